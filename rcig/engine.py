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
- the learning-rate search of §8.2 runs a jitted one-step probe, compiled once.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from rcig import krr, step
from rcig.config import ConfigError, DistillConfig
from rcig.model import make_convnet


def build_context(cfg: DistillConfig, image_shape: tuple[int, int, int], num_classes: int,
                  mesh: jax.sharding.Mesh | None = None) -> step.StepContext:
    """Static step settings from a config and the dataset's shape (and the device mesh)."""
    dtype = jnp.bfloat16 if cfg.compute_dtype == "bfloat16" else jnp.float32
    net = make_convnet(image_shape, num_classes, width=cfg.model.width, depth=cfg.model.depth,
                       softplus_temp=cfg.model.softplus_temp, dtype=dtype)
    n_images = cfg.ipc * num_classes
    o = cfg.outer
    spec = krr.KrrSpec(
        apply_fn=net.apply, num_classes=num_classes, lam=o.l2_rate * n_images, solve=o.solve,
        use_flip=o.use_flip, learn_labels=o.learn_labels, label_margin=o.label_margin,
        chunk=o.max_forward_batch_size,
        row_sharding=NamedSharding(mesh, P("data")) if mesh is not None and mesh.size > 1 else None,
    )
    unroll = cfg.loop == "unroll"  # "auto" and "scan": lax.scan (see DistillConfig.loop)
    t = cfg.lr_tune
    return step.StepContext(
        spec=spec, net=net, image_shape=tuple(image_shape),
        n_inner=cfg.inner.n_steps, n_hinv=cfg.hinv.n_steps,
        inner_sub=cfg.inner.train_batch_size, hinv_sub=cfg.hinv.batch_size,
        direct_s_sub=o.direct_support_batch, direct_t_sub=o.direct_real_batch,
        implicit_sub=o.implicit_batch_size, precompute=o.do_precompute,
        normal_repeats=o.normal_repeats,
        pool_count=cfg.pool.model_count, pool_lr=cfg.pool.lr, pool_max_online=cfg.pool.max_online_steps,
        pool_n_max=cfg.pool.n_max_steps, pool_batch=cfg.pool.train_batch_size,
        dense_tangent=cfg.faithful.dense_kernel_tangent, faithful_e2=cfg.faithful.inner_opt_state,
        proto_lr=o.proto_lr, temp_lr=o.temp_lr, ema_decay=o.ema_decay,
        adapt_every=t.adapt_every, fail_fraction=t.fail_fraction, mono_fraction=t.monotonic_fraction,
        lr_decrease=t.decrease, lr_increase=t.increase, unroll=unroll,
    )


def _keyed_step(ctx: step.StepContext, state: dict, batch: dict):
    key = jax.random.fold_in(state["rng"], state["step"])
    return step.outer_step(ctx, state, batch, key)


class Engine:
    """A config's step, jitted and sharded over the local devices.

    Example:
        >>> eng = Engine(cfg, (8, 8, 1), 10)
        >>> state = eng.init_state(x0, y0, jax.random.PRNGKey(0), 1e-5, 5e-5)
        >>> state, metrics = eng.step(state, eng.put_batch(xb, yb))
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
        # LR probes, vmapped over a batch of candidate LRs (one call tries several).
        probe_many = lambda inner_only: jax.jit(jax.vmap(  # noqa: E731
            functools.partial(step.probe, self.ctx, inner_only=inner_only), in_axes=(None, None, None, 0, 0, None)))
        self._probe_inner, self._probe_both = probe_many(True), probe_many(False)

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
        return self._step(state, batch)

    def compile_step(self, state: dict, batch: dict):
        """AOT-compiled step (for cost analysis); does not run it."""
        return self._step.lower(state, batch).compile()

    def tune_learning_rates(self, coreset: dict, batch: dict, key, inner_lr: float, hvp_lr: float) -> dict:
        """§8.2 search: grow each LR by `growth` while its probe stays monotonic, then back off.

        Probes: one step on a single fresh model (the same key every time) and the same
        real batch; the inner search uses the inner-loop label, the H-solve search the
        H-solve residual label. `lr_tune.batch` candidate LRs (lr·growth^0..k-1) are probed
        in one vmapped call; the result equals the one-at-a-time search (each probe is
        independent of the others). Returns {"inner", "hvp", "probes", "seconds", "capped"}.
        """
        t = self.cfg.lr_tune
        k = t.batch or (1 if jax.default_backend() == "cpu" else 8)
        t0 = time.perf_counter()
        theta0 = step.fresh_model(self.ctx, jax.random.fold_in(key, 7))["params"]
        coreset = jax.device_put(coreset, self.replicated)
        probes, capped = 0, []

        def search(lr: float, fixed: float, which: int) -> float:
            nonlocal probes
            tried = 0
            while tried < t.max_probes:
                lrs = lr * t.growth ** np.arange(k)
                other = np.full(k, fixed, np.float32)
                args = (lrs.astype(np.float32), other) if which == 0 else (other, lrs.astype(np.float32))
                fn = self._probe_inner if which == 0 else self._probe_both
                labels = np.asarray(fn(coreset, theta0, batch, args[0], args[1], key)[which])
                tried += k
                bad = np.flatnonzero(labels != 1)
                if bad.size:
                    probes += int(bad[0]) + 1
                    return float(lrs[bad[0]]) * t.backoff
                probes += k
                lr = float(lrs[-1]) * t.growth
            capped.append("inner" if which == 0 else "hvp")
            return lr * t.backoff

        inner_lr = search(inner_lr, hvp_lr, 0)
        hvp_lr = search(hvp_lr, inner_lr, 1)
        return {"inner": float(inner_lr), "hvp": float(hvp_lr), "probes": probes,
                "seconds": time.perf_counter() - t0, "capped": capped}
