"""Evaluation stage (docs/algorithm.md §10): augmentations, the training protocol, `rcig eval`.

Everything runs on the embedded 8x8 digits with tiny step counts and a small network.
"""

from __future__ import annotations

import io
import json
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rcig import augment
from rcig.config import EvalConfig, make_config
from rcig.data import load_dataset, shifted_one_hot
from rcig.distilled_io import DistilledError, candidate_paths, load_distilled
from rcig.evaluate import (
    EvalError,
    evaluate_distilled,
    evaluate_set,
    lr_schedule,
    run_keys,
    spec_steps,
    train_and_test,
)

WIDTH = 16
AUG = "crop_rotate_translate_cutout"


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _one_per_class(ds, ipc=1):
    idx = np.concatenate([np.flatnonzero(ds.y_train == c)[:ipc] for c in range(ds.num_classes)])
    return ds.x_train[idx], shifted_one_hot(ds.y_train[idx], ds.num_classes)


# ---- augmentations ----------------------------------------------------------------------
@pytest.mark.parametrize("shape,dtype", [((8, 8, 1), jnp.float32), ((12, 10, 3), jnp.bfloat16)])
def test_ops_keep_shape_dtype_and_are_identity_at_zero_strength(shape, dtype):
    x = jax.random.normal(jax.random.key(0), shape).astype(dtype)
    for name in augment.OPS:
        op = getattr(augment, name)
        changed = False
        for seed in range(4):
            y0 = op(jax.random.key(seed), x, 0.0)
            assert y0.shape == x.shape and y0.dtype == x.dtype, name
            np.testing.assert_array_equal(np.asarray(y0, np.float32), np.asarray(x, np.float32), err_msg=name)
            y1 = op(jax.random.key(seed), x, 1.0)
            assert y1.shape == x.shape and y1.dtype == x.dtype, name
            changed |= bool(jnp.any(y1 != x))
        assert changed, f"{name} never changed the image at strength 1"


def test_geometry_bilinear_edge_replication_centred():
    x = jnp.arange(36.0).reshape(6, 6, 1)
    apply = jax.jit(augment.apply_params)
    p = augment._identity_params()
    p["A"] = jnp.array([[1.0, 0.0], [0.0, -1.0]])
    np.testing.assert_array_equal(apply(x, p), x[:, ::-1])  # flip
    p = augment._identity_params()
    p["t"] = jnp.array([0.0, -2.0])  # translate right by 2 pixels, edges replicated
    y = apply(x, p)
    np.testing.assert_array_equal(y[:, 2:], x[:, :-2])
    np.testing.assert_array_equal(y[:, :2], jnp.repeat(x[:, :1], 2, axis=1))
    p["t"] = jnp.array([0.0, -0.5])  # half a pixel: bilinear average of neighbours
    np.testing.assert_allclose(apply(x, p)[:, 1:], (x[:, 1:] + x[:, :-1]) / 2)
    p = augment._identity_params()  # 90 degrees about the centre ((H-1)/2, (W-1)/2)
    p["A"] = jnp.array([[0.0, -1.0], [1.0, 0.0]])
    np.testing.assert_allclose(apply(x, p)[..., 0], jnp.rot90(x[..., 0], -1), atol=1e-5)


def test_exactly_one_op_per_image():
    # An asymmetric, zero-free image: a flipped output has no zeros; a cut-out one has
    # exactly (8//4)^2 zeros and is otherwise unflipped. Never both.
    x = jnp.tile(jnp.arange(1.0, 9.0)[None, :, None], (8, 1, 1))
    xb = jnp.broadcast_to(x, (64, 8, 8, 1))
    y = jax.jit(augment.augment_batch, static_argnums=2)(jax.random.key(0), xb, "flip_cutout")
    kinds = set()
    for img in np.asarray(y):
        zeros = int((img == 0).sum())
        if zeros:
            assert zeros == 4
            np.testing.assert_array_equal(img[img != 0], np.asarray(x)[img != 0])
            kinds.add("cutout")
        elif np.array_equal(img, np.asarray(x)[:, ::-1]):
            kinds.add("flip")
        else:
            np.testing.assert_array_equal(img, np.asarray(x))  # flip drew "no flip"
    assert kinds == {"flip", "cutout"}


