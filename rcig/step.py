"""One RCIG outer step as a pure function `(state, batch, key) -> (state, metrics)`.

The state is one pytree kept on device between steps (dict of arrays):

    step            int32            completed outer steps
    rng             uint32[2]        the run's base key; step keys are fold_in(rng, step)
    coreset         {x [N,H,W,C], y [N,C], log_temp []}   learned parameters (§1.2)
    opt             {xy: AdaBelief state, t: AdaBelief state}  (§6.1)
    ema             {hidden, average}: trees like coreset (§6.2)
    pool            {params: stacked [P,...], mu, nu: base-Adam moments, age: int32[P]} (§7)
    lr              {inner, hvp}     tuned learning rates (§8)
    lr_stats        window counters for the online inner-LR adaptation (§8.3)

Order of operations (E11): inner loop -> inner-LR check -> meta step (direct gradient,
H-solve, implicit gradient, clip, combine) -> AdaBelief update -> EMA -> pool training
on the updated coreset -> pool reset check.

Decisions on the original's sharp edges (docs/algorithm.md §13):
  E1  Dense-kernel tangent: frozen at 0 in the inner loop by default
      (`faithful.dense_kernel_tangent="ascent"` replicates the raw-gradient ascent);
      the H-solve and implicit gradient always use the full tangent tree, as the original.
  E2  Inner optimiser state: fresh Adam, base untouched by default;
      `faithful.inner_opt_state=true` inherits the pool model's step count and lets the
      base drift by its leftover Adam momentum at every inner step.
  E3  Inner loop and H-solve are not run to convergence (20 Adam steps each), as original.
  E4  lambda = l2_rate * N (un-flipped); losses normalised by the rows used (n*C).
  E6  Fresh split keys everywhere; no key reuse.
  E8  Pool minibatches (if configured) sample from all n support rows.
  E10 Only the inner LR adapts online; the HVP labels are counted and logged only.
  E12 The pool lives on device (stacked), never copied to the host per step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax

from rcig import krr
from rcig.config import FaithfulConfig, HinvConfig, InnerConfig, LRTuneConfig, OuterConfig, PoolConfig

Params = Any


@dataclass(frozen=True)
class StepContext:
    """The step's static settings (closed over by jit; not part of the state): the frozen
    sub-configs of `rcig.config.DistillConfig` as they are (`ctx.inner.n_steps`), plus
    what is derived from the config and the dataset (`rcig.engine.build_context`)."""

    spec: krr.KrrSpec                 # the KRR problem: λ, solve, flips, row sharding
    net: Any                          # flax ConvNet (nonlinear network of the pool)
    image_shape: tuple[int, int, int]
    unroll: bool                      # the loop form: True Python-unrolled, False lax.scan (DistillConfig.loop)
    inner: InnerConfig = InnerConfig()
    hinv: HinvConfig = HinvConfig()
    outer: OuterConfig = OuterConfig()
    pool: PoolConfig = PoolConfig()
    lr_tune: LRTuneConfig = LRTuneConfig()
    faithful: FaithfulConfig = FaithfulConfig()


def fresh_model_context(ctx: StepContext) -> StepContext:
    """`ctx` for a fresh model (the probes, E10): no inherited inner optimiser state (E2)."""
    return dataclasses.replace(ctx, faithful=dataclasses.replace(ctx.faithful, inner_opt_state=False))


# ---- small helpers -------------------------------------------------------------------
def _repeat(ctx: StepContext, body, carry, n: int):
    """Run `body(carry, i) -> (carry, out)` n times, unrolled or as a scan."""
    if ctx.unroll:
        outs = []
        for i in range(n):
            carry, o = body(carry, jnp.int32(i))
            outs.append(o)
        return carry, jnp.stack(outs)
    return jax.lax.scan(body, carry, jnp.arange(n, dtype=jnp.int32))


def _opaque_zeros(tree):
    """Zeros like `tree` that XLA cannot constant-fold into the first loop iteration.

    A loop started from literal zeros lets XLA specialise its first (unrolled) iteration;
    on XLA:CPU (jax 0.10.2) some compilations of that specialised inner loop returned a
    garbage first loss (inf, 1e8, 7e16): 7 of 8 fresh compiles without this barrier, 0 of
    8 with it (BENCHMARKS.md, "Findings"). Same values; only the program changes.
    """
    return jax.lax.optimization_barrier(jax.tree.map(jnp.zeros_like, tree))


def _subset(key, n: int, size: int | None):
    if size is None or size >= n:
        return None
    return jax.random.permutation(key, n)[:size]


def meta_caches(ctx: StepContext, theta0, delta, x_s, x_t) -> dict:
    """§5.6 do_precompute: stop-gradient features/offsets of all support and real rows at
    (θ0', δ*), once per outer step, when any subsampling (or precompute) is configured."""
    subs = (ctx.outer.direct_support_batch, ctx.outer.direct_real_batch, ctx.hinv.batch_size, ctx.outer.implicit_batch_size)
    if not ctx.outer.do_precompute and all(v is None for v in subs):
        return {}
    return {"s": krr.linearize_nograd(ctx.spec, theta0, delta, x_s),
            "t": krr.linearize_nograd(ctx.spec, theta0, delta, x_t)}


def _is_dense_kernel(path) -> bool:
    names = [getattr(p, "key", getattr(p, "name", None)) for p in path]
    return len(names) >= 2 and str(names[-2]).startswith("Dense") and names[-1] == "kernel"


def classify(values: jax.Array) -> jax.Array:
    """§8.1: +1 strictly decreasing, -1 ended worse than it started, else 0."""
    d = values[:-1] - values[1:]
    mono = jnp.all(d > 0)
    fail = values[-1] > values[0]
    return jnp.where(mono, 1, jnp.where(fail, -1, 0)).astype(jnp.int32)


def coreset_optimizers(ctx: StepContext):
    return optax.adabelief(ctx.outer.proto_lr), optax.adabelief(ctx.outer.temp_lr)


# ---- init ----------------------------------------------------------------------------
def fresh_model(ctx: StepContext, key) -> dict:
    params = ctx.net.init(key, jnp.zeros((1, *ctx.image_shape), jnp.float32))["params"]
    zeros = jax.tree.map(jnp.zeros_like, params)
    return {"params": params, "mu": zeros, "nu": zeros, "age": jnp.int32(0)}


def init_state(ctx: StepContext, x_init, y_init, key, inner_lr: float, hvp_lr: float) -> dict:
    """Initial state: coreset from (x_init, y_init), a fresh pool, the given LRs."""
    k_pool, k_run = jax.random.split(key)
    coreset = {
        "x": jnp.asarray(x_init, jnp.float32),
        "y": jnp.asarray(y_init, jnp.float32),
        "log_temp": jnp.float32(0.0),
    }
    opt_xy, opt_t = coreset_optimizers(ctx)
    pool = jax.vmap(lambda k: fresh_model(ctx, k))(jax.random.split(k_pool, ctx.pool.model_count))
    zero = jnp.int32(0)
    return {
        "step": zero,
        "rng": k_run,
        "coreset": coreset,
        "opt": {"xy": opt_xy.init({"x": coreset["x"], "y": coreset["y"]}), "t": opt_t.init(coreset["log_temp"])},
        "ema": {"hidden": jax.tree.map(jnp.zeros_like, coreset), "average": coreset},
        "pool": pool,
        "lr": {"inner": jnp.float32(inner_lr), "hvp": jnp.float32(hvp_lr)},
        "lr_stats": {"n": zero, "fail": zero, "mono": zero, "hvp_fail": zero, "hvp_mono": zero},
    }


# ---- phases --------------------------------------------------------------------------
def inner_loop(ctx: StepContext, model: dict, x_s, y_s, lr, key):
    """§4.2: n_inner Adam steps on delta from 0. Returns (delta*, theta0', losses)."""
    spec = ctx.spec
    theta0 = model["params"]
    delta = _opaque_zeros(theta0)
    adam = optax.scale_by_adam()
    st = adam.init(delta)
    base_st = None
    if ctx.faithful.inner_opt_state:  # E2: inherit the step count, and drift the base
        st = st._replace(count=model["age"])
        base_st = optax.ScaleByAdamState(count=model["age"], mu=model["mu"], nu=model["nu"])
    n_rows = x_s.shape[0]
    # The base is fixed unless E2 drifts it: linearise and factor once for all steps.
    all_rows = ctx.inner.train_batch_size is None or ctx.inner.train_batch_size >= n_rows
    fixed = krr.fixed_inner_loss(spec, theta0, x_s, y_s) if all_rows and not ctx.faithful.inner_opt_state else None

    def body(carry, i):
        delta, st, base, base_st = carry
        if fixed is not None:
            loss, g = jax.value_and_grad(fixed)(delta)
        else:
            idx = _subset(jax.random.fold_in(key, i), n_rows, ctx.inner.train_batch_size)
            loss, g = jax.value_and_grad(lambda d: krr.inner_loss(spec, d, base, x_s, y_s, idx))(delta)
        u, st = adam.update(g, st)

        def upd(path, d, u_leaf, g_leaf):
            if _is_dense_kernel(path):
                return d + g_leaf if ctx.faithful.dense_kernel_tangent == "ascent" else d
            return d - lr * u_leaf

        delta = jax.tree_util.tree_map_with_path(upd, delta, u, g)
        if base_st is not None:
            bu, base_st = adam.update(jax.tree.map(jnp.zeros_like, base), base_st)
            base = jax.tree.map(lambda p, v: p - ctx.pool.lr * v, base, bu)
        return (delta, st, base, base_st), loss

    (delta, _, theta0p, _), losses = _repeat(ctx, body, (delta, st, theta0, base_st), ctx.inner.n_steps)
    return delta, theta0p, losses


def direct_gradient(ctx: StepContext, coreset, delta, theta0, x_t, y_t, caches, key):
    """§5.1-5.2: averaged over normal_repeats subset draws. Returns (loss, aux, d_dir, g_t)."""
    spec = ctx.spec
    n_s = coreset["x"].shape[0] * (2 if spec.use_flip else 1)
    d_sum = g_sum = None
    for r in range(ctx.outer.normal_repeats):
        ks, kt = jax.random.split(jax.random.fold_in(key, r))
        sub = {
            "s_idx": _subset(ks, n_s, ctx.outer.direct_support_batch),
            "t_idx": _subset(kt, x_t.shape[0], ctx.outer.direct_real_batch),
            "s_cache": caches.get("s"),
            "t_cache": caches.get("t"),
        }
        fn = lambda cs, d: krr.outer_loss(spec, cs, d, theta0, x_t, y_t, sub)  # noqa: E731
        (loss, aux), (d_dir, g_t) = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(coreset, delta)
        d_sum = d_dir if d_sum is None else jax.tree.map(jnp.add, d_sum, d_dir)
        g_sum = g_t if g_sum is None else jax.tree.map(jnp.add, g_sum, g_t)
    inv = 1.0 / ctx.outer.normal_repeats
    return loss, aux, jax.tree.map(lambda a: a * inv, d_sum), jax.tree.map(lambda a: a * inv, g_sum)


def hinv_solve(ctx: StepContext, delta, theta0, x_s, y_s, g_t, lr, key, cache=None):
    """§5.3: h ≈ H⁻¹ g_t by n_hinv Adam steps on ½hᵀHh − g_tᵀh. Returns (h, residuals)."""
    spec = ctx.spec
    h = _opaque_zeros(g_t)
    adam = optax.scale_by_adam()
    n_rows = x_s.shape[0]
    hvp_fixed = None
    if ctx.hinv.batch_size is None or ctx.hinv.batch_size >= n_rows:  # all rows: H·v is one linear map, built once
        hvp_fixed = jax.linearize(jax.grad(krr.fixed_inner_loss(spec, theta0, x_s, y_s)), delta)[1]

    def body(carry, i):
        h, st = carry
        if hvp_fixed is not None:
            hh = hvp_fixed(h)
        else:
            idx = _subset(jax.random.fold_in(key, i), n_rows, ctx.hinv.batch_size)
            hh = krr.hvp(spec, delta, theta0, x_s, y_s, h, idx, cache)
        res = krr.tree_vdot(h, jax.tree.map(lambda a, b: a - 2.0 * b, hh, g_t))
        u, st = adam.update(jax.tree.map(jnp.subtract, hh, g_t), st)
        h = jax.tree.map(lambda p, v: p - lr * v, h, u)
        return (h, st), res

    (h, _), residuals = _repeat(ctx, body, (h, adam.init(h)), ctx.hinv.n_steps)
    return h, residuals


def implicit_gradient(ctx: StepContext, coreset, delta, theta0, h, cache, key):
    """§5.4, averaged over normal_repeats subset draws."""
    n_s = coreset["x"].shape[0] * (2 if ctx.spec.use_flip else 1)
    total = None
    for r in range(ctx.outer.normal_repeats):
        idx = _subset(jax.random.fold_in(key, r), n_s, ctx.outer.implicit_batch_size)
        g = krr.implicit_grad(ctx.spec, coreset, delta, theta0, h, idx, cache if idx is not None else None)
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    return jax.tree.map(lambda a: a / ctx.outer.normal_repeats, total)


def clip_and_combine(d_dir: dict, d_imp: dict) -> tuple[dict, dict]:
    """§5.5: per leaf, cap ‖d_imp‖ at ‖d_dir‖; NaN -> 0; return (combined, clipped)."""

    def clip(dd, di):
        nd, ni = jnp.linalg.norm(dd), jnp.linalg.norm(di)
        out = di * (jnp.minimum(nd, ni) / ni)
        return jnp.where(jnp.isnan(out), 0.0, out)

    clipped = jax.tree.map(clip, d_dir, d_imp)
    return jax.tree.map(jnp.add, d_dir, clipped), clipped


def apply_coreset_update(ctx: StepContext, coreset, opt, grads):
    """AdaBelief (lr proto_lr on x,y; temp_lr on log_temp). Returns (coreset, opt, updates)."""
    opt_xy, opt_t = coreset_optimizers(ctx)
    g_xy = {"x": grads["x"], "y": grads["y"]}
    u_xy, s_xy = opt_xy.update(g_xy, opt["xy"], {"x": coreset["x"], "y": coreset["y"]})
    u_t, s_t = opt_t.update(grads["log_temp"], opt["t"], coreset["log_temp"])
    updates = {"x": u_xy["x"], "y": u_xy["y"], "log_temp": u_t}
    return optax.apply_updates(coreset, updates), {"xy": s_xy, "t": s_t}, updates


def ema_update(ctx: StepContext, ema: dict, coreset: dict, t) -> dict:
    """§6.2: bias-corrected EMA; t is the step count after increment (1 at first update)."""
    decay = jnp.float32(ctx.outer.ema_decay)  # f32 throughout, so the step-1 average equals the params
    hidden = jax.tree.map(lambda h, p: decay * h + (1 - decay) * p, ema["hidden"], coreset)
    corr = 1 - decay ** t.astype(jnp.float32)
    return {"hidden": hidden, "average": jax.tree.map(lambda h: h / corr, hidden)}


def pool_train(ctx: StepContext, model: dict, coreset: dict, n_steps, key) -> dict:
    """§7.2.3: n_steps (traced, 1..15) Adam steps of the base params on MSE to the labels."""
    spec = ctx.spec
    x_s, y_s = krr.support(spec, jax.lax.stop_gradient(coreset))
    adam = optax.scale_by_adam()

    def loss_fn(p, xb, yb):
        logits, _ = ctx.net.apply({"params": p}, xb)
        return 0.5 * jnp.sum(jnp.square(logits - yb)) / yb.size

    def one(i, m):
        xb, yb = x_s, y_s
        if ctx.pool.train_batch_size is not None and ctx.pool.train_batch_size < x_s.shape[0]:
            idx = jax.random.permutation(jax.random.fold_in(key, i), x_s.shape[0])[: ctx.pool.train_batch_size]
            xb, yb = x_s[idx], y_s[idx]
        g = jax.grad(loss_fn)(m["params"], xb, yb)
        st = optax.ScaleByAdamState(count=m["age"], mu=m["mu"], nu=m["nu"])
        u, st = adam.update(g, st)
        params = jax.tree.map(lambda p, v: p - ctx.pool.lr * v, m["params"], u)
        return {"params": params, "mu": st.mu, "nu": st.nu, "age": st.count}

    if not ctx.unroll:  # one loop body with a traced trip count: small program, fast compile
        return jax.lax.fori_loop(0, n_steps, one, model)
    for i in range(ctx.pool.n_max_steps - 1):  # unrolled form: each step skipped by a cond
        model = jax.lax.cond(i < n_steps, lambda m, i=i: one(i, m), lambda m: m, model)
    return model


# ---- the outer step ------------------------------------------------------------------
def outer_step(ctx: StepContext, state: dict, batch: dict, key) -> tuple[dict, dict]:
    """One RCIG outer step (Appendix A). Pure; jit it where it is called."""
    spec = ctx.spec
    x_t, y_t = batch["x"], batch["y"]
    keys = jax.random.split(key, 8)
    k_model, k_inner, k_dir, k_hinv, k_imp, k_pool_n, k_pool, k_reset = keys
    step = state["step"]

    model_idx = jax.random.randint(k_model, (), 0, ctx.pool.model_count)
    model = jax.tree.map(lambda a: a[model_idx], state["pool"])
    coreset = state["coreset"]
    x_s, y_s = krr.support(spec, jax.lax.stop_gradient(coreset))

    # 1. inner loop
    delta, theta0p, inner_losses = inner_loop(ctx, model, x_s, y_s, state["lr"]["inner"], k_inner)
    inner_label = classify(inner_losses)

    # 2. inner-LR check (every adapt_every completed steps, window includes this step)
    st = state["lr_stats"]
    n = st["n"] + 1
    fail = st["fail"] + (inner_label == -1)
    mono = st["mono"] + (inner_label == 1)
    adapt = (step > 0) & (step % ctx.lr_tune.adapt_every == 0)
    fail_frac = fail / n
    mono_frac = mono / n
    lr_inner = state["lr"]["inner"]
    factor = jnp.where(fail_frac >= ctx.lr_tune.fail_fraction, ctx.lr_tune.decrease, jnp.where(mono_frac >= ctx.lr_tune.monotonic_fraction, ctx.lr_tune.increase, 1.0))
    new_lr_inner = jnp.where(adapt, lr_inner * factor, lr_inner).astype(jnp.float32)

    # 3. meta step
    caches = meta_caches(ctx, theta0p, delta, x_s, x_t)
    loss, aux, d_dir, g_t = direct_gradient(ctx, coreset, delta, theta0p, x_t, y_t, caches, k_dir)
    h, residuals = hinv_solve(ctx, delta, theta0p, x_s, y_s, g_t, state["lr"]["hvp"], k_hinv, caches.get("s"))
    hvp_label = classify(residuals)
    d_imp = implicit_gradient(ctx, coreset, delta, theta0p, h, caches.get("s"), k_imp)
    if not spec.learn_labels:
        d_dir = {**d_dir, "y": jnp.zeros_like(d_dir["y"])}
        d_imp = {**d_imp, "y": jnp.zeros_like(d_imp["y"])}
    grads, d_imp_clipped = clip_and_combine(d_dir, d_imp)

    # 4. optimiser update, then EMA
    new_coreset, new_opt, _ = apply_coreset_update(ctx, coreset, state["opt"], grads)
    t_next = step + 1
    new_ema = ema_update(ctx, state["ema"], new_coreset, t_next)

    # 5. pool training on the updated coreset (model as it was before the inner loop)
    n_pool = jax.random.randint(k_pool_n, (), 1, ctx.pool.n_max_steps)
    trained = pool_train(ctx, model, new_coreset, n_pool, k_pool)
    # 6. pool reset check
    reset = trained["age"] >= ctx.pool.max_online_steps
    trained = jax.lax.cond(reset, lambda: fresh_model(ctx, k_reset), lambda: trained)
    pool = jax.tree.map(lambda a, v: a.at[model_idx].set(v), state["pool"], trained)

    new_state = {
        "step": t_next,
        "rng": state["rng"],
        "coreset": new_coreset,
        "opt": new_opt,
        "ema": new_ema,
        "pool": pool,
        "lr": {"inner": new_lr_inner, "hvp": state["lr"]["hvp"]},
        "lr_stats": {
            "n": jnp.where(adapt, 0, n).astype(jnp.int32),
            "fail": jnp.where(adapt, 0, fail).astype(jnp.int32),
            "mono": jnp.where(adapt, 0, mono).astype(jnp.int32),
            "hvp_fail": (st["hvp_fail"] + (hvp_label == -1)).astype(jnp.int32),
            "hvp_mono": (st["hvp_mono"] + (hvp_label == 1)).astype(jnp.int32),
        },
    }
    norm = lambda t: jnp.sqrt(krr.tree_sq_norm(t))  # noqa: E731
    metrics = {
        "outer/loss": loss,
        "outer/acc": aux["acc"],
        "outer/ce": aux["ce"],
        "inner/lr": lr_inner,
        "inner/loss_first": inner_losses[0],
        "inner/loss_last": inner_losses[-1],
        "inner/loss_ratio": inner_losses[-1] / inner_losses[0],
        "inner/label": inner_label.astype(jnp.float32),
        "hinv/lr": state["lr"]["hvp"],
        "hinv/residual": residuals[-1],
        "hinv/label": hvp_label.astype(jnp.float32),
        "grad/direct_norm": norm(d_dir),
        "grad/implicit_norm": norm(d_imp),
        "grad/implicit_clipped_norm": norm(d_imp_clipped),
        "coreset/log_temp": new_coreset["log_temp"],
        "pool/model": model_idx.astype(jnp.float32),
        "pool/steps": n_pool.astype(jnp.float32),
        "pool/reset": reset.astype(jnp.float32),
    }
    return new_state, {k: v.astype(jnp.float32) for k, v in metrics.items()}


def first_inner_loss(ctx: StepContext, theta0, x_s, y_s) -> jax.Array:
    """L_in at delta = 0 for base theta0 (all rows), computed without a loop and without
    linearising: J·0 = 0, so only the features enter. The inner loop's first recorded loss
    must equal it; the loop-form guard compares the two.

    (Not `fixed_inner_loss(...)(zeros)`: on XLA:CPU, jax 0.10.2, that tangent map applied
    to literal zeros compiled to inf here, the same defect the loops' opaque zero start
    works around; see BENCHMARKS.md, "Findings".)
    """
    feats = ctx.spec.apply_fn({"params": theta0}, x_s)[1]
    zeros = jax.tree.map(jnp.zeros_like, theta0)
    return krr.inner_loss_from_rows(ctx.spec, feats, jnp.zeros_like(y_s), y_s, zeros)


def probe_inner(ctx: StepContext, coreset, theta0, inner_lr, key) -> tuple[jax.Array, jax.Array]:
    """The inner half of the §8.2 probe: (inner label, first inner loss) on a fresh model.
    The same computation and keys as `probe(..., inner_only=True)`."""
    model = {"params": theta0, "mu": None, "nu": None, "age": jnp.int32(0)}
    x_s, y_s = krr.support(ctx.spec, coreset)
    k_inner = jax.random.split(key, 3)[0]
    ctx_fresh = fresh_model_context(ctx)
    _, _, losses = inner_loop(ctx_fresh, model, x_s, y_s, inner_lr, k_inner)
    return classify(losses), losses[0]


def probe_prepare(ctx: StepContext, coreset, theta0, batch, inner_lr, key) -> dict:
    """Everything the H-solve probe needs that does not depend on the H-solve LR: delta*,
    theta0' and g_t at the (fixed) inner LR. Computed once per H-solve search."""
    model = {"params": theta0, "mu": None, "nu": None, "age": jnp.int32(0)}
    x_s, y_s = krr.support(ctx.spec, coreset)
    k_inner, k_dir, k_hinv = jax.random.split(key, 3)
    ctx_fresh = fresh_model_context(ctx)
    delta, theta0p, _ = inner_loop(ctx_fresh, model, x_s, y_s, inner_lr, k_inner)
    caches = meta_caches(ctx, theta0p, delta, x_s, batch["x"])
    _, _, _, g_t = direct_gradient(ctx, coreset, delta, theta0p, batch["x"], batch["y"], caches, k_dir)
    return {"delta": delta, "theta0p": theta0p, "g_t": g_t, "cache": caches.get("s"), "k_hinv": k_hinv}


def probe_hvp(ctx: StepContext, coreset, prepared: dict, hvp_lr) -> tuple[jax.Array, jax.Array]:
    """The H-solve half of the §8.2 probe: (H-solve label, first residual; 0 exactly when
    the program is right, since h starts at 0). Same values as `probe`'s second label."""
    x_s, y_s = krr.support(ctx.spec, coreset)
    p = prepared
    _, residuals = hinv_solve(ctx, p["delta"], p["theta0p"], x_s, y_s, p["g_t"], hvp_lr, p["k_hinv"], p["cache"])
    return classify(residuals), residuals[0]


def probe(ctx: StepContext, coreset, theta0, batch, inner_lr, hvp_lr, key, inner_only: bool = False) -> tuple[jax.Array, jax.Array]:
    """§8.2 probe: one step's inner and H-solve labels on a fresh model. Pure.

    With `inner_only` the meta step is skipped (the inner search needs only the inner label).
    """
    model = {"params": theta0, "mu": None, "nu": None, "age": jnp.int32(0)}
    x_s, y_s = krr.support(ctx.spec, coreset)
    k_inner, k_dir, k_hinv = jax.random.split(key, 3)
    ctx_fresh = fresh_model_context(ctx)  # probes use a fresh model (E10)
    delta, theta0p, losses = inner_loop(ctx_fresh, model, x_s, y_s, inner_lr, k_inner)
    if inner_only:
        return classify(losses), jnp.int32(0)
    caches = meta_caches(ctx, theta0p, delta, x_s, batch["x"])
    _, _, _, g_t = direct_gradient(ctx, coreset, delta, theta0p, batch["x"], batch["y"], caches, k_dir)
    _, residuals = hinv_solve(ctx, delta, theta0p, x_s, y_s, g_t, hvp_lr, k_hinv, caches.get("s"))
    return classify(losses), classify(residuals)

