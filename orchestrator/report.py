"""`rcig report`: one self-contained HTML page of a sweep, from its storage alone.

Reads the sweep manifest and trial records (`orchestrator.manifest`) and, per trial,
`metrics.jsonl`, `eval.json` and `distilled.npz` through `rcig.storage` (local or gs://),
so it works while the sweep runs and with no Ray. Its "Search" panel shows the sweep's
metric against each searched parameter and every trial's intermediate `val/acc` by step,
trials a scheduler stopped early (STOPPED) drawn apart from finished ones (COMPLETED).
Figures are matplotlib PNGs embedded as `data:` URIs; the page loads nothing from the
network.

A trial whose files are missing or unreadable is still listed; what is missing becomes a
note (shown in the page and returned in `Report.notes`), never an exception.

Example:
    >>> rep = build_report("quickstart")                              # doctest: +SKIP
    >>> write_report(rep, default_out(rep))                           # doctest: +SKIP
    '/work/sweep_results/quickstart/report.html'
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from orchestrator import manifest as mf
from orchestrator.locate import resolve_sweep
from orchestrator.results import (SELECT_METRIC, metric_value, price_of, ranking_metric, trial_row,
                                  with_reached)
from rcig import run_folder, storage

IN_PROGRESS = (mf.RUNNING, mf.PENDING, mf.PREEMPTED, mf.FAILED)


class ReportError(ValueError):
    """Nothing to report (e.g. a sweep with no trials); the message says why."""


@dataclass
class TrialView:
    """Everything the page shows about one trial."""

    rec: mf.TrialRecord
    row: dict[str, Any]                      # orchestrator.results.trial_row
    metrics: list[dict[str, Any]]            # metrics.jsonl rows
    eval: dict[str, Any] | None
    value: float | None                      # the leaderboard metric
    rank: int | None = None
    images: dict[str, bytes] = field(default_factory=dict)  # grid, labels, curves: PNG/JPEG
    notes: list[str] = field(default_factory=list)

    @property
    def latest_step(self) -> int | None:
        steps = [r["step"] for r in self.metrics if isinstance(r.get("step"), int)]
        cands = [s for s in (max(steps) if steps else None, self.rec.step) if s is not None]
        return max(cands) if cands else None


@dataclass
class Report:
    """A sweep's report data; `html` is the page (see `orchestrator.report_html`)."""

    name: str
    uri: str
    metric: str
    mode: str
    currency: str
    generated: float
    params: list[str]
    trials: list[TrialView]                  # leaderboard order
    notes: list[str]
    html: str = ""
    search: dict[str, bytes] = field(default_factory=dict)  # the search panel: params, curves

    @property
    def counts(self) -> dict[str, int]:
        return mf.count_states([t.rec for t in self.trials])


# ---- reading one trial ------------------------------------------------------------------
def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


def _figures(view: TrialView, tdir: str) -> None:
    from orchestrator import report_figures as figs

    key = view.rec.key
    if view.metrics or view.eval:
        try:
            view.images["curves"] = figs.curves_figure(view.metrics, view.eval, _eval_step(view))
        except Exception as e:  # a plot must never sink the report
            view.notes.append(f"trial {key}: curves not drawn ({_one_line(e)})")
    npz_uri = run_folder.uri_of(tdir, run_folder.DISTILLED_NPZ)
    if not storage.exists(npz_uri):
        if view.rec.status == mf.COMPLETED:  # a STOPPED trial never reached its export
            view.notes.append(f"trial {key}: {view.rec.status} but no distilled.npz in {tdir}")
        return
    try:
        arrays = run_folder.read_distilled(npz_uri)
        if "x_pixels" not in arrays:
            view.notes.append(f"trial {key}: {npz_uri} has no x_pixels (keys: {', '.join(arrays) or 'none'})")
            return
        x = arrays["x_pixels"]
        n = len(x)
        y_class = arrays["y_class"] if "y_class" in arrays else np.zeros(n, np.int32)
        names = [str(s) for s in arrays["class_names"]] if "class_names" in arrays else []
    except Exception as e:
        view.notes.append(f"trial {key}: {npz_uri} unreadable ({_one_line(e)})")
        return
    try:
        view.images["grid"] = figs.image_grid_figure(x, y_class, names)
        if "y_proto" in arrays:
            view.images["labels"] = figs.label_heatmap_figure(arrays["y_proto"], y_class, names)
    except Exception as e:
        view.notes.append(f"trial {key}: distilled images not drawn ({_one_line(e)})")


def _eval_step(view: TrialView) -> int | None:
    ev = view.eval or {}
    for v in (ev.get("distill_steps"), view.rec.step, (view.rec.config or {}).get("steps")):
        if isinstance(v, int):
            return v
    return None


