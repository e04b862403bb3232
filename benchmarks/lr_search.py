"""The learning-rate search alone on digits: probes, seconds (wall and CPU), the LRs found.

    python -m benchmarks.lr_search --ipc 1
    python -m benchmarks.lr_search --ipc 10 --set lr_tune.method=linear   # the one-at-a-time search

Runs `Engine.tune_learning_rates` exactly as `rcig distill` does (same coreset, real batch,
keys) and writes every probe (index, LR, label) to benchmarks/results/. The machine's
1-minute load average is recorded before and after: on a shared machine the wall time
mostly measures the other processes.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from benchmarks.default_run import cpu_s


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--label", default=None)
    opts = p.parse_args(argv)

    import jax
    import numpy as np

    from rcig.config import make_config
    from rcig.data import init_proto_indices, load_dataset, real_batch_indices, shifted_one_hot
    from rcig.engine import Engine

    cfg = make_config("digits", opts.ipc, overrides=opts.set)
    ds = load_dataset("digits")
    load0 = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), cpu_s()
    eng = Engine(cfg, ds.image_shape, ds.num_classes)
    idx = init_proto_indices(ds.y_train, ds.num_classes, cfg.ipc, cfg.seed)
    cs = {"x": ds.x_train[idx].astype(np.float32), "y": shifted_one_hot(ds.y_train[idx], ds.num_classes),
          "log_temp": np.float32(0.0)}
    bi = real_batch_indices(cfg.seed, 0, len(ds.x_train), cfg.outer.real_batch_size)
    batch = eng.put_batch(ds.x_train[bi], shifted_one_hot(ds.y_train[bi], ds.num_classes))
    key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 1)
    r = eng.tune_learning_rates(cs, batch, key, cfg.inner.lr, cfg.hinv.lr)
    rec = {"ipc": opts.ipc, "overrides": opts.set, "wall_s": time.perf_counter() - t0, "cpu_s": cpu_s() - c0,
           "load_avg_1m": {"before": load0, "after": os.getloadavg()[0]},
           "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), **r}
    print(f"ipc {opts.ipc} {cfg.lr_tune.method}: inner {r['inner']:.3g}, H-solve {r['hvp']:.3g}, {r['probes']} probes "
          f"({r['calls']} calls), capped {r['capped']}; search {r['seconds']:.1f} s wall, process {rec['wall_s']:.1f} s wall "
          f"/ {rec['cpu_s']:.1f} s CPU; load {rec['load_avg_1m']}")
    label = opts.label or f"ipc{opts.ipc}_{cfg.lr_tune.method}"
    out = Path(__file__).parent / "results" / f"cpu_lr_search_{label}.json"
    out.write_text(json.dumps(rec, indent=1, default=float) + "\n")
    print(f"wrote {out}")
    return rec


if __name__ == "__main__":
    main()
