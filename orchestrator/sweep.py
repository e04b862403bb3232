"""Launch and resume sweeps: spec -> Ray Tune `Tuner` over `orchestrator.trial`.

The sweep folder is `<storage>/<name>` (local path or `gs://`); it holds Ray's standard
experiment state *and* our manifest (`orchestrator.manifest`), so `status`, `best` and
`fetch` read storage alone.

- `launch(spec_path, ...)`: validate the spec (before Ray starts), write the manifest,
  start local Ray (or connect with `address`), check that some node (live, or one the
  autoscaler can add) holds a trial and that a cluster's storage is shared
  (`orchestrator.preflight`), run the Tuner. Launching into an existing sweep folder adopts
  the trials already there (finished ones are not rerun).
- `resume(name_or_uri)`: `Tuner.restore` (unfinished and errored trials continue, with a
  fresh failure budget; finished ones are not rerun), with the searcher's and scheduler's
  own saved state (Optuna's study: `orchestrator.optuna_search`; PBT's trial folders and
  pointers: `orchestrator.pbt`). A searcher's proposal made after Ray's last save is
  closed as STOPPED and replaced (`_stop_orphans`). If Ray's state is missing or damaged
  (e.g. a truncated `tuner.pkl`), the sweep is rebuilt from our manifest instead: each
  recorded trial in its own folder (PBT trials with their current parameters, under FIFO).

Example:
    >>> out = launch("sweeps/quickstart.yaml", sets=["steps=10"])   # doctest: +SKIP
    >>> out.sweep_uri, out.counts                                    # doctest: +SKIP
    ('/work/sweep_results/quickstart', {'COMPLETED': 4})
"""

from __future__ import annotations

import os
import posixpath
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from orchestrator import lifecycle as lc
from orchestrator import manifest as mf
from orchestrator.locate import default_root, resolve_sweep
from orchestrator.spec import SweepSpec, load_spec, spec_from_raw
from rcig import storage

# Environment a remote Ray worker needs from the driver (emulators, tokens, our knobs).
_FORWARD_PREFIXES = ("RCIG_", "STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
                     "GOOGLE_AUTH_TOKEN_FOR_TESTING", "GCSFS_", "NO_GCE_CHECK",
                     "GCE_METADATA_", "GOOGLE_CLOUD_PROJECT", "JAX_COMPILATION_CACHE_DIR")


class SweepError(RuntimeError):
    """A sweep cannot start or resume; one line saying what and where."""


@dataclass
class SweepOutcome:
    sweep_uri: str
    name: str
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def sweep_uri_for(spec: SweepSpec, storage_override: str | None = None) -> str:
    root = storage_override or spec.storage or default_root()
    return storage.join(storage.normalize(root), spec.name)


def ray_space(spec: SweepSpec) -> dict[str, Any]:
    """Tune param_space of the spec's search space."""
    from orchestrator.search import ray_space as space_of

    return space_of(spec.space)


def storage_for_ray(sweep_uri: str) -> tuple[str, str, Any]:
    """(storage_path, name, storage_filesystem) for tune.RunConfig / Tuner.restore."""
    uri = storage.normalize(sweep_uri)
    parent, name = posixpath.split(uri.rstrip("/"))
    if storage.is_remote(uri):
        import pyarrow.fs as pafs

        fs, path = storage.filesystem(parent)
        return path, name, pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    return parent, name, None


# Ray kills a worker's child processes when the worker exits; the trial's distillation
# process must outlive its worker long enough to commit the preemption checkpoint.
WORKER_ENV = {"RAY_kill_child_processes_on_worker_exit": "0"}


# Connecting and the checks before any trial starts live in orchestrator.preflight.
from orchestrator.preflight import check_storage, cluster_offers, init_ray, preflight  # noqa: E402,F401


