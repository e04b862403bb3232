"""Evaluation-time augmentations of docs/algorithm.md §10.4, in whitened (model) space.

The ops are named in a `test_aug` string joined by "_" (e.g.
``"flip_color_crop_rotate_translate_cutout"``). `augment_batch` picks exactly ONE op per
image, uniformly at random, and applies it; ops are never composed.

| op        | what it does (res = image side, s = strength, 1.0 = the spec's ranges)          |
|-----------|-----------------------------------------------------------------------------------|
| flip      | horizontal flip with probability 0.5·s                                            |
| color     | brightness += U(±0.25 s); contrast about the image mean × exp(U(±0.25 s));        |
|           | saturation about each pixel's channel mean × exp(U(±0.25 s))                      |
| crop      | random resized crop: zoom z = exp(U(log 0.8, log 1.25)·s), offset per axis        |
|           | c ~ U(±|res·z − res|/2); output at centred u reads input at (u + c)/z            |
| rotate    | angle ~ U(±15°·s) about the centre                                                |
| translate | shift per axis ~ U(±0.125·res·s)                                                  |
| cutout    | one square hole of round(s·(res//4)) pixels set to 0, fully inside the image      |

Geometric ops (flip, crop, rotate, translate) resample with bilinear interpolation and
edge replication, in coordinates centred at ((H−1)/2, (W−1)/2), through
`dm_pix.affine_transform(order=1, mode="nearest")`. dm-pix's colour ops assume RGB in
[0, 1] (saturation goes through HSV, contrast uses a per-channel mean), which does not fit
whitened data, so the colour op and cutout are a few lines of plain JAX here.

Every op is expressed as one set of per-image parameters (an affine map, colour factors
and a hole), so a batch costs a single resample per image whichever op was drawn. At
strength 0 every op is the identity, exactly (the affine map is the identity on the
integer pixel grid).

Example:
    >>> import jax, jax.numpy as jnp
    >>> x = jnp.zeros((4, 8, 8, 1))
    >>> augment_batch(jax.random.key(0), x, "crop_rotate_translate_cutout").shape
    (4, 8, 8, 1)
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import dm_pix
import jax
import jax.numpy as jnp

OPS: tuple[str, ...] = ("flip", "color", "crop", "rotate", "translate", "cutout")

# Per-image parameters: a dict of arrays, identical structure for every op.
#   A (2, 2): centred output (row, col) -> centred input coordinates; t (2,): offset.
#   bright, contrast, sat: scalars (identity 0, 1, 1).  hole: (top, left, size) int32.
Params = dict


def parse_ops(test_aug: str | Sequence[str] | None) -> tuple[str, ...]:
    """`"crop_rotate"` -> ("crop", "rotate"); "" / "none" / None -> (). Unknown op: ValueError.

    Example:
        >>> parse_ops("flip_cutout")
        ('flip', 'cutout')
    """
    if test_aug is None:
        return ()
    names = test_aug.split("_") if isinstance(test_aug, str) else list(test_aug)
    names = [n.strip() for n in names if n.strip() and n.strip().lower() != "none"]
    for n in names:
        if n not in OPS:
            raise ValueError(f"augmentation {n!r} in {test_aug!r}: unknown op; known: {', '.join(OPS)}")
    return tuple(names)


def _identity_params(dtype=jnp.float32) -> Params:
    return {
        "A": jnp.eye(2, dtype=dtype),
        "t": jnp.zeros((2,), dtype),
        "bright": jnp.zeros((), dtype),
        "contrast": jnp.ones((), dtype),
        "sat": jnp.ones((), dtype),
        "hole": jnp.zeros((3,), jnp.int32),
    }


def _u(key, lo, hi, shape=()):
    return jax.random.uniform(key, shape, jnp.float32, lo, hi)


# ---- samplers: (key, (H, W), strength) -> Params --------------------------------------
def sample_flip(key, hw, strength=1.0) -> Params:
    do = jax.random.bernoulli(key, 0.5 * min(max(strength, 0.0), 2.0))
    p = _identity_params()
    p["A"] = jnp.eye(2).at[1, 1].set(jnp.where(do, -1.0, 1.0))
    return p


def sample_color(key, hw, strength=1.0) -> Params:
    kb, kc, ks = jax.random.split(key, 3)
    r = 0.25 * strength
    p = _identity_params()
    p["bright"] = _u(kb, -r, r)
    p["contrast"] = jnp.exp(_u(kc, -r, r))
    p["sat"] = jnp.exp(_u(ks, -r, r))
    return p


def sample_crop(key, hw, strength=1.0) -> Params:
    kz, kc = jax.random.split(key)
    z = jnp.exp(_u(kz, math.log(0.8) * strength, math.log(1.25) * strength))
    res = jnp.array(hw, jnp.float32)
    half = jnp.abs(res * z - res) / 2.0
    c = _u(kc, -1.0, 1.0, (2,)) * half
    p = _identity_params()
    p["A"] = jnp.eye(2) / z
    p["t"] = c / z
    return p


def sample_rotate(key, hw, strength=1.0) -> Params:
    a = math.radians(15.0) * strength
    th = _u(key, -a, a)
    p = _identity_params()
    p["A"] = jnp.array([[jnp.cos(th), -jnp.sin(th)], [jnp.sin(th), jnp.cos(th)]])
    return p


def sample_translate(key, hw, strength=1.0) -> Params:
    lim = 0.125 * jnp.array(hw, jnp.float32) * strength
    shift = _u(key, -1.0, 1.0, (2,)) * lim
    p = _identity_params()
    p["t"] = -shift  # output u reads input u - shift
    return p


def sample_cutout(key, hw, strength=1.0) -> Params:
    h, w = hw
    size = int(round(max(strength, 0.0) * (min(h, w) // 4)))
    size = min(size, h, w)
    kt, kl = jax.random.split(key)
    top = jax.random.randint(kt, (), 0, h - size + 1)
    left = jax.random.randint(kl, (), 0, w - size + 1)
    p = _identity_params()
    p["hole"] = jnp.stack([top, left, jnp.int32(size)]).astype(jnp.int32)
    return p


SAMPLERS: dict[str, Callable[..., Params]] = {
    "flip": sample_flip,
    "color": sample_color,
    "crop": sample_crop,
    "rotate": sample_rotate,
    "translate": sample_translate,
    "cutout": sample_cutout,
}


# ---- application ---------------------------------------------------------------------
def apply_params(img: jax.Array, p: Params) -> jax.Array:
    """Apply one image's parameters (affine resample, colour, hole) to an HWC image."""
    h, w, _ = img.shape
    dtype = img.dtype
    A = p["A"].astype(jnp.float32)
    t = p["t"].astype(jnp.float32)
    x = img.astype(jnp.float32)
    # Geometric: input = A (o - centre) + t + centre, as a pull-resample over (H, W, C).
    centre = jnp.array([(h - 1) / 2.0, (w - 1) / 2.0], jnp.float32)
    m = jnp.zeros((3, 3), jnp.float32).at[:2, :2].set(A).at[2, 2].set(1.0)
    off = jnp.concatenate([centre + t - A @ centre, jnp.zeros((1,), jnp.float32)])
    x = dm_pix.affine_transform(x, m, offset=off, order=1, mode="nearest")
    # Colour: brightness, then contrast about the global mean, then saturation about
    # each pixel's mean over channels.
    x = x + p["bright"]
    # (written as x + dev·(f − 1) so that f = 1 leaves x bit-for-bit unchanged)
    x = x + (x - jnp.mean(x)) * (p["contrast"] - 1.0)
    x = x + (x - jnp.mean(x, axis=-1, keepdims=True)) * (p["sat"] - 1.0)
    # Cutout.
    top, left, size = p["hole"][0], p["hole"][1], p["hole"][2]
    rows = jnp.arange(h)[:, None, None]
    cols = jnp.arange(w)[None, :, None]
    hole = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
    x = jnp.where(hole, 0.0, x)
    return x.astype(dtype)


