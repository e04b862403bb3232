"""The Ray Tune trial: one sweep point, resumable, with its own record and two budgets.

`make_trainable(ctx)` returns the function trainable Tune runs. Per attempt it:

1. resolves the trial's config and key (`resolve`: its parameters, its sample index when
   the sweep draws several samples, and the hash of its run identity) and its folder
   `<sweep>/trials/<key>/`;
2. applies `lifecycle.start` to its record (compare-and-swap): a finished trial is
   adopted, not rerun; an attempt left open was lost with its node or driver (one
   preemption); a used-up budget (`max_failures`, `max_preemptions`) gives up;
3. runs the distillation in a child process (`orchestrator.trial_worker`) with the device
   environment of its resources. The child takes the folder's lease (`rcig.lease`)
   before writing anything, so two attempts never write one folder. Metrics go to Tune
   with the Orbax checkpoint step and URI (never the checkpoint itself: no second
   upload), and to the record at most every few seconds;
4. applies `lifecycle.finish` with how the attempt ended: COMPLETED (final metrics
   reported), PREEMPTED (Ray reruns it; it resumes at its last committed step), FAILED
   (rerun until `max_failures`) or ERROR (Tune is told not to retry: see
   `orchestrator.callbacks`).

Inside the trial only `ray.tune.report` and `ray.tune.get_context` are used.

Example:
    >>> trainable = make_trainable(TrialContext(sweep_uri, spec))  # doctest: +SKIP
    >>> tune.Tuner(trainable, param_space=...)                      # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Mapping

from orchestrator import lifecycle as lc
from orchestrator import manifest as mf
from orchestrator.spec import SweepSpec
from orchestrator.trial_worker import EXIT_LEASE_LOST
from rcig import storage
from rcig.config import identity_hash
from rcig.preemption import EXIT_PREEMPTED

PARAMS_KEY = "_rcig_params"  # (older sweeps) resume fallback: recorded params
RECORDED_KEY = "_rcig_recorded"  # resume fallback: {"params": ..., "sample": ...} of a record
SAMPLE_KEY = "_rcig_sample"  # index of a sample when a sweep draws several (num_samples > 1)
ORIGIN_KEY = "_rcig_origin"  # PBT: the trial's folder key, fixed when it joined (orchestrator.pbt)
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
    if RECORDED_KEY in config:
        return dict(config[RECORDED_KEY]["params"])
    if PARAMS_KEY in config:
        return dict(config[PARAMS_KEY])
    return {k: v for k, v in config.items() if not k.startswith("_")}


def trial_sample(config: Mapping[str, Any], trial_id: str | None = None) -> int | str | None:
    """Which sample of the sweep a trial is: the index Tune's grid gave it (several samples
    of a basic search), else, for a searcher, its Tune trial id (ids survive a driver
    restore); None when the sweep draws one sample per point."""
    if RECORDED_KEY in config:
        return config[RECORDED_KEY].get("sample")
    if PARAMS_KEY in config:
        return None
    if SAMPLE_KEY in config:
        return config[SAMPLE_KEY]
    return trial_id


def resolve(spec: SweepSpec, config: Mapping[str, Any], trial_id: str | None = None):
    """(params, sample, config, key) of a trial. Samples after the first of a repeated
    point get their own seed (`seed + sample`) unless `seed` is searched."""
    params = trial_params(config)
    sample = trial_sample(config, trial_id if spec.searcher_proposes() else None)
    cfg = spec.trial_config(params)
    if isinstance(sample, int) and sample and "seed" not in params:
        cfg = dataclasses.replace(cfg, seed=cfg.seed + sample)
    # A PBT trial keeps its folder when an exploit changes its config (orchestrator.pbt).
    own = config.get(ORIGIN_KEY) or (config.get(RECORDED_KEY) or {}).get("key")
    return params, sample, cfg, own or mf.trial_key(params, cfg, sample)


def key_of(spec: SweepSpec, config: Mapping[str, Any], trial_id: str | None = None) -> str:
    return resolve(spec, config, trial_id)[3]


def make_trainable(ctx: TrialContext):
    """Tune function trainable with the spec's per-trial resources attached."""
    from ray import tune

    def rcig_trial(config: dict) -> None:
        run_trial(config, ctx)

    return tune.with_resources(rcig_trial, _trial_resources(ctx.spec))


