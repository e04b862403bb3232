"""The pre-training learning-rate search (docs/algorithm.md §8.2 of the algorithm notes) as a pure function.

The search knows nothing of JAX, devices or the step: it is given a *probe*, a callable
that runs one short probe step per candidate learning rate and returns each candidate's
label (§8.1: +1 monotonic, 0 unstable, -1 fail), and returns the chosen learning rates
with a record of every probe it asked for. `rcig.engine.Engine.tune_learning_rates`
supplies the real probe; the tests supply fake ones.

The rule (§8.2): for the inner LR, then for the H-solve LR (with the inner LR fixed at its
result), the candidates are the grid lr0 * growth**i, i = 0, 1, 2, ...; the chosen LR is
backoff * (the first candidate whose probe is not monotonic). The original walks the grid
one candidate at a time (`method="linear"`). `method="bracket"` (the default) finds the
same first non-monotonic index with O(log i) probes: it gallops (i = 0, 1, 3, 7, 15, ...)
until a probe is not monotonic, then bisects between the last monotonic and the first
non-monotonic index. Both give the same answer whenever the labels along the grid are
monotonic-then-not (every label after the first non-monotonic one is non-monotonic too);
if a probe pattern is not of that form, `bracket` returns *a* boundary between a
monotonic and a non-monotonic candidate, `linear` the first one.

Caps: `max_index` bounds the grid and `max_probes` the number of probes of one search.
If no candidate tried is non-monotonic within them, the search is reported as capped and
returns backoff * lr0 * growth**(m + 1), m the largest index tried (with `linear` and
max_probes = 60 that is the earlier engine's 60-probe cap exactly); if the probe budget
runs out while bisecting, the smallest non-monotonic candidate seen decides.

`batch` candidates are handed to the probe per call (a vmapped probe on an accelerator
tries several LRs at the price of one call): `linear` tries the next `batch` indices;
`bracket` tries the next `batch` gallop points, then `batch` evenly spaced interior points.

`should_stop()` (optional) is called before every probe call; if it returns true the
search raises `SearchStopped` (carrying the record so far) without probing again.

Example:
    >>> probe = lambda which, lrs: [1 if lr < 1e-3 else -1 for lr in lrs]
    >>> r = search_lr(probe, "inner", 1e-5)
    >>> round(r.lr, 8), r.capped, len(r.probes) < 15
    (0.00080133, False, True)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

MONOTONIC, UNSTABLE, FAIL = 1, 0, -1
LABEL_NAMES = {MONOTONIC: "monotonic", UNSTABLE: "unstable", FAIL: "fail"}
METHODS = ("bracket", "linear")

# probe(which, lrs) -> one label per candidate learning rate, in order
Probe = Callable[[str, Sequence[float]], Sequence[int]]


class SearchStopped(RuntimeError):
    """`should_stop()` returned true between probes; `.record` holds the probes done so far."""

    def __init__(self, record: list[dict]):
        super().__init__(f"learning-rate search stopped on request after {len(record)} probes")
        self.record = record


def classify_values(values: Sequence[float]) -> int:
    """§8.1 on host values: +1 strictly decreasing, -1 ended above its start, else 0."""
    v = [float(x) for x in values]
    if all(a > b for a, b in zip(v[:-1], v[1:])):
        return MONOTONIC
    return FAIL if v[-1] > v[0] else UNSTABLE


@dataclass
class SearchResult:
    which: str
    lr: float  # the chosen learning rate
    first_bad_index: int | None  # grid index of the first non-monotonic candidate found
    capped: bool  # no non-monotonic candidate within the caps
    probes: list[dict] = field(default_factory=list)  # {which, index, lr, label, name, call}
    calls: int = 0
    seconds: float = 0.0


def search_lr(
    probe: Probe,
    which: str,
    lr0: float,
    *,
    growth: float = 1.2,
    backoff: float = 0.7,
    max_index: int = 60,
    max_probes: int = 60,
    method: str = "bracket",
    batch: int = 1,
    should_stop: Callable[[], bool] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> SearchResult:
    """Search one learning rate (`which`: "inner" or "hvp") on the grid lr0 * growth**i."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if not (growth > 1 and lr0 > 0 and batch >= 1 and max_index >= 0 and max_probes >= 1):
        raise ValueError("need growth > 1, lr0 > 0, batch >= 1, max_index >= 0, max_probes >= 1")
    t0 = clock()
    labels: dict[int, int] = {}
    record: list[dict] = []
    calls = 0

    def grid(i: int) -> float:
        return lr0 * growth**i

    def run(indices: list[int]) -> None:
        nonlocal calls
        indices = [i for i in dict.fromkeys(indices) if i not in labels][: max_probes - len(labels)]
        if not indices:
            return
        if should_stop is not None and should_stop():
            raise SearchStopped(record)
        out = [int(v) for v in probe(which, [grid(i) for i in indices])]
        if len(out) != len(indices):
            raise ValueError(f"probe returned {len(out)} labels for {len(indices)} learning rates")
        for i, lab in zip(indices, out):
            labels[i] = lab
            record.append({"which": which, "index": i, "lr": grid(i), "label": lab,
                           "name": LABEL_NAMES.get(lab, str(lab)), "call": calls})
        calls += 1

    def budget_left() -> bool:
        return len(labels) < max_probes

    def first_bad() -> int | None:
        bad = [i for i, lab in labels.items() if lab != MONOTONIC]
        return min(bad) if bad else None

    if method == "linear":
        i = 0
        while i <= max_index and budget_left() and first_bad() is None:
            run(list(range(i, min(i + batch, max_index + 1))))
            i += batch
    else:
        # gallop: indices 0, 1, 3, 7, ... (2^j - 1), capped at max_index
        j = 0
        while budget_left() and first_bad() is None:
            pts = []
            while len(pts) < batch:
                i = min(2**j - 1, max_index)
                j += 1
                if not pts or i != pts[-1]:
                    pts.append(i)
                if i == max_index:
                    break
            run(pts)
            if pts[-1] == max_index:
                break
        # bisect between the largest monotonic index below the first bad one and it
        while budget_left() and first_bad() is not None:
            hi = first_bad()
            good = [i for i, lab in labels.items() if lab == MONOTONIC and i < hi]
            lo = max(good) if good else -1
            if hi - lo <= 1:
                break
            gap = hi - lo - 1
            k = min(batch, gap)
            run(sorted({lo + max(1, round((m + 1) * (gap + 1) / (k + 1))) for m in range(k)} - {hi}))
    bad = first_bad()
    if bad is not None:
        lr, capped = grid(bad) * backoff, False
    else:  # every candidate tried was monotonic: one grid step past the largest, backed off
        lr, capped = grid(max(labels) + 1) * backoff, True
    return SearchResult(which, float(lr), bad, capped, record, calls, clock() - t0)


