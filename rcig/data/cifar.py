"""CIFAR-10 / CIFAR-100 from the official python archives or their extracted folders.

Accepted ``data_dir`` forms (local or gs://): the tarball itself
(``cifar-10-python.tar.gz``), a folder holding it, the extracted folder
(``cifar-10-batches-py`` / ``cifar-100-python``), or a folder holding that.
The tarball is read into memory and its members are unpickled directly (nothing is
extracted to disk), always through `safe_pickle.load_pickle`.
"""

from __future__ import annotations

import io
import tarfile

import numpy as np

from rcig import storage
from rcig.data import sources
from rcig.data.errors import DatasetError
from rcig.data.safe_pickle import load_pickle

LAYOUT = {
    "cifar10": dict(archive="cifar-10-python.tar.gz", folder="cifar-10-batches-py",
                    train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
                    meta="batches.meta", names_key="label_names", labels_key="labels",
                    classes=10),
    "cifar100": dict(archive="cifar-100-python.tar.gz", folder="cifar-100-python",
                     train=["train"], test=["test"], meta="meta",
                     names_key="fine_label_names", labels_key="fine_labels", classes=100),
}


def _str_keys(obj, source: str) -> dict:
    if not isinstance(obj, dict):
        raise DatasetError(f"{source}: holds a {type(obj).__name__}, expected a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _batch(obj, source: str, labels_key: str, classes: int):
    d = _str_keys(obj, source)
    if "data" not in d or labels_key not in d:
        raise DatasetError(f"{source}: keys {sorted(d)}; expected 'data' and '{labels_key}'")
    data = d["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise DatasetError(f"{source}: 'data' is {type(data).__name__} {shape}; "
                           "expected a uint8 array of shape (N, 3072)")
    labels = np.asarray(d[labels_key])
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu":
        raise DatasetError(f"{source}: '{labels_key}' has shape {labels.shape}; "
                           f"expected {len(data)} integer labels")
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise DatasetError(f"{source}: labels span {labels.min()}..{labels.max()}; "
                           f"expected 0..{classes - 1}")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # NCHW rows -> NHWC
    return np.ascontiguousarray(images), labels.astype(np.int32)


class _Members:
    """Named members of either an in-memory tarball or an extracted folder."""

    def __init__(self, dataset: str, base: str):
        lay = LAYOUT[dataset]
        self.expected = f"the official {dataset} python archive {lay['archive']} " \
                        f"or its extracted folder {lay['folder']}"
        self.tar = None
        archive = None
        if base.endswith((".tar.gz", ".tgz", ".tar")):
            archive = base
        elif sources.exists(storage.join(base, lay["archive"])):
            archive = storage.join(base, lay["archive"])
        if archive is not None:
            raw = sources.read(archive, self.expected)
            try:
                self.tar = tarfile.open(fileobj=io.BytesIO(raw), mode="r:*")
                self.names = {m.name.split("/")[-1]: m for m in self.tar.getmembers() if m.isfile()}
            except (tarfile.TarError, OSError, EOFError) as e:
                raise DatasetError(
                    f"{archive}: corrupt archive ({e}); expected {self.expected}") from e
            self.where = archive
            return
        probe = lay["train"][0]
        for folder in (storage.join(base, lay["folder"]), base):
            if sources.exists(storage.join(folder, probe)):
                self.where = folder
                return
        missing = storage.join(base, lay["archive"])
        raise DatasetError(f"{missing}: not found (expected {self.expected})")

    def read(self, name: str) -> tuple[bytes, str]:
        if self.tar is None:
            uri = storage.join(self.where, name)
            return sources.read(uri, f"{name} of {self.expected}"), uri
        source = f"{self.where}!{name}"
        member = self.names.get(name)
        if member is None:
            raise DatasetError(f"{source}: member missing (expected {name} in {self.expected})")
        try:
            return self.tar.extractfile(member).read(), source
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DatasetError(f"{source}: corrupt archive member ({e})") from e


def load_cifar(dataset: str, data_dir: str | None):
    """(x_train, y_train, x_test, y_test, class_names) with uint8 NHWC 32x32x3 images."""
    lay = LAYOUT[dataset]
    base = sources.require_data_dir(dataset, data_dir, f"{lay['archive']} or {lay['folder']}/")
    members = _Members(dataset, base)
    splits = []
    for names in (lay["train"], lay["test"]):
        xs, ys = [], []
        for name in names:
            raw, source = members.read(name)
            x, y = _batch(load_pickle(raw, source), source, lay["labels_key"], lay["classes"])
            xs.append(x)
            ys.append(y)
        splits += [np.concatenate(xs), np.concatenate(ys)]
    raw, source = members.read(lay["meta"])
    meta = _str_keys(load_pickle(raw, source), source)
    names = meta.get(lay["names_key"])
    if not isinstance(names, list) or len(names) != lay["classes"]:
        raise DatasetError(f"{source}: '{lay['names_key']}' missing or not {lay['classes']} names")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return (*splits, names)