def test_parse_ops():
    assert augment.parse_ops("flip_color_crop_rotate_translate_cutout") == augment.OPS
    assert augment.parse_ops("") == () and augment.parse_ops("none") == ()
    with pytest.raises(ValueError, match="'blur'"):
        augment.parse_ops("crop_blur")


# ---- protocol pieces -----------------------------------------------------------------------
def test_schedule_and_step_budget():
    s = lr_schedule(1e-4, 2000)
    assert float(s(0)) == 0.0
    assert float(s(500)) == pytest.approx(1e-4)
    assert float(s(2000)) == pytest.approx(1e-6)
    assert float(s(5000)) == pytest.approx(1e-6)
    assert float(s(250)) == pytest.approx(5e-5)
    assert spec_steps(10) == 1000 and spec_steps(20) == 2000 and spec_steps(100) == 2000


# ---- training ------------------------------------------------------------------------------
def test_eval_end_to_end_seeds_and_determinism(digits):
    x, y = _one_per_class(digits)
    cfg = EvalConfig(runs=3, steps=40, lr=1e-3, aug=AUG)
    r1 = evaluate_set(x, y, digits, use_flip=False, cfg=cfg, width=WIDTH, seed=0)
    assert len(r1["accs"]) == 3 and r1["steps"] == 40 and r1["protocol"] == "rcig"
    assert all(0.0 <= a <= 1.0 for a in r1["accs"])
    assert r1["std"] > 0  # different init keys per run
    assert r1["mean"] > 0.2  # 10 images, 40 steps: clearly above chance (0.1)
    r2 = evaluate_set(x, y, digits, use_flip=False, cfg=cfg, width=WIDTH, seed=0)
    assert r2["accs"] == r1["accs"]
    r3 = evaluate_set(x, y, digits, use_flip=False, cfg=cfg, width=WIDTH, seed=1)
    assert r3["accs"] != r1["accs"]


def test_vmapped_runs_match_sequential_runs(digits):
    x, y = _one_per_class(digits)
    y = y.astype(np.float32)
    keys = run_keys(3, 2)
    kw = dict(width=8, depth=None, steps=6, lr=1e-3, batch=None, ops=("flip", "cutout"))
    seq, _ = train_and_test(x, y, digits.x_test, digits.y_test, keys, runs_per_group=1, loop="python", **kw)
    vec, _ = train_and_test(x, y, digits.x_test, digits.y_test, keys, runs_per_group=None, loop="scan", **kw)
    np.testing.assert_allclose(vec, seq, atol=2 / len(digits.y_test))


def test_baseline_and_flip_doubling(digits):
    x, y = _one_per_class(digits)
    cfg = EvalConfig(runs=2, steps=20, lr=1e-3, protocol="noaug")
    r = evaluate_distilled(x, y, digits, use_flip=True, cfg=cfg, width=8, ipc=1, seed=0)
    assert r["baseline"] is not None and len(r["baseline"]["accs"]) == 2
    assert r["use_flip"] is True and r["protocol"] == "noaug" and r["ipc"] == 1
    assert set(r) >= {"mean", "std", "accs", "baseline", "protocol", "dataset", "ipc", "steps", "runs", "wall_s"}
    r0 = evaluate_distilled(x, y, digits, use_flip=True, cfg=replace(cfg, baseline=False), width=8, ipc=1)
    assert r0["baseline"] is None and r0["accs"] == r["accs"]


def test_bad_inputs_name_the_problem(digits):
    x, y = _one_per_class(digits)
    with pytest.raises(EvalError, match="labels have shape"):
        evaluate_set(x, y[:, :5], digits, use_flip=False, cfg=EvalConfig(steps=1), width=8)
    with pytest.raises(EvalError, match="protocol"):
        evaluate_set(x, y, digits, use_flip=False, cfg=EvalConfig(protocol="nope"), width=8)