def _trial_resources(spec: SweepSpec):
    """One host: its bundle; several: a STRICT_SPREAD placement group, one bundle per host
    (`orchestrator.multihost`)."""
    from orchestrator.multihost import trainable_resources

    return trainable_resources(spec)


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


def budgets(spec: SweepSpec) -> lc.Budgets:
    return lc.Budgets(spec.max_failures, spec.max_preemptions)


def run_trial(config: Mapping[str, Any], ctx: TrialContext) -> None:
    """One attempt of one trial: the lifecycle's `start`, the worker, its `finish`.

    Every change to the record goes through `RecordStore.update` (compare-and-swap) with a
    transition of `orchestrator.lifecycle`; this function only carries out the actions.
    """
    from ray import tune

    spec = ctx.spec
    params, sample, cfg, key = resolve(spec, config, _ray_ids()["ray_trial_id"])
    uri = mf.trial_uri(ctx.sweep_uri, key)
    store = mf.RecordStore(ctx.sweep_uri, key)
    count, unit = spec.accelerators_per_trial()

    def begin(rec: mf.TrialRecord | None) -> lc.Decision:
        rec = rec or mf.TrialRecord(key=key, params=params, fingerprint=identity_hash(cfg),
                                    config=cfg.to_dict(), accelerators=count,
                                    accelerator_unit=unit, sample=sample)
        return lc.start(rec, budgets(spec), time.time(), host=socket.gethostname(),
                        worker_pid=os.getpid(), **_ray_ids())

    try:
        decision = store.update(begin)
    except mf.DamagedRecord as e:  # never restart over it: budgets and results would be lost
        tune.report({TERMINAL: 1, "rcig/trial_key": key})
        raise TrialFailed(str(e)) from None
    if decision.action == lc.ADOPT:  # finished before: never rerun
        tune.report(final_metrics(decision.record, uri, spec))
        return
    if decision.action == lc.GIVE_UP:
        _give_up(decision, "budget exhausted before this attempt")
    rec = _take_donor_state(ctx, params, cfg, uri, store) or decision.record
    ending = _run_child(rec, cfg, uri, ctx, store)
    decision = store.update(lambda rec: lc.finish(rec, ending, budgets(spec), time.time()))
    rec = decision.record
    if decision.action == lc.REPORT:
        tune.report(final_metrics(rec, uri, spec))
        return
    if decision.action == lc.GIVE_UP:
        _give_up(decision, decision.reason)
    if ending.kind in ("preempted", "lost"):
        raise TrialPreempted(f"trial {key}: {decision.reason}; it resumes from there when rescheduled")
    raise TrialFailed(f"trial {key} {decision.reason}:\n{rec.last_error()}")


def _take_donor_state(ctx: TrialContext, params: dict, cfg, uri: str,
                      store: mf.RecordStore) -> mf.TrialRecord | None:
    """PBT: an exploit's donor step becomes this trial's checkpoint before the worker
    starts (`orchestrator.pbt.apply_exploit`); None when this attempt has none to take."""
    if getattr(ctx.spec.scheduler, "type", None) != "pbt":
        return None
    from orchestrator.pbt import apply_exploit

    return apply_exploit(params, cfg, uri, store)


def _give_up(decision: lc.Decision, why: str) -> None:
    from ray import tune

    rec = decision.record
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


def _ending(code: int, result: dict | None, error: str | None) -> lc.Ending:
    """How the attempt ended, from the worker's exit code and last events."""
    res = result or {}
    common = {"step": res.get("step"), "checkpoint_step": res.get("checkpoint_step"),
              "resumed_from": res.get("resumed_from")}
    if code == 0 and result is not None:
        return lc.Ending("completed", metrics=res.get("final_metrics") or {}, eval=res.get("eval"),
                         wall_s=res.get("wall_s"), **common)
    if code == EXIT_PREEMPTED:
        return lc.Ending("preempted", **common)
    if code == EXIT_LEASE_LOST:
        return lc.Ending("lost", **common)
    if code < 0:
        error = error or f"trial worker killed by signal {-code} (out of memory? killed by hand?)"
    return lc.Ending("failed", error=error or f"trial worker exited with code {code} without a "
                                              f"traceback (killed? out of memory?)", **common)


