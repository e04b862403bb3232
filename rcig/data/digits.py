"""The embedded default: scikit-learn's bundled 8x8 digits (no network, no files).

1797 images, 8x8x1, pixel values 0..16 (divided by 16 to get [0, 1]). The train/test
split (1437 / 360) is fixed: per class, a share of the 360 test images proportional to
the class size (largest remainder), drawn with ``numpy.random.default_rng(0)``; both
splits keep the original order. A golden checksum in the tests pins it.
"""

from __future__ import annotations

import numpy as np

N_TEST = 360
SPLIT_SEED = 0


def split_indices(y: np.ndarray, n_test: int = N_TEST, seed: int = SPLIT_SEED):
    """Stratified (train_idx, test_idx), each sorted, for integer labels ``y``.

    Example:
        >>> tr, te = split_indices(np.array([0, 0, 0, 0, 1, 1, 1, 1]), n_test=2)
        >>> len(tr), len(te)
        (6, 2)
    """
    classes, counts = np.unique(y, return_counts=True)
    quota = counts * n_test / len(y)
    take = np.floor(quota).astype(int)
    order = np.argsort(-(quota - take), kind="stable")
    take[order[: n_test - take.sum()]] += 1
    rng = np.random.default_rng(seed)
    test = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:k]
                           for c, k in zip(classes, take)])
    test = np.sort(test)
    train = np.setdiff1d(np.arange(len(y)), test)
    return train, test


def load_digits_split(dataset: str = "digits", data_dir: str | None = None):
    """(x_train, y_train, x_test, y_test, class_names) with float32 [0,1] NHWC 8x8x1 images."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[..., None]
    y = bunch.target.astype(np.int32)
    train, test = split_indices(y)
    return x[train], y[train], x[test], y[test], [str(i) for i in range(10)]
