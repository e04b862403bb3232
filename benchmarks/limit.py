"""How far the outer step is from the machine's limit: XLA cost analysis against measured rates.

In one run: a large matmul and a 3x3 convolution (f32 at default precision, f32 at highest
precision for the matmul, bf16) timed in FLOP/s; then, per setting, the compiled step's
cost analysis (FLOPs, bytes accessed), its measured time, the achieved FLOP/s and its
fraction of the measured conv rate of the step's dtype. With `--phases`, each phase of
the step (inner loop, direct gradient, H-solve, implicit gradient, pool training) is
jitted and timed on its own: where the time goes.

FLOPs: with loop=scan XLA's analysis counts a loop body once, so the step is also lowered
with unrolled loops (no compile) and that count is the one used for FLOP/s.

Example:
    PYTHONPATH=. python -m benchmarks.limit --settings cifar10_ipc10
    PYTHONPATH=. python -m benchmarks.limit --tiny --settings digits_shape --phases
    PYTHONPATH=. python -m benchmarks.limit --micro-only
"""

from __future__ import annotations

import statistics
import sys
import time
import traceback

from benchmarks import common


def _time(fn, *args, repeats: int = 5) -> float:
    import jax

    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def micro_sizes(backend: str, tiny: bool) -> dict:
    """Problem sizes: the anchor's on accelerators, smaller on CPU (same kernels)."""
    if tiny:
        return {"matmul_n": 128, "conv_batch": 1, "conv_ch": 16, "conv_hw": 16}
    if backend == "cpu":
        return {"matmul_n": 1024, "conv_batch": 8, "conv_ch": 128, "conv_hw": 32}
    return {"matmul_n": 8192, "conv_batch": 256, "conv_ch": 128, "conv_hw": 32}


def micro(tiny: bool = False) -> list[dict]:
    """Measured matmul and 3x3-conv FLOP/s on the first device."""
    import jax
    import jax.numpy as jnp

    sz = micro_sizes(jax.default_backend(), tiny)
    key = jax.random.PRNGKey(0)
    out = []
    n = sz["matmul_n"]
    for name, dtype, prec in [("matmul f32 default", jnp.float32, None),
                              ("matmul f32 highest", jnp.float32, jax.lax.Precision.HIGHEST),
                              ("matmul bf16", jnp.bfloat16, None)]:
        a = jax.random.normal(key, (n, n), dtype)
        f = jax.jit(lambda a, b, prec=prec: jnp.matmul(a, b, precision=prec))
        t = _time(f, a, a)
        out.append({"op": name, "dtype": jnp.dtype(dtype).name, "shape": f"{n}^3", "flops": 2.0 * n**3,
                    "seconds": t, "flops_per_s": 2.0 * n**3 / t})
    b, c, hw = sz["conv_batch"], sz["conv_ch"], sz["conv_hw"]
    for name, dtype in [("conv3x3 f32 default", jnp.float32), ("conv3x3 bf16", jnp.bfloat16)]:
        x = jax.random.normal(key, (b, hw, hw, c), dtype)
        w = jax.random.normal(key, (3, 3, c, c), dtype)
        f = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
        flops = 2.0 * b * hw * hw * c * c * 9
        t = _time(f, x, w)
        out.append({"op": name, "dtype": jnp.dtype(dtype).name, "shape": f"{b}x{hw}x{hw}x{c}->{c}",
                    "flops": flops, "seconds": t, "flops_per_s": flops / t})
    return out


def conv_rate(micro_rows: list[dict], dtype: str) -> float | None:
    for r in micro_rows:
        if r["op"].startswith("conv") and r["dtype"] == dtype:
            return r["flops_per_s"]
    return None


def flops_only(s: common.Setting, opts) -> dict:
    """The step's FLOPs at the setting's size from the unrolled lowering: no compile, no compute.

    State and batch are abstract (shapes and shardings only), so paper sizes cost a trace.
    """
    import dataclasses

    import jax
    import jax.numpy as jnp

    from rcig.engine import Engine

    cfg, notes = common.build_config(s, opts)
    cfg = dataclasses.replace(cfg, loop="unroll")
    eng = Engine(cfg, s.shape, s.classes, devices=jax.local_devices()[: opts.devices])
    m = cfg.outer.real_batch_size
    batch = {"x": jax.ShapeDtypeStruct((m, *s.shape), jnp.float32, sharding=eng.batch_sharding),
             "y": jax.ShapeDtypeStruct((m, s.classes), jnp.float32, sharding=eng.batch_sharding)}
    t0 = time.perf_counter()
    cost = common.cost_summary(eng._step.lower(eng.abstract_state(s.classes * s.ipc), batch).cost_analysis())
    return {"setting": s.name, "notes": notes, "support_rows": s.classes * s.ipc * (2 if cfg.outer.use_flip else 1),
            "cost_unrolled": cost, "lower_s": time.perf_counter() - t0,
            "anchor": {"s_per_step": s.anchor_s, "compile_s": s.anchor_compile_s, "device": common.ANCHOR_DEVICE}}


