"""Figures of the sweep report, drawn with matplotlib (Agg) into PNG (or JPEG) bytes.

Each function takes plain arrays / metric rows and returns PNG bytes, so the HTML side
only embeds them as `data:` URIs. `matplotlib.figure.Figure` is used directly (no pyplot),
so nothing here touches matplotlib's global backend or figure registry.

Example:
    >>> import numpy as np
    >>> png = image_grid_figure(np.random.rand(4, 8, 8, 1), np.array([0, 0, 1, 1]), ["a", "b"])
    >>> png[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
    True
"""

from __future__ import annotations

import io
import math
from typing import Any, Sequence

import numpy as np

CURVES = (("outer/loss", "outer loss", True), ("outer/acc", "outer accuracy", False),
          ("hinv/residual", "H⁻¹ residual", True))
MAX_POINTS = 4000
BLOCK_ROWS = 25
MAX_PNG_BYTES = 1_000_000
DPI = 80


def _png(fig, tight: bool = True) -> bytes:
    """PNG bytes of a figure; a JPEG (quality 90) instead where the PNG passes `MAX_PNG_BYTES`
    (large colour image grids), so reports of big sweeps stay a reasonable size."""
    bbox = "tight" if tight else None
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches=bbox)
    if buf.tell() > MAX_PNG_BYTES:
        buf = io.BytesIO()
        fig.savefig(buf, format="jpg", dpi=DPI, bbox_inches=bbox, pil_kwargs={"quality": 90})
    return buf.getvalue()


def _figure(width_in: float, height_in: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width_in, height_in))


def class_order(y_class: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image order grouping images by class, the classes in row order).

    Example:
        >>> class_order(np.array([1, 0, 1, 0]))
        (array([1, 3, 0, 2]), array([0, 1]))
    """
    y = np.asarray(y_class).reshape(-1)
    return np.argsort(y, kind="stable"), np.unique(y)


def _class_label(names: Sequence[str], c: int) -> str:
    return str(names[c]) if 0 <= c < len(names) else str(c)


def image_grid_figure(x_pixels: np.ndarray, y_class: np.ndarray, class_names: Sequence[str]) -> bytes:
    """The distilled images, one row per class, each row labelled with its class name.

    `x_pixels` is [N, H, W, C] in pixel scale; each image is min-max scaled for display
    (as `rcig.export.image_grid_png` does). Many classes (> 30) are folded into side-by-side
    blocks of up to `BLOCK_ROWS` rows so the figure stays readable.
    """
    x = np.asarray(x_pixels, np.float32)
    if x.ndim == 3:
        x = x[..., None]
    order, classes = class_order(y_class)
    x, yc = x[order], np.asarray(y_class).reshape(-1)[order]
    n, h, w, _ = x.shape
    rows = max(1, len(classes))
    cols = int(math.ceil(n / rows))
    blocks = int(math.ceil(rows / BLOCK_ROWS)) if rows > 30 else 1
    per = int(math.ceil(rows / blocks))
    scale = max(1.0, 64 / max(h, w))  # small images drawn larger
    grid_h, grid_w = (per * (h + 1) + 1) * scale, (cols * (w + 1) + 1) * scale
    scale *= min(1.0, 3000 / grid_h, 1200 / (blocks * grid_w))
    ax_w, ax_h = (cols * (w + 1) + 1) * scale / DPI, (per * (h + 1) + 1) * scale / DPI
    label_in = 0.9
    fig = _figure(blocks * (ax_w + label_in), ax_h + 0.1)
    fig.subplots_adjust(left=label_in / (blocks * (ax_w + label_in)), right=1.0, bottom=0.0,
                        top=1.0, wspace=label_in / ax_w)
    for b, ax in enumerate(fig.subplots(1, blocks, squeeze=False)[0]):
        block = classes[b * per:(b + 1) * per]
        ax.set_xticks([])
        for side in ("top", "right", "bottom", "left"):
            ax.spines[side].set_visible(False)
        if not len(block):
            ax.set_yticks([])
            continue
        grid = _grid_pixels(x[np.isin(yc, block)], len(block))
        ax.imshow(grid, cmap="gray" if grid.ndim == 2 else None, interpolation="nearest",
                  vmin=0, vmax=255)
        ax.set_yticks([1 + r * (h + 1) + h / 2 for r in range(len(block))])
        ax.set_yticklabels([_class_label(class_names, int(c)) for c in block], fontsize=8)
    return _png(fig)


def _grid_pixels(x: np.ndarray, rows: int) -> np.ndarray:
    """uint8 pixels of `rcig.export.image_grid_png`'s grid (unscaled)."""
    from PIL import Image

    from rcig.export import image_grid_png

    return np.asarray(Image.open(io.BytesIO(image_grid_png(x, rows=rows, scale=1))))


