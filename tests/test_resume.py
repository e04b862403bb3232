"""Exact resume through the real CLI: a run killed (SIGKILL) or stopped (SIGTERM) and then
rerun with the same command ends with the same distilled set, bit for bit, as a run that
was never interrupted; a rerun with another config is refused.

Every run is a real `rcig distill` subprocess on 4 emulated CPU devices. They share a JAX
persistent compilation cache (a fresh folder for this module), so only the first run pays
for XLA compilation; a cached executable is the same program, so this cannot hide a
resume difference.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import conftest
from rcig.checkpoint import CheckpointStore

pytestmark = pytest.mark.slow

N_STEPS, EVERY = 60, 5  # enough steps after the first checkpoint to stop the run mid-way
RUN_TIMEOUT_S = 900


def rcig_exe() -> str:
    here = Path(sys.executable).parent / "rcig"
    return str(here) if here.exists() else (shutil.which("rcig") or "rcig")


def command(out: Path, ipc: int = 1) -> list[str]:
    return [rcig_exe(), "distill", "--dataset", "digits", "--ipc", str(ipc), "--steps", str(N_STEPS),
            "--out", str(out), "--no-eval",
            "--set", f"checkpoint.every_steps={EVERY}", "--set", "lr_tune.skip=true",
            "--set", "model.width=8", "--set", "outer.real_batch_size=64",
            "--set", "pool.model_count=3"]


@pytest.fixture(scope="module")
def run_env(tmp_path_factory):
    env = {**conftest.loopback_env(), "PATH": os.environ.get("PATH", ""),
           "HOME": os.environ.get("HOME", "/tmp"),
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    return env


def start(out: Path, env: dict, ipc: int = 1, tag: str = "run") -> subprocess.Popen:
    log = out.parent / f"{out.name}.{tag}.log"
    return subprocess.Popen(command(out, ipc), env=env, cwd=conftest.ROOT,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def log_of(out: Path, tag: str) -> str:
    return (out.parent / f"{out.name}.{tag}.log").read_text()[-4000:]


def run_to_end(out: Path, env: dict, ipc: int = 1, tag: str = "run") -> tuple[int, str]:
    p = start(out, env, ipc, tag)
    rc = p.wait(timeout=RUN_TIMEOUT_S)
    return rc, log_of(out, tag)


def wait_for_checkpoint(out: Path, step: int, p: subprocess.Popen, tag: str) -> int:
    """Poll the run's checkpoint folder until a step >= `step` is committed."""
    store = CheckpointStore(str(out))  # reads only: creates and deletes nothing
    deadline = time.time() + RUN_TIMEOUT_S
    while time.time() < deadline:
        latest = store.latest_step()
        if latest is not None and latest >= step:
            return latest
        assert p.poll() is None, f"run exited ({p.returncode}) before checkpoint {step}:\n{log_of(out, tag)}"
        time.sleep(0.05)
    raise TimeoutError(f"no checkpoint >= {step} in {out} after {RUN_TIMEOUT_S} s")


def metrics(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"metrics.jsonl steps repeat or go back: {steps}"
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith("time/")} for r in rows}


