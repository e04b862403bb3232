"""Status, leaderboard and fetch, from the sweep's storage alone (no Ray needed).

Everything here reads `orchestrator.manifest` records, so it works with no Ray cluster
and with Ray's experiment state missing or damaged.

Selection is on validation: `best` ranks by `val/acc` (a finished trial's final
evaluation on the validation split; a trial a scheduler stopped early, by the last
intermediate estimate it reached) unless another metric is asked for by name, and
`fetch` takes that best. Test accuracy is shown beside it, never used to choose:
the best of N trials picked on test overstates its test accuracy.

Example:
    >>> rows = status("quickstart")                                # doctest: +SKIP
    >>> best("quickstart", top=1)[0]["key"]                        # doctest: +SKIP
    'proto_lr=0.003,width=16_1a2b3c4d'
    >>> fetch("quickstart", "out/")                                # doctest: +SKIP
"""

from __future__ import annotations

import os
import time
from typing import Any

from orchestrator import lifecycle as lc
from orchestrator import manifest as mf
from orchestrator.locate import resolve_sweep
from rcig import run_folder, storage

FETCH_FILES = (run_folder.DISTILLED_NPZ, run_folder.DISTILLED_PNG, run_folder.EVAL_JSON,
               run_folder.CONFIG_JSON, run_folder.SPLIT_JSON, run_folder.METRICS_JSONL, mf.RECORD)
SELECT_METRIC = "val/acc"  # what `best` ranks by and `fetch` takes the best of
TEST_METRICS = ("eval/mean", "test/acc")  # shown, never selected on by default


class ResultsError(ValueError):
    """Nothing to show or fetch; the message says why and what to run."""


def price_of(doc: dict[str, Any]) -> tuple[float | None, str]:
    """(price per accelerator-hour, currency) from a sweep manifest's `cost` block."""
    cost = (doc.get("spec") or {}).get("cost") or {}
    return cost.get("per_accelerator_hour"), cost.get("currency", "USD")


def trial_row(rec: mf.TrialRecord, price: float | None) -> dict[str, Any]:
    """One trial as a flat dict (what `status --json` prints per trial)."""
    steps = (rec.config or {}).get("steps")
    hours = rec.accelerator_s / 3600
    base = (rec.eval or {}).get("baseline") or {}
    row = {
        "key": rec.key, "status": rec.status, "step": rec.step, "steps": steps,
        "checkpoint_step": rec.checkpoint_step, "params": rec.params,
        "metrics": rec.metrics, "preemptions": rec.preemptions, "failures": rec.failures,
        "attempts": rec.attempts, "accelerator_unit": rec.accelerator_unit,
        "accelerator_hours": hours, "cost": hours * price if price is not None else None,
        "eval_mean": (rec.eval or {}).get("mean"), "eval_std": (rec.eval or {}).get("std"),
        # validation accuracy: the final evaluation's, else the latest intermediate estimate
        "val_mean": metric_value(rec, SELECT_METRIC),
        "val_std": ((rec.eval or {}).get("val") or {}).get("std"),
        "val_source": ("eval" if (rec.eval or {}).get("val_mean") is not None else
                       "probe" if rec.metrics.get(SELECT_METRIC) is not None else None),
        "val_step": (rec.step if (rec.eval or {}).get("val_mean") is not None
                     else rec.metrics.get("val/step")),
        # random real images of the same ipc, trained the same way (absent with baseline off)
        "baseline_mean": base.get("mean"), "baseline_std": base.get("std"),
        "baseline_val_mean": base.get("val_mean"),
        "updated_ago_s": time.time() - rec.updated if rec.updated else None,
        "stale": lc.is_stale_running(rec, time.time()),
        "error": rec.last_error() if rec.status in (mf.ERROR, mf.FAILED) else None,
    }
    return row


