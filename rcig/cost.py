"""What a run will cost before it runs: FLOPs, memory per device, estimated wall time.

`estimate(cfg)` builds the run's step for the devices it would use, lowers it on abstract
arguments (no data, no dataset files), and reads XLA's cost analysis (FLOPs of one outer
step). Memory per device comes from XLA's memory analysis of the compiled step when the
step is small enough to compile quickly (`compile_below_flops`), otherwise from the sizes
of the step's arguments (the state and a real batch: a lower bound; temporaries are not
counted), and says which. Wall time = LR search + compile + steps + evaluation, each from
the step's FLOPs and the device's measured matmul rate times an efficiency calibrated on
this project's CPU measurements (BENCHMARKS.md); it is a rough estimate, printed as such.

Example:
    >>> from rcig.config import make_config
    >>> est = estimate(make_config("digits", 1))
    >>> est["flops_per_step"] > 0, est["wall_s"] > 0
    (True, True)
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from rcig.config import DistillConfig
from rcig.units import human_bytes as _fmt_bytes
from rcig.units import human_seconds as _fmt_s

# image shape and classes per dataset, for estimating without the dataset files
SHAPES: dict[str, tuple[tuple[int, int, int], int]] = {
    "digits": ((8, 8, 1), 10),
    "mnist": ((28, 28, 1), 10),
    "fashion_mnist": ((28, 28, 1), 10),
    "cifar10": ((32, 32, 3), 10),
    "cifar100": ((32, 32, 3), 100),
    "tiny_imagenet": ((64, 64, 3), 200),
}

# Fraction of the device's matmul FLOP/s the step achieves. CPU: the digits preset's
# unrolled step (3.96 GFLOP by XLA's count) ran 0.22 s on the idle 2-core VM (18 GFLOP/s)
# where a 512x512 f32 matmul runs ~45-60 GFLOP/s: ~0.3. Accelerators: a guess (no GPU
# measurement in this project yet).
EFFICIENCY = {"cpu": 0.3, "gpu": 0.15, "tpu": 0.15}
EVAL_STEP_FLOOR_S = {"cpu": 2e-3, "gpu": 5e-4, "tpu": 5e-4}  # per-step dispatch floor of the eval loop
COMPILE_S = {"cpu": 25.0, "gpu": 40.0, "tpu": 60.0}  # per compiled program, rough
CPU_SLOW_S = 30 * 60  # a CPU run estimated above this prints faster options first


def matmul_rate(device=None, n: int = 512, repeats: int = 5) -> float:
    """Measured f32 matmul FLOP/s on `device` (best of `repeats`, after a warm-up)."""
    device = device or jax.local_devices()[0]
    a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def _bytes(tree) -> int:
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def estimate(cfg: DistillConfig, *, image_shape=None, num_classes: int | None = None, devices=None,
             compile_below_flops: float = 20e9, rate: float | None = None) -> dict:
    """Cost of `cfg` on `devices` (default: all local ones). Returns a JSON-ready dict."""
    from rcig.engine import Engine, resolve_loop

    if image_shape is None or num_classes is None:
        if cfg.dataset in SHAPES:
            image_shape, num_classes = SHAPES[cfg.dataset]
        else:  # a user's .npz: its shape is in the file
            from rcig.data import load_dataset

            ds = load_dataset(cfg.dataset, cfg.data_dir)
            image_shape, num_classes = tuple(ds.image_shape), ds.num_classes
    devices = list(devices) if devices is not None else jax.local_devices()
    kind = devices[0].platform
    eng = Engine(cfg, image_shape, num_classes, devices=devices)
    n_images = cfg.ipc * num_classes
    state = eng.abstract_state(n_images)
    b = cfg.outer.real_batch_size
    batch = {"x": jax.ShapeDtypeStruct((b, *image_shape), jnp.float32, sharding=eng.batch_sharding),
             "y": jax.ShapeDtypeStruct((b, num_classes), jnp.float32, sharding=eng.batch_sharding)}
    t0 = time.perf_counter()
    # FLOPs from the unrolled program (XLA's cost analysis counts a scan's body once);
    # lowering only, no compile
    unrolled = eng if eng.ctx.unroll else Engine(dataclasses.replace(cfg, loop="unroll"), image_shape,
                                                   num_classes, devices=devices)
    ca = unrolled._step.lower(state, batch).cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    flops = float(ca.get("flops", 0.0))
    mem, mem_kind, compile_s = None, "arguments only (state + batch; XLA temporaries not counted)", None
    if flops <= compile_below_flops:  # memory: compile the scan form (compiles fastest)
        scan = eng if not eng.ctx.unroll else Engine(dataclasses.replace(cfg, loop="scan"), image_shape,
                                                     num_classes, devices=devices)
        t1 = time.perf_counter()
        ma = scan._step.lower(state, batch).compile().memory_analysis()
        compile_s = time.perf_counter() - t1
        if ma is not None:
            mem = int(ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
                      + ma.temp_size_in_bytes)
            mem_kind = "XLA memory analysis of the compiled step, scan form"
    if mem is None:
        mem = _bytes(state) + _bytes(batch) // len(devices)
    rate = rate or matmul_rate(devices[0])
    eff = EFFICIENCY.get(kind, 0.15)
    step_s = flops / (rate * eff * len(devices))
    # LR search: ~25 probes of ~half a step each (bracketed), plus 3 probe compiles
    tune_s = 0.0 if cfg.lr_tune.skip else 25 * 0.5 * step_s + 3 * COMPILE_S.get(kind, 30.0) * 0.4
    step_compile_s = COMPILE_S.get(kind, 30.0) * (1.0 if resolve_loop(cfg, kind) == "unroll" else 0.5)
    # evaluation: runs x steps x (distilled + baseline) of a ReLU ConvNet on the set; one
    # eval step ~ a forward+backward of the set, ~ the step's FLOPs over (real batch + 40
    # support passes) rows per row
    from rcig.evaluate import spec_steps

    n_rows = n_images * (2 if cfg.outer.use_flip else 1)
    ev_steps = cfg.eval.steps or spec_steps(n_images)
    per_row = flops / max(1, b + 40 * n_rows)
    eval_s = 0.0
    if cfg.eval.runs:
        sets = 2 if cfg.eval.baseline else 1
        eval_s = sets * cfg.eval.runs * ev_steps * max(min(n_rows, cfg.eval.batch_size) * per_row / (rate * eff),
                                                       EVAL_STEP_FLOOR_S.get(kind, 1e-3))
    wall = tune_s + step_compile_s + cfg.steps * step_s + eval_s
    return {
        "preset": cfg.preset, "dataset": cfg.dataset, "ipc": cfg.ipc, "steps": cfg.steps,
        "image_shape": list(image_shape), "num_classes": num_classes,
        "devices": len(devices), "device_kind": devices[0].device_kind, "platform": kind,
        "loop": resolve_loop(cfg, kind),
        "flops_per_step": flops, "bytes_accessed_per_step": float(ca.get("bytes accessed", 0.0)),
        "memory_per_device_bytes": mem, "memory_kind": mem_kind,
        "matmul_flops_per_s": rate, "efficiency": eff,
        "step_s": step_s, "tune_s": tune_s, "compile_s": step_compile_s, "eval_s": eval_s, "wall_s": wall,
        "measured_compile_s": compile_s, "analysis_s": time.perf_counter() - t0,
    }


def describe(est: dict) -> list[str]:
    """Human-readable lines for `rcig distill --dry-run`."""
    return [
        f"preset {est['preset']}: {est['dataset']} {'x'.join(map(str, est['image_shape']))}, "
        f"{est['num_classes']} classes, ipc {est['ipc']}, {est['steps']} outer steps, {est['loop']} loops",
        f"step: {est['flops_per_step'] / 1e9:.3g} GFLOP (XLA cost analysis), memory per device "
        f"{_fmt_bytes(est['memory_per_device_bytes'])} ({est['memory_kind']})",
        f"devices: {est['devices']} x {est['device_kind']} ({est['platform']}); matmul "
        f"{est['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s measured, step efficiency ~{est['efficiency']:.1%} assumed",
        f"estimated wall time: {_fmt_s(est['wall_s'])} = LR search {_fmt_s(est['tune_s'])} + compile "
        f"{_fmt_s(est['compile_s'])} + {est['steps']} x {est['step_s']:.3g} s + eval {_fmt_s(est['eval_s'])} "
        f"(rough: within a factor of ~3; a shared machine is slower)",
    ]


def faster_options(est: dict) -> list[str]:
    """Suggestions printed before a CPU run estimated above `CPU_SLOW_S`."""
    from rcig.config import LAPTOP_PRESETS

    out = []
    lp = LAPTOP_PRESETS.get(est["dataset"])
    if lp and lp != est["preset"]:
        out.append(f"--preset {lp} (this dataset's laptop preset)")
    steps = max(10, int(est["steps"] * CPU_SLOW_S / max(est["wall_s"], 1) / 2))
    out.append(f"--steps {steps} (fewer outer steps)")
    out.append("--set model.width=8 (a narrower network)")
    out.append("--no-eval (evaluate later with `rcig eval`)")
    return out




# ---- what `rcig distill` prints before it runs --------------------------------------
def choose_preset(dataset: str, ipc: int, preset: str | None, backend: str | None = None) -> tuple[str | None, str | None]:
    """(preset to use, one line saying why) for `rcig distill`: an explicit --preset wins;
    without one, a machine without an accelerator gets the dataset's laptop preset."""
    from rcig.config import default_preset, laptop_preset

    if preset is not None:
        return preset, None
    backend = backend or jax.default_backend()
    lp = laptop_preset(dataset, ipc, backend)
    if lp is None or lp == default_preset(dataset, ipc):
        return None, None
    return lp, (f"no accelerator found: using the laptop preset {lp} (minutes on 2 cores); "
                f"the paper's is --preset {default_preset(dataset, ipc)}")


