"""The `Dataset` record, `load_dataset` and `REGISTRY`, the table of named datasets
(docs/algorithm.md §12): adding a dataset format is one reader module and one entry here."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from rcig.data.cifar import load_cifar
from rcig.data.digits import load_digits_split
from rcig.data.errors import DatasetError
from rcig.data.idx import load_idx
from rcig.data.npz import load_npz
from rcig.data.preprocess import Preprocessor, cached_zca, channel_stats
from rcig.data.split import DEFAULT_MAX_IMAGES, val_split
from rcig.data.tiny_imagenet import load_tiny_imagenet


@dataclass(frozen=True)
class DatasetEntry:
    """One named dataset: how its files are read and how its pixels are pre-processed."""

    name: str
    # (name, data_dir) -> (x_train, y_train, x_test, y_test, class_names[, num_classes])
    reader: Callable[[str, str | None], tuple]
    # Per-channel standardisation constants of §12 on [0, 1] pixels; None = from train data.
    stats: tuple[tuple[float, ...], tuple[float, ...]] | None
    # ZCA per §1.5: not for MNIST-likes (`digits` follows MNIST: 1 channel, no ZCA); None:
    # exactly when the images have 3 channels (RGB, like every ZCA dataset in §12).
    zca: bool | None


REGISTRY: dict[str, DatasetEntry] = {e.name: e for e in (
    DatasetEntry("digits", load_digits_split, None, False),
    DatasetEntry("mnist", load_idx, ((0.1307,), (0.3081,)), False),
    DatasetEntry("fashion_mnist", load_idx, ((0.2861,), (0.3530,)), False),
    DatasetEntry("cifar10", load_cifar, ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)), True),
    DatasetEntry("cifar100", load_cifar, ((0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)), True),
    DatasetEntry("tiny_imagenet", load_tiny_imagenet, ((0.4759, 0.4481, 0.3926), (0.2763, 0.2687, 0.2813)), True),
    DatasetEntry("npz", load_npz, None, None),
)}
DATASETS: tuple[str, ...] = tuple(REGISTRY)
_CHUNK = 4096


@dataclass(frozen=True, eq=False)
class Dataset:
    """A preprocessed dataset held in memory (float32 NHWC images, int32 labels)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    image_shape: tuple[int, int, int]
    class_names: list[str] | None
    preprocessor: Preprocessor
    # The validation split carved from train (`rcig.data.split`); x_train is then the rest.
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None
    split: dict | None = None  # its record (sizes, seed, hash), written to split.json

    def to_pixels(self, x: np.ndarray) -> np.ndarray:
        """Model space -> [0,1]-scale pixels (not clipped), e.g. to show distilled images."""
        return self.preprocessor.to_pixels(x)

    def from_pixels(self, x: np.ndarray) -> np.ndarray:
        """[0,1]-scale pixels -> model space, the transform applied to train and test."""
        return self.preprocessor.from_pixels(x)


def _unit(x: np.ndarray) -> np.ndarray:
    """Raw images (uint8 0..255 or float [0,1]) -> float32 [0,1]."""
    return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)


def _apply(fn, x_raw: np.ndarray) -> np.ndarray:
    out = np.empty(x_raw.shape, np.float32)
    for i in range(0, len(x_raw), _CHUNK):
        out[i : i + _CHUNK] = fn(_unit(x_raw[i : i + _CHUNK]))
    return out


def with_val_split(ds: Dataset, fraction: float, max_images: int = DEFAULT_MAX_IMAGES,
                   min_per_class: int = 1) -> Dataset:
    """`ds` with its validation split carved out of train (`rcig.data.split.val_split`):
    `x_val`/`y_val` hold it, `x_train`/`y_train` the rest, `split` its record. A fraction
    of 0 gives `ds` with no validation split.

    Example:
        >>> ds = with_val_split(load_dataset("digits"), 0.1)
        >>> len(ds.x_train), len(ds.x_val), ds.split["n_val"]
        (1293, 144, 144)
    """
    sp = val_split(ds.y_train, ds.name, fraction, max_images, min_per_class)
    if not len(sp.val_idx):
        return replace(ds, split=sp.record(ds.name))
    return replace(ds, x_train=ds.x_train[sp.train_idx], y_train=ds.y_train[sp.train_idx],
                   x_val=ds.x_train[sp.val_idx], y_val=ds.y_train[sp.val_idx],
                   split=sp.record(ds.name))


def load_dataset(name: str, data_dir: str | None = None, cache_dir: str | None = None, *,
                 val_fraction: float = 0.0, val_max_images: int = DEFAULT_MAX_IMAGES,
                 min_per_class: int = 1) -> Dataset:
    """Load and preprocess a named dataset from a local path or gs:// URI (never downloads).

    With `val_fraction` > 0 the validation split is carved from train (`with_val_split`;
    what a distillation run uses, from its config's `val` section).

    ``data_dir`` holds the official files (ignored for ``digits``); ``cache_dir`` is the
    cache root for ZCA statistics (default ``$RCIG_CACHE_DIR`` or ``~/.cache/rcig-sweep``;
    files go to ``<root>/zca/``).

    Example:
        >>> ds = load_dataset("digits")
        >>> ds.x_train.shape, ds.x_test.shape, ds.num_classes
        ((1437, 8, 8, 1), (360, 8, 8, 1), 10)
    """
    if name not in REGISTRY:
        raise DatasetError(f"unknown dataset '{name}'; expected one of {', '.join(DATASETS)}")
    entry = REGISTRY[name]
    loaded = entry.reader(name, data_dir)
    x_train, y_train, x_test, y_test, class_names = loaded[:5]
    num_classes = loaded[5] if len(loaded) > 5 else (
        len(class_names) if class_names else int(y_train.max()) + 1)
    channels = x_train.shape[-1]

    if entry.stats is not None:
        mean, std = (np.asarray(v) for v in entry.stats)
    else:
        mean, std = channel_stats(_apply(lambda x: x, x_train))
    standardize_only = Preprocessor(mean, std)
    preprocessor = standardize_only
    use_zca = entry.zca if entry.zca is not None else channels == 3
    if use_zca:
        x_std = _apply(standardize_only.standardize, x_train)
        zca = cached_zca(name, x_std, cache_dir)
        preprocessor = Preprocessor(mean, std, zca)
    ds = Dataset(
        name=name,
        x_train=_apply(preprocessor.from_pixels, x_train),
        y_train=np.asarray(y_train, np.int32),
        x_test=_apply(preprocessor.from_pixels, x_test),
        y_test=np.asarray(y_test, np.int32),
        num_classes=int(num_classes),
        image_shape=tuple(int(s) for s in x_train.shape[1:]),
        class_names=list(class_names) if class_names is not None else None,
        preprocessor=preprocessor,
    )
    if val_fraction:
        ds = with_val_split(ds, val_fraction, val_max_images, min_per_class)
    return ds


def load_run_dataset(cfg) -> Dataset:
    """The dataset of a run's config (`rcig.config.DistillConfig`): its data, with the
    validation split of its `val` section carved from train (every class keeps at least
    `ipc` training images)."""
    return with_val_split(load_dataset(cfg.dataset, cfg.data_dir), cfg.val.fraction,
                          cfg.val.max_images, min_per_class=cfg.ipc)