def _run_child(rec: mf.TrialRecord, cfg, uri: str, ctx: TrialContext,
               store: mf.RecordStore) -> lc.Ending:
    """Run the worker; relay its events to Tune and (at most every few seconds) to the
    record; return how the attempt ended."""
    from ray import tune

    job = {"config": cfg.to_dict(), "out_uri": uri, "attempt": rec.attempts,
           "parent_pid": os.getpid()}
    hosts = _host_group(ctx.spec)
    if hosts is not None:
        job["distributed"] = hosts.distributed(0)
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
    if hosts is not None:
        _start_hosts(hosts, job, proc)
    news: dict[str, Any] = {"pid": proc.pid}  # progress not yet written to the record

    def flush() -> None:
        update = dict(news)
        news.clear()
        store.update(lambda cur: lc.progress(cur, time.time(), **update) if cur else None)

    flush()
    result = error = None
    step = rec.step
    min_gap = float(os.environ.get("RCIG_RECORD_MIN_INTERVAL_S", "2"))
    last_write = time.time()
    try:
        for line in _lines(r, idle_s=float(os.environ.get("RCIG_RECORD_IDLE_S", "60"))):
            if line is None:  # quiet (compiling, evaluating): keep the record fresh
                flush()
                last_write = time.time()
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            kind = ev.get("event")
            if kind == "metrics":
                step = ev["step"]
                metrics = {k: float(v) for k, v in ev["metrics"].items()}
                news.update(step=step, metrics=metrics)
                if ctx.spec.metric in metrics:  # a scheduler may stop the trial on this report:
                    flush()                     # the record holds what it reached first
                    last_write = time.time()
                tune.report({**metrics, "step": step, **_pointer(rec, uri)})
            elif kind == "checkpoint":
                news["checkpoint_step"] = rec.checkpoint_step = ev["step"]
            elif kind == "result":
                result = ev
            elif kind == "error":
                error = ev.get("traceback")
            if news and time.time() - last_write >= min_gap:
                flush()
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
        if hosts is not None:
            hosts.stop()
    if news:
        flush()
    ending = _ending(code, result, error)
    return ending if hosts is None else _hosts_ending(ending, code, hosts)


# ---- several hosts (orchestrator.multihost): kept apart from the one-host path ----------
def _host_group(spec: SweepSpec):
    """The other hosts of a multi-host trial (None for one host), with its coordinator."""
    bundles = spec.ray_bundles()
    if len(bundles) == 1:
        return None
    from orchestrator.multihost import HostGroup

    return HostGroup(bundles, spec.resources.as_dict()).prepare()


def _start_hosts(hosts, job: dict, proc: subprocess.Popen) -> None:
    """Start processes 1..N-1; if one ends before process 0, stop process 0 (SIGTERM: it
    checkpoints if the hosts can still agree, else its stop deadline ends it)."""
    def on_peer_end(end) -> None:
        print(f"rcig: {end.describe()}; stopping the trial's other hosts", file=sys.stderr, flush=True)
        if proc.poll() is None:
            proc.terminate()

    peer_job = {k: v for k, v in job.items() if k not in ("distributed", "parent_pid")}
    try:
        hosts.start(peer_job, on_peer_end)
    except BaseException:
        proc.terminate()
        raise


def _hosts_ending(ending: lc.Ending, code: int, hosts) -> lc.Ending:
    """A multi-host attempt's ending: process 0's, unless another host ended first."""
    from orchestrator.multihost import attempt_ending

    kind, error = attempt_ending(code, hosts.first_end, ending.kind)
    if kind == ending.kind and error is None:
        return ending
    if kind == "failed":
        return dataclasses.replace(ending, kind=kind, error=error, metrics={}, eval=None)
    return dataclasses.replace(ending, kind=kind, error=None, metrics={}, eval=None)


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
