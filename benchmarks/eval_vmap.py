"""Evaluation: R runs vmapped in one jitted program vs the same R runs one after another.

Trains R fresh ConvNets on a digits subset (ipc images per class, the `rcig` protocol with
augmentation) twice per mode, and prints the first call (with compilation) and the second
(warm) call, wall and process-CPU seconds. Accuracies of both modes must agree (same keys).

Modes: `seq` = runs_per_group 1; `vmap` = all runs in one vmap. `--loop` picks the step
loop for both (auto: a host loop over the jitted step on CPU, one lax.scan elsewhere).

Example:
    PYTHONPATH=. python -m benchmarks.eval_vmap --runs 5 --ipc 10 --steps 200 --width 32
"""

from __future__ import annotations

import argparse
import json
import resource
import time


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--aug", default="crop_rotate_translate_cutout")
    ap.add_argument("--loop", default="auto", choices=["auto", "python", "scan"])
    ap.add_argument("--modes", default="seq,vmap")
    a = ap.parse_args(argv)

    import jax
    import numpy as np

    from rcig.augment import parse_ops
    from rcig.data import init_proto_indices, load_dataset, shifted_one_hot
    from rcig.evaluate import run_keys, train_and_test

    ds = load_dataset("digits")
    idx = init_proto_indices(ds.y_train, ds.num_classes, a.ipc, 0)
    x, y = ds.x_train[idx], shifted_one_hot(ds.y_train[idx], ds.num_classes)
    keys = run_keys(0, a.runs)
    out = {"backend": jax.default_backend(), "device": str(jax.devices()[0]), **vars(a), "modes": {}}
    for mode in a.modes.split(","):
        group = 1 if mode == "seq" else None
        rec = {}
        for rep in ("first", "warm"):
            w, c = time.perf_counter(), _cpu()
            accs, _ = train_and_test(x, y, ds.x_test, ds.y_test, keys, width=a.width, depth=None,
                                     steps=a.steps, lr=1e-3, batch=256 if len(x) > 256 else None,
                                     ops=parse_ops(a.aug), runs_per_group=group, loop=a.loop)
            rec[rep] = {"wall_s": round(time.perf_counter() - w, 2), "cpu_s": round(_cpu() - c, 2)}
        rec["accs"] = [round(float(v), 4) for v in accs]
        out["modes"][mode] = rec
        print(mode, json.dumps(rec), flush=True)
    if {"seq", "vmap"} <= set(out["modes"]):
        s, v = out["modes"]["seq"], out["modes"]["vmap"]
        out["speedup_warm"] = round(s["warm"]["wall_s"] / v["warm"]["wall_s"], 2)
        out["speedup_first"] = round(s["first"]["wall_s"] / v["first"]["wall_s"], 2)
        out["accs_agree"] = bool(np.allclose(s["accs"], v["accs"], atol=3 / len(ds.y_test)))
    print(json.dumps({k: out[k] for k in out if k != "modes"}))
    return out


if __name__ == "__main__":
    main()