def read_trial(sweep_uri: str, rec: mf.TrialRecord, price: float | None, metric: str,
               figures: bool = True) -> TrialView:
    """One trial's view: its record, metrics, eval (eval.json, else the record's) and figures."""
    tdir = mf.trial_uri(sweep_uri, rec.key)
    notes: list[str] = []
    try:
        metrics = run_folder.read_metrics(tdir)
    except OSError as e:
        metrics = []
        notes.append(f"trial {rec.key}: metrics.jsonl unreadable ({_one_line(e)})")
    try:
        ev = run_folder.read_eval(tdir)
    except (ValueError, OSError) as e:
        ev = None
        notes.append(f"trial {rec.key}: {run_folder.uri_of(tdir, run_folder.EVAL_JSON)} unreadable ({_one_line(e)})")
    ev = ev or rec.eval
    if not metrics:
        notes.append(f"trial {rec.key}: no metrics yet ({rec.status})")
    if ev is not None and ev is not rec.eval:
        rec = replace(rec, eval=ev)
    row = trial_row(rec, price)
    value = metric_value(rec, metric)
    if value is not None and not math.isfinite(value):
        value = None
    view = TrialView(rec=rec, row=row, metrics=metrics, eval=ev, value=value, notes=notes)
    if figures:
        _figures(view, tdir)
    return view


# ---- the whole sweep --------------------------------------------------------------------
def rank_trials(views: list[TrialView], mode: str) -> list[TrialView]:
    """Trials with a metric value first (best first, ranks 1..k), then the rest by state/key."""
    scored = sorted((v for v in views if v.value is not None),
                    key=lambda v: (-v.value if mode == "max" else v.value, v.rec.key))
    for i, v in enumerate(scored, 1):
        v.rank = i
    order = {s: i for i, s in enumerate((mf.RUNNING, mf.PREEMPTED, mf.FAILED, mf.PENDING,
                                         mf.COMPLETED, mf.STOPPED, mf.ERROR))}
    rest = sorted((v for v in views if v.value is None),
                  key=lambda v: (order.get(v.rec.status, 99), v.rec.key))
    return scored + rest


def search_data(rep: Report) -> dict[str, Any]:
    """What the search panel draws: `points`, one per trial with a value of the sweep's
    metric ({"key", "params", "value", "state"}: a STOPPED trial's value is the last
    intermediate estimate it reached), and `curves`, one per trial that reported the
    intermediate metric ({"key", "state", "steps", "values", "final", "final_step"}:
    `final`, a finished trial's final evaluation of that metric).
    """
    points = [{"key": t.rec.key, "params": t.rec.params, "value": t.value, "state": t.rec.status}
              for t in rep.trials if t.value is not None]
    curves = []
    for t in rep.trials:
        pts = sorted({int(r["step"]): float(r[SELECT_METRIC]) for r in t.metrics
                      if isinstance(r.get(SELECT_METRIC), (int, float))
                      and math.isfinite(r[SELECT_METRIC])}.items())
        if not pts:
            continue
        final = (t.eval or {}).get("val_mean") if t.rec.status == mf.COMPLETED else None
        curves.append({"key": t.rec.key, "state": t.rec.status, "steps": [s for s, _ in pts],
                       "values": [v for _, v in pts], "final": final,
                       "final_step": _eval_step(t) if final is not None else None})
    return {"points": points, "curves": curves}


def _search_figures(rep: Report) -> None:
    from orchestrator import report_figures as figs

    data = search_data(rep)
    try:
        if rep.params:
            rep.search["params"] = figs.search_params_figure(rep.params, data["points"], rep.metric)
        rep.search["curves"] = figs.search_curves_figure(data["curves"], SELECT_METRIC)
    except Exception as e:  # a plot must never sink the report
        rep.notes.append(f"search panel not drawn ({_one_line(e)})")


def build_report(name_or_uri: str, figures: bool = True) -> Report:
    """Read a sweep (name or URI) and build its report page.

    Raises `orchestrator.manifest.ManifestError` for an unknown sweep and `ReportError`
    for a sweep without trials; problems of single trials become `Report.notes`.
    """
    from orchestrator.report_html import render

    uri = resolve_sweep(name_or_uri)
    doc = mf.read_manifest(uri)
    spec = doc.get("spec") or {}
    mode = spec.get("mode", "max")
    price, currency = price_of(doc)
    recs = with_reached(uri, mf.read_records(uri, []))
    metric = ranking_metric(spec.get("metric"), recs)
    if not recs:
        raise ReportError(f"sweep {doc.get('name', name_or_uri)} at {uri} has no trials yet "
                          f"(no {mf.TRIALS}/*/{mf.RECORD}); see `rcig sweep status {name_or_uri}`")
    views = rank_trials([read_trial(uri, r, price, metric, figures) for r in recs], mode)
    params = sorted({k for v in views for k in v.rec.params})
    rep = Report(name=str(doc.get("name") or name_or_uri), uri=uri, metric=metric, mode=mode,
                 currency=currency, generated=time.time(), params=params, trials=views,
                 notes=[n for v in views for n in v.notes])
    if figures:
        _search_figures(rep)
    rep.html = render(rep)
    return rep


def default_out(rep: Report) -> str:
    """`<sweep>/report.html` for a local sweep, else `./<name>-report.html`.

    Example:
        >>> default_out(Report("q", "gs://b/q", "eval/mean", "max", "USD", 0, [], [], []))
        ... # doctest: +ELLIPSIS
        '.../q-report.html'
    """
    if storage.is_remote(rep.uri):
        return storage.normalize(f"{rep.name}-report.html")
    return storage.join(rep.uri, "report.html")


def write_report(rep: Report, out: str) -> str:
    """Write the page to `out` (path or URI); return the normalized destination."""
    dest = storage.normalize(out)
    storage.write_text(dest, rep.html)
    return dest
