"""The intermediate validation metric: a cheap, honest estimate of the distilled set's quality.

Every `eval.every_steps` outer steps a run trains `eval.probe_runs` fresh evaluation
networks (the docs/algorithm.md §10 protocol of `rcig.evaluate`: same network, optimiser, schedule shape,
augmentation) for `eval.probe_steps` steps at `eval.probe_lr` (100 steps at 1e-2: a
short run needs a larger step than the full evaluation's 1e-4) on the current EMA
distilled set, and scores
them on the **validation** split only (never the test split). The mean accuracy is
reported as `val/acc`, the name a sweep selects on, so Tune's searchers and schedulers
see the same quantity at every report as at the end (where `val/acc` is the full
evaluation's validation accuracy). It is the final evaluation shortened (fewer steps,
fewer networks), so it estimates the same thing; BENCHMARKS.md has its cost and how it
ranks trials against the final evaluation.

On CPU the probe reuses the final evaluation's compiled step (the step count is traced),
so it adds no compilation of its own.

Example:
    >>> probe = ValProbe(ds, cfg)                  # doctest: +SKIP
    >>> probe(state["ema"]["average"])             # doctest: +SKIP
    {'val/acc': 0.84, 'val/probe_s': 0.41}
"""

from __future__ import annotations

import time

import jax
import numpy as np

from rcig.augment import parse_ops
from rcig.config import DistillConfig
from rcig.evaluate import run_keys, train_and_score, with_flips

PROBE_SEED_OFFSET = 7919  # probe networks' keys differ from the final evaluation's


def probe_due(step: int, every: int, log_every: int, have_value: bool) -> bool:
    """Probe at every multiple of `every`, and at the first report of an attempt (a step
    that is a multiple of `log_every`) if there is no value yet, so that every report to
    Tune carries the metric.

    Example:
        >>> [s for s in range(1, 31) if probe_due(s, every=20, log_every=5, have_value=s > 5)]
        [5, 20]
    """
    if every <= 0:
        return False
    return step % every == 0 or (not have_value and step % log_every == 0)


class ValProbe:
    """`probe(ema_average) -> {"val/acc": mean validation accuracy, "val/probe_s": seconds}`."""

    def __init__(self, ds, cfg: DistillConfig):
        if getattr(ds, "x_val", None) is None:
            raise ValueError("the intermediate metric needs a validation split (val.fraction > 0)")
        self.ds, self.cfg = ds, cfg
        ev = cfg.eval
        self.ops = parse_ops(ev.aug) if ev.protocol == "rcig" else ()
        self.keys = run_keys(cfg.seed + PROBE_SEED_OFFSET, ev.probe_runs)
        self.width = ev.width or cfg.model.width

    def __call__(self, ema_average: dict) -> dict[str, float]:
        t0 = time.perf_counter()
        ev = self.cfg.eval
        x = np.asarray(jax.device_get(ema_average["x"]), np.float32)
        y = np.asarray(jax.device_get(ema_average["y"]), np.float32)
        n = x.shape[0]
        batch = None if n <= ev.batch_size else ev.batch_size
        if self.cfg.outer.use_flip:
            x, y = with_flips(x, y)
        accs, _ = train_and_score(
            x, y, {"val": (self.ds.x_val, self.ds.y_val)}, self.keys, width=self.width,
            depth=self.cfg.model.depth, steps=ev.probe_steps, lr=ev.probe_lr, batch=batch, ops=self.ops,
            test_batch=ev.test_batch_size)
        return {"val/acc": float(np.mean(accs["val"])), "val/probe_s": time.perf_counter() - t0}