def status(name_or_uri: str) -> dict[str, Any]:
    """Sweep summary and one row per trial."""
    uri = resolve_sweep(name_or_uri)
    doc = mf.read_manifest(uri)
    price, currency = price_of(doc)
    damaged: list[mf.DamagedRecord] = []
    recs = mf.read_records(uri, damaged)
    rows = [trial_row(r, price) for r in recs]
    counts = mf.count_states(recs, damaged)
    return {"sweep": doc["name"], "uri": uri, "counts": counts, "currency": currency,
            "metric": doc["spec"].get("metric", "eval/mean"), "trials": rows,
            "damaged": [{"path": e.uri, "error": str(e)} for e in damaged],
            "launches": doc.get("launches", [])}


def metric_value(rec: mf.TrialRecord, metric: str) -> float | None:
    """`eval/<field>` from the eval result, anything else from the latest metrics.

    `val/acc`: the final evaluation's validation mean if the trial has one, else the last
    intermediate estimate it reported; `test/acc`: the final evaluation's test mean."""
    if metric == SELECT_METRIC and rec.eval and rec.eval.get("val_mean") is not None:
        return float(rec.eval["val_mean"])
    if metric == "test/acc":
        v = (rec.eval or {}).get("mean")
        return float(v) if isinstance(v, (int, float)) else None
    if metric.startswith("eval/") and rec.eval:
        field = metric[len("eval/"):]
        v = rec.eval.get(field)
        if field.startswith("baseline_") and rec.eval.get("baseline"):
            v = rec.eval["baseline"].get(field[len("baseline_"):])
        if isinstance(v, (int, float)):
            return float(v)
    v = rec.metrics.get(metric)
    return float(v) if isinstance(v, (int, float)) else None


def selection_metric(spec_metric: str | None) -> str:
    """The metric `best` ranks by by default: the spec's, unless it is a test metric
    (a sweep launched before validation existed): then `val/acc`."""
    return SELECT_METRIC if not spec_metric or spec_metric in TEST_METRICS else spec_metric


def with_reached(sweep_uri: str, recs: list[mf.TrialRecord]) -> list[mf.TrialRecord]:
    """Trials a scheduler stopped whose record missed their last reports (the trial was
    ended between two record writes) get the validation estimate they reached, and the
    last step they ran, from their own `metrics.jsonl` (in memory; records untouched)."""
    for rec in recs:
        if rec.status != mf.STOPPED or rec.metrics.get(SELECT_METRIC) is not None or rec.eval:
            continue
        try:
            rows = run_folder.read_metrics(mf.trial_uri(sweep_uri, rec.key))
        except (OSError, ValueError):
            continue
        last_step = rows[-1]["step"] if rows else None
        reached = next((r for r in reversed(rows) if isinstance(r.get(SELECT_METRIC), (int, float))), None)
        if reached is not None:
            rec.metrics = {**rec.metrics, SELECT_METRIC: float(reached[SELECT_METRIC]),
                           "val/step": float(reached["step"])}
        if rec.step is None and last_step is not None:
            rec.step = int(last_step)
    return recs


def ranking_metric(spec_metric: str | None, recs: list[mf.TrialRecord]) -> str:
    """`selection_metric`, except in a sweep from before validation splits (no trial has a
    validation figure): there, the spec's own metric."""
    chosen = selection_metric(spec_metric)
    if chosen == SELECT_METRIC and spec_metric in TEST_METRICS and not any(
            metric_value(r, SELECT_METRIC) is not None for r in recs):
        return spec_metric
    return chosen


