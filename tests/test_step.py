"""The RCIG outer step: golden numbers, hypergradient correctness, devices, tracing, switches."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from rcig import krr, step
from rcig.config import HinvConfig, InnerConfig, OuterConfig, make_config
from rcig.engine import Engine
from rcig.model import ConvNet

GOLDEN = Path(__file__).parent / "golden" / "step_golden.json"
C, IPC, M = 3, 2, 16


def tiny_cfg(**over):
    base = {
        "model.width": 4, "pool.model_count": 2, "outer.real_batch_size": M,
        "inner.n_steps": 5, "hinv.n_steps": 5, "lr_tune.skip": True, "outer.use_flip": True,
        "loop": "scan", "pool.n_max_steps": 3,
    }
    base.update(over)
    return make_config("digits", IPC, overrides=base)


def tiny_data(seed=0):
    rng = np.random.default_rng(seed)
    x0 = rng.normal(size=(C * IPC, 8, 8, 1)).astype(np.float32)
    y0 = (np.repeat(np.eye(C), IPC, axis=0) - 1 / C).astype(np.float32)
    xb = rng.normal(size=(M, 8, 8, 1)).astype(np.float32)
    yb = (np.eye(C)[rng.integers(0, C, M)] - 1 / C).astype(np.float32)
    return x0, y0, xb, yb


_ENGINES: dict = {}


def engine_for(cfg, devices=None):
    """Engines are cached so tests sharing a config compile its step once."""
    key = (cfg.to_json(), tuple(str(d) for d in (devices or [])))
    if key not in _ENGINES:
        _ENGINES[key] = Engine(cfg, (8, 8, 1), C, devices=devices)
    return _ENGINES[key]


def run_steps(cfg, n, devices=None):
    eng = engine_for(cfg, devices)
    x0, y0, xb, yb = tiny_data()
    state = eng.init_state(x0, y0, jax.random.PRNGKey(0), 1e-3, 1e-3)
    out = []
    for i in range(n):
        state, m = eng.step(state, eng.put_batch(xb + 0.01 * i, yb))
        out.append({k: float(v) for k, v in m.items()})
    return eng, state, out


def summary(state, metrics):
    x = np.asarray(state["coreset"]["x"], np.float64)
    return {
        "outer/loss": metrics[-1]["outer/loss"],
        "grad/direct_norm": metrics[-1]["grad/direct_norm"],
        "grad/implicit_norm": metrics[-1]["grad/implicit_norm"],
        "hinv/residual": metrics[-1]["hinv/residual"],
        "x_sum": float(x.sum()),
        "x_abs_sum": float(np.abs(x).sum()),
        "y_sum": float(np.asarray(state["coreset"]["y"], np.float64).sum()),
        "log_temp": float(state["coreset"]["log_temp"]),
    }


@pytest.mark.parametrize("n_steps", [1, 3])
def test_golden_numbers(n_steps):
    """Golden values for 1 and 3 steps of a tiny config on one device.

    If this fails after an INTENDED change of the algorithm's math (not a refactor),
    regenerate with `RCIG_UPDATE_GOLDEN=1 pytest tests/test_step.py -k golden` and say
    why in the commit. A refactor must not change these numbers.
    """
    _, state, metrics = run_steps(tiny_cfg(), n_steps, devices=jax.local_devices()[:1])
    got = summary(state, metrics)
    import os

    data = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if os.environ.get("RCIG_UPDATE_GOLDEN"):
        data[str(n_steps)] = got
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(data, indent=2, sort_keys=True))
    assert str(n_steps) in data, f"no golden values for {n_steps} steps in {GOLDEN}"
    for k, v in data[str(n_steps)].items():
        np.testing.assert_allclose(got[k], v, rtol=2e-4, atol=1e-6, err_msg=f"golden {k} after {n_steps} steps (see docstring on when updating is right)")


def test_one_vs_four_devices():
    assert len(jax.local_devices()) >= 4, "conftest should give 4 emulated CPU devices"
    _, s1, m1 = run_steps(tiny_cfg(), 2, devices=jax.local_devices()[:1])
    _, s4, m4 = run_steps(tiny_cfg(), 2, devices=jax.local_devices()[:4])
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s4)):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=2e-4, atol=2e-5)
    for k in m1[-1]:
        np.testing.assert_allclose(m1[-1][k], m4[-1][k], rtol=2e-4, atol=2e-5, err_msg=k)
    assert len(s4["coreset"]["x"].sharding.device_set) == 4


def test_batch_not_divisible_is_a_clear_error():
    from rcig.config import ConfigError

    with pytest.raises(ConfigError, match="outer.real_batch_size"):
        Engine(tiny_cfg(**{"outer.real_batch_size": 18}), (8, 8, 1), C, devices=jax.local_devices()[:4])


def test_no_retrace_and_no_transfers_per_step():
    eng, state, _ = run_steps(tiny_cfg(), 1, devices=jax.local_devices()[:2])
    x0, y0, xb, yb = tiny_data()
    batches = [eng.put_batch(xb * (1 + i), yb) for i in range(3)]
    with jax.transfer_guard("disallow"):
        for b in batches:
            state, m = eng.step(state, b)
    jax.block_until_ready(m)
    assert eng._step._cache_size() == 1, "the outer step was traced more than once"
    # (the engine is shared with other tests; all its calls use the same shapes/shardings)


@pytest.mark.parametrize("solve", ["cholesky", "lu"])
def test_fixed_inner_loss_is_the_inner_loss(solve):
    """The inner loop's / H-solve's linearise-once form: same value, gradient and H·v."""
    cs, theta0, delta, _, _ = _inputs()
    net, spec = _spec()
    spec = krr.KrrSpec(**{**spec.__dict__, "solve": solve})
    xs, ys = krr.support(spec, cs)
    fixed = krr.fixed_inner_loss(spec, theta0, xs, ys)
    v = jax.tree.map(lambda a: jnp.sin(jnp.arange(a.size, dtype=jnp.float32)).reshape(a.shape), delta)
    np.testing.assert_allclose(fixed(delta), krr.inner_loss(spec, delta, theta0, xs, ys), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(jax.grad(fixed)(delta)), jax.tree.leaves(krr.inner_grad(spec, delta, theta0, xs, ys))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    hv_fixed = jax.linearize(jax.grad(fixed), delta)[1](v)
    for a, b in zip(jax.tree.leaves(hv_fixed), jax.tree.leaves(krr.hvp(spec, delta, theta0, xs, ys, v))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_support_rows_are_split_over_the_devices():
    """On several devices every per-row pass over the support set is partitioned, not repeated."""
    eng = engine_for(tiny_cfg(), jax.local_devices()[:4])
    cs = jax.device_put({"x": jnp.zeros((C * IPC, 8, 8, 1)), "y": jnp.zeros((C * IPC, C)), "log_temp": jnp.float32(0)},
                        eng.replicated)
    xs, _ = jax.jit(lambda c: krr.support(eng.ctx.spec, c))(cs)
    assert xs.shape[0] == 2 * C * IPC and xs.sharding.spec[0] == "data" and len(xs.sharding.device_set) == 4
    assert engine_for(tiny_cfg(), jax.local_devices()[:1]).ctx.spec.row_sharding is None


# ---- hypergradient correctness ---------------------------------------------------------
@pytest.mark.slow
def test_implicit_gradient_matches_exact_hypergradient():
    """With the inner problem solved to convergence, direct + implicit == d L_out(δ*(S), S)/dX."""
    net = ConvNet(depth=2, width=2, num_classes=2, softplus_temp=60.0)
    n_img = 4
    spec = krr.KrrSpec.from_config(OuterConfig(l2_rate=0.5, use_flip=False), net.apply, 2, n_img)
    ctx = step.StepContext(spec=spec, net=net, image_shape=(8, 8, 1), unroll=False,
                           inner=InnerConfig(n_steps=600), hinv=HinvConfig(n_steps=600))
    rng = np.random.default_rng(3)
    theta0 = net.init(jax.random.PRNGKey(1), jnp.zeros((1, 8, 8, 1)))["params"]
    cs = {"x": jnp.asarray(rng.normal(size=(n_img, 8, 8, 1)), jnp.float32),
          "y": jnp.asarray(np.repeat(np.eye(2), 2, 0) - 0.5, jnp.float32), "log_temp": jnp.float32(0.0)}
    xt = jnp.asarray(rng.normal(size=(32, 8, 8, 1)), jnp.float32)
    yt = jnp.asarray(np.eye(2)[rng.integers(0, 2, 32)] - 0.5, jnp.float32)
    flat0, unravel = ravel_pytree(jax.tree.map(jnp.zeros_like, theta0))
    mask, _ = ravel_pytree(jax.tree_util.tree_map_with_path(lambda p, a: jnp.zeros_like(a) if step._is_dense_kernel(p) else jnp.ones_like(a), theta0))
    free = np.flatnonzero(np.asarray(mask))

    def delta_star(coreset):  # exact minimiser over the free (non-Dense-kernel) tangent leaves
        xs, ys = krr.support(spec, coreset)
        f = lambda v: krr.inner_loss(spec, unravel(flat0.at[free].set(v)), theta0, xs, ys)  # noqa: E731
        v0 = jnp.zeros(len(free))
        hess = jax.hessian(f)(v0)
        return unravel(flat0.at[free].set(jnp.linalg.solve(hess, -jax.grad(f)(v0))))

    def hyper(coreset):
        return krr.outer_loss(spec, coreset, delta_star(coreset), theta0, xt, yt)[0]

    exact = jax.grad(hyper)(cs)

    @jax.jit
    def ours():
        model = {"params": theta0, "mu": None, "nu": None, "age": jnp.int32(0)}
        xs, ys = krr.support(spec, cs)
        delta, th, losses = step.inner_loop(ctx, model, xs, ys, jnp.float32(1e-2), jax.random.PRNGKey(0))
        _, _, d_dir, g_t = step.direct_gradient(ctx, cs, delta, th, xt, yt, {}, jax.random.PRNGKey(1))
        # the H-solve over the free leaves only, so it is the same linear system as `exact`
        g_t = jax.tree_util.tree_map_with_path(lambda p, a: jnp.zeros_like(a) if step._is_dense_kernel(p) else a, g_t)
        h, res = step.hinv_solve(ctx, delta, th, xs, ys, g_t, jnp.float32(1e-2), jax.random.PRNGKey(2))
        h = jax.tree_util.tree_map_with_path(lambda p, a: jnp.zeros_like(a) if step._is_dense_kernel(p) else a, h)
        d_imp = step.implicit_gradient(ctx, cs, delta, th, h, None, jax.random.PRNGKey(3))
        return d_dir, d_imp, losses

    d_dir, d_imp, losses = ours()
    assert float(losses[-1]) < float(losses[0]), "inner loop did not decrease L_in"

    def cos(a, b):
        a, b = np.ravel(a), np.ravel(b)
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    total_x = np.asarray(d_dir["x"] + d_imp["x"])
    c_total = cos(total_x, exact["x"])
    c_direct = cos(d_dir["x"], exact["x"])
    print(f"cosine total {c_total:.5f} direct {c_direct:.5f}")
    assert c_total > 0.99, f"direct+implicit vs exact hypergradient: cosine {c_total:.4f}"
    assert c_total > c_direct, f"implicit term did not help: {c_total:.4f} vs direct only {c_direct:.4f}"


# ---- switches change what the spec says and nothing else ----------------------------------
def _spec(use_flip=True, learn_labels=True):
    net = ConvNet(depth=2, width=4, num_classes=C, softplus_temp=60.0)
    return net, krr.KrrSpec.from_config(OuterConfig(use_flip=use_flip, learn_labels=learn_labels), net.apply, C, C * IPC)


def _inputs():
    x0, y0, xb, yb = tiny_data(1)
    net, _ = _spec()
    theta0 = net.init(jax.random.PRNGKey(2), jnp.zeros((1, 8, 8, 1)))["params"]
    delta = jax.tree.map(lambda a: 1e-3 * jnp.ones_like(a), theta0)
    cs = {"x": jnp.asarray(x0), "y": jnp.asarray(y0), "log_temp": jnp.float32(0.1)}
    return cs, theta0, delta, jnp.asarray(xb), jnp.asarray(yb)


def test_flip_trick_is_the_doubled_support_set():
    cs, theta0, delta, xb, yb = _inputs()
    _, flip = _spec(use_flip=True)
    _, plain = _spec(use_flip=False)  # same lambda (uses N, not 2N)
    doubled = {"x": jnp.concatenate([cs["x"], cs["x"][:, :, ::-1]]), "y": jnp.concatenate([cs["y"], cs["y"]]), "log_temp": cs["log_temp"]}
    gf = jax.grad(lambda c: krr.outer_loss(flip, c, delta, theta0, xb, yb)[0])(cs)
    gp = jax.grad(lambda c: krr.outer_loss(plain, c, delta, theta0, xb, yb)[0])(doubled)
    n = cs["x"].shape[0]
    np.testing.assert_allclose(gf["x"], gp["x"][:n] + gp["x"][n:, :, ::-1], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(gf["y"], gp["y"][:n] + gp["y"][n:], rtol=1e-4, atol=1e-7)
    assert not np.allclose(gf["x"], jax.grad(lambda c: krr.outer_loss(plain, c, delta, theta0, xb, yb)[0])(cs)["x"])


def test_learn_labels_off_freezes_only_labels():
    x0, y0, xb, yb = tiny_data()
    _, on, _ = run_steps(tiny_cfg(), 1, devices=jax.local_devices()[:1])
    _, off, _ = run_steps(tiny_cfg(**{"outer.learn_labels": False}), 1, devices=jax.local_devices()[:1])
    np.testing.assert_array_equal(off["coreset"]["y"], y0)
    assert not np.allclose(on["coreset"]["y"], y0)
    np.testing.assert_allclose(off["coreset"]["x"], on["coreset"]["x"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(off["coreset"]["log_temp"], on["coreset"]["log_temp"], rtol=1e-5)


def test_subsampling_only_restricts_which_images_get_gradient():
    cs, theta0, delta, xb, yb = _inputs()
    _, spec = _spec()
    n_s = 2 * cs["x"].shape[0]
    idx = jnp.array([0, 3, 7])  # support rows 0, 3 (images 0, 3) and 7 (= flipped image 1)
    full_loss, _ = krr.outer_loss(spec, cs, delta, theta0, xb, yb)
    sub = {"s_idx": idx}
    sub_loss, _ = krr.outer_loss(spec, cs, delta, theta0, xb, yb, sub)
    np.testing.assert_allclose(sub_loss, full_loss, rtol=1e-5)  # the forward value is unchanged
    g = jax.grad(lambda c: krr.outer_loss(spec, c, delta, theta0, xb, yb, sub)[0])(cs)
    gx = np.abs(np.asarray(g["x"])).reshape(cs["x"].shape[0], -1).sum(1)
    assert set(np.flatnonzero(gx > 0)) == {0, 1, 3}, gx
    assert np.all(np.abs(np.asarray(g["y"])).sum(1) > 0), "labels outside the subset must still get gradient"
    everything = jax.grad(lambda c: krr.outer_loss(spec, c, delta, theta0, xb, yb, {"s_idx": jnp.arange(n_s)})[0])(cs)
    plain = jax.grad(lambda c: krr.outer_loss(spec, c, delta, theta0, xb, yb)[0])(cs)
    np.testing.assert_allclose(everything["x"], plain["x"], rtol=1e-4, atol=1e-7)


def test_subsampled_config_runs_a_step():
    cfg = tiny_cfg(**{"inner.train_batch_size": 6, "hinv.batch_size": 6, "outer.direct_support_batch": 6,
                      "outer.direct_real_batch": 8, "outer.implicit_batch_size": 6, "outer.do_precompute": True,
                      "outer.normal_repeats": 2, "outer.max_forward_batch_size": 4})
    _, state, metrics = run_steps(cfg, 1, devices=jax.local_devices()[:1])
    assert np.isfinite(metrics[-1]["outer/loss"])
    assert metrics[-1]["grad/implicit_norm"] > 0


# ---- loop form: unrolled on CPU behind a first-step guard ------------------------------
def test_auto_loop_is_unrolled_on_cpu_and_a_scan_elsewhere():
    from rcig.engine import resolve_loop

    cfg = tiny_cfg(loop="auto")
    assert resolve_loop(cfg, "cpu") == "unroll" and resolve_loop(cfg, "gpu") == "scan"
    assert resolve_loop(tiny_cfg(loop="scan"), "cpu") == "scan"


def test_first_inner_loss_reference_is_the_inner_loss_at_zero():
    cs, theta0, delta, _, _ = _inputs()
    eng = engine_for(tiny_cfg())
    xs, ys = krr.support(eng.ctx.spec, cs)
    zeros = jax.tree.map(jnp.zeros_like, delta)
    want = krr.inner_loss(eng.ctx.spec, zeros, theta0, xs, ys)
    np.testing.assert_allclose(jax.jit(lambda *a: step.first_inner_loss(eng.ctx, *a))(theta0, xs, ys), want, rtol=1e-5)


@pytest.mark.slow  # compiles an unrolled step
def test_guard_accepts_a_right_first_step_and_flags_a_wrong_one():
    cfg = tiny_cfg(loop="unroll")
    eng = Engine(cfg, (8, 8, 1), C, devices=jax.local_devices()[:1])
    assert eng.guard
    x0, y0, xb, yb = tiny_data()
    state = eng.init_state(x0, y0, jax.random.PRNGKey(0), 1e-3, 1e-3)
    keep = jax.tree.map(jnp.copy, state)
    _, m = eng.step(state, eng.put_batch(xb, yb))
    assert eng.guard_log == [] and eng.ctx.unroll  # a right compile is kept
    m = {k: float(v) for k, v in m.items()}
    assert eng._check_step(keep, m) is None
    assert "first inner loss" in eng._check_step(keep, {**m, "inner/loss_first": m["inner/loss_first"] * 1e6})
    assert "non-finite" in eng._check_step(keep, {**m, "outer/loss": float("inf")})


@pytest.mark.slow  # compiles an unrolled and a scanned step
def test_guard_falls_back_to_scan_and_redoes_the_step():
    """A first step the guard rejects is recomputed with scans from the same state: the
    result is the scan engine's, and the engine stays on scans."""
    x0, y0, xb, yb = tiny_data()
    eng = Engine(tiny_cfg(loop="unroll"), (8, 8, 1), C, devices=jax.local_devices()[:1])
    eng._check_step = lambda state, metrics: "forced by the test"
    state = eng.init_state(x0, y0, jax.random.PRNGKey(0), 1e-3, 1e-3)
    with pytest.warns(RuntimeWarning, match="forced by the test"):
        got, _ = eng.step(state, eng.put_batch(xb, yb))
    assert not eng.ctx.unroll and eng.guard_log == ["first step: forced by the test"]
    ref = engine_for(tiny_cfg())  # loop=scan
    want, _ = ref.step(ref.init_state(x0, y0, jax.random.PRNGKey(0), 1e-3, 1e-3), ref.put_batch(xb, yb))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):  # separate compiles: last-bit differences
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