@pytest.mark.slow
def test_trained_on_everything_learns(digits):
    y = shifted_one_hot(digits.y_train, digits.num_classes)
    cfg = EvalConfig(runs=1, steps=150, lr=1e-3, protocol="noaug", batch_size=256)
    r = evaluate_set(digits.x_train, y, digits, use_flip=False, cfg=cfg, width=32)
    assert r["mean"] > 0.9, r


# ---- sources and the CLI ----------------------------------------------------------------
def _write_npz(path, digits, steps=20, **extra):
    x, y = _one_per_class(digits)
    cfg = make_config("digits", 1, overrides=[f"eval.steps={steps}", "eval.runs=2", "eval.lr=0.001",
                                              "model.width=8"])
    arrays = dict(x_proto=x, x_pixels=digits.to_pixels(x), y_proto=y, log_temp=np.float32(0.0),
                  y_class=np.arange(10, dtype=np.int32), dataset=np.asarray("digits"),
                  ipc=np.asarray(1), use_flip=np.asarray(True), step=np.asarray(7),
                  config_json=np.asarray(cfg.to_json()))
    arrays.update(extra)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path


def test_sources_resolve(tmp_path, digits):
    run = tmp_path / "run"
    _write_npz(run / "distilled.npz", digits)
    (run / "checkpoints" / "50").mkdir(parents=True)
    for src in (run / "distilled.npz", run, run / "checkpoints", run / "checkpoints" / "50"):
        d = load_distilled(str(src))
        assert d.path == str(run / "distilled.npz")
        assert d.ipc == 1 and d.use_flip is True and d.step == 7 and d.config.model.width == 8
    with pytest.raises(DistilledError, match="no distilled.npz found"):
        load_distilled(str(tmp_path))
    bad = _write_npz(tmp_path / "bad" / "distilled.npz", digits, config_json=np.asarray("{"))
    with pytest.raises(DistilledError, match="config_json"):
        load_distilled(str(bad))
    assert candidate_paths("gs://b/r/checkpoints")[-1] == "gs://b/r/distilled.npz"


@pytest.mark.gcs
def test_source_on_gcs(gcs, tmp_path, digits):
    from rcig import storage

    bucket = gcs.make_bucket("rcig-eval-src")
    local = _write_npz(tmp_path / "distilled.npz", digits)
    storage.write_bytes(f"{bucket}/run1/distilled.npz", local.read_bytes())
    d = load_distilled(f"{bucket}/run1/checkpoints")
    assert d.path == f"{bucket}/run1/distilled.npz" and d.x_proto.shape == (10, 8, 8, 1)


def test_cli_eval(tmp_path, digits):
    from typer.testing import CliRunner

    import cli

    run = tmp_path / "run"
    _write_npz(run / "distilled.npz", digits)
    runner = CliRunner()
    res = runner.invoke(cli.app, ["eval", str(run), "--protocol", "noaug"])
    assert res.exit_code == 0, res.output
    first = res.output.splitlines()[0]
    assert first.startswith("distilled ") and " vs random " in first and first.count("±") == 2
    res = runner.invoke(cli.app, ["eval", str(run / "distilled.npz"), "--json", "--no-baseline",
                                  "--runs", "1", "--steps", "5"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["baseline"] is None and len(out["accs"]) == 1 and out["steps"] == 5
    assert out["dataset"] == "digits" and out["ipc"] == 1

    missing = tmp_path / "nope" / "distilled.npz"
    res = runner.invoke(cli.app, ["eval", str(missing)])
    assert res.exit_code == 1
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and str(missing) in lines[0] and "Traceback" not in res.output
    res = runner.invoke(cli.app, ["eval", str(run), "--protocol", "fancy"])
    assert res.exit_code == 1 and "--protocol" in res.output
