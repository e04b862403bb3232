"""The ConvNet of docs/algorithm.md §2 (FRePo's doubling-width variant), in Flax.

Block i: 3x3 conv (stride 1, bias, 128*2^i channels; padding 1, except padding 3 when the
network input has one channel and i == 0), optional normalisation (none by default),
softplus with temperature beta (or ReLU when beta == 0), 2x2 average pool (VALID).
Then flatten (NHWC order) -> features phi(x); Dense -> C logits.

`__call__` returns `(logits, features)`. Parameter names follow Flax's automatic naming
(`Conv_0`, ..., `Dense_0`), which is also the layout of the original code.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# Image side -> depth (§2 table, plus 8 px for the embedded 8x8 digits).
_DEPTH_BY_SIDE = {8: 2, 28: 3, 32: 3, 64: 4, 128: 5}


def depth_for_side(side: int) -> int:
    if side not in _DEPTH_BY_SIDE:
        raise ValueError(
            f"image side {side}: the ConvNet supports sides {sorted(_DEPTH_BY_SIDE)} "
            "(or give model.depth explicitly)"
        )
    return _DEPTH_BY_SIDE[side]


def softplus_beta(x: jax.Array, beta: float) -> jax.Array:
    """log(1 + exp(beta x)) / beta, computed stably."""
    return jax.nn.softplus(beta * x) / beta


class ConvNet(nn.Module):
    depth: int
    width: int
    num_classes: int
    softplus_temp: float = 60.0  # 0 => ReLU
    dtype: Any = jnp.float32  # compute dtype of the convolutions (params stay f32)

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        one_channel = x.shape[-1] == 1
        for i in range(self.depth):
            pad = 3 if (i == 0 and one_channel) else 1
            x = nn.Conv(
                self.width * 2**i,
                kernel_size=(3, 3),
                padding=((pad, pad), (pad, pad)),
                dtype=self.dtype,
                param_dtype=jnp.float32,
            )(x)
            x = x.astype(jnp.float32)
            if self.softplus_temp > 0:
                x = softplus_beta(x, self.softplus_temp)
            else:
                x = nn.relu(x)
            x = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        feats = x.reshape((x.shape[0], -1))
        logits = nn.Dense(self.num_classes, param_dtype=jnp.float32)(feats)
        return logits, feats


def make_convnet(
    image_shape: tuple[int, int, int],
    num_classes: int,
    width: int = 128,
    depth: int | None = None,
    softplus_temp: float = 60.0,
    dtype: Any = jnp.float32,
) -> ConvNet:
    d = depth if depth is not None else depth_for_side(image_shape[0])
    return ConvNet(depth=d, width=width, num_classes=num_classes, softplus_temp=softplus_temp, dtype=dtype)