# docs/performance.md: the H200's measured 3x3 conv rate, f32 default precision
ANCHOR_CONV_FLOPS = 362e12


def flops_row(rec: dict) -> dict:
    fl = rec["cost_unrolled"].get("flops")
    orig = rec["anchor"]["s_per_step"]
    return {"setting": rec["setting"], "rows": str(rec["support_rows"]), "notes": ", ".join(rec["notes"]) or "paper size",
            "gflop": common.fmt(fl / 1e9 if fl else None),
            "gb": common.fmt(rec["cost_unrolled"].get("bytes", 0) / 1e9),
            "ms": common.fmt(fl / ANCHOR_CONV_FLOPS * 1e3 if fl else None),
            "orig": common.fmt(orig * 1e3 if orig else None),
            "orig_frac": "-" if not (fl and orig) else f"{100 * fl / orig / ANCHOR_CONV_FLOPS:.1f}%"}


FLOPS_COLUMNS = [("setting", "setting"), ("rows", "support rows"), ("notes", "size"), ("gflop", "GFLOP/step"),
                 ("gb", "GB accessed (HLO)"), ("ms", "ms at 362 TFLOP/s (H200 conv)"),
                 ("orig", "original ms (H200)"), ("orig_frac", "original's fraction of conv rate")]


def phase_times(s: common.Setting, opts) -> dict:
    """Each phase of the step jitted alone (first device, no row caches): median s and FLOPs."""
    import jax
    import jax.numpy as jnp

    from rcig import krr, step
    from rcig.engine import Engine

    cfg, _ = common.build_config(s, opts)
    eng = Engine(cfg, s.shape, s.classes, devices=jax.local_devices()[:1])
    ctx = eng.ctx
    x0, y0, batches = common.synthetic(s, cfg.outer.real_batch_size)
    key = jax.random.PRNGKey(0)
    state = eng.init_state(x0, y0, key, cfg.inner.lr, cfg.hinv.lr)
    model = jax.tree.map(lambda a: a[0], state["pool"])
    coreset = state["coreset"]
    x_t, y_t = jnp.asarray(batches[0][0]), jnp.asarray(batches[0][1])
    x_s, y_s = krr.support(ctx.spec, coreset)
    lr_i, lr_h = jnp.float32(cfg.inner.lr), jnp.float32(cfg.hinv.lr)
    out = {}

    def timed(name, fn, args):
        jf = jax.jit(fn)
        t0 = time.perf_counter()
        compiled = jf.lower(*args).compile()
        c = time.perf_counter() - t0
        res = compiled(*args)
        out[name] = {"median_s": _time(compiled, *args, repeats=max(3, opts.steps // 2)), "compile_s": c,
                     **common.cost_summary(compiled.cost_analysis())}
        return res

    delta, theta0p = timed("inner loop", lambda m, xs, ys: step.inner_loop(ctx, m, xs, ys, lr_i, key)[:2],
                           (model, x_s, y_s))
    _, _, d_dir, g_t = timed("direct grad + g_t", lambda cs, d, th, xt, yt: step.direct_gradient(
        ctx, cs, d, th, xt, yt, {}, key), (coreset, delta, theta0p, x_t, y_t))
    h, _ = timed("H-solve", lambda d, th, xs, ys, g: step.hinv_solve(ctx, d, th, xs, ys, g, lr_h, key),
                 (delta, theta0p, x_s, y_s, g_t))
    timed("implicit grad", lambda cs, d, th, hh: step.implicit_gradient(ctx, cs, d, th, hh, None, key),
          (coreset, delta, theta0p, h))
    mean_pool = (1 + ctx.pool.n_max_steps - 1) // 2
    timed(f"pool ({mean_pool} steps)", lambda m, cs: step.pool_train(ctx, m, cs, jnp.int32(mean_pool), key),
          (model, coreset))
    return out


def main(argv: list[str] | None = None) -> int:
    p = common.parser("limit", doc=__doc__)
    p.add_argument("--micro-only", action="store_true", help="only the matmul/conv rates")
    p.add_argument("--no-micro", action="store_true", help="skip the matmul/conv rates")
    p.add_argument("--phases", action="store_true", help="also time each phase of the step alone")
    p.add_argument("--flops-only", action="store_true",
                   help="only the FLOPs per step (unrolled lowering of abstract shapes; no compile, no run)")
    opts = p.parse_args(argv)
    common.prepare(opts.devices)
    if opts.flops_only:
        return main_flops_only(opts, argv)
    settings = [] if opts.micro_only else common.selected(opts)
    info = common.machine_info()
    micro_rows = [] if opts.no_micro else micro(opts.tiny)
    recs = []
    for s in settings:
        print(f"[limit] {s.name} ...", file=sys.stderr, flush=True)
        try:
            rec = common.measure_setting(s, opts, want_unrolled_cost=True)
            if opts.phases:
                rec["phases"] = phase_times(s, opts)
        except Exception as e:
            traceback.print_exc()
            rec = {"setting": s.name, "error": f"{type(e).__name__}: {e}"}
        recs.append(rec)
    for rec in recs:
        if "error" not in rec:
            rate = conv_rate(micro_rows, rec["config"]["compute_dtype"])
            fl = common.best_flops(rec)
            rec["conv_rate_flops_per_s"] = rate
            rec["fraction_of_conv_rate"] = (fl / rec["step"]["median_s"] / rate) if (fl and rate) else None
    print(f"\n{info['device_count']} x {info['device_kind']} ({info['backend']}), jax {info['versions']['jax']}, "
          f"{info['date']}")
    if micro_rows:
        print(common.table([{"op": r["op"], "shape": r["shape"], "tf": f"{r['flops_per_s'] / 1e12:.3g}"}
                            for r in micro_rows], [("op", "operation"), ("shape", "size"), ("tf", "TFLOP/s")]))
    if recs:
        print()
        print(common.table([limit_row(r) for r in recs], LIMIT_COLUMNS))
    for r in recs:
        if r.get("phases"):
            print(f"\nphases of {r['setting']} (each jitted alone):")
            print(common.table([{"phase": k, "s": common.fmt(v["median_s"]), "gf": common.fmt(v.get("flops", 0) / 1e9),
                                 "c": common.fmt(v["compile_s"])} for k, v in r["phases"].items()],
                               [("phase", "phase"), ("s", "median s"), ("gf", "GFLOP (XLA)"), ("c", "compile s")]))
    path = common.write_json(opts.out, "limit", {"benchmark": "limit", "machine": info, "argv": argv or sys.argv[1:],
                                                 "micro": micro_rows, "results": recs})
    print(f"wrote {path}")
    return 1 if any("error" in r for r in recs) else 0


def main_flops_only(opts, argv) -> int:
    info = common.machine_info()
    recs = []
    for s in common.selected(opts):
        print(f"[limit] {s.name}: lowering ...", file=sys.stderr, flush=True)
        recs.append(flops_only(s, opts))
    print(f"\nXLA cost analysis of the unrolled step (lowered on {info['device_kind']}, {info['date']})")
    print(common.table([flops_row(r) for r in recs], FLOPS_COLUMNS))
    path = common.write_json(opts.out, "limit_flops", {"benchmark": "limit --flops-only", "machine": info,
                                                       "argv": argv or sys.argv[1:], "results": recs})
    print(f"wrote {path}")
    return 0


LIMIT_COLUMNS = [
    ("setting", "setting"), ("notes", "size"), ("dtype", "dtype"), ("s_step", "s/step"),
    ("gflop", "GFLOP/step (unrolled)"), ("gflop_c", "GFLOP/step (compiled)"), ("gb", "GB accessed (compiled)"),
    ("tfs", "achieved TFLOP/s"), ("frac", "fraction of conv rate"),
]


def limit_row(rec: dict) -> dict:
    if "error" in rec:
        return {"setting": rec["setting"], "notes": "ERROR: " + rec["error"][:60]}
    fl = common.best_flops(rec)
    med = rec["step"]["median_s"]
    frac = rec.get("fraction_of_conv_rate")
    return {
        "setting": rec["setting"], "notes": ", ".join(rec["notes"]) or "paper size",
        "dtype": rec["config"]["compute_dtype"], "s_step": common.fmt(med),
        "gflop": common.fmt(fl / 1e9 if fl else None),
        "gflop_c": common.fmt(rec["cost"].get("flops", 0) / 1e9),
        "gb": common.fmt(rec["cost"].get("bytes", 0) / 1e9),
        "tfs": common.fmt(fl / med / 1e12 if fl else None),
        "frac": "-" if frac is None else f"{100 * frac:.1f}%",
    }


if __name__ == "__main__":
    sys.exit(main())
