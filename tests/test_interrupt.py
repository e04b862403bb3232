"""A stop request is honoured in every phase of a run, within seconds, with exit 75, and
what was committed is kept: a rerun does not tune again, and a run stopped during its
evaluation goes back to the evaluation (keeping the finished evaluation runs), not to the
distillation.

Real `rcig distill` (and trial worker) processes, real SIGTERM. Each process runs with
``RCIG_TRACE_PHASES=1``, which prints ``[phase] NAME`` as each phase starts; the tests
send the signal once the phase they target has begun. Processes share a JAX persistent
compilation cache (a fresh folder for this module) so reruns do not compile again.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import conftest
from rcig.checkpoint import CheckpointStore

STOP_WITHIN_S = 10.0
RUN_TIMEOUT_S = 900
N_STEPS = 12
SMALL = ["--set", "model.width=8", "--set", "outer.real_batch_size=64", "--set", "pool.model_count=3",
         "--set", "checkpoint.every_steps=6", "--set", "lr_tune.skip=false", "--set", "lr_tune.max_probes=12",
         "--set", "loop=scan",
         "--set", "eval.runs=3", "--set", "eval.steps=400", "--set", "eval.baseline=true"]


def rcig_exe() -> str:
    here = Path(sys.executable).parent / "rcig"
    return str(here) if here.exists() else (shutil.which("rcig") or "rcig")


def distill_cmd(out: Path, *extra: str) -> list[str]:
    return [rcig_exe(), "distill", "--dataset", "digits", "--ipc", "1", "--steps", str(N_STEPS),
            "--out", str(out), *SMALL, *extra]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    return {**conftest.loopback_env(), "PATH": os.environ.get("PATH", ""),
            "HOME": os.environ.get("HOME", "/tmp"), "RCIG_TRACE_PHASES": "1",
            "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


class Proc:
    """A subprocess whose stderr lines are collected by a thread (so the test can wait
    for a phase line without blocking on the pipe)."""

    def __init__(self, cmd: list[str], env: dict, **kw):
        self.p = subprocess.Popen(cmd, env=env, cwd=conftest.ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, **kw)
        self.lines: list[str] = []
        self._q: queue.Queue = queue.Queue()
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        for line in self.p.stdout:
            self.lines.append(line)
            self._q.put(line)
        self._q.put(None)

    def __enter__(self) -> "Proc":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()

    def kill(self) -> None:
        """SIGKILL, if the process is still running."""
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()

    @property
    def log(self) -> str:
        return "".join(self.lines)[-6000:]

    def wait_for(self, prefix: str, timeout: float = RUN_TIMEOUT_S) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                line = self._q.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"exited ({self.p.wait()}) before {prefix!r}:\n{self.log}")
            if line.startswith(prefix):
                return
        raise AssertionError(f"no {prefix!r} within {timeout} s:\n{self.log}")

    def stop(self) -> tuple[int, float]:
        """SIGTERM; (exit code, seconds from the signal to the exit)."""
        t0 = time.monotonic()
        self.p.send_signal(signal.SIGTERM)
        try:
            rc = self.p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running 60 s after SIGTERM:\n{self.log}") from None
        self._t.join(timeout=10)
        return rc, time.monotonic() - t0

    def finish(self, timeout: float = RUN_TIMEOUT_S) -> int:
        try:
            rc = self.p.wait(timeout=timeout)
        finally:
            self.kill()
        self._t.join(timeout=10)
        return rc


def stop_in_phase(cmd: list[str], env: dict, phase: str, after_s: float = 1.0) -> tuple[int, float, str]:
    """Start `cmd`, SIGTERM it `after_s` into `phase`; (rc, seconds to exit, output)."""
    with Proc(cmd, env) as p:
        p.wait_for(f"[phase] {phase}")
        time.sleep(after_s)
        assert p.p.poll() is None, f"exited before the signal:\n{p.log}"
        rc, took = p.stop()
    return rc, took, p.log


def assert_stopped_in_time(rc: int, took: float, log: str) -> None:
    """The exit of a stopped run: code 75, within STOP_WITHIN_S of the SIGTERM."""
    assert rc == 75, log
    assert took < STOP_WITHIN_S, f"{took:.1f} s from SIGTERM to exit"


def run(cmd: list[str], env: dict) -> tuple[int, str]:
    p = Proc(cmd, env)
    return p.finish(), p.log


@pytest.fixture(scope="module")
def stopped_in_tune(tmp_path_factory, env):
    """A run stopped during its LR search, then rerun to the end without evaluation."""
    out = tmp_path_factory.mktemp("tune") / "run"
    rc, took, log = stop_in_phase(distill_cmd(out), env, "tune")
    stopped = {"rc": rc, "took": took, "log": log, "files": sorted(p.name for p in out.iterdir())}
    rc2, log2 = run(distill_cmd(out, "--no-eval"), env)
    return out, stopped, (rc2, log2)


def copy_of_tuned_run(stopped_in_tune, dest: Path) -> Path:
    """`dest`: a copy of the `stopped_in_tune` run, finished without evaluation."""
    done, _, (rc0, log0) = stopped_in_tune
    assert rc0 == 0, log0
    shutil.copytree(done, dest)
    return dest


@pytest.mark.slow
def test_sigterm_during_lr_search_exits_75_within_10_s(stopped_in_tune):
    out, stopped, (rc2, log2) = stopped_in_tune
    assert_stopped_in_time(stopped["rc"], stopped["took"], stopped["log"])
    assert "stopped by SIGTERM during tune" in stopped["log"]
    assert "tuning.json" not in stopped["files"] and "checkpoints" not in stopped["files"]
    # nothing was tuned yet: the rerun searches, then runs to the end
    assert rc2 == 0, log2
    assert "LR search: inner" in log2 and "reusing" not in log2
    assert CheckpointStore(str(out)).latest_step() == N_STEPS and (out / "distilled.npz").exists()


@pytest.mark.slow
def test_sigterm_during_first_compile_keeps_tuning(tmp_path, env):
    # Another EMA decay: the LR search and init (cached by the run above, when it ran)
    # are the same programs; the step is not, so its compile takes seconds.
    out = tmp_path / "run"
    cmd = distill_cmd(out, "--no-eval", "--set", "outer.ema_decay=0.98")
    rc, took, log = stop_in_phase(cmd, env, "compile")
    assert_stopped_in_time(rc, took, log)
    assert "stopped by SIGTERM during compile" in log
    tuning = json.loads((out / "tuning.json").read_text())
    assert not (out / "metrics.jsonl").read_text().strip()

    # As if the stop had come before checkpoint 0 was committed: tuning.json alone
    # must spare the rerun the search.
    before_ckpt = tmp_path / "no-ckpt"
    shutil.copytree(out, before_ckpt)
    shutil.rmtree(before_ckpt / "checkpoints", ignore_errors=True)

    rc, log = run(cmd, env)  # resumes from checkpoint 0 (or reuses tuning.json)
    assert rc == 0, log
    assert "LR search: inner" not in log, log
    assert json.loads((out / "tuning.json").read_text()) == tuning

    cmd2 = distill_cmd(before_ckpt, "--no-eval", "--set", "outer.ema_decay=0.98")
    rc, log = run(cmd2, env)
    assert rc == 0, log
    assert "LR search: reusing tuning.json" in log and "probes" not in log, log
    assert (out / "distilled.npz").read_bytes() != b""
    import numpy as np

    a, b = np.load(out / "distilled.npz"), np.load(before_ckpt / "distilled.npz")
    assert np.array_equal(a["x_proto"], b["x_proto"]) and np.array_equal(a["y_proto"], b["y_proto"])

    # A tuning.json of another run is not reused.
    doc = json.loads((before_ckpt / "tuning.json").read_text())
    doc["identity"]["model.width"] = 9
    (before_ckpt / "tuning.json").write_text(json.dumps(doc))
    from rcig.config import make_config
    from rcig.distill import load_tuning

    cfg = make_config("digits", 1, overrides=[a for a in SMALL if a != "--set"]
                      + ["steps=12", "outer.ema_decay=0.98"])
    assert load_tuning(str(out), cfg) is not None and load_tuning(str(before_ckpt), cfg) is None


@pytest.mark.slow
def test_sigterm_during_eval_resumes_the_eval_not_the_distillation(stopped_in_tune, env, tmp_path):
    out = copy_of_tuned_run(stopped_in_tune, tmp_path / "run")
    metrics_before = (out / "metrics.jsonl").read_bytes()
    npz_before = (out / "distilled.npz").read_bytes()

    with Proc(distill_cmd(out), env) as p:
        p.wait_for("[phase] eval")
        partial = out / "eval.partial.json"
        deadline = time.time() + RUN_TIMEOUT_S
        while time.time() < deadline:  # stop once at least one evaluation run is finished
            if partial.exists() and json.loads(partial.read_text())["distilled"]:
                break
            assert p.p.poll() is None, p.log
            time.sleep(0.05)
        rc, took = p.stop()
    assert_stopped_in_time(rc, took, p.log)
    assert "stopped by SIGTERM during eval" in p.log and "already complete at step" in p.log
    assert not (out / "eval.json").exists()
    kept = json.loads(partial.read_text())
    assert kept["distilled"]

    rc, log = run(distill_cmd(out), env)
    assert rc == 0, log
    assert "already complete at step 12" in log and "[phase] compile" not in log and "LR search" not in log, log
    assert (out / "metrics.jsonl").read_bytes() == metrics_before  # the loop did not run again
    import numpy as np

    import io

    after, before = np.load(out / "distilled.npz"), np.load(io.BytesIO(npz_before))
    assert all(np.array_equal(after[k], before[k]) for k in before.files)
    ev = json.loads((out / "eval.json").read_text())
    assert len(ev["accs"]) == 3 and ev["baseline"] is not None
    for r, acc in kept["distilled"].items():
        assert ev["accs"][int(r)] == acc  # finished runs were kept, not redone
    assert not partial.exists()


@pytest.mark.slow
def test_trial_worker_stopped_outside_the_loop_exits_75_and_reports_the_checkpoint(stopped_in_tune, env, tmp_path):
    out = copy_of_tuned_run(stopped_in_tune, tmp_path / "trial")
    from rcig.config import DistillConfig

    cfg = json.loads((out / "config.json").read_text())
    DistillConfig.from_dict(cfg)
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"config": cfg, "out_uri": str(out), "attempt": 1, "parent_pid": os.getpid()}))
    r, w = os.pipe()
    try:
        p = Proc([sys.executable, "-m", "orchestrator.trial_worker", str(job), str(w)], env, pass_fds=(w,))
    finally:
        os.close(w)
    with p:
        p.wait_for("[phase] eval")
        time.sleep(0.5)
        rc, took = p.stop()
    with os.fdopen(r) as f:
        events = [json.loads(line) for line in f if line.strip()]
    assert_stopped_in_time(rc, took, p.log)
    results = [e for e in events if e.get("event") == "result"]
    assert len(results) == 1, events
    assert results[0]["status"] == "preempted" and results[0]["checkpoint_step"] == N_STEPS
    assert json.loads((out / "lease.json").read_text())["released"] is True


# ---- the mechanism, without JAX: fast ---------------------------------------------------------
SCRIPT = r"""
import os, sys, threading, time
from rcig.preemption import StopControl, phase
with StopControl(on_abort=lambda name: print("hook", name, flush=True)) as ctl:
    with phase(sys.argv[1], abortable=sys.argv[2] == "1"):
        print("ready", flush=True)
        threading.Event().wait(float(sys.argv[3]))  # blocked, like a long compile
    print("left the phase", ctl.requested(), flush=True)
