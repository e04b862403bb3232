"""The default `rcig distill` run, phase by phase: wall and CPU seconds of each phase.

Phases: engine build + LR search, init + first step (the step's compile, and the
loop-form guard on CPU), the remaining outer steps, the evaluation (distilled + random
real). The same work as `rcig distill` on the given config (no checkpoints or files), so
phase costs can be compared between configurations. CPU seconds (user + system, all
threads of this process) are reported beside wall seconds because this project's CPU
measurements run on a shared machine: the 1-minute load average is recorded before and
after each run.

    python -m benchmarks.default_run                       # the defaults
    python -m benchmarks.default_run --set loop=scan --set steps=1000 --set lr_tune.method=linear
    python -m benchmarks.default_run --dataset npz --data-dir digits28.npz --preset laptop_mnist
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Phases:
    def __init__(self):
        self.rows: dict[str, dict] = {}

    def __call__(self, name: str):
        phases = self

        class _Ctx:
            def __enter__(self):
                self.w, self.c = time.perf_counter(), cpu_s()

            def __exit__(self, *exc):
                phases.rows[name] = {"wall_s": time.perf_counter() - self.w, "cpu_s": cpu_s() - self.c}

        return _Ctx()


def run(cfg, *, progress: bool = False) -> dict:
    import jax
    import numpy as np

    from rcig import export
    from rcig.data import init_proto_indices, load_dataset, real_batch_indices, shifted_one_hot
    from rcig.engine import Engine
    from rcig.evaluate import evaluate_distilled

    ph = Phases()
    load0 = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), cpu_s()
    ds = load_dataset(cfg.dataset, cfg.data_dir)
    key = jax.random.PRNGKey(cfg.seed)
    idx = init_proto_indices(ds.y_train, ds.num_classes, cfg.ipc, cfg.seed)
    x0, y0 = ds.x_train[idx], shifted_one_hot(ds.y_train[idx], ds.num_classes)

    def batch_for(eng, s):
        i = real_batch_indices(cfg.seed, s, len(ds.x_train), cfg.outer.real_batch_size)
        return eng.put_batch(ds.x_train[i], shifted_one_hot(ds.y_train[i], ds.num_classes))

    tuning = None
    with ph("lr_search"):
        eng = Engine(cfg, ds.image_shape, ds.num_classes)
        inner_lr, hvp_lr = cfg.inner.lr, cfg.hinv.lr
        if not cfg.lr_tune.skip:
            cs = {"x": np.asarray(x0, np.float32), "y": y0, "log_temp": np.float32(0.0)}
            tuning = eng.tune_learning_rates(cs, batch_for(eng, 0), jax.random.fold_in(key, 1), inner_lr, hvp_lr)
            inner_lr, hvp_lr = tuning["inner"], tuning["hvp"]
    with ph("compile_first_step"):
        state = eng.init_state(x0, y0, key, inner_lr, hvp_lr)
        state, m = eng.step(state, batch_for(eng, 0))
        jax.block_until_ready(m)
    with ph("steps"):
        for s in range(1, cfg.steps):
            state, m = eng.step(state, batch_for(eng, s))
        m = {k: float(v) for k, v in jax.device_get(m).items()}
    with ph("eval"):
        arrays = export.distilled_arrays(jax.device_get(state["ema"]["average"]), ds, cfg, cfg.steps)
        ev = evaluate_distilled(arrays["x_proto"], arrays["y_proto"], ds, use_flip=cfg.outer.use_flip, cfg=cfg.eval,
                                width=cfg.eval.width or cfg.model.width, ipc=cfg.ipc, seed=cfg.seed, depth=cfg.model.depth)
    total = {"wall_s": time.perf_counter() - t0, "cpu_s": cpu_s() - c0}
    base = ev.get("baseline") or {}
    return {
        "config": cfg.to_dict(), "phases": ph.rows, "total": total,
        "loop_used": "unroll" if eng.ctx.unroll else "scan", "guard_log": eng.guard_log,
        "tuning": None if tuning is None else {k: v for k, v in tuning.items() if k != "record"},
        "tuning_record": None if tuning is None else tuning["record"],
        "final_metrics": m,
        "eval": {"mean": ev["mean"], "std": ev["std"], "baseline_mean": base.get("mean"),
                 "baseline_std": base.get("std"), "protocol": ev.get("protocol"), "runs": ev.get("runs")},
        "gap_points": 100 * (ev["mean"] - base["mean"]) if base else None,
        "load_avg_1m": {"before": load0, "after": os.getloadavg()[0]},
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--preset", default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/cpu_default_run_<label>.json)")
    p.add_argument("--label", default="defaults")
    opts = p.parse_args(argv)

    import jax

    from rcig.config import make_config

    over = list(opts.set) + ([f"data_dir={opts.data_dir}"] if opts.data_dir else [])
    cfg = make_config(opts.dataset, opts.ipc, preset=opts.preset, overrides=over)
    rec = run(cfg)
    rec["machine"] = {"node": platform.node(), "cpus": os.cpu_count(), "backend": jax.default_backend(),
                      "devices": len(jax.local_devices()), "jax": jax.__version__,
                      "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    rec["command"] = "python -m benchmarks.default_run " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    print(f"{'phase':<20} {'wall s':>8} {'cpu s':>8}")
    for name, r in {**rec["phases"], "total": rec["total"]}.items():
        print(f"{name:<20} {r['wall_s']:8.1f} {r['cpu_s']:8.1f}")
    t = rec["tuning"]
    if t:
        print(f"LR search: inner {t['inner']:.3g}, H-solve {t['hvp']:.3g}, {t['probes']} probes, capped {t['capped']}")
    e = rec["eval"]
    vs = (f" vs random {e['baseline_mean']:.4f} ± {e['baseline_std']:.4f} (gap {rec['gap_points']:+.1f} points)"
          if rec["gap_points"] is not None else " (no baseline)")
    print(f"eval: distilled {e['mean']:.4f} ± {e['std']:.4f}{vs}; loop {rec['loop_used']}; load {rec['load_avg_1m']}")
    out = Path(opts.out or Path(__file__).parent / "results" / f"cpu_default_run_{opts.label}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=1, default=float) + "\n")
    print(f"wrote {out}")
    return rec


if __name__ == "__main__":
    main()
