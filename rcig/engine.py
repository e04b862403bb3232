"""Wiring of the pure step: context from a config, device mesh, jit, shardings, LR tuning.

The step itself (`rcig.step.outer_step`) knows nothing of devices. Here:
- a 1-D mesh over all local devices (axis `data`); the real batch is sharded over it, the
  whole state (distilled set, optimiser, EMA, pool, LRs) is replicated; inside the step
  the support rows are sharded over it too (`KrrSpec.row_sharding`), so the inner loop,
  H-solve, implicit gradient and pool training split their per-row passes across devices
  rather than each device repeating them; XLA's SPMD partitioner inserts the exact
  cross-device collectives (feature all-gathers for the kernels, sums over rows);
- the step is jitted once with the state donated, and its key is derived on device from
  the state (`fold_in(rng, step)`), so a step needs no host round trip;
- the learning-rate search of §8.2 (`rcig.lr_search`) runs jitted probes: the inner loop
  alone for the inner rate; for the H-solve rate, delta*, theta0' and g_t once, then the
  H-solve alone per candidate;
- loops are unrolled on CPU (`resolve_loop`), and the first step is checked against a
  loop-free value, falling back to scans on a bad compile (`Engine.step`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from rcig import krr, step
from rcig.config import ConfigError, DistillConfig
from rcig.model import make_convnet


def resolve_loop(cfg: DistillConfig, backend: str | None = None) -> str:
    """The loop form a config gets: "auto" is unrolled on CPU (with the first-step guard of
    `Engine`, which falls back to scans on a wrongly compiled program) and a scan elsewhere."""
    if cfg.loop != "auto":
        return cfg.loop
    return "unroll" if (backend or jax.default_backend()) == "cpu" else "scan"


def build_context(cfg: DistillConfig, image_shape: tuple[int, int, int], num_classes: int,
                  mesh: jax.sharding.Mesh | None = None) -> step.StepContext:
    """Static step settings from a config and the dataset's shape (and the device mesh)."""
    dtype = jnp.bfloat16 if cfg.compute_dtype == "bfloat16" else jnp.float32
    net = make_convnet(image_shape, num_classes, width=cfg.model.width, depth=cfg.model.depth,
                       softplus_temp=cfg.model.softplus_temp, dtype=dtype)
    spec = krr.KrrSpec.from_config(
        cfg.outer, net.apply, num_classes, cfg.ipc * num_classes,
        row_sharding=NamedSharding(mesh, P("data")) if mesh is not None and mesh.size > 1 else None,
    )
    return step.StepContext(
        spec=spec, net=net, image_shape=tuple(image_shape), unroll=resolve_loop(cfg) == "unroll",
        inner=cfg.inner, hinv=cfg.hinv, outer=cfg.outer, pool=cfg.pool, lr_tune=cfg.lr_tune, faithful=cfg.faithful,
    )


def _keyed_step(ctx: step.StepContext, state: dict, batch: dict):
    key = jax.random.fold_in(state["rng"], state["step"])
    return step.outer_step(ctx, state, batch, key)


