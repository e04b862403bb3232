"""Tiny-ImageNet-200 from the official ``tiny-imagenet-200`` folder layout.

``data_dir`` is the ``tiny-imagenet-200`` folder or a folder holding it (local or gs://):

    wnids.txt                          class ids, one a line; class index = line order
    words.txt                          optional: "<wnid>\\t<names>" (class names)
    train/<wnid>/images/*.JPEG         training images (sorted by name within a class)
    val/images/*.JPEG                  test split (the official validation set)
    val/val_annotations.txt            "<file>\\t<wnid>\\t..." (test labels; file order kept)

Images are decoded with Pillow, converted to RGB (a few originals are greyscale) and must
be 64x64.
"""

from __future__ import annotations

import io
import posixpath

import numpy as np

from rcig import storage
from rcig.data import sources
from rcig.data.errors import DatasetError

FOLDER = "tiny-imagenet-200"
SIDE = 64


def _listdir(uri: str, expected: str) -> list[str]:
    try:
        names = storage.listdir(uri)
    except OSError as e:
        raise DatasetError(f"{uri}: cannot list ({e}); expected {expected}") from e
    if not names:
        raise DatasetError(f"{uri}: missing or empty (expected {expected})")
    return names


def _decode(data: bytes, uri: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DatasetError(f"{uri}: cannot decode image ({e}); expected a 64x64 JPEG") from e
    if arr.shape != (SIDE, SIDE, 3):
        raise DatasetError(f"{uri}: image is {arr.shape[1]}x{arr.shape[0]}; expected 64x64")
    return arr


def _images(uris: list[str]) -> np.ndarray:
    out = np.empty((len(uris), SIDE, SIDE, 3), np.uint8)
    for start in range(0, len(uris), 2048):
        chunk = uris[start : start + 2048]
        for i, (uri, data) in enumerate(zip(chunk, sources.read_many(chunk, "a 64x64 JPEG"))):
            out[start + i] = _decode(data, uri)
    return out


def load_tiny_imagenet(dataset: str, data_dir: str | None):
    """(x_train, y_train, x_test, y_test, class_names) with uint8 NHWC 64x64x3 images."""
    base = sources.require_data_dir(dataset, data_dir, f"the official {FOLDER} folder")
    wnids_name = "wnids.txt"
    root = base if sources.exists(storage.join(base, wnids_name)) else storage.join(base, FOLDER)
    wnids_uri = storage.join(root, wnids_name)
    text = sources.read(wnids_uri, f"{wnids_name} of the official {FOLDER} folder")
    wnids = [line.strip() for line in text.decode("utf-8", "replace").splitlines() if line.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise DatasetError(f"{wnids_uri}: expected unique WordNet ids, one a line")
    index = {w: i for i, w in enumerate(wnids)}

    names: list[str] | None = None
    words_uri = storage.join(root, "words.txt")
    if sources.exists(words_uri):
        words = {}
        for line in sources.read(words_uri, "words.txt").decode("utf-8", "replace").splitlines():
            wnid, _, label = line.partition("\t")
            words[wnid.strip()] = label.strip()
        names = [words.get(w, w) for w in wnids]

    train_uris, train_labels = [], []
    for wnid in wnids:
        folder = storage.join(root, "train", wnid, "images")
        files = [f for f in _listdir(folder, f"training JPEGs of class {wnid}")
                 if f.lower().endswith((".jpeg", ".jpg"))]
        train_uris += [storage.join(folder, f) for f in sorted(files)]
        train_labels += [index[wnid]] * len(files)

    ann_uri = storage.join(root, "val", "val_annotations.txt")
    test_uris, test_labels = [], []
    ann = sources.read(ann_uri, "val_annotations.txt (<file>\\t<wnid>\\t... per line)")
    for n, line in enumerate(ann.decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2 or parts[1].strip() not in index:
            raise DatasetError(f"{ann_uri}: line {n} is {line[:60]!r}; expected "
                               "'<file>\\t<wnid>\\t...' with a wnid from wnids.txt")
        test_uris.append(storage.join(root, "val", "images", posixpath.basename(parts[0].strip())))
        test_labels.append(index[parts[1].strip()])

    return (_images(train_uris), np.asarray(train_labels, np.int32),
            _images(test_uris), np.asarray(test_labels, np.int32), names)
