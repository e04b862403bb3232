"""Config presets and dotted overrides; the ConvNet's shapes per resolution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from rcig.config import PRESETS, ConfigError, DistillConfig, apply_overrides, make_config
from rcig.model import depth_for_side, init_params, make_convnet


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_round_trips(name):
    cfg = make_config("cifar10", 1, preset=name)
    assert cfg.preset == name
    assert DistillConfig.from_dict(cfg.to_dict()) == cfg


def test_presets_fix_the_released_defects():
    for name in ("cifar100_50", "depth_4_big"):
        assert PRESETS[name].pool.model_count == 30 and PRESETS[name].pool.train_batch_size is None
    assert PRESETS["depth_5"].outer.l2_rate == 0.05
    assert PRESETS["cifar100_50"].outer.normal_repeats == 2
    assert PRESETS["depth_3_no_flip"].outer.use_flip is False
    assert PRESETS["depth_4_200"].model.softplus_temp == 0.0


def test_overrides_from_strings_and_dicts_are_typed():
    cfg = make_config("digits", 1, overrides=["inner.n_steps=10", "outer.use_flip=true", "outer.direct_real_batch=none", "hinv.lr=1e-3"])
    assert (cfg.inner.n_steps, cfg.outer.use_flip, cfg.outer.direct_real_batch, cfg.hinv.lr) == (10, True, None, 1e-3)
    assert apply_overrides(cfg, {"model": {"width": 8}}).model.width == 8


@pytest.mark.parametrize("override,names", [
    ({"inner.n_step": 3}, "inner.n_step"),
    ({"nosuch": 1}, "nosuch"),
    ({"inner.n_steps": "ten"}, "inner.n_steps"),
    ({"inner.n_steps": 2.5}, "inner.n_steps"),
    ({"outer.use_flip": "maybe"}, "outer.use_flip"),
    ({"outer.solve": "qr"}, "outer.solve"),
    ({"inner": 3}, "inner"),
    ({"model.width.x": 1}, "model.width.x"),
    ({"ipc": 0}, "ipc"),
])
def test_bad_overrides_name_the_key(override, names):
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        make_config("digits", 1, overrides=override)


def test_override_string_without_equals():
    with pytest.raises(ConfigError, match="key=value"):
        make_config("digits", 1, overrides=["inner.n_steps"])


@pytest.mark.parametrize("shape,depth,feat", [
    ((8, 8, 1), 2, 3 * 3 * 16),      # 1-channel: first conv pads 3 -> 12 -> 6 -> 3
    ((28, 28, 1), 3, 4 * 4 * 32),    # 28 -> 32 -> 16 -> 8 -> 4
    ((32, 32, 3), 3, 4 * 4 * 32),
    ((64, 64, 3), 4, 4 * 4 * 64),
])
def test_convnet_shapes(shape, depth, feat):
    assert depth_for_side(shape[0]) == depth
    net = make_convnet(shape, num_classes=7, width=8)
    params = init_params(net, jax.random.PRNGKey(0), shape)
    logits, feats = net.apply({"params": params}, jnp.zeros((2, *shape)))
    assert logits.shape == (2, 7) and feats.shape == (2, feat)
    assert params["Conv_0"]["kernel"].shape == (3, 3, shape[2], 8)
    assert params[f"Conv_{depth - 1}"]["kernel"].shape[-1] == 8 * 2 ** (depth - 1)
    assert float(jnp.abs(params["Dense_0"]["bias"]).sum()) == 0.0


def test_relu_and_softplus_differ_and_unknown_side_is_clear():
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 1))
    relu, soft = make_convnet((8, 8, 1), 3, width=4, softplus_temp=0.0), make_convnet((8, 8, 1), 3, width=4)
    p = init_params(relu, jax.random.PRNGKey(0), (8, 8, 1))
    assert not jnp.allclose(relu.apply({"params": p}, x)[1], soft.apply({"params": p}, x)[1])
    with pytest.raises(ValueError, match="image side 48"):
        depth_for_side(48)