class Engine:
    """A config's step, jitted and sharded over the local devices.

    Example:
        >>> eng = Engine(cfg, (8, 8, 1), 10)                                   # doctest: +SKIP
        >>> state = eng.init_state(x0, y0, jax.random.PRNGKey(0), 1e-5, 5e-5)  # doctest: +SKIP
        >>> state, metrics = eng.step(state, eng.put_batch(xb, yb))            # doctest: +SKIP
    """

    def __init__(self, cfg: DistillConfig, image_shape, num_classes: int, devices: list | None = None):
        self.cfg = cfg
        self.devices = list(devices) if devices is not None else jax.local_devices()
        n = len(self.devices)
        if cfg.outer.real_batch_size % n:
            raise ConfigError(
                f"outer.real_batch_size: {cfg.outer.real_batch_size} is not divisible by the "
                f"{n} local devices; use a multiple of {n}"
            )
        # Auto axis: XLA's partitioner propagates the batch sharding and inserts the
        # (exact) reductions; the step's code stays sharding-agnostic.
        self.mesh = jax.make_mesh((n,), ("data",), devices=self.devices, axis_types=(jax.sharding.AxisType.Auto,))
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P("data"))
        self.ctx = build_context(cfg, image_shape, num_classes, self.mesh)
        self.image_shape = tuple(image_shape)
        self.num_classes = num_classes
        self._step = jax.jit(
            functools.partial(_keyed_step, self.ctx),
            in_shardings=(self.replicated, self.batch_sharding),
            out_shardings=(self.replicated, self.replicated),
            donate_argnums=0,
        )
        self._init = jax.jit(
            functools.partial(step.init_state, self.ctx), out_shardings=self.replicated, static_argnums=()
        )
        self._build_probes()
        # Loop-form guard: unrolled loops on XLA:CPU once compiled to a garbage first inner
        # loss (BENCHMARKS.md, "Findings"). The first step's first inner loss is checked
        # against the same loss computed without a loop (and every metric for finiteness);
        # on a mismatch the engine recompiles the step with scans and redoes that step.
        self.guard = self.ctx.unroll
        self._step_checked = not self.guard
        self.guard_log: list[str] = []
        self._first_loss = jax.jit(functools.partial(_first_loss_of_model, self.ctx))

    def _build_probes(self) -> None:
        # LR probes, vmapped over a batch of candidate LRs (one call tries several); the
        # H-solve probe reuses delta*, theta0' and g_t, which do not depend on its LR.
        # Probes always use scanned loops: a search makes ~25 calls, where an unrolled
        # program's longer compile costs more than its faster loops save (BENCHMARKS.md),
        # and scans never showed the bad first loss (so the probes need no guard).
        ctx = dataclasses.replace(self.ctx, unroll=False)
        self._probe_inner = jax.jit(jax.vmap(functools.partial(step.probe_inner, ctx), in_axes=(None, None, 0, None)))
        self._probe_prepare = jax.jit(functools.partial(step.probe_prepare, ctx))
        self._probe_hvp = jax.jit(jax.vmap(functools.partial(step.probe_hvp, ctx), in_axes=(None, None, 0)))

    def _fall_back_to_scan(self, why: str) -> None:
        self.guard_log.append(why)
        warnings.warn(f"unrolled loops: {why}; recompiling with lax.scan loops", RuntimeWarning, stacklevel=3)
        self.ctx = dataclasses.replace(self.ctx, unroll=False)
        self._step = jax.jit(
            functools.partial(_keyed_step, self.ctx),
            in_shardings=(self.replicated, self.batch_sharding),
            out_shardings=(self.replicated, self.replicated),
            donate_argnums=0,
        )
        self.guard, self._step_checked = False, True

    # -- state ---------------------------------------------------------------------
    def init_state(self, x_init, y_init, key, inner_lr: float, hvp_lr: float) -> dict:
        return self._init(jnp.asarray(x_init), jnp.asarray(y_init), key, jnp.float32(inner_lr), jnp.float32(hvp_lr))

    def abstract_state(self, n_images: int) -> Any:
        """Shapes/dtypes/shardings of the state (Orbax restore target), without computing it."""
        x = jax.ShapeDtypeStruct((n_images, *self.image_shape), jnp.float32)
        y = jax.ShapeDtypeStruct((n_images, self.num_classes), jnp.float32)
        key = jax.ShapeDtypeStruct((2,), jnp.uint32)
        f = jax.ShapeDtypeStruct((), jnp.float32)
        tree = jax.eval_shape(functools.partial(step.init_state, self.ctx), x, y, key, f, f)
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated), tree)

    # -- data ----------------------------------------------------------------------
    def put_batch(self, x: np.ndarray, y: np.ndarray) -> dict:
        return {
            "x": jax.device_put(np.asarray(x, np.float32), self.batch_sharding),
            "y": jax.device_put(np.asarray(y, np.float32), self.batch_sharding),
        }

    # -- compute -------------------------------------------------------------------
    def step(self, state: dict, batch: dict) -> tuple[dict, dict]:
        if self._step_checked:
            return self._step(state, batch)
        # First call with unrolled loops: run on a copy (the step donates its state), check
        # the step's first inner loss against the loop-free value, keep or redo with scans.
        backup = jax.tree.map(jnp.copy, state)
        new, metrics = self._step(state, batch)
        why = self._check_step(backup, metrics)
        self._step_checked = True
        if why is None:
            return new, metrics
        self._fall_back_to_scan(f"first step: {why}")
        return self._step(backup, batch)

    def _check_step(self, state: dict, metrics: dict) -> str | None:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        bad = sorted(k for k, v in m.items() if not np.isfinite(v))
        if bad:
            return f"non-finite {', '.join(bad)}"
        sub = self.ctx.inner.train_batch_size
        if self.ctx.faithful.inner_opt_state or not (sub is None or sub >= state["coreset"]["x"].shape[0]):
            return None  # the first loss is on a subset (or a drifting base): only finiteness is checked
        want = float(self._first_loss(state["pool"]["params"], jnp.int32(int(m["pool/model"])), state["coreset"]))
        # bf16 convolutions round differently in the two programs; garbage is off by orders of magnitude
        return _mismatch("first inner loss", m["inner/loss_first"], want,
                         rtol=1e-3 if self.cfg.compute_dtype == "float32" else 5e-2)

    def compile_step(self, state: dict, batch: dict):
        """AOT-compiled step (for cost analysis); does not run it."""
        return self._step.lower(state, batch).compile()

    def tune_learning_rates(self, coreset: dict, batch: dict, key, inner_lr: float, hvp_lr: float,
                            should_stop: Callable[[], bool] | None = None) -> dict:
        """docs/algorithm.md §8.2 search (`rcig.lr_search`) with this engine's probes.

        Probes: one step on a single fresh model (the same key every time) and the same
        real batch; the inner search uses the inner-loop label, the H-solve search the
        H-solve residual label (delta*, theta0' and g_t are computed once for it, at the
        inner LR found). `lr_tune.batch` candidate LRs are probed per vmapped call.
        `should_stop()` is asked before every probe call; when it returns true the search
        raises `rcig.lr_search.SearchStopped`. Returns `search_learning_rates`' dict.
        """
        from rcig import lr_search

        t = self.cfg.lr_tune
        k = t.batch or (1 if jax.default_backend() == "cpu" else 8)
        t0 = time.perf_counter()
        theta0 = step.fresh_model(self.ctx, jax.random.fold_in(key, 7))["params"]
        coreset = jax.device_put(coreset, self.replicated)
        held = {"inner": float(inner_lr), "prepared": None}

        def pad(lrs):  # a fixed batch shape: one compile per probe function
            lrs = np.asarray(lrs, np.float32)
            return np.concatenate([lrs, np.full(k - len(lrs) % k if len(lrs) % k else 0, lrs[-1], np.float32)])

        def probe(which: str, lrs):
            n = len(lrs)
            if which == "inner":
                labels, _ = self._probe_inner(coreset, theta0, pad(lrs), key)
                return np.asarray(labels)[:n].tolist()
            if held["prepared"] is None:
                held["prepared"] = self._probe_prepare(coreset, theta0, batch, np.float32(held["inner"]), key)
            labels, _ = self._probe_hvp(coreset, held["prepared"], pad(lrs))
            return np.asarray(labels)[:n].tolist()

        def set_inner(lr: float) -> None:
            held["inner"], held["prepared"] = float(lr), None

        out = lr_search.search_learning_rates(
            probe, float(inner_lr), float(hvp_lr), set_inner=set_inner, growth=t.growth, backoff=t.backoff,
            max_index=t.max_index, max_probes=t.max_probes, method=t.method, batch=k, should_stop=should_stop)
        out["seconds"] = time.perf_counter() - t0
        return out


def _first_loss_of_model(ctx: step.StepContext, pool_params, idx, coreset) -> jax.Array:
    theta0 = jax.tree.map(lambda a: a[idx], pool_params)
    x_s, y_s = krr.support(ctx.spec, jax.lax.stop_gradient(coreset))
    return step.first_inner_loss(ctx, theta0, x_s, y_s)


def _mismatch(what: str, got: float, want: float, rtol: float = 1e-3) -> str | None:
    """None if `got` is finite and within rtol of `want`, else a one-line description."""
    if np.isfinite(got) and abs(got - want) <= rtol * max(abs(want), 1e-12):
        return None
    return f"{what} {got!r}, want {want!r}"
