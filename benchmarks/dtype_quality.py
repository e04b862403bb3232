"""Distilled-set accuracy and speed of `compute_dtype=bfloat16` against float32.

For each dataset and each dtype: a full `run_distillation` (LR search, `--steps` outer
steps, evaluation against the same random real images), then one table row: accuracy
(mean ± std over the eval runs), the random baseline, the tuned learning rates, the
median outer-step time and the wall time. Both dtypes of a dataset start from the same
seed, so they share the initial support set, the real batches and the eval keys.

Datasets (`--data`):
- `digits`: the bundled 8x8 digits with the `digits` preset (the embedded default);
- `mnist_shape`: the same digits, bilinearly upsampled to 28x28x1 (MNIST's shape; no
  MNIST files ship with the project), written to an `.npz` and distilled with the
  `digits` preset deepened to MNIST's depth 3 (28 -> 14 -> 7 -> 3). Upsampled digits are
  smoother than MNIST strokes: this measures bf16 at MNIST's resolution and depth, not
  on MNIST itself; point `--npz` at a real MNIST `.npz` for that.

Imports only `rcig/` (and scikit-learn for the bundled digits). Examples:
    python -m benchmarks.dtype_quality --data digits --steps 300
    python -m benchmarks.dtype_quality --data mnist_shape --steps 200 --set model.width=16
    python -m benchmarks.dtype_quality --data mnist_shape --npz /data/mnist.npz
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks import common

DATA = ("digits", "mnist_shape")
# MNIST's depth on the embedded preset; the rest (width 32, real batch 256, pool of 10,
# no flips, noaug eval) stays the digits preset's. `--set` changes any of it.
MNIST_SHAPE_OVERRIDES = {"model.depth": 3}


def options(argv=None):
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.dtype_quality", description=__doc__.splitlines()[0])
    p.add_argument("--data", default="digits,mnist_shape", help=f"comma-separated: {', '.join(DATA)}")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--steps", type=int, default=300, help="outer steps per run")
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--npz", default=None, help="mnist_shape: use this .npz (e.g. real MNIST) instead of upsampled digits")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override (all runs)")
    p.add_argument("--tiny", action="store_true", help="toy sizes and few steps (exercises the script)")
    p.add_argument("--workdir", default=None, help="keep the runs' folders here (default: a temp folder, removed)")
    p.add_argument("--out", default=str(common.RESULTS / "dtype_quality.json"))
    opts = p.parse_args(argv)
    opts.data = [d.strip() for d in opts.data.split(",") if d.strip()]
    bad = [d for d in opts.data if d not in DATA]
    if bad:
        p.error(f"--data: unknown {', '.join(bad)}; known: {', '.join(DATA)}")
    opts.dtypes = [d.strip() for d in opts.dtypes.split(",") if d.strip()]
    bad = [d for d in opts.dtypes if d not in ("float32", "bfloat16")]
    if bad:
        p.error(f"--dtypes: unknown {', '.join(bad)}; known: float32, bfloat16")
    return opts


def upsampled_digits_npz(path: Path, size: int = 28) -> Path:
    """The bundled digits (same split) resized to size x size, as uint8, in an .npz."""
    import jax
    import numpy as np

    from rcig.data.digits import load_digits_split

    xtr, ytr, xte, yte, names = load_digits_split()

    def up(x):
        y = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), method="bilinear")
        return np.asarray(np.clip(np.round(np.asarray(y) * 255), 0, 255), dtype=np.uint8)

    np.savez(path, x_train=up(xtr), y_train=ytr, x_test=up(xte), y_test=yte, class_names=np.array(names))
    return path


def run_config(data: str, dtype: str, opts, npz: Path | None):
    from rcig.config import make_config, parse_override_strings

    over: dict = {"steps": opts.steps, "compute_dtype": dtype, "seed": opts.seed,
                  "checkpoint.every_steps": 0, "log_every": max(1, opts.steps)}
    if data == "mnist_shape":
        over.update(MNIST_SHAPE_OVERRIDES)
    if opts.tiny:
        over.update({k: v for k, v in common.TINY.items() if k != "pool.n_max_steps"})
        over.update({"eval.runs": 2, "eval.steps": 20, "lr_tune.max_probes": 3})
    over.update(parse_override_strings(opts.set))
    if data == "digits":
        return make_config("digits", opts.ipc, overrides=over)
    return make_config("npz", opts.ipc, preset="digits", overrides={**over, "data_dir": str(npz)})


def one_run(cfg, out_dir: Path) -> dict:
    from rcig.distill import run_distillation

    t0 = time.perf_counter()
    res = run_distillation(cfg, str(out_dir), progress=False)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    step_s = [r["time/step_s"] for r in rows[1:] if "time/step_s" in r]  # the first includes compile
    ev = res.eval or {}
    base = ev.get("baseline") or {}
    return {
        "acc_mean": ev.get("mean"), "acc_std": ev.get("std"), "accs": ev.get("accs"),
        "baseline_mean": base.get("mean"), "baseline_std": base.get("std"),
        "protocol": ev.get("protocol"),
        "final_outer_loss": res.final_metrics.get("outer/loss"),
        "tuning": res.tuning,
        "median_step_s": statistics.median(step_s) if step_s else None,
        "wall_s": wall,
    }


def main(argv=None) -> dict:
    opts = options(argv)
    common.prepare(1)
    work = Path(opts.workdir) if opts.workdir else Path(tempfile.mkdtemp(prefix="rcig-dtype-"))
    work.mkdir(parents=True, exist_ok=True)
    npz = None
    if "mnist_shape" in opts.data:
        npz = Path(opts.npz) if opts.npz else upsampled_digits_npz(work / "digits28.npz")
    info = common.machine_info()
    runs = []
    for data in opts.data:
        for dtype in opts.dtypes:
            cfg = run_config(data, dtype, opts, npz)
            rec = {"data": data, "dtype": dtype, "config": cfg.to_dict()}
            rec.update(one_run(cfg, work / f"{data}-{dtype}"))
            runs.append(rec)
            print(f"{data} {dtype}: acc {rec['acc_mean']:.3f} ± {rec['acc_std']:.3f} "
                  f"(random {rec['baseline_mean'] or float('nan'):.3f}), "
                  f"{rec['median_step_s'] or float('nan'):.3f} s/step, wall {rec['wall_s']:.0f} s", flush=True)

    def lr(t, k):
        return common.fmt((t or {}).get(k)) if t else "-"

    table = [{
        "data": r["data"], "dtype": r["dtype"],
        "acc": f"{r['acc_mean']:.3f} ± {r['acc_std']:.3f}",
        "random": "-" if r["baseline_mean"] is None else f"{r['baseline_mean']:.3f} ± {r['baseline_std']:.3f}",
        "inner_lr": lr(r["tuning"], "inner"), "hvp_lr": lr(r["tuning"], "hvp"),
        "s_step": common.fmt(r["median_step_s"]), "wall_s": f"{r['wall_s']:.0f}",
    } for r in runs]
    cols = [("data", "data"), ("dtype", "dtype"), ("acc", "distilled acc"), ("random", "random real"),
            ("inner_lr", "inner lr"), ("hvp_lr", "H-solve lr"), ("s_step", "s/step (median)"), ("wall_s", "wall s")]
    print(common.table(table, cols))
    out = {"machine": info, "steps": opts.steps, "ipc": opts.ipc, "tiny": opts.tiny,
           "mnist_shape_source": (str(opts.npz) if opts.npz else "bundled digits upsampled to 28x28 (bilinear)"),
           "runs": runs}
    print(f"wrote {common.write_json(opts.out, 'dtype_quality', out)}")
    if not opts.workdir:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return out


if __name__ == "__main__":
    main()