def label_heatmap_figure(y_proto: np.ndarray, y_class: np.ndarray, class_names: Sequence[str]) -> bytes:
    """Heatmap of the learned labels: one row per distilled image (grouped by class),
    one column per class, diverging colours centred at 0, with a colour bar."""
    y = np.asarray(y_proto, np.float32)
    order, _ = class_order(y_class)
    y = y[order]
    yc = np.asarray(y_class).reshape(-1)[order]
    n, c = y.shape
    lim = float(np.nanmax(np.abs(y))) if y.size else 1.0
    lim = lim if math.isfinite(lim) and lim > 0 else 1.0
    fig = _figure(min(12.0, max(3.5, 0.32 * c + 2.0)), min(30.0, max(2.0, 0.22 * n + 1.0)))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(y, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
    small = 7 if max(n, c) <= 40 else 4
    if c <= 40:
        ax.set_xticks(range(c))
        ax.set_xticklabels([_class_label(class_names, j) for j in range(c)], rotation=90, fontsize=small)
    if n <= 60:
        ax.set_yticks(range(n))
        ax.set_yticklabels([_class_label(class_names, int(k)) for k in yc], fontsize=small)
    ax.set_xlabel("label dimension (class)", fontsize=8)
    ax.set_ylabel("distilled image (its class)", fontsize=8)
    ax.set_title("learned labels y_proto", fontsize=9)
    return _png(fig)


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[key]) for r in rows
           if isinstance(r.get(key), (int, float)) and isinstance(r.get("step"), (int, float))
           and math.isfinite(r[key])]
    if not pts:
        return np.zeros(0), np.zeros(0)
    arr = np.asarray(pts, np.float64)
    if len(arr) > MAX_POINTS:  # keep the shape, always keep the last point
        idx = np.unique(np.r_[np.linspace(0, len(arr) - 1, MAX_POINTS).astype(int), len(arr) - 1])
        arr = arr[idx]
    return arr[:, 0], arr[:, 1]


def curves_figure(rows: Sequence[dict[str, Any]], eval_result: dict[str, Any] | None,
                  eval_step: int | None) -> bytes:
    """Four panels over outer steps: outer/loss, outer/acc, hinv/residual, eval accuracy.

    Eval accuracy: `eval/*` metrics logged during the run if any, and the final evaluation
    (mean ± std at `eval_step`) next to the random-subset baseline.
    """
    fig = _figure(13.0, 2.6)
    axes = fig.subplots(1, 4)
    for ax, (key, title, log) in zip(axes, CURVES):
        s, v = _series(rows, key)
        ax.set_title(title, fontsize=9)
        if len(s):
            ax.plot(s, v, lw=1.0, color="tab:blue")
            if log and np.all(v > 0):
                ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, f"no {key} yet", ha="center", va="center", transform=ax.transAxes,
                    fontsize=8, color="gray")
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    ax = axes[3]
    ax.set_title("eval accuracy", fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    drawn = False
    for key in sorted({k for r in rows for k in r if k.startswith("eval/") and "std" not in k}):
        s, v = _series(rows, key)
        if len(s):
            ax.plot(s, v, lw=1.0, marker=".", label=key)
            drawn = True
    if eval_result and isinstance(eval_result.get("mean"), (int, float)):
        x = eval_step or 0
        ax.errorbar([x], [eval_result["mean"]], yerr=[eval_result.get("std") or 0.0], fmt="o",
                    color="tab:green", capsize=3, label="distilled")
        base = eval_result.get("baseline") or {}
        if isinstance(base.get("mean"), (int, float)):
            ax.axhline(base["mean"], color="tab:red", ls="--", lw=1.0, label="random subset")
            if base.get("std"):
                ax.axhspan(base["mean"] - base["std"], base["mean"] + base["std"], color="tab:red",
                           alpha=0.12)
        drawn = True
    if drawn:
        last = max([int(r["step"]) for r in rows if isinstance(r.get("step"), int)] + [eval_step or 0])
        if last > 0:
            ax.set_xlim(0, last * 1.05)
        ax.legend(fontsize=7, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no eval yet", ha="center", va="center", transform=ax.transAxes,
                fontsize=8, color="gray")
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.17, top=0.88, wspace=0.3)
    return _png(fig, tight=False)  # fixed margins: "tight" would draw the figure twice