def known_fast(cfg: DistillConfig) -> bool:
    """Laptop-sized runs whose estimate need not be computed before they start."""
    from rcig.config import LAPTOP_PRESETS, PRESETS

    base = PRESETS.get(cfg.preset)
    return (cfg.preset in set(LAPTOP_PRESETS.values()) and base is not None and cfg.ipc <= 10
            and cfg.steps <= 2 * base.steps and cfg.model.width <= base.model.width)


def preflight(cfg: DistillConfig, *, dry_run: bool, backend: str | None = None) -> list[str]:
    """Lines to print before a run: everything with --dry-run; on a CPU, the estimate and
    faster options when the estimate exceeds `CPU_SLOW_S`; nothing otherwise."""
    backend = backend or jax.default_backend()
    if not dry_run and (backend != "cpu" or known_fast(cfg)):
        return []
    est = estimate(cfg, compile_below_flops=20e9 if dry_run else 0.0)
    lines = describe(est) if dry_run else []
    if backend == "cpu" and est["wall_s"] > CPU_SLOW_S:
        if not dry_run:
            lines += describe(est)[-1:]
        lines.append(f"this exceeds {CPU_SLOW_S // 60} min on this CPU; faster: " + "; ".join(faster_options(est)))
    return lines


def sweep_dry_run(dataset: str, ipc: int, preset: str | None, overrides: dict, *, trials: int,
                  max_concurrent: int | None, accelerators: str) -> list[str]:
    """Lines for `rcig sweep launch --dry-run`: one trial's base config costed on this
    machine's devices (the search space's values are not costed one by one), and the
    sweep's total if its trials ran here `max_concurrent` at a time."""
    from rcig.config import make_config

    cfg = make_config(dataset, ipc, preset=preset, overrides=dict(overrides))
    est = estimate(cfg)
    waves = -(-trials // max(1, max_concurrent or trials))
    lines = describe(est)
    lines.append(f"sweep: {trials} trials ({accelerators} each on the cluster); here, {max_concurrent or trials} at a "
                 f"time, ~{_fmt_s(waves * est['wall_s'])} in all (the estimate is for this machine's "
                 f"{est['devices']} x {est['device_kind']}, not the cluster's devices)")
    return lines