def _single(name: str):
    sampler = SAMPLERS[name]

    def op(key: jax.Array, img: jax.Array, strength: float = 1.0) -> jax.Array:
        return apply_params(img, sampler(key, img.shape[:2], strength))

    op.__name__ = name
    op.__doc__ = (
        f"`{name}` on one HWC image (see the module table); strength 0 is the identity.\n\n"
        f"    Example: {name}(jax.random.key(0), img, strength=1.0)"
    )
    return op


flip = _single("flip")
color = _single("color")
crop = _single("crop")
rotate = _single("rotate")
translate = _single("translate")
cutout = _single("cutout")


def augment_image(key: jax.Array, img: jax.Array, ops: Sequence[str], strength: float = 1.0) -> jax.Array:
    """One op drawn uniformly from `ops`, applied to one HWC image."""
    if not ops:
        return img
    kc, ko = jax.random.split(key)
    choice = jax.random.randint(kc, (), 0, len(ops))
    keys = jax.random.split(ko, len(ops))
    cands = [SAMPLERS[n](keys[i], img.shape[:2], strength) for i, n in enumerate(ops)]
    p = jax.tree.map(lambda *leaves: jnp.stack(leaves)[choice], *cands)
    return apply_params(img, p)


def augment_batch(
    key: jax.Array, x: jax.Array, test_aug: str | Sequence[str] | None, strength: float = 1.0
) -> jax.Array:
    """Augment a NHWC batch: for each image independently, ONE op from `test_aug`.

    Example:
        >>> x = jnp.ones((2, 8, 8, 3))
        >>> y = augment_batch(jax.random.key(1), x, "flip_color", strength=0.0)
        >>> bool(jnp.all(y == x))
        True
    """
    ops = parse_ops(test_aug)
    if not ops:
        return x
    keys = jax.random.split(key, x.shape[0])
    return jax.vmap(lambda k, im: augment_image(k, im, ops, strength))(keys, x)
