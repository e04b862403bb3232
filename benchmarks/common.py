"""Shared parts of the benchmarks: settings, anchors, options, one measured setting, output.

Nothing here imports jax at module level: `prepare(n)` must be able to set XLA_FLAGS (the
number of emulated CPU devices) before jax is first imported. On a GPU machine the flag
only adds host devices that the benchmarks never use.

Example:
    >>> from benchmarks import common
    >>> common.prepare(2)                      # before jax is imported
    >>> opts = common.parser("demo").parse_args(["--tiny", "--settings", "digits_shape"])
    >>> rec = common.measure_setting(common.SETTINGS["digits_shape"], opts)
    >>> rec["step"]["median_s"] > 0
    True
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ANCHOR_DEVICE = "H200"  # the device of docs/performance.md


@dataclass(frozen=True)
class Setting:
    """One benchmark setting: synthetic data of `shape`, a preset, the original's figures."""

    name: str
    shape: tuple[int, int, int]
    classes: int
    ipc: int
    preset: str
    overrides: dict = field(default_factory=dict)
    anchor_s: float | None = None  # original RCIG, s per outer step on an H200
    anchor_compile_s: float | None = None


# docs/performance.md: every 8/28/32-px setting is `depth_3` with flips (depth 2 at
# 8 px); Tiny-ImageNet is `depth_4_200`. `digits` is this project's embedded preset.
SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in [
        Setting("digits_shape", (8, 8, 1), 10, 1, "depth_3", {"model.depth": 2}, 0.102, 17.9),
        Setting("mnist_shape", (28, 28, 1), 10, 1, "depth_3", {}, 0.128, 25.1),
        Setting("cifar10_ipc1", (32, 32, 3), 10, 1, "depth_3", {}, 0.127, 19.6),
        Setting("cifar10_ipc10", (32, 32, 3), 10, 10, "depth_3", {}, 0.206, 29.0),
        Setting("cifar10_ipc50", (32, 32, 3), 10, 50, "depth_3", {}, 0.623, 28.4),
        Setting("cifar100_ipc1", (32, 32, 3), 100, 1, "depth_3", {}, 0.210, 28.5),
        Setting("cifar100_ipc10", (32, 32, 3), 100, 10, "depth_3", {}, 1.165, 41.1),
        Setting("tiny_ipc1", (64, 64, 3), 200, 1, "depth_4_200", {}, 1.019, 46.1),
        Setting("digits", (8, 8, 1), 10, 1, "digits", {}),
    ]
}
ANCHORED = [n for n, s in SETTINGS.items() if s.anchor_s is not None]

# Tiny-step mode: the same code paths at toy size, so a GPU run never fails on a typo.
TINY = {
    "model.width": 4, "inner.n_steps": 3, "hinv.n_steps": 3, "pool.model_count": 2,
    "pool.n_max_steps": 3, "outer.real_batch_size": 32,
}


def prepare(n_devices: int = 1) -> None:
    """Ask for n emulated host devices (CPU only) unless XLA_FLAGS already names a count.

    Must run before jax is imported; a count the caller set in XLA_FLAGS is respected.
    """
    if "jax" in sys.modules:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    key = "--xla_force_host_platform_device_count="
    if key not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {key}{max(1, n_devices)}".strip()