sys.exit(3)
"""


@pytest.mark.parametrize("abortable,deadline,expect_s", [("1", "30", (0.0, 2.0)), ("0", "2", (1.5, 5.0))])
def test_stop_control_exits_75_from_a_blocked_phase(abortable, deadline, expect_s):
    env = {**os.environ, "RCIG_STOP_DEADLINE_S": deadline, "PYTHONPATH": str(conftest.ROOT)}
    p = Proc([sys.executable, "-c", SCRIPT, "work", abortable, "60"], env)
    p.wait_for("ready", timeout=60)
    rc, took = p.stop()
    assert rc == 75, p.log
    assert expect_s[0] <= took < expect_s[1], took
    assert "hook work" in p.log and "stopped by SIGTERM during work" in p.log
    assert "left the phase" not in p.log


def test_stop_control_lets_a_cooperative_phase_finish():
    env = {**os.environ, "RCIG_STOP_DEADLINE_S": "30", "PYTHONPATH": str(conftest.ROOT)}
    p = Proc([sys.executable, "-c", SCRIPT, "loop", "0", "1.5"], env)
    p.wait_for("ready", timeout=60)
    p.p.send_signal(signal.SIGTERM)
    assert p.finish(timeout=30) == 3, p.log
    assert "left the phase True" in p.log and "hook" not in p.log
