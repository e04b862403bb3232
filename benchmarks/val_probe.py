"""The intermediate validation metric (`rcig.val_probe`): its cost, and whether it ranks
runs like the final evaluation does.

Runs the quickstart's trial config (digits, ipc 1, 100 steps, width 16, the probe every
25 steps) once per coreset learning rate, one after another in this process, and records
for each run: the probe's `val/acc` at every probe step, the final evaluation's validation
and test accuracy, the seconds spent in probes and the run's wall time. Prints and saves
(benchmarks/results/val_probe.json) the Spearman rank correlation over the runs between
the probe at each probe step and the final validation (and test) accuracy, and the
probes' share of the run time.

Example:
    PYTHONPATH=. python -m benchmarks.val_probe --lrs 3e-4,1e-3,3e-3,1e-2,3e-2,1e-1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
QUICKSTART = ["steps=100", "model.width=16", "outer.real_batch_size=128", "pool.model_count=4",
              "eval.runs=3", "eval.baseline=false", "eval.every_steps=25",
              "checkpoint.every_steps=25"]


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rho with average ranks for ties (NaN if either side is constant)."""
    import numpy as np

    def ranks(v):
        v = np.asarray(v, float)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for x in np.unique(v):  # ties: average rank
            r[v == x] = r[v == x].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lrs", default="3e-4,1e-3,3e-3,1e-2,3e-2,1e-1", help="outer.proto_lr values")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], help="extra config overrides")
    ap.add_argument("--out", default=str(RESULTS / "val_probe.json"))
    a = ap.parse_args(argv)

    from rcig.config import make_config
    from rcig.distill import run_distillation

    runs = []
    root = tempfile.mkdtemp(prefix="rcig-val-probe-")
    try:
        for lr in [float(v) for v in a.lrs.split(",")]:
            cfg = make_config("digits", 1, overrides=QUICKSTART + [f"outer.proto_lr={lr}",
                                                                   f"seed={a.seed}"] + a.set)
            probes: dict[int, float] = {}
            probe_s: dict[int, float] = {}

            def on_metrics(s, m):
                if m.get("val/step") is not None:
                    probes[int(m["val/step"])] = m["val/acc"]
                    probe_s[int(m["val/step"])] = m["val/probe_s"]

            t0 = time.perf_counter()
            res = run_distillation(cfg, os.path.join(root, f"lr{lr}"), progress=False,
                                   on_metrics=on_metrics)
            wall = time.perf_counter() - t0
            row = {"proto_lr": lr, "probes": probes, "probe_s": probe_s, "wall_s": wall,
                   "probe_total_s": sum(probe_s.values()), "eval_wall_s": res.eval["wall_s"],
                   "val": res.eval["val_mean"], "test": res.eval["mean"]}
            row["probe_share"] = row["probe_total_s"] / wall
            # The first probe of a process compiles the evaluation network, which the final
            # evaluation would otherwise compile: the share without it is the added cost.
            first = min(probe_s)
            row["probe_share_warm"] = (row["probe_total_s"] - probe_s[first]) / (wall - probe_s[first])
            print(json.dumps(row), flush=True)
            runs.append(row)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    steps = sorted(set.intersection(*(set(r["probes"]) for r in runs)))
    out = {
        "config": QUICKSTART + a.set, "seed": a.seed, "runs": runs,
        "spearman_vs_final_val": {s: spearman([r["probes"][s] for r in runs], [r["val"] for r in runs]) for s in steps},
        "spearman_vs_final_test": {s: spearman([r["probes"][s] for r in runs], [r["test"] for r in runs]) for s in steps},
        "spearman_final_val_vs_test": spearman([r["val"] for r in runs], [r["test"] for r in runs]),
        "probe_share_of_run": {"mean": sum(r["probe_share"] for r in runs) / len(runs),
                               "max": max(r["probe_share"] for r in runs),
                               "warm_mean": sum(r["probe_share_warm"] for r in runs) / len(runs)},
    }
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}, indent=1))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