def search_learning_rates(
    probe: Probe,
    inner_lr0: float,
    hvp_lr0: float,
    *,
    set_inner: Callable[[float], None] | None = None,
    **kw,
) -> dict:
    """Inner search, then the H-solve search with the inner LR at its result (§8.2).

    `probe(which, lrs)` is called with which="inner" (lrs: inner LRs) or "hvp" (lrs:
    H-solve LRs); before the H-solve search `set_inner(inner_lr)` tells the probe the inner
    LR to hold fixed. Returns {"inner", "hvp", "probes", "calls", "seconds", "capped",
    "record", "method"} (JSON-ready).
    """
    inner = search_lr(probe, "inner", inner_lr0, **kw)
    if set_inner is not None:
        set_inner(inner.lr)
    hvp = search_lr(probe, "hvp", hvp_lr0, **kw)
    return {
        "inner": inner.lr,
        "hvp": hvp.lr,
        "probes": len(inner.probes) + len(hvp.probes),
        "calls": inner.calls + hvp.calls,
        "seconds": inner.seconds + hvp.seconds,
        "capped": [r.which for r in (inner, hvp) if r.capped],
        "first_bad_index": {"inner": inner.first_bad_index, "hvp": hvp.first_bad_index},
        "record": inner.probes + hvp.probes,
        "method": kw.get("method", "bracket"),
    }


def linear_probe_count(first_bad_index: int | None, max_index: int) -> int:
    """Probes the one-at-a-time search needs for the same answer (for reports)."""
    return (first_bad_index + 1) if first_bad_index is not None else max_index + 1


