"""The linearised network and the KRR losses of RCIG (docs/algorithm.md §3-§5).

Predictions: g(x) = J(x)·delta + phi(x; theta0)^T W, with W solved in closed form.

- `linearize` runs a forward-mode JVP of theta -> (logits, features) at the primal
  stop_gradient(theta0) with tangent delta; it returns the primal features phi(x; theta0)
  and the tangent logits o = J(x)·delta.
- `inner_loss` is the "self" KRR loss L_in on the support set (§4.1), in the original's
  form [½‖Y−preds‖² + ½λ(tr(AᵀKA) + ‖δ‖²)] / (n·C).
- `outer_loss` is the cross-entropy of the KRR predictions on a real batch with learned
  temperature, minus the label margin (§5.1).

Row subsampling (§5.6): `rows_with_grad` computes features/offsets with autodiff for a
subset of rows only and takes the other rows from a stop-gradient cache, so only the
subset's images get gradient while the kernel is always formed over all rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from rcig.config import OuterConfig

Params = Any


@dataclass(frozen=True)
class KrrSpec:
    """Static description of the KRR problem (hashable: closed over by jit). Built from the
    config by `KrrSpec.from_config`, which is where its settings' defaults come from."""

    apply_fn: Callable  # flax apply: ({'params': p}, x) -> (logits, feats)
    num_classes: int
    lam: float  # l2_rate * N (un-flipped N, E4)
    solve: str  # "lu" (original) | "cholesky" (OuterConfig.solve)
    use_flip: bool
    learn_labels: bool
    label_margin: bool
    chunk: int | None  # max_forward_batch_size for no-grad forwards
    # Multi-device: the sharding the support rows are spread with (rows over the mesh's
    # `data` axis), so every per-row pass over the support set is split across devices
    # instead of repeated on each; None on one device.
    row_sharding: Any = None

    @classmethod
    def from_config(cls, outer: OuterConfig, apply_fn: Callable, num_classes: int, n_images: int,
                    row_sharding: Any = None) -> KrrSpec:
        """The KRR problem of `outer` (an `rcig.config.OuterConfig`) for `n_images` distilled
        images (un-flipped) of `num_classes` classes."""
        return cls(apply_fn=apply_fn, num_classes=num_classes, lam=outer.l2_rate * n_images, solve=outer.solve,
                   use_flip=outer.use_flip, learn_labels=outer.learn_labels, label_margin=outer.label_margin,
                   chunk=outer.max_forward_batch_size, row_sharding=row_sharding)


def tree_vdot(a: Params, b: Params) -> jax.Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def tree_sq_norm(a: Params) -> jax.Array:
    return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(a))


def support(spec: KrrSpec, coreset: dict) -> tuple[jax.Array, jax.Array]:
    """(X_s, Y_s): the flip-doubled support set (E5) built from the learned parameters."""
    x, y = coreset["x"], coreset["y"]
    if not spec.learn_labels:
        y = jax.lax.stop_gradient(y)
    if spec.use_flip:
        x = jnp.concatenate([x, x[:, :, ::-1, :]], axis=0)  # mirror along width (axis -2)
        y = jnp.concatenate([y, y], axis=0)
    return shard_rows(spec, x), shard_rows(spec, y)


def shard_rows(spec: KrrSpec, a: jax.Array) -> jax.Array:
    """`a` with its rows (axis 0) spread over the devices, where there are several."""
    return a if spec.row_sharding is None else jax.lax.with_sharding_constraint(a, spec.row_sharding)