def build_tuner(spec: SweepSpec, sweep_uri: str, param_space: dict[str, Any] | None = None,
                mlflow: str | None = None):
    from ray import tune

    from orchestrator import tracking
    from orchestrator.callbacks import BudgetCallback, ray_max_failures
    from orchestrator.search import build_search
    from orchestrator.trial import SAMPLE_KEY, TrialContext, key_of, make_trainable

    storage_path, name, fs = storage_for_ray(sweep_uri)
    search_alg, scheduler, metric, mode, max_concurrent = build_search(
        spec, restored_space=param_space is not None)

    def dirname(trial) -> str:
        return key_of(spec, trial.config, trial.trial_id)

    num_samples = spec.num_samples if param_space is None else 1
    if param_space is None:
        param_space = ray_space(spec)
        if num_samples > 1 and not spec.searcher_proposes():
            # Repeats as a grid dimension: each repeat knows its index (its own folder).
            param_space[SAMPLE_KEY] = tune.grid_search(list(range(num_samples)))
            num_samples = 1
    return tune.Tuner(
        make_trainable(TrialContext(storage.normalize(sweep_uri), spec)),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=metric, mode=mode, num_samples=num_samples,
            max_concurrent_trials=max_concurrent, scheduler=scheduler,
            search_alg=search_alg, reuse_actors=False,
            trial_dirname_creator=dirname, trial_name_creator=dirname),
        run_config=tune.RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=fs,
            failure_config=tune.FailureConfig(max_failures=ray_max_failures(spec)),
            callbacks=[BudgetCallback(storage.normalize(sweep_uri), spec),
                       *tracking.callbacks(storage.normalize(sweep_uri), spec, mlflow)],
            verbose=int(os.environ.get("RCIG_TUNE_VERBOSE", "1"))),
    )


def _launch_info(address: str | None, kind: str) -> dict[str, Any]:
    import ray

    return {"at": time.time(), "kind": kind, "address": address or "local",
            "ray": ray.__version__}


def _counts(sweep_uri: str) -> dict[str, int]:
    damaged: list[mf.DamagedRecord] = []
    return mf.count_states(mf.read_records(sweep_uri, damaged), damaged)


def launch(spec_path: str, storage_uri: str | None = None, name: str | None = None,
           address: str | None = None, sets: Sequence[str] = (),
           shared_storage: bool = False, mlflow: str | None = None) -> SweepOutcome:
    """Validate a spec and run its sweep to the end (see module docstring); `mlflow`: an
    MLflow tracking URI to log every trial to (`orchestrator.tracking`)."""
    from orchestrator import tracking

    spec = load_spec(spec_path, sets=sets, storage=storage_uri, name=name)
    sweep_uri = sweep_uri_for(spec)
    check_storage(sweep_uri, address, shared_storage)
    if mlflow:
        mlflow = tracking.check_mlflow(mlflow)
    try:
        existing = mf.read_manifest(sweep_uri, missing_ok=True)
    except mf.ManifestError as e:
        raise SweepError(str(e)) from None
    init_ray(address)
    checked = preflight(spec, address)
    mf.write_manifest(sweep_uri, spec.name, spec.raw, spec.source,
                      {**_launch_info(address, "launch"), "mlflow": tracking.recordable(mlflow)})
    out = SweepOutcome(sweep_uri, spec.name, notes=list(checked))
    if existing:
        out.notes.append(f"{sweep_uri} already held a sweep; its existing trials are adopted")
    build_tuner(spec, sweep_uri, mlflow=mlflow).fit()
    out.counts = _counts(sweep_uri)
    return out