def assert_same_result(out: Path, ref: Path, resumed_at: int) -> None:
    a, b = np.load(out / "distilled.npz"), np.load(ref / "distilled.npz")
    assert {"x_proto", "y_proto", "log_temp"} <= set(a.files) and set(a.files) == set(b.files)
    for k in a.files:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), f"distilled.npz[{k}] differs"
    got, want = metrics(out), metrics(ref)
    assert sorted(got) == list(range(1, N_STEPS + 1))
    for s in range(resumed_at + 1, N_STEPS + 1):
        assert got[s] == want[s], f"metrics of step {s} differ after resuming at {resumed_at}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, run_env) -> Path:
    """An uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    rc, log = run_to_end(out, run_env)
    assert rc == 0, log
    assert (out / "distilled.npz").exists() and CheckpointStore(str(out)).latest_step() == N_STEPS
    return out


def _signal_after_a_checkpoint(out: Path, run_env, sig: int, tag: str) -> int:
    """Start a run, send it `sig` once its first periodic checkpoint is there; its exit code."""
    p = start(out, run_env, tag=tag)
    wait_for_checkpoint(out, EVERY, p, tag)
    assert p.poll() is None, "the run finished before the signal; raise N_STEPS"
    p.send_signal(sig)
    return p.wait(timeout=300)


def _rerun_matches_reference(out: Path, run_env, reference: Path, stopped_at: int) -> None:
    assert EVERY <= stopped_at < N_STEPS and not (out / "distilled.npz").exists()
    rc, log = run_to_end(out, run_env, tag="resumed")
    assert rc == 0, log
    assert_same_result(out, reference, stopped_at)


def test_sigkill_then_rerun_is_bitwise_equal(reference, run_env, tmp_path):
    out = tmp_path / "run"
    assert _signal_after_a_checkpoint(out, run_env, signal.SIGKILL, "killed") == -signal.SIGKILL
    _rerun_matches_reference(out, run_env, reference, CheckpointStore(str(out)).latest_step())


def test_sigterm_checkpoints_current_step_exits_75_and_resumes_bitwise(reference, run_env, tmp_path):
    out = tmp_path / "run"
    assert _signal_after_a_checkpoint(out, run_env, signal.SIGTERM, "terminated") == 75, log_of(out, "terminated")
    stopped_at = max(metrics(out))  # the step it was on: finished, logged, then checkpointed
    assert CheckpointStore(str(out)).latest_step() == stopped_at
    _rerun_matches_reference(out, run_env, reference, stopped_at)


def test_resume_with_other_ipc_is_refused(reference, run_env, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    ck = out / "checkpoints"
    before = sorted((p.relative_to(ck), p.stat().st_mtime_ns) for p in ck.rglob("*"))
    npz = (out / "distilled.npz").read_bytes()

    rc, log = run_to_end(out, run_env, ipc=2, tag="other-ipc")
    assert rc not in (0, 75), log
    assert "ipc" in log and "Traceback" not in log, log
    assert sorted((p.relative_to(ck), p.stat().st_mtime_ns) for p in ck.rglob("*")) == before
    assert (out / "distilled.npz").read_bytes() == npz


def test_restart_moves_old_checkpoints_aside_and_only_force_deletes(tmp_path, run_env):
    """--restart starts over without deleting the old checkpoints; --restart --force deletes them."""
    out = tmp_path / "run"
    short = lambda extra: [c if c != str(N_STEPS) else "6" for c in command(out)] + extra  # noqa: E731
    assert subprocess.run(short([]), env=run_env, cwd=conftest.ROOT, capture_output=True).returncode == 0
    first = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert first, "no checkpoints written"

    proc = subprocess.run(short(["--restart"]), env=run_env, cwd=conftest.ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    aside = [p for p in out.iterdir() if p.name.startswith("checkpoints.old-")]
    assert len(aside) == 1, "the old checkpoints were not kept aside"
    assert sorted(p.name for p in aside[0].iterdir() if p.name[0].isdigit()) == [n for n in first if n[0].isdigit()]

    proc = subprocess.run(short(["--restart", "--force"]), env=run_env, cwd=conftest.ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert CheckpointStore(str(out)).latest_step() == 6
    assert len([p for p in out.iterdir() if p.name.startswith("checkpoints.old-")]) == 1  # --force deletes only the live folder


def _other_run_folder(out: Path, **over) -> dict[str, bytes]:
    """A run folder holding another run's results (config.json, distilled.npz, eval.json),
    without checkpoints; returns its files' bytes."""
    from rcig.config import make_config

    out.mkdir(parents=True)
    other = make_config("digits", 1, overrides={"steps": N_STEPS, "model.width": 16, **over})
    (out / "config.json").write_text(other.to_json() + "\n")
    np.savez(out / "distilled.npz", x_proto=np.zeros((10, 8, 8, 1), np.float32), config_json=np.asarray(other.to_json()))
    (out / "eval.json").write_text('{"mean": 0.5}\n')
    return {p.name: p.read_bytes() for p in out.iterdir()}


def test_folder_holding_another_run_is_refused_naming_the_field(tmp_path, run_env):
    out = tmp_path / "run"
    before = _other_run_folder(out)
    proc = subprocess.run(command(out), env=run_env, cwd=conftest.ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode not in (0, 75), proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model.width (saved 16, now 8)" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "lease.json"}
    assert after == before  # nothing written but the (released) lease of the refused attempt

    # only distilled.npz (its config inside) says which run the folder holds
    (out / "config.json").unlink()
    proc = subprocess.run(command(out), env=run_env, cwd=conftest.ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode not in (0, 75) and "model.width (saved 16, now 8)" in proc.stderr, proc.stderr[-3000:]
    assert not (out / "config.json").exists()


def test_run_folder_check_uses_run_identity(tmp_path):
    from rcig.config import apply_overrides, make_config
    from rcig.distill import RunFolderError, check_run_folder

    out = tmp_path / "run"
    _other_run_folder(out, **{"model.width": 8})
    cfg = make_config("digits", 1, overrides={"steps": N_STEPS, "model.width": 8})
    check_run_folder(str(out), apply_overrides(cfg, ["eval.runs=2", "checkpoint.keep=1", "data_dir=/x"]))
    with pytest.raises(RunFolderError, match=r"steps \(saved 60, now 61\)"):
        check_run_folder(str(out), apply_overrides(cfg, ["steps=61"]))  # results there: same steps only
    for name in ("distilled.npz", "eval.json"):
        (out / name).unlink()
    check_run_folder(str(out), apply_overrides(cfg, ["steps=61"]))  # stopped before any result
    with pytest.raises(RunFolderError, match=r"seed \(saved 0, now 1\)"):
        check_run_folder(str(out), apply_overrides(cfg, ["seed=1"]))


def test_restart_moves_another_runs_files_aside(tmp_path, run_env):
    out = tmp_path / "run"
    before = _other_run_folder(out)
    cmd = [c if c != str(N_STEPS) else "6" for c in command(out)] + ["--restart"]
    proc = subprocess.run(cmd, env=run_env, cwd=conftest.ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    aside = [p for p in out.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1, sorted(p.name for p in out.iterdir())
    assert {p.name: p.read_bytes() for p in aside[0].iterdir()} == before
    assert json.loads((out / "config.json").read_text())["model"]["width"] == 8
    assert CheckpointStore(str(out)).latest_step() == 6
