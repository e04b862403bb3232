"""Labels and index sampling: shifted one-hot (docs/algorithm.md §1.4), real batches (§1.6), init (§1.3).

Everything here is a pure function of its arguments (seeds included), so a run has no
iterator state to checkpoint: the real batch of outer step ``s`` is
``real_batch_indices(seed, s, n_train, batch_size)``.

Seed streams (numpy ``SeedSequence`` pads short entropy with zeros, so
``default_rng(seed) == default_rng([seed, 0])``):

- real batches, epoch ``e``: ``default_rng([seed, e])``;
- initial prototypes: ``default_rng([seed, 0, 1])`` (never equal to a batch stream).

Difference from the original (E13): the original's real-data shuffle is seeded with 0 for
every run; here it is seeded from the run seed, and it is an exact per-epoch permutation
instead of a 16384-item streaming shuffle buffer.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from rcig.data.errors import DatasetError

_INIT_STREAM = (0, 1)


def shifted_one_hot(y: np.ndarray, num_classes: int) -> np.ndarray:
    """Shifted one-hot labels (§1.4): on-value ``1 - 1/C``, off-value ``-1/C``; rows sum to 0.

    Example:
        >>> shifted_one_hot(np.array([1]), 4)
        array([[-0.25,  0.75, -0.25, -0.25]], dtype=float32)
    """
    y = np.asarray(y)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise DatasetError(f"labels must lie in [0, {num_classes}); got {y.min()}..{y.max()}")
    out = np.full(y.shape + (num_classes,), -1.0 / num_classes, dtype=np.float32)
    np.put_along_axis(out, y[..., None].astype(np.int64), 1.0 - 1.0 / num_classes, axis=-1)
    return out


@lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, n_train: int) -> np.ndarray:
    perm = np.random.default_rng([seed, epoch]).permutation(n_train)
    perm.setflags(write=False)
    return perm


def real_batch_indices(seed: int, step: int, n_train: int, batch_size: int) -> np.ndarray:
    """Training-set indices of the real batch for outer step ``step`` (a pure function).

    The training set is visited epoch by epoch, each epoch in the order of the permutation
    ``default_rng([seed, epoch]).permutation(n_train)``; batches are consecutive slices of
    that endless stream, so a batch crossing an epoch boundary continues into the next
    epoch's permutation. Each epoch covers every index exactly once.

    Example:
        >>> idx = real_batch_indices(seed=0, step=3, n_train=1437, batch_size=256)
        >>> idx.shape, idx.dtype
        ((256,), dtype('int64'))
        >>> bool((idx == real_batch_indices(0, 3, 1437, 256)).all())
        True
    """
    for name, value, low in (("seed", seed, 0), ("step", step, 0), ("n_train", n_train, 1),
                             ("batch_size", batch_size, 1)):
        if int(value) != value or value < low:
            raise ValueError(
                f"real_batch_indices: {name} must be an integer >= {low}, got {value!r}")
    seed, step, n_train, batch_size = int(seed), int(step), int(n_train), int(batch_size)
    start = step * batch_size
    epoch, offset = divmod(start, n_train)
    parts, needed = [], batch_size
    while needed > 0:
        perm = _epoch_permutation(seed, epoch, n_train)
        take = perm[offset : offset + needed]
        parts.append(take)
        needed -= take.size
        epoch, offset = epoch + 1, 0
    return np.concatenate(parts).astype(np.int64)


def init_proto_indices(y_train: np.ndarray, num_classes: int, ipc: int, seed: int) -> np.ndarray:
    """Indices of ``ipc`` random real images per class, class-sorted (§1.3, practical form).

    The result is ``[class 0 x ipc, class 1 x ipc, ...]``; within a class the order is the
    random draw. Raises `DatasetError` if a class has fewer than ``ipc`` images.

    Example:
        >>> y = np.array([0, 1, 0, 1, 2, 2, 0])
        >>> idx = init_proto_indices(y, num_classes=3, ipc=2, seed=0)
        >>> y[idx].tolist()
        [0, 0, 1, 1, 2, 2]
    """
    if ipc < 1:
        raise ValueError(f"init_proto_indices: ipc must be >= 1, got {ipc}")
    y_train = np.asarray(y_train)
    rng = np.random.default_rng([int(seed), *_INIT_STREAM])
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(y_train == c)
        if members.size < ipc:
            raise DatasetError(
                f"class {c} has {members.size} training images, fewer than ipc={ipc}"
            )
        chosen.append(rng.permutation(members)[:ipc])
    return np.concatenate(chosen).astype(np.int64)
