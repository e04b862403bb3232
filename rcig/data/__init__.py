"""Datasets, pre-processing and sampling for RCIG (docs/algorithm.md §1.3-1.6, §12).

Example:
    >>> from rcig.data import load_dataset, real_batch_indices, shifted_one_hot
    >>> ds = load_dataset("digits")                      # embedded default, no files
    >>> idx = real_batch_indices(seed=0, step=0, n_train=len(ds.x_train), batch_size=64)
    >>> x, y = ds.x_train[idx], shifted_one_hot(ds.y_train[idx], ds.num_classes)
    >>> x.shape, y.shape
    ((64, 8, 8, 1), (64, 10))

Registry (`REGISTRY`, names in `DATASETS`): ``digits`` (scikit-learn's bundled 8x8 digits), ``mnist``,
``fashion_mnist`` (official IDX files), ``cifar10``, ``cifar100`` (official python
archives, restricted unpickler), ``tiny_imagenet`` (official folder), ``npz``.
"""

from rcig.data.dataset import DATASETS, REGISTRY, Dataset, DatasetEntry, load_dataset, load_run_dataset, with_val_split
from rcig.data.errors import DatasetError
from rcig.data.preprocess import Preprocessor, Zca, compute_zca
from rcig.data.sampling import init_proto_indices, real_batch_indices, shifted_one_hot
from rcig.data.split import ValSplit, val_split

__all__ = [
    "DATASETS", "REGISTRY", "Dataset", "DatasetEntry", "DatasetError", "Preprocessor", "Zca", "compute_zca",
    "init_proto_indices", "load_dataset", "real_batch_indices", "shifted_one_hot",
    "ValSplit", "load_run_dataset", "val_split", "with_val_split",
]
