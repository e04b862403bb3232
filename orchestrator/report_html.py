"""The sweep report as one HTML page: inline CSS, inline JS (column sorting), PNGs as
`data:` URIs. No external URL appears anywhere in the page, so opening it makes no
network request (the favicon is an empty `data:` URI too).

Example:
    >>> cell("0.81 ± 0.01", 0.81)
    '<td data-v="0.81">0.81 ± 0.01</td>'
"""

from __future__ import annotations

import base64
import time
from html import escape
from typing import TYPE_CHECKING, Any

from orchestrator import manifest as mf
from rcig.units import human_seconds

if TYPE_CHECKING:  # pragma: no cover
    from orchestrator.report import Report, TrialView

STATE_COLOURS = {mf.COMPLETED: "#1a7f37", mf.STOPPED: "#57606a", mf.RUNNING: "#0969da",
                 mf.PENDING: "#8c959f", mf.PREEMPTED: "#bf8700", mf.FAILED: "#d1242f",
                 mf.ERROR: "#82071e"}

CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1f2328}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px} h3{font-size:15px;margin:0}
.meta{color:#57606a} code{font:12px ui-monospace,monospace}
table{border-collapse:collapse;margin:6px 0} th,td{padding:3px 8px;border-bottom:1px solid #d0d7de;
text-align:right;white-space:nowrap} td.l,th.l{text-align:left}
table.sortable th{cursor:pointer;user-select:none;background:#f6f8fa}
th[aria-sort=ascending]::after{content:" \\25B2"} th[aria-sort=descending]::after{content:" \\25BC"}
.state{color:#fff;border-radius:10px;padding:1px 8px;font-size:12px;font-weight:600}
.trial{border:1px solid #d0d7de;border-radius:6px;padding:12px;margin:14px 0}
.trial img,#search img{max-width:100%;display:block;margin:8px 0}
.figs{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.notes{color:#9a6700} .none{color:#8c959f} pre{background:#f6f8fa;padding:8px;overflow:auto;font-size:12px}
"""

SORT_JS = """
(function(){
  function val(row, i){ var c = row.cells[i]; return c ? c.getAttribute('data-v') : null; }
  function num(s){ return s !== null && s.trim() !== '' && !isNaN(Number(s)); }
  document.querySelectorAll('table.sortable').forEach(function(table){
    table.querySelectorAll('thead th').forEach(function(th, i){
      th.title = th.title || 'sort';
      th.addEventListener('click', function(){
        var asc = th.getAttribute('aria-sort') !== 'ascending';
        table.querySelectorAll('thead th').forEach(function(h){ h.removeAttribute('aria-sort'); });
        th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
        var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
        rows.sort(function(a, b){
          var x = val(a, i), y = val(b, i), ex = x === null || x === '', ey = y === null || y === '';
          if (ex || ey) { return ex === ey ? 0 : (ex ? 1 : -1); }
          var c = (num(x) && num(y)) ? Number(x) - Number(y) : x.localeCompare(y);
          return asc ? c : -c;
        });
        rows.forEach(function(r){ body.appendChild(r); });
      });
    });
  });
})();
"""


def cell(text: Any, sort: Any = None, cls: str = "", raw: bool = False) -> str:
    """One `<td>`; `sort` (number or text) goes to `data-v`, what the sort script compares."""
    v = "" if sort is None else (repr(float(sort)) if isinstance(sort, float) else str(sort))
    body = str(text) if raw else escape(str(text))
    c = f' class="{cls}"' if cls else ""
    return f'<td{c} data-v="{escape(v)}">{body}</td>'


def _num(v: Any, spec: str, none: str = "–") -> str:
    return none if not isinstance(v, (int, float)) else format(v, spec)


def _badge(state: str) -> str:
    colour = STATE_COLOURS.get(state, "#57606a")
    return f'<span class="state" style="background:{colour}">{escape(state)}</span>'


def _img(image: bytes, cls: str, alt: str) -> str:
    mime = "image/jpeg" if image[:3] == b"\xff\xd8\xff" else "image/png"
    data = base64.b64encode(image).decode("ascii")
    return f'<img class="{cls}" alt="{escape(alt)}" src="data:{mime};base64,{data}">'


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t))


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return human_seconds(seconds) + " ago"


def _param(v: Any) -> str:
    return format(v, ".4g") if isinstance(v, float) else str(v)


def _eval_cells(t: "TrialView") -> tuple[str, str, str]:
    """Validation (what trials are chosen by; "(p)": a stopped trial's last intermediate
    estimate), test (the final evaluation) and the random-real baseline's test accuracy."""
    ev = t.eval or {}
    base = ev.get("baseline") or {}
    mean, std = ev.get("mean"), ev.get("std")
    val, src = t.row.get("val_mean"), t.row.get("val_source")
    v = cell(f"{_num(val, '.4f')}{' (p)' if src == 'probe' else ''}" if val is not None else "–", val)
    e = cell(f"{_num(mean, '.4f')} ± {_num(std, '.4f')}" if mean is not None else "–", mean)
    b = cell(f"{_num(base.get('mean'), '.4f')} ± {_num(base.get('std'), '.4f')}"
             if base.get("mean") is not None else "–", base.get("mean"))
    return v, e, b


def leaderboard(rep: "Report") -> str:
    """The sortable leaderboard table, one `<tr data-key=...>` per trial, best first."""
    heads = ["rank", "trial", "state"] + [p.rsplit(".", 1)[-1] for p in rep.params] + [
        "val", "eval mean ± std", "random baseline", "step", "preempt.", "failures", "acc-hours",
        f"cost ({rep.currency})"]
    titles = ["", "", ""] + rep.params + ["validation accuracy (selection)", "test accuracy"] + [""] * 6
    th = "".join(f'<th class="{"l" if h in ("trial", "state") else ""}" title="{escape(t)}">'
                 f"{escape(h)}</th>" for h, t in zip(heads, titles))
    rows = []
    for i, t in enumerate(rep.trials):
        r = t.row
        steps = r.get("steps")
        step = t.latest_step
        cells = [cell(t.rank if t.rank is not None else "–", t.rank),
                 cell(f'<a href="#t{i}">{escape(t.rec.key)}</a>', t.rec.key, "l", raw=True),
                 cell(_badge(t.rec.status), t.rec.status, "l", raw=True)]
        for p in rep.params:
            v = t.rec.params.get(p)
            cells.append(cell("–" if v is None else _param(v), v))
        cells += list(_eval_cells(t))
        cells += [cell(f"{_num(step, 'd', '0')}/{_num(steps, 'd', '?')}", step),
                  cell(r["preemptions"], r["preemptions"]), cell(r["failures"], r["failures"]),
                  cell(f"{r['accelerator_hours']:.3f} {r.get('accelerator_unit') or ''}".strip(),
                       r["accelerator_hours"]),
                  cell(_num(r.get("cost"), ".2f"), r.get("cost"))]
        rows.append(f'<tr data-key="{escape(t.rec.key)}" data-state="{escape(t.rec.status)}">'
                    + "".join(cells) + "</tr>")
    return (f'<table id="leaderboard" class="sortable"><thead><tr>{th}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def in_progress(rep: "Report") -> str:
    """Running / pending / preempted / failed-and-retrying trials with their latest step."""
    from orchestrator.report import IN_PROGRESS

    live = [(i, t) for i, t in enumerate(rep.trials) if t.rec.status in IN_PROGRESS]
    if not live:
        return '<p class="none">No trial is running, pending or preempted.</p>'
    rows = []
    for i, t in live:
        r = t.row
        rows.append(
            f'<tr data-key="{escape(t.rec.key)}">'
            + cell(f'<a href="#t{i}">{escape(t.rec.key)}</a>', t.rec.key, "l", raw=True)
            + cell(_badge(t.rec.status), t.rec.status, "l", raw=True)
            + cell(f"{_num(t.latest_step, 'd', '0')}/{_num(r.get('steps'), 'd', '?')}", t.latest_step)
            + cell(_num(r.get("checkpoint_step"), "d"), r.get("checkpoint_step"))
            + cell(r["attempts"], r["attempts"])
            + cell(_ago(r.get("updated_ago_s")), r.get("updated_ago_s")) + "</tr>")
    head = "".join(f'<th class="{c}">{h}</th>' for h, c in (
        ("trial", "l"), ("state", "l"), ("latest step", ""), ("checkpoint", ""),
        ("attempts", ""), ("last update", "")))
    return (f'<table id="in-progress" class="sortable"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def _history(t: "TrialView") -> str:
    if not t.rec.history:
        return ""
    rows = "".join(
        f"<tr>{cell(a.get('n'))}{cell(a.get('host', ''), cls='l')}{cell(a.get('outcome') or 'open', cls='l')}"
        f"{cell(_num(a.get('start_step'), 'd'))}{cell(_num(a.get('end_step'), 'd'))}</tr>"
        for a in t.rec.history)
    return ("<details><summary>attempts</summary><table><thead><tr><th>#</th><th class=l>host</th>"
            "<th class=l>outcome</th><th>from step</th><th>to step</th></tr></thead>"
            f"<tbody>{rows}</tbody></table></details>")


def trial_section(i: int, t: "TrialView") -> str:
    """One trial: header, params, eval line, image grid, label heatmap, curves, errors."""
    r = t.row
    rank = f"#{t.rank} " if t.rank is not None else ""
    params = ", ".join(f"{escape(k)}={escape(_param(v))}" for k, v in sorted(t.rec.params.items()))
    ev = t.eval or {}
    base = ev.get("baseline") or {}
    if ev.get("mean") is not None:
        line = f"eval {_num(ev['mean'], '.4f')} ± {_num(ev.get('std'), '.4f')}"
        if base.get("mean") is not None:
            line += f" vs random subset {_num(base['mean'], '.4f')} ± {_num(base.get('std'), '.4f')}"
        line += f" ({escape(str(ev.get('protocol', '?')))}, {escape(str(ev.get('runs', '?')))} runs)"
    else:
        line = "no eval yet"
    facts = (f"step {_num(t.latest_step, 'd', '0')}/{_num(r.get('steps'), 'd', '?')}, checkpoint "
             f"{_num(r.get('checkpoint_step'), 'd')}, {r['preemptions']} preemptions, "
             f"{r['failures']} failures, {r['attempts']} attempts, "
             f"{r['accelerator_hours']:.3f} {escape(str(r.get('accelerator_unit') or ''))}-hours")
    parts = [f'<section class="trial" id="t{i}" data-key="{escape(t.rec.key)}" '
             f'data-state="{escape(t.rec.status)}">',
             f"<h3>{rank}{escape(t.rec.key)} {_badge(t.rec.status)}</h3>",
             f'<div class="meta">{params or "no swept parameters"}</div>',
             f"<div>{line}</div><div class=meta>{facts}</div>"]
    if t.notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{escape(n)}</li>" for n in t.notes) + "</ul>")
    figs = []
    if "grid" in t.images:
        figs.append("<div><b>distilled images</b>" + _img(t.images["grid"], "grid", f"distilled images of {t.rec.key}") + "</div>")
    else:
        figs.append('<div class="none">no distilled images yet</div>')
    if "labels" in t.images:
        figs.append("<div><b>learned labels</b>" + _img(t.images["labels"], "labels", f"learned labels of {t.rec.key}") + "</div>")
    parts.append('<div class="figs">' + "".join(figs) + "</div>")
    if "curves" in t.images:
        parts.append(_img(t.images["curves"], "curves", f"curves of {t.rec.key}"))
    else:
        parts.append('<div class="none">no metrics yet</div>')
    if t.rec.errors and t.rec.status in (mf.ERROR, mf.FAILED):
        last = t.rec.errors[-1]
        parts.append(f"<details open><summary>last error (attempt {escape(str(last.get('attempt', '?')))})"
                     f"</summary><pre>{escape(str(last.get('traceback', ''))[-4000:])}</pre></details>")
    parts.append(_history(t))
    parts.append("</section>")
    return "".join(parts)


def search_panel(rep: "Report") -> str:
    """`<section id="search">`: the metric against each searched parameter, and the
    intermediate-metric curves, STOPPED and COMPLETED trials drawn apart."""
    counts = rep.counts
    done, stopped = counts.get(mf.COMPLETED, 0), counts.get(mf.STOPPED, 0)
    other = sum(counts.values()) - done - stopped
    legend = (f'{_badge(mf.COMPLETED)} {done} finished: solid, ★ final evaluation &middot; '
              f'{_badge(mf.STOPPED)} {stopped} stopped early by the scheduler: dashed, ✕ where '
              f"stopped, ranked on the last estimate they reached"
              + (f" &middot; {other} other (running, pending, preempted, failed): dotted" if other else ""))
    figs = []
    if "params" in rep.search:
        figs.append(f"<div><b>{escape(rep.metric)} vs searched parameters</b>"
                    + _img(rep.search["params"], "search-params", f"{rep.metric} vs searched parameters")
                    + "</div>")
    elif not rep.params:
        figs.append('<div class="none">no searched parameters: one point of the space</div>')
    if "curves" in rep.search:
        figs.append("<div><b>intermediate val/acc by step</b>"
                    + _img(rep.search["curves"], "search-curves", "intermediate val/acc by step")
                    + "</div>")
    if not rep.search:
        figs.append('<div class="none">no search figures (report built without figures)</div>')
    return (f'<section id="search" data-completed="{done}" data-stopped="{stopped}">'
            f'<p class="meta">{legend}</p><div class="figs">{"".join(figs)}</div></section>')


def render(rep: "Report") -> str:
    """The whole page."""
    counts = ", ".join(f"{n} {s}" for s, n in sorted(rep.counts.items()))
    notes = ""
    if rep.notes:
        notes = ('<h2>Notes</h2><ul class="notes" id="notes">'
                 + "".join(f"<li>{escape(n)}</li>" for n in rep.notes) + "</ul>")
    best = "best first" if rep.mode == "max" else "lowest first"
    return "".join([
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        '<meta name=viewport content="width=device-width,initial-scale=1">',
        '<link rel="icon" href="data:,">',
        f"<title>rcig report: {escape(rep.name)}</title><style>{CSS}</style></head><body>",
        f"<h1>rcig sweep report: {escape(rep.name)}</h1>",
        f'<div class="meta">{escape(rep.uri)}<br>made <time id="generated" datetime="'
        f'{time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(rep.generated))}">{_when(rep.generated)}'
        f"</time> &middot; {len(rep.trials)} trials: {escape(counts)} &middot; ranked by "
        f"<code>{escape(rep.metric)}</code> ({best}) &middot; rerun <code>rcig report "
        f"{escape(rep.uri)}</code> to refresh</div>",
        notes,
        "<h2>In progress</h2>", in_progress(rep),
        "<h2>Leaderboard</h2><p class=meta>Click a column to sort.</p>", leaderboard(rep),
        "<h2>Search</h2>", search_panel(rep),
        "<h2>Trials</h2>",
        "".join(trial_section(i, t) for i, t in enumerate(rep.trials)),
        f"<script>{SORT_JS}</script></body></html>",
    ])