def best(name_or_uri: str, metric: str | None = None, top: int = 5,
         mode: str | None = None) -> list[dict[str, Any]]:
    """Leaderboard: trials with `metric` (default: `selection_metric` of the spec's, a
    validation metric), best first."""
    uri = resolve_sweep(name_or_uri)
    doc = mf.read_manifest(uri)
    spec = doc["spec"]
    recs = with_reached(uri, mf.read_records(uri, []))
    default = ranking_metric(spec.get("metric"), recs)
    metric = metric or default
    mode = mode or (spec.get("mode", "max") if metric == default else
                    ("min" if "loss" in metric else "max"))
    price, _ = price_of(doc)
    scored = [(metric_value(r, metric), r) for r in recs]
    scored = [(v, r) for v, r in scored if v is not None]
    if not scored:
        states = mf.format_counts(mf.count_states(recs))
        raise ResultsError(f"no trial of {uri} has reported {metric} yet ({states}); "
                           f"see `rcig sweep status {name_or_uri}`")
    scored.sort(key=lambda t: t[0], reverse=(mode == "max"))
    out = []
    for rank, (v, r) in enumerate(scored[:max(1, top)], 1):
        row = trial_row(r, price)
        row.update(rank=rank, metric=metric, value=v)
        out.append(row)
    return out


COMMIT_MARKER = "commit_success.txt"


def committed_steps(run_uri: str) -> list[int]:
    """Checkpoint steps of a run folder whose save finished, ascending.

    Orbax decides what is finalized (locally: the folder was renamed from its temporary
    name; on gs://: it holds `commit_success.txt`, since a step folder in progress has no
    temporary suffix there). A step must also hold the commit marker itself: Orbax writes
    it into every step before the commit, so a digit-named folder without one (a copy or
    sync cut short) is not a checkpoint either.
    """
    ckpt_uri = storage.join(run_uri, "checkpoints")
    if not storage.exists(ckpt_uri):
        return []
    from rcig.checkpoint import CheckpointStore

    store = CheckpointStore(run_uri, async_save=False)
    try:
        listed = store.all_steps()
    finally:
        store.close()
    return sorted(s for s in listed
                  if storage.exists(storage.join(ckpt_uri, str(s), COMMIT_MARKER)))


def fetch(name_or_uri: str, to_dir: str, trial: str | None = None) -> dict[str, Any]:
    """Copy the best (or the named) trial's distilled set, eval, config and final
    checkpoint (the newest committed step) into `to_dir`; return {"key", "files",
    "checkpoint_step"}."""
    uri = resolve_sweep(name_or_uri)
    recs = {r.key: r for r in mf.read_records(uri, [])}
    if trial is None:
        key = best(name_or_uri, top=1)[0]["key"]
    else:
        matches = [k for k in recs if k == trial] or [k for k in recs if k.startswith(trial)]
        if len(matches) != 1:
            what = "matches several trials" if matches else "matches no trial"
            raise ResultsError(f"--trial {trial!r} {what} of {uri}; see `rcig sweep status {name_or_uri}`")
        key = matches[0]
    rec = recs[key]
    src = mf.trial_uri(uri, key)
    if not storage.exists(run_folder.uri_of(src, run_folder.DISTILLED_NPZ)):
        raise ResultsError(f"trial {key} of {uri} has no distilled.npz yet (status {rec.status}); "
                           f"see `rcig sweep status {name_or_uri}`")
    os.makedirs(to_dir, exist_ok=True)
    files = []
    for name in FETCH_FILES:
        if name == run_folder.METRICS_JSONL:  # one local file, whichever form it has there
            if run_folder.download_metrics(src, os.path.join(to_dir, name)):
                files.append(name)
        elif storage.exists(storage.join(src, name)):
            storage.download(storage.join(src, name), os.path.join(to_dir, name))
            files.append(name)
    steps = committed_steps(src)
    ckpt = steps[-1] if steps else None
    if ckpt is not None:
        dest = os.path.join(to_dir, "checkpoint", str(ckpt))
        storage.download(storage.join(src, "checkpoints", str(ckpt)), dest)
        files.append(f"checkpoint/{ckpt}")
    return {"key": key, "files": files, "checkpoint_step": ckpt, "to": os.path.abspath(to_dir),
            "eval_mean": (rec.eval or {}).get("mean"), "val_mean": metric_value(rec, SELECT_METRIC)}