def parser(name: str, settings_default: str = "all", doc: str | None = None) -> argparse.ArgumentParser:
    """The options every benchmark shares (settings, sizes, loop form, dtype, devices, output)."""
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default=settings_default,
                   help=f"comma-separated names or 'all' (the 8 anchored); known: {', '.join(SETTINGS)}")
    p.add_argument("--steps", type=int, default=10, help="timed steps after warm-up (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (compiled) one")
    p.add_argument("--tiny", action="store_true", help="tiny-step mode (toy sizes; exercises the script)")
    p.add_argument("--devices", type=int, default=1, help="use the first N local devices")
    p.add_argument("--loop", choices=["auto", "unroll", "scan"], default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--width", type=int, default=None, help="reduced model.width (CPU runs); default: preset")
    p.add_argument("--real-batch", type=int, default=None, help="reduced outer.real_batch_size; default: preset")
    p.add_argument("--tune-probes", type=int, default=None,
                   help="cap on LR-tuning probes (0 skips tuning); default: preset's (80), tiny: 2")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    p.add_argument("--out", default=None, help=f"JSON path (default {RESULTS}/{name}.json)")
    return p


def selected(opts) -> list[Setting]:
    names = ANCHORED if opts.settings == "all" else [s.strip() for s in opts.settings.split(",") if s.strip()]
    bad = [n for n in names if n not in SETTINGS]
    if bad:
        raise SystemExit(f"--settings: unknown setting(s) {', '.join(bad)}; known: {', '.join(SETTINGS)}")
    return [SETTINGS[n] for n in names]


def build_config(s: Setting, opts):
    """The setting's config with the run's options; returns (cfg, reduced-size notes)."""
    from rcig.config import make_config, parse_override_strings

    over = dict(s.overrides)
    notes = []
    if opts.tiny:
        over.update(TINY)
        notes.append("tiny")
    if opts.width is not None:
        over["model.width"] = opts.width
        notes.append(f"width {opts.width}")
    if opts.real_batch is not None:
        over["outer.real_batch_size"] = opts.real_batch
        notes.append(f"real batch {opts.real_batch}")
    if opts.loop:
        over["loop"] = opts.loop
    if opts.dtype:
        over["compute_dtype"] = opts.dtype
    probes = tune_probes(opts)
    over["lr_tune.skip"] = probes == 0
    if probes:
        over["lr_tune.max_probes"] = probes
    extra = parse_override_strings(opts.set)
    over.update(extra)
    notes += [f"{k}={v}" for k, v in extra.items()]
    cfg = make_config("npz", s.ipc, preset=s.preset, overrides=over)
    return cfg, notes


def tune_probes(opts) -> int | None:
    if opts.tune_probes is not None:
        return max(0, opts.tune_probes)
    return 2 if opts.tiny else None


def synthetic(s: Setting, real_batch: int, seed: int = 0, n_batches: int = 2):
    """Standard-normal images of the setting's shape; labels one-hot - 1/C (shifted one-hot)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    c = s.classes

    def labels(y):
        return (np.eye(c, dtype=np.float32)[y] - np.float32(1.0 / c)).astype(np.float32)

    x0 = rng.standard_normal((c * s.ipc, *s.shape), dtype=np.float32)
    y0 = labels(np.repeat(np.arange(c), s.ipc))
    batches = [
        (rng.standard_normal((real_batch, *s.shape), dtype=np.float32), labels(rng.integers(0, c, real_batch)))
        for _ in range(n_batches)
    ]
    return x0, y0, batches


# ---- environment ---------------------------------------------------------------------
def machine_info() -> dict:
    import jax

    def version(mod):
        try:
            return importlib.import_module(mod).__version__
        except Exception:  # missing package on a bare machine: record, don't fail
            return None

    devs = jax.local_devices()
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_avg": load,
        "backend": jax.default_backend(),
        "device_kind": devs[0].device_kind,
        "device_count": len(devs),
        "python": platform.python_version(),
        "versions": {m: version(m) for m in ("jax", "jaxlib", "flax", "optax", "numpy", "orbax.checkpoint")},
    }


def same_device_as_anchor(info: dict) -> bool:
    return ANCHOR_DEVICE.lower() in str(info.get("device_kind", "")).lower()


def host_peak_rss_bytes() -> int:
    """Peak resident set of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def device_peak_bytes(devices) -> int | None:
    peaks = []
    for d in devices:
        try:
            st = d.memory_stats()
        except Exception:
            st = None
        if st and "peak_bytes_in_use" in st:
            peaks.append(int(st["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


# ---- cost analysis ---------------------------------------------------------------------
def cost_summary(analysis) -> dict:
    """flops / bytes accessed / transcendentals from a (Compiled|Lowered).cost_analysis()."""
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    analysis = analysis or {}
    pick = {"flops": "flops", "bytes": "bytes accessed", "transcendentals": "transcendentals"}
    return {k: float(analysis[v]) for k, v in pick.items() if v in analysis}


def memory_summary(compiled) -> dict:
    try:
        m = compiled.memory_analysis()
    except Exception:
        return {}
    if m is None:
        return {}
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")
    out = {k.replace("_size_in_bytes", "_bytes"): int(getattr(m, k, 0)) for k in keys}
    out["total_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    return out


def unrolled_flops(s: Setting, opts, devices, state, batch) -> dict:
    """Cost analysis of the step with Python-unrolled loops, lowered only (no compile).

    XLA's analysis of a compiled `lax.scan` counts the loop body once, so with loop=scan
    the compiled figure undercounts; the unrolled HLO counts every iteration.
    """
    from rcig.engine import Engine

    import dataclasses

    cfg = dataclasses.replace(build_config(s, opts)[0], loop="unroll")
    eng = Engine(cfg, s.shape, s.classes, devices=devices)
    return cost_summary(eng._step.lower(state, batch).cost_analysis())


# ---- one setting -----------------------------------------------------------------------
def measure_setting(s: Setting, opts, devices=None, want_unrolled_cost: bool = False) -> dict:
    """Tune LRs, compile, run the step; timings, cost analysis and memory for one setting."""
    import jax
    import numpy as np

    from rcig.engine import Engine

    devices = list(devices) if devices is not None else jax.local_devices()[: opts.devices]
    cfg, notes = build_config(s, opts)
    rec: dict = {"setting": s.name, "shape": list(s.shape), "classes": s.classes, "ipc": s.ipc,
                 "preset": s.preset, "devices": len(devices), "notes": notes,
                 "support_rows": s.classes * s.ipc * (2 if cfg.outer.use_flip else 1),
                 "config": {"model.width": cfg.model.width, "model.depth": cfg.model.depth,
                            "outer.real_batch_size": cfg.outer.real_batch_size, "loop": cfg.loop,
                            "compute_dtype": cfg.compute_dtype, "inner.n_steps": cfg.inner.n_steps,
                            "hinv.n_steps": cfg.hinv.n_steps, "pool.model_count": cfg.pool.model_count},
                 "anchor": {"s_per_step": s.anchor_s, "compile_s": s.anchor_compile_s, "device": ANCHOR_DEVICE}}
    t_setup = time.perf_counter()
    eng = Engine(cfg, s.shape, s.classes, devices=devices)
    rec["config"]["loop_form"] = "unroll" if eng.ctx.unroll else "scan"
    x0, y0, host_batches = synthetic(s, cfg.outer.real_batch_size)
    batches = [eng.put_batch(x, y) for x, y in host_batches]
    key = jax.random.PRNGKey(0)
    inner_lr, hvp_lr = cfg.inner.lr, cfg.hinv.lr
    if not cfg.lr_tune.skip:
        coreset = {"x": x0, "y": y0, "log_temp": np.float32(0.0)}
        tun = eng.tune_learning_rates(coreset, batches[0], jax.random.fold_in(key, 1), inner_lr, hvp_lr)
        capped = tun.get("capped")  # the engine's list of capped searches, where it gives one
        rec["tuning"] = {**tun, "max_probes": cfg.lr_tune.max_probes,
                         "capped": capped if capped is not None else tun["probes"] >= cfg.lr_tune.max_probes}
        inner_lr, hvp_lr = tun["inner"], tun["hvp"]
    state = eng.init_state(x0, y0, key, inner_lr, hvp_lr)
    jax.block_until_ready(state)
    rec["setup_s"] = time.perf_counter() - t_setup

    t0 = time.perf_counter()
    compiled = eng.compile_step(state, batches[0])
    rec["compile_s"] = time.perf_counter() - t0
    rec["cost"] = cost_summary(compiled.cost_analysis())
    rec["cost"]["loops_counted"] = "every iteration" if eng.ctx.unroll else "scan body once (undercount)"
    rec["memory_analysis"] = memory_summary(compiled)

    def run(i):
        nonlocal state
        state, m = compiled(state, batches[i % len(batches)])
        return m

    t0 = time.perf_counter()
    jax.block_until_ready(run(0))
    rec["first_step_s"] = time.perf_counter() - t0
    for i in range(opts.warmup):
        jax.block_until_ready(run(1 + i))
    times = []
    for i in range(opts.steps):
        t0 = time.perf_counter()
        m = jax.block_until_ready(run(i))
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()  # pipelined: dispatch all, sync once (what a training loop sees)
    for i in range(opts.steps):
        m = run(i)
    jax.block_until_ready(m)
    pipelined = (time.perf_counter() - t0) / max(opts.steps, 1)
    metrics = {k: float(v) for k, v in jax.device_get(m).items()}
    med = statistics.median(times)
    rec["step"] = {"median_s": med, "min_s": min(times), "max_s": max(times), "n": len(times),
                   "steps_per_s": 1.0 / med, "pipelined_s": pipelined, "times_s": times}
    rec["final_loss"] = metrics["outer/loss"]
    rec["finite"] = all(np.isfinite(v) for v in metrics.values())
    if "flops" in rec["cost"]:
        rec["cost"]["achieved_flops_per_s"] = rec["cost"]["flops"] / med
    if want_unrolled_cost and not eng.ctx.unroll:
        t0 = time.perf_counter()
        rec["cost_unrolled"] = unrolled_flops(s, opts, devices, state, batches[0])
        rec["cost_unrolled"]["lower_s"] = time.perf_counter() - t0
        rec["cost_unrolled"]["achieved_flops_per_s"] = rec["cost_unrolled"].get("flops", 0.0) / med
    rec["host_peak_rss_bytes"] = host_peak_rss_bytes()
    rec["device_peak_bytes"] = device_peak_bytes(devices)
    del state, batches, compiled
    return rec


def best_flops(rec: dict) -> float | None:
    """The step's FLOPs: the unrolled count when there is one, else the compiled one."""
    c = rec.get("cost_unrolled") or rec.get("cost") or {}
    return c.get("flops")


# ---- output ----------------------------------------------------------------------------
def write_json(path: str | None, name: str, payload: dict) -> Path:
    p = Path(path) if path else RESULTS / f"{name}.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(p)
    return p


def fmt(v, spec: str = ".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return format(v, spec)


def mib(v) -> str:
    return "-" if v is None else f"{v / 2**20:.0f}"


def table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    """Markdown table of `rows` with (key, header) columns; values already strings."""
    head = "| " + " | ".join(h for _, h in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = ["| " + " | ".join(str(r.get(k, "-")) for k, _ in cols) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def ratio_text(ours: float | None, anchor: float | None, info: dict) -> str:
    """original / ours (>1 means faster than the original), only on the anchor's device kind."""
    if ours is None or anchor is None:
        return "-"
    if not same_device_as_anchor(info):
        return "n/a (device differs)"
    return f"{anchor / ours:.2f}x"
