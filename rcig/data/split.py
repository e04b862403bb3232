"""The validation split: images carved out of a dataset's training split for selection.

Every trial of a sweep selects (intermediate metric, schedulers, searchers, the
leaderboard) on validation accuracy and reports test accuracy once, at the end, so the
test split never informs a choice. The split is:

- **stratified**: each class gives a share of the validation images proportional to its
  size (largest remainder), so class balance matches the training split;
- **seeded by the dataset**, not the run: the seed is a hash of the dataset name and the
  training-set size, so every trial of a sweep (any seed, any learning rate) holds out
  exactly the same images, and reruns do too;
- **sized** `fraction` of train, at most `max_images` (default 10%, at most 5,000).

Distillation and the random-real baseline only see the rest of the training split.
Standardisation/ZCA statistics are label-free and computed once per dataset on the whole
training split (as before), so they are shared by every run of a dataset.

Example:
    >>> y = np.repeat(np.arange(3), [50, 30, 20])
    >>> sp = val_split(y, "toy", fraction=0.1)
    >>> len(sp.train_idx), len(sp.val_idx), np.bincount(y[sp.val_idx]).tolist()
    (90, 10, [5, 3, 2])
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass

import numpy as np

from rcig.data.errors import DatasetError

DEFAULT_FRACTION = 0.1
DEFAULT_MAX_IMAGES = 5000


def split_seed(dataset: str, n_train: int) -> int:
    """The split's seed: a stable hash of the dataset's name and training-set size."""
    return zlib.crc32(f"rcig-val:{dataset}:{int(n_train)}".encode())


def val_size(n_train: int, fraction: float, max_images: int) -> int:
    """Validation images for a training split of `n_train`: round(fraction * n), capped."""
    if not 0.0 <= fraction < 1.0:
        raise DatasetError(f"val.fraction must be in [0, 1), got {fraction}")
    if max_images < 0:
        raise DatasetError(f"val.max_images must be >= 0, got {max_images}")
    return int(min(round(fraction * n_train), max_images))


@dataclass(frozen=True)
class ValSplit:
    """Indices into the original training split: what distillation uses, what it never sees."""

    train_idx: np.ndarray  # sorted
    val_idx: np.ndarray  # sorted
    seed: int
    fraction: float
    max_images: int

    def record(self, dataset: str) -> dict:
        """What a run folder records (`split.json`): sizes, seed, per-class counts, a hash."""
        return {
            "dataset": dataset,
            "fraction": self.fraction,
            "max_images": self.max_images,
            "seed": self.seed,
            "n_train_total": int(len(self.train_idx) + len(self.val_idx)),
            "n_train": int(len(self.train_idx)),
            "n_val": int(len(self.val_idx)),
            "val_sha256": hashlib.sha256(np.asarray(self.val_idx, np.int64).tobytes()).hexdigest(),
        }


def stratified_take(y: np.ndarray, n_take: int, rng: np.random.Generator) -> np.ndarray:
    """`n_take` indices of `y`, per class proportional to its size (largest remainder),
    drawn at random within each class; sorted."""
    y = np.asarray(y)
    if n_take <= 0:
        return np.zeros((0,), np.int64)
    classes, counts = np.unique(y, return_counts=True)
    quota = counts * n_take / len(y)
    take = np.floor(quota).astype(int)
    order = np.argsort(-(quota - take), kind="stable")
    take[order[: n_take - take.sum()]] += 1
    picked = [rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def val_split(y_train: np.ndarray, dataset: str, fraction: float = DEFAULT_FRACTION,
              max_images: int = DEFAULT_MAX_IMAGES, min_per_class: int = 1) -> ValSplit:
    """The validation split of a training split with labels `y_train` (see module doc).

    Raises `DatasetError` if a class would keep fewer than `min_per_class` training
    images (e.g. fewer than `ipc`, which distillation starts from).
    """
    y_train = np.asarray(y_train)
    n = len(y_train)
    k = val_size(n, fraction, max_images)
    seed = split_seed(dataset, n)
    val = stratified_take(y_train, k, np.random.default_rng(seed))
    train = np.setdiff1d(np.arange(n), val).astype(np.int64)
    if k:
        kept = np.bincount(y_train[train], minlength=int(y_train.max()) + 1)
        present = np.unique(y_train)
        short = [int(c) for c in present if kept[c] < min_per_class]
        if short:
            raise DatasetError(
                f"validation split of {dataset}: classes {short} keep fewer than {min_per_class} "
                f"training images; lower val.fraction or val.max_images")
    return ValSplit(train, val, seed, float(fraction), int(max_images))