# ---- the search panel ---------------------------------------------------------------------
# How a trial's state is drawn in the search figures (colours as in the page's badges).
STATE_STYLE = {"COMPLETED": ("#1a7f37", "-", "o"), "STOPPED": ("#57606a", "--", "X")}
OTHER_STYLE = ("#0969da", ":", "s")


def _style(state: str) -> tuple[str, str, str]:
    from orchestrator.report_html import STATE_COLOURS

    colour, ls, marker = STATE_STYLE.get(state, OTHER_STYLE)
    return STATE_COLOURS.get(state, colour), ls, marker


def _state_label(state: str) -> str:
    return {"COMPLETED": "COMPLETED (final evaluation)",
            "STOPPED": "STOPPED early (last estimate)"}.get(state, state)


def _axis_values(values: Sequence[Any]) -> tuple[list[float], list[str] | None, bool]:
    """(x positions, category labels or None, log scale?) of one parameter's values."""
    nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(nums) == len(values):
        arr = np.asarray(nums, np.float64)
        log = bool(len(arr) and np.all(arr > 0) and arr.max() / arr.min() >= 20)
        return [float(v) for v in nums], None, log
    cats = sorted({str(v) for v in values})
    return [float(cats.index(str(v))) for v in values], cats, False


def search_params_figure(params: Sequence[str], points: Sequence[dict[str, Any]], metric: str) -> bytes:
    """The sweep's metric against each searched parameter: one panel per parameter, one
    point per trial with a value (`points`: {"params", "value", "state"}), its marker and
    colour by state (COMPLETED: final evaluation; STOPPED: the last intermediate estimate
    it reached before the scheduler stopped it)."""
    n = max(1, len(params))
    cols = min(n, 3)
    rows = int(math.ceil(n / cols))
    fig = _figure(4.2 * cols, 3.0 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).reshape(-1)
    for ax, name in zip(axes, params):
        have = [p for p in points if name in p["params"]]
        xs, cats, log = _axis_values([p["params"][name] for p in have])
        for state in sorted({p["state"] for p in have}):
            colour, _, marker = _style(state)
            idx = [i for i, p in enumerate(have) if p["state"] == state]
            ax.scatter([xs[i] for i in idx], [have[i]["value"] for i in idx], c=colour, marker=marker,
                       s=36, alpha=0.85, label=_state_label(state), edgecolors="none")
        if log:
            ax.set_xscale("log")
        if cats is not None:
            ax.set_xticks(range(len(cats)))
            ax.set_xticklabels(cats, fontsize=7, rotation=30 if len(cats) > 4 else 0)
        ax.set_xlabel(name, fontsize=8)
        ax.set_ylabel(metric, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if not have:
            ax.text(0.5, 0.5, "no trial has a value yet", ha="center", va="center",
                    transform=ax.transAxes, fontsize=8, color="gray")
    for ax in axes[len(params):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        axes[0].legend(handles, labels, fontsize=7, loc="best")
    return _png(fig)


def search_curves_figure(curves: Sequence[dict[str, Any]], metric: str) -> bytes:
    """The intermediate metric against the outer step, one line per trial (`curves`:
    {"steps", "values", "state", "final", "final_step"}): COMPLETED solid, ending at its
    final evaluation (a star); STOPPED dashed, ending with a cross where the scheduler
    stopped it; any other state dotted."""
    fig = _figure(7.5, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    seen: set[str] = set()
    for c in curves:
        colour, ls, _ = _style(c["state"])
        label = None if c["state"] in seen else _state_label(c["state"])
        seen.add(c["state"])
        steps, values = list(c["steps"]), list(c["values"])
        ax.plot(steps, values, ls=ls, lw=1.2, color=colour, alpha=0.85, label=label, marker=".", ms=4)
        if c["state"] == "STOPPED" and steps:
            ax.plot([steps[-1]], [values[-1]], marker="X", ms=8, color=colour, ls="none")
        if isinstance(c.get("final"), (int, float)):
            x = c.get("final_step") or (steps[-1] if steps else 0)
            ax.plot([x], [c["final"]], marker="*", ms=10, color=colour, ls="none")
    if not curves:
        ax.text(0.5, 0.5, f"no trial has reported {metric} yet", ha="center", va="center",
                transform=ax.transAxes, fontsize=9, color="gray")
    else:
        ax.legend(fontsize=7, loc="lower right")
    ax.set_xlabel("outer step", fontsize=8)
    ax.set_ylabel(metric, fontsize=8)
    ax.set_title(f"intermediate {metric} (★ final evaluation, ✕ stopped by the scheduler)", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.14, top=0.9)
    return _png(fig, tight=False)