def linearize(spec: KrrSpec, theta0: Params, delta: Params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(features phi(x;theta0), tangent logits J(x)·delta)."""

    def f(p):
        return spec.apply_fn({"params": p}, x)

    (_, feats), (offset, _) = jax.jvp(f, (jax.lax.stop_gradient(theta0),), (delta,))
    return feats, offset


def linearize_nograd(spec: KrrSpec, theta0: Params, delta: Params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Stop-gradient features/offsets, in chunks of `spec.chunk` rows when set."""
    theta0, delta = jax.lax.stop_gradient((theta0, delta))
    if spec.chunk is None or x.shape[0] <= spec.chunk:
        out = linearize(spec, theta0, delta, x)
    else:
        out = jax.lax.map(lambda xi: linearize(spec, theta0, delta, xi[None]), x, batch_size=spec.chunk)
        out = jax.tree.map(lambda a: a.reshape((x.shape[0],) + a.shape[2:]), out)
    return jax.lax.stop_gradient(out)


def rows_with_grad(
    spec: KrrSpec,
    theta0: Params,
    delta: Params,
    x: jax.Array,
    idx: jax.Array | None,
    cache: tuple[jax.Array, jax.Array] | None,
) -> tuple[jax.Array, jax.Array]:
    """Features/offsets of all rows; autodiff only through rows `idx` (all if None)."""
    if idx is None:
        return linearize(spec, theta0, delta, x)
    if cache is None:
        cache = linearize_nograd(spec, theta0, delta, x)
    f_sub, o_sub = linearize(spec, theta0, delta, x[idx])
    feats = jax.lax.stop_gradient(cache[0]).at[idx].set(f_sub)
    offs = jax.lax.stop_gradient(cache[1]).at[idx].set(o_sub)
    return feats, offs


def krr_solver(spec: KrrSpec, k_nxn: jax.Array) -> Callable[[jax.Array], jax.Array]:
    """rhs -> (K + λI)^-1 rhs with K + λI factored once: Cholesky (E15 option), or the
    original's general LU (with pivoting)."""
    a = k_nxn + spec.lam * jnp.eye(k_nxn.shape[0], dtype=k_nxn.dtype)
    if spec.solve == "cholesky":
        c = jax.scipy.linalg.cho_factor(a, lower=True)
        return lambda rhs: jax.scipy.linalg.cho_solve(c, rhs)
    lu = jax.scipy.linalg.lu_factor(a)
    return lambda rhs: jax.scipy.linalg.lu_solve(lu, rhs)


def krr_solve(spec: KrrSpec, k_nxn: jax.Array, rhs: jax.Array) -> jax.Array:
    """(K + λI)^-1 rhs, one right-hand side, one factorisation."""
    return krr_solver(spec, k_nxn)(rhs)


def inner_loss_from_rows(spec: KrrSpec, feats_s, offs_s, y_s, delta, k_ss=None, solve=None) -> jax.Array:
    n, c = y_s.shape
    if k_ss is None:
        k_ss = feats_s @ feats_s.T
    a = (solve or krr_solver(spec, k_ss))(y_s - offs_s)
    k_a = k_ss @ a
    preds = offs_s + k_a
    sq_err = jnp.sum(jnp.square(y_s - preds))
    reg = jnp.sum(a * k_a) + tree_sq_norm(delta)
    return (0.5 * sq_err + 0.5 * spec.lam * reg) / (n * c)


def inner_loss(
    spec: KrrSpec, delta: Params, theta0: Params, x_s: jax.Array, y_s: jax.Array, idx=None, cache=None
) -> jax.Array:
    """L_in(delta; theta0, S) of §4.1."""
    feats, offs = rows_with_grad(spec, theta0, delta, x_s, idx, cache)
    return inner_loss_from_rows(spec, feats, offs, y_s, delta)


def fixed_inner_loss(spec: KrrSpec, theta0: Params, x_s: jax.Array, y_s: jax.Array) -> Callable[[Params], jax.Array]:
    """delta -> L_in(delta; theta0, S) for a fixed (theta0, S), all rows, no autodiff to S.

    The same function as `inner_loss` with idx=None, built for the inner loop and the
    H-solve, which evaluate it (and its gradient, and H·v) at 20 deltas each: the network
    is linearised once (`jax.linearize`: the primal forward and its residuals), and
    K_ss = φφᵀ and the factorisation of K_ss + λI are formed once, since none of them
    depends on delta. Each evaluation then costs one tangent pass J·delta (and its
    transpose for the gradient) and two triangular solves.
    """
    theta0, x_s, y_s = jax.lax.stop_gradient((theta0, x_s, y_s))
    (_, feats), tangent = jax.linearize(lambda p: spec.apply_fn({"params": p}, x_s), theta0)
    k_ss = feats @ feats.T
    solve = krr_solver(spec, k_ss)

    def loss(delta):
        offs = tangent(delta)[0]
        return inner_loss_from_rows(spec, feats, offs, y_s, delta, k_ss=k_ss, solve=solve)

    return loss


def label_margin(spec: KrrSpec, y_s: jax.Array) -> jax.Array:
    """mean_i min(top1 − top2, 1/(2C)) over support labels (§5.1)."""
    top2 = jax.lax.top_k(y_s, 2)[0]
    return jnp.mean(jnp.minimum(top2[:, 0] - top2[:, 1], 1.0 / (2 * spec.num_classes)))


def outer_loss(
    spec: KrrSpec,
    coreset: dict,
    delta: Params,
    theta0: Params,
    x_t: jax.Array,
    y_t: jax.Array,
    sub: dict | None = None,
) -> tuple[jax.Array, dict]:
    """L_out of §5.1 and its accuracy; differentiable in (coreset, delta).

    `sub` (optional) holds row subsets and caches for §5.6: keys `s_idx`, `s_cache`,
    `t_idx`, `t_cache`.
    """
    sub = sub or {}
    x_s, y_s = support(spec, coreset)
    feats_s, offs_s = rows_with_grad(spec, theta0, delta, x_s, sub.get("s_idx"), sub.get("s_cache"))
    feats_t, offs_t = rows_with_grad(spec, theta0, delta, x_t, sub.get("t_idx"), sub.get("t_cache"))
    k_ss = feats_s @ feats_s.T
    k_ts = feats_t @ feats_s.T
    a = krr_solve(spec, k_ss, y_s - offs_s)
    preds_t = offs_t + k_ts @ a
    logits = jnp.exp(coreset["log_temp"]) * preds_t
    onehot = y_t - jnp.min(y_t)
    ce = jnp.mean(optax.softmax_cross_entropy(logits, onehot))
    loss = ce
    if spec.label_margin:
        loss = loss - label_margin(spec, y_s)
    acc = jnp.mean((jnp.argmax(preds_t, -1) == jnp.argmax(y_t, -1)).astype(jnp.float32))
    return loss, {"acc": acc, "ce": ce}


def inner_grad(spec: KrrSpec, delta, theta0, x_s, y_s, idx=None, cache=None):
    return jax.grad(lambda d: inner_loss(spec, d, theta0, x_s, y_s, idx, cache))(delta)


def hvp(spec: KrrSpec, delta, theta0, x_s, y_s, v, idx=None, cache=None):
    """H·v, forward-over-reverse, H = ∇²_δ L_in at delta (full tangent tree)."""
    g = lambda d: inner_grad(spec, d, theta0, x_s, y_s, idx, cache)  # noqa: E731
    return jax.jvp(g, (delta,), (v,))[1]


def implicit_grad(spec: KrrSpec, coreset, delta, theta0, h, idx=None, cache=None) -> dict:
    """d_imp = ∂/∂(X,Y,τ) of −⟨h, ∇_δ L_in(θ0, δ*; S(X,Y))⟩ with h fixed (§5.4)."""
    h = jax.lax.stop_gradient(h)

    def obj(cs):
        x_s, y_s = support(spec, cs)
        return -tree_vdot(h, inner_grad(spec, delta, theta0, x_s, y_s, idx, cache))

    return jax.grad(obj)(coreset)
