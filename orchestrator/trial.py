"""The Ray Tune trial: one sweep point, resumable, with its own record and two budgets.

`make_trainable(ctx)` returns the function trainable Tune runs. Per attempt it:

1. resolves the trial's config and key (params + hash of config and seed) and its folder
   `<sweep>/trials/<key>/`; a trial already COMPLETED there is adopted, not rerun;
2. classifies how the previous attempt ended (its record has no outcome -> it was lost
   with its node or driver: one preemption) and checks both budgets: `max_preemptions`
   (node losses, notices) and `max_failures` (exceptions in the trial);
3. waits while a previous attempt elsewhere still holds the trial's lease (it is
   committing its preemption-notice checkpoint);
4. runs the distillation in a child process (`orchestrator.trial_worker`) with the
   device environment of its resources, relays metrics to Tune with the Orbax
   checkpoint step and URI (never the checkpoint itself: no second upload), and keeps
   the record (`trial.json`) up to date, at most every few seconds;
5. ends COMPLETED (eval done, final metrics reported), PREEMPTED (notice honoured; Ray
   reruns it, it resumes at that step) or FAILED (Ray reruns it until `max_failures`;
   then ERROR with the traceback, and Tune is told not to retry: see
   `orchestrator.callbacks`).

Inside the trial only `ray.tune.report` and `ray.tune.get_context` are used.

Example:
    >>> trainable = make_trainable(TrialContext(sweep_uri, spec))  # doctest: +SKIP
    >>> tune.Tuner(trainable, param_space=...)                      # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Mapping

from orchestrator import manifest as mf
from orchestrator.spec import SweepSpec
from orchestrator.trial_worker import EXIT_PREEMPTED, LEASE, lease_heartbeat_s
from rcig import storage

PARAMS_KEY = "_rcig_params"  # resume fallback wraps recorded params under this key
TERMINAL = "rcig/terminal"  # reported just before a final raise: Tune must not retry
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TrialPreempted(RuntimeError):
    """The attempt stopped on a preemption notice after committing a checkpoint."""


class TrialFailed(RuntimeError):
    """The distillation raised; the message carries the child's traceback."""


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a sweep shares (pickled into Tune's trainable)."""

    sweep_uri: str
    spec: SweepSpec


def trial_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """The search parameters of a trial from Tune's config (plain or resume-wrapped)."""
    if PARAMS_KEY in config:
        return dict(config[PARAMS_KEY])
    return {k: v for k, v in config.items() if not k.startswith("_")}


def key_of(spec: SweepSpec, config: Mapping[str, Any]) -> str:
    params = trial_params(config)
    return mf.trial_key(params, spec.trial_config(params))


def make_trainable(ctx: TrialContext):
    """Tune function trainable with the spec's per-trial resources attached."""
    from ray import tune

    def rcig_trial(config: dict) -> None:
        run_trial(config, ctx)

    return tune.with_resources(rcig_trial, ctx.spec.ray_resources())


def final_metrics(rec: mf.TrialRecord, trial_uri: str, spec: SweepSpec) -> dict[str, Any]:
    """The metrics a finished trial reports to Tune (and `best` ranks by)."""
    out: dict[str, Any] = {**rec.metrics, "step": rec.step or 0}
    if rec.eval:
        out["eval/mean"] = rec.eval.get("mean")
        out["eval/std"] = rec.eval.get("std")
        base = rec.eval.get("baseline") or {}
        if base:
            out["eval/baseline_mean"] = base.get("mean")
    out.update(_pointer(rec, trial_uri))
    out["rcig/accelerator_s"] = rec.accelerator_s
    if spec.cost:
        out["rcig/cost"] = rec.accelerator_s / 3600 * spec.cost["per_accelerator_hour"]
    return {k: v for k, v in out.items() if v is not None}


def _pointer(rec: mf.TrialRecord, trial_uri: str) -> dict[str, Any]:
    """What Tune gets instead of a checkpoint: the Orbax step and folder URI."""
    out = {"rcig/trial_key": rec.key, "rcig/checkpoint_uri": storage.join(trial_uri, "checkpoints")}
    if rec.checkpoint_step is not None:
        out["rcig/checkpoint_step"] = rec.checkpoint_step
    return out


def run_trial(config: Mapping[str, Any], ctx: TrialContext) -> None:
    """One attempt of one trial (see the module docstring)."""
    from ray import tune

    spec = ctx.spec
    params = trial_params(config)
    cfg = spec.trial_config(params)
    key = mf.trial_key(params, cfg)
    uri = mf.trial_uri(ctx.sweep_uri, key)
    count, unit = spec.accelerators_per_trial()
    rec = mf.read_record(ctx.sweep_uri, key) or mf.TrialRecord(
        key=key, params=params, fingerprint=cfg.fingerprint(), config=cfg.to_dict(),
        accelerators=count, accelerator_unit=unit)

    if rec.status in mf.FINAL_STATES:  # adopted: finished before, never rerun
        tune.report(final_metrics(rec, uri, spec))
        return
    if rec.history and rec.history[-1].get("outcome") is None:
        rec.history[-1].update(outcome="lost", ended=rec.history[-1].get("updated"))
        rec.preemptions += 1
    if rec.failures_used > spec.max_failures or rec.preemptions_used > spec.max_preemptions:
        _terminal(rec, ctx, "budget exhausted before this attempt")
    _wait_for_lease(uri, rec.attempts)

    att = rec.open_attempt(worker_pid=os.getpid(), **_ray_ids())
    mf.write_record(ctx.sweep_uri, rec)
    code, result, error = _run_child(rec, cfg, uri, ctx, att)
    if result is not None and "resumed_from" in result:  # what the run really started from
        att["start_step"] = result["resumed_from"] or 0

    if code == 0 and result is not None:
        rec.step = result.get("step", rec.step)
        rec.metrics.update(result.get("final_metrics") or {})
        rec.eval = result.get("eval")
        rec.wall_s = result.get("wall_s")
        if result.get("checkpoint_step") is not None:
            rec.checkpoint_step = result["checkpoint_step"]
        rec.close_attempt("completed")
        rec.status = mf.COMPLETED
        mf.write_record(ctx.sweep_uri, rec)
        tune.report(final_metrics(rec, uri, spec))
        return
    if code == EXIT_PREEMPTED:
        if result is not None and result.get("checkpoint_step") is not None:
            rec.checkpoint_step = result["checkpoint_step"]
        rec.close_attempt("preempted")
        rec.preemptions += 1
        rec.status = mf.PREEMPTED
        mf.write_record(ctx.sweep_uri, rec)
        if rec.preemptions_used > spec.max_preemptions:
            _terminal(rec, ctx, "max_preemptions reached")
        raise TrialPreempted(f"trial {key}: preemption notice; checkpoint committed at step "
                             f"{rec.checkpoint_step}; it resumes from there when rescheduled")
    tb = error or f"trial worker exited with code {code} without a traceback (killed? out of memory?)"
    rec.errors.append({"attempt": rec.attempts, "at": time.time(), "traceback": tb[-8000:]})
    rec.close_attempt("failed")
    rec.failures += 1
    rec.status = mf.FAILED
    mf.write_record(ctx.sweep_uri, rec)
    if rec.failures_used > spec.max_failures:
        _terminal(rec, ctx, f"failed {rec.failures_used} times (max_failures={spec.max_failures})")
    raise TrialFailed(f"trial {key} failed (attempt {rec.attempts}); retrying from its last "
                      f"checkpoint:\n{tb}")


def _terminal(rec: mf.TrialRecord, ctx: TrialContext, why: str) -> None:
    from ray import tune

    rec.status = mf.ERROR
    mf.write_record(ctx.sweep_uri, rec)
    tune.report({TERMINAL: 1, "rcig/trial_key": rec.key})  # the callback stops Tune's retries
    raise TrialFailed(f"trial {rec.key}: {why}; giving up. Last error:\n{rec.last_error() or why}")


def _ray_ids() -> dict[str, str | None]:
    """Tune trial id and Ray node id of this attempt (for status and node-loss tests)."""
    import ray
    from ray import tune

    try:
        trial_id = tune.get_context().get_trial_id()
    except Exception:  # noqa: BLE001 - outside Tune (direct calls)
        trial_id = None
    node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    return {"ray_trial_id": trial_id, "node_id": node_id}


def _wait_for_lease(trial_uri: str, attempts: int) -> None:
    """Wait while another attempt's worker still holds the lease (committing its notice
    checkpoint); a lease not refreshed for 3 heartbeats is stale (its holder is gone)."""
    uri = storage.join(trial_uri, LEASE)
    stale = 3 * lease_heartbeat_s()
    deadline = time.time() + 10 * stale
    while time.time() < deadline:
        try:
            lease = json.loads(storage.read_text(uri))
        except (FileNotFoundError, ValueError):
            return
        if lease.get("released") or time.time() - float(lease.get("t", 0)) > stale:
            return
        time.sleep(min(1.0, stale / 3))


def _warn_if_children_die_with_worker() -> None:
    if os.environ.get("RAY_kill_child_processes_on_worker_exit") != "0":
        print("rcig: warning: this Ray job kills child processes with their worker, so a "
              "preemption notice cannot be checkpointed; start Ray through `rcig sweep` "
              "(orchestrator.sweep.init_ray) or set RAY_kill_child_processes_on_worker_exit=0",
              file=sys.stderr)


def _child_env(spec: SweepSpec) -> dict[str, str]:
    from orchestrator.devices import configure_trial_devices

    env = dict(os.environ)
    configure_trial_devices(spec.resources, env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # trials may share a node
    # Trials of a sweep on one node compile the same programs: share JAX's disk cache.
    cache_root = env.get("RCIG_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "rcig-sweep")
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(cache_root, "jax"))
    return env


def _run_child(rec: mf.TrialRecord, cfg, uri: str, ctx: TrialContext,
               att: dict[str, Any]) -> tuple[int, dict | None, str | None]:
    """Run the worker; relay its events to Tune and the record; return (code, result, tb)."""
    from ray import tune

    job = {"config": cfg.to_dict(), "out_uri": uri, "attempt": rec.attempts,
           "parent_pid": os.getpid()}
    fd, job_path = tempfile.mkstemp(prefix="rcig-trial-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(job, f)
    _warn_if_children_die_with_worker()
    r, w = os.pipe()
    try:  # own session: not killed with the worker's process group; PDEATHSIG tells it
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.trial_worker", job_path, str(w)],
            env=_child_env(ctx.spec), pass_fds=(w,), cwd=REPO_ROOT, start_new_session=True)
    finally:
        os.close(w)
    att["pid"] = proc.pid
    mf.write_record(ctx.sweep_uri, rec)
    result = error = None
    min_gap = float(os.environ.get("RCIG_RECORD_MIN_INTERVAL_S", "2"))
    last_write = time.time()
    try:
        for line in _lines(r, idle_s=float(os.environ.get("RCIG_RECORD_IDLE_S", "60"))):
            if line is None:  # quiet (compiling, evaluating): keep the record fresh
                rec.tick()
                mf.write_record(ctx.sweep_uri, rec)
                last_write = time.time()
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            kind = ev.get("event")
            if kind == "metrics":
                rec.step = ev["step"]
                rec.metrics = {k: float(v) for k, v in ev["metrics"].items()}
                tune.report({**rec.metrics, "step": rec.step, **_pointer(rec, uri)})
            elif kind == "checkpoint":
                rec.checkpoint_step = ev["step"]
            elif kind == "result":
                result = ev
            elif kind == "error":
                error = ev.get("traceback")
            if kind in ("metrics", "checkpoint") and time.time() - last_write >= min_gap:
                rec.tick()
                mf.write_record(ctx.sweep_uri, rec)
                last_write = time.time()
        code = proc.wait()
    finally:
        if proc.poll() is None:  # Tune stopped us: let the worker checkpoint, then go
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        os.unlink(job_path)
    return code, result, error


def _lines(fd: int, idle_s: float):
    """Lines from a pipe fd until EOF; yields None after each `idle_s` without data."""
    import select

    buf = b""
    try:
        while True:
            ready, _, _ = select.select([fd], [], [], idle_s)
            if not ready:
                yield None
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
            *done, buf = buf.split(b"\n")
            for line in done:
                yield line.decode(errors="replace")
    finally:
        os.close(fd)