def resume(name_or_uri: str, address: str | None = None, shared_storage: bool = False,
           mlflow: str | None = None) -> SweepOutcome:
    """Continue a sweep from storage: Ray's state if readable, else our manifest. MLflow
    tracking: `mlflow` if given ("off": none), else where the sweep last tracked to."""
    from ray import tune

    from orchestrator import tracking
    from orchestrator.trial import TrialContext, make_trainable

    sweep_uri = resolve_sweep(name_or_uri)
    check_storage(sweep_uri, address, shared_storage)
    doc = mf.read_manifest(sweep_uri)
    spec = spec_from_raw(doc["spec"], source=doc.get("source", "<manifest>"))
    mlflow = tracking.resume_uri(doc, mlflow)
    if mlflow:
        mlflow = tracking.check_mlflow(mlflow)
    init_ray(address)
    checked = preflight(spec, address)
    damaged: list[mf.DamagedRecord] = []
    records = mf.read_records(sweep_uri, damaged)
    for rec in records:  # resume grants errored trials a fresh budget
        if rec.status == mf.ERROR:
            mf.RecordStore(sweep_uri, rec.key).update(lambda cur: lc.grant_budgets(cur) if cur else None)
    mf.write_manifest(sweep_uri, spec.name, spec.raw, spec.source,
                      {**_launch_info(address, "resume"), "mlflow": tracking.recordable(mlflow)})
    out = SweepOutcome(sweep_uri, spec.name, notes=list(checked))
    out.notes += [f"{e} (that trial stops with this error)" for e in damaged]
    storage_path, name, fs = storage_for_ray(sweep_uri)
    exp_path = sweep_uri if fs is None else posixpath.join(storage_path, name)
    tuner = None
    if tune.Tuner.can_restore(exp_path, storage_filesystem=fs):
        try:
            tuner = tune.Tuner.restore(
                exp_path, trainable=make_trainable(TrialContext(sweep_uri, spec)),
                resume_unfinished=True, resume_errored=True, storage_filesystem=fs)
        except Exception as e:  # noqa: BLE001 - e.g. EOFError on a truncated tuner.pkl
            out.notes.append(f"Ray's experiment state in {sweep_uri} is unreadable "
                             f"({type(e).__name__}: {e}); resuming from the rcig manifest")
    else:
        out.notes.append(f"no Ray experiment state in {sweep_uri}; resuming from the rcig manifest")
    if tuner is not None and spec.searcher_proposes():
        out.notes += _stop_orphans(sweep_uri, exp_path, fs, records)
    if tuner is not None:  # the callbacks pickled at launch would track to the old places
        tracking.replace_in_restored(tuner, tracking.callbacks(sweep_uri, spec, mlflow))
    if tuner is None:
        tuner = build_tuner(spec, sweep_uri, param_space=_manifest_space(spec, records, out),
                            mlflow=mlflow)
    tuner.fit()
    out.counts = _counts(sweep_uri)
    return out


def _stop_orphans(sweep_uri: str, exp_path: str, fs: Any, records: list[mf.TrialRecord]) -> list[str]:
    """A searcher's proposal that started after Ray last saved the experiment (at most
    every ~10 s) is in neither Ray's restored state nor the restored searcher: nothing will
    run it again, and the searcher proposes another trial in its place. Its record is
    closed as STOPPED (kept with what it reached, never rerun); one note per trial."""
    from ray.tune import ExperimentAnalysis

    try:
        known = {t.trial_id for t in ExperimentAnalysis(exp_path, storage_filesystem=fs).trials}
    except Exception:  # noqa: BLE001 - unreadable: leave the records as they are
        return []
    notes = []
    for rec in records:
        ids = {h.get("ray_trial_id") for h in rec.history} - {None}
        if rec.status in mf.FINAL_STATES or not ids or ids & known:
            continue
        mf.RecordStore(sweep_uri, rec.key).update(
            lambda cur: lc.stopped_by_scheduler(cur, time.time()) if cur else None)
        notes.append(f"trial {rec.key} started after Ray's last save of the sweep; its searcher "
                     f"does not know it, so it stays STOPPED at step {rec.step} and another "
                     f"proposal takes its place")
    return notes


def _manifest_space(spec: SweepSpec, records: list[mf.TrialRecord], out: SweepOutcome) -> dict[str, Any] | None:
    """Param space to rebuild a sweep without Ray's state: the spec's own grid if it is
    deterministic (trials adopt their folders), else the recorded trials' params."""
    from ray import tune

    from orchestrator.trial import RECORDED_KEY

    pbt = getattr(spec.scheduler, "type", None) == "pbt"  # exploits changed their configs
    if all("grid" in d for d in spec.space.values()) and not spec.searcher_proposes() and not pbt:
        return None  # deterministic: the same trials (and sample indices) again
    missing = spec.grid_size() - len(records)
    if missing > 0:
        out.notes.append(f"{missing} sampled trial(s) had not started; run `rcig sweep launch` "
                         f"on the spec again to create them")
    # Each record's own folder key: a PBT trial's current params no longer hash to it.
    return {RECORDED_KEY: tune.grid_search([{"params": rec.params, "sample": rec.sample, "key": rec.key}
                                            for rec in records])}
