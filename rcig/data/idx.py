"""MNIST and Fashion-MNIST from the official IDX files (gzipped or not)."""

from __future__ import annotations

import numpy as np

from rcig import storage
from rcig.data import sources
from rcig.data.errors import DatasetError

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                   "Shirt", "Sneaker", "Bag", "Ankle boot"]
_IMAGES_MAGIC, _LABELS_MAGIC = 0x00000803, 0x00000801


def parse_idx(raw: bytes, uri: str, images: bool) -> np.ndarray:
    """An IDX array (uint8); checks magic number, dimensions and payload size.

    Example:
        >>> raw = bytes([0, 0, 8, 1, 0, 0, 0, 2, 7, 3])
        >>> parse_idx(raw, "labels", images=False).tolist()
        [7, 3]
    """
    kind = "IDX images (magic 0x00000803)" if images else "IDX labels (magic 0x00000801)"
    want_magic, ndim = (_IMAGES_MAGIC, 3) if images else (_LABELS_MAGIC, 1)
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{uri}: {len(raw)} bytes, too short for {kind}")
    magic = int.from_bytes(raw[:4], "big")
    if magic != want_magic:
        raise DatasetError(f"{uri}: magic number 0x{magic:08x}, expected {kind}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(dims))
    if len(raw) - header != size:
        raise DatasetError(
            f"{uri}: header says {'x'.join(map(str, dims))} = {size} bytes of data, "
            f"found {len(raw) - header}; expected complete {kind}"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _read_idx(base: str, stem: str, images: bool, dataset: str) -> np.ndarray:
    plain, gz = storage.join(base, stem), storage.join(base, stem + ".gz")
    expected = f"the official {dataset} IDX file {stem}.gz (or {stem})"
    uri = sources.pick([gz, plain])
    if uri is None:
        raise DatasetError(f"{gz}: not found (expected {expected})")
    raw = sources.read(uri, expected)
    if uri.endswith(".gz"):
        raw = sources.gunzip(raw, uri, expected)
    return parse_idx(raw, uri, images)


def load_idx(dataset: str, data_dir: str | None):
    """(x_train, y_train, x_test, y_test, class_names) with uint8 NHWC images (C = 1)."""
    base = sources.require_data_dir(dataset, data_dir, "train-images-idx3-ubyte.gz and the "
                                    "other three official IDX files")
    arrays = {}
    for key, stem in IDX_FILES.items():
        arrays[key] = _read_idx(base, stem, key.endswith("images"), dataset)
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_img != n_lab:
            raise DatasetError(
                f"{storage.join(base, IDX_FILES[split + '_labels'])}: {n_lab} labels for "
                f"{n_img} images in {IDX_FILES[split + '_images']}; expected equal counts"
            )
        labels = arrays[f"{split}_labels"]
        if labels.size and labels.max() > 9:
            raise DatasetError(f"{storage.join(base, IDX_FILES[split + '_labels'])}: "
                               f"label {labels.max()} out of range; expected 0..9")
    names = FASHION_CLASSES if dataset == "fashion_mnist" else [str(i) for i in range(10)]
    return (arrays["train_images"][..., None], arrays["train_labels"].astype(np.int32),
            arrays["test_images"][..., None], arrays["test_labels"].astype(np.int32), names)
