"""Any ``.npz`` holding ``x_train, y_train, x_test, y_test`` (optional ``class_names``).

``data_dir`` is the ``.npz`` file or a folder holding ``data.npz`` (local or gs://).
Images are uint8 in 0..255 or floats in [0, 1], shaped NHWC or NHW (a channel axis is
added). Labels are integers 0..C-1 with C = max label + 1 (or ``len(class_names)``).
Loaded with ``allow_pickle=False``: object arrays are refused.
"""

from __future__ import annotations

import io
import zipfile

import numpy as np

from rcig import storage
from rcig.data import sources
from rcig.data.errors import DatasetError

KEYS = ("x_train", "y_train", "x_test", "y_test")
EXPECTED = "an .npz with x_train, y_train, x_test, y_test"


def _images(x: np.ndarray, key: str, uri: str) -> np.ndarray:
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or 0 in x.shape:
        raise DatasetError(f"{uri}: '{key}' has shape {x.shape}; expected NHWC or NHW images")
    if x.dtype == np.uint8:
        return x
    if x.dtype.kind != "f":
        raise DatasetError(f"{uri}: '{key}' has dtype {x.dtype}; expected uint8 or float in [0, 1]")
    lo, hi = float(np.min(x)), float(np.max(x))
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1e-6 or hi > 1 + 1e-6:
        raise DatasetError(f"{uri}: '{key}' spans {lo:g}..{hi:g}; expected floats in [0, 1] "
                           "(or uint8 0..255)")
    return x.astype(np.float32)


def _labels(y: np.ndarray, n: int, key: str, uri: str) -> np.ndarray:
    if y.ndim != 1 or len(y) != n or y.dtype.kind not in "iu":
        raise DatasetError(f"{uri}: '{key}' is {y.dtype} {y.shape}; expected {n} integer labels")
    if n and y.min() < 0:
        raise DatasetError(f"{uri}: '{key}' has negative label {y.min()}")
    return y.astype(np.int32)


def load_npz(dataset: str, data_dir: str | None):
    """(x_train, y_train, x_test, y_test, class_names); images uint8 (0..255) or float [0,1]."""
    base = sources.require_data_dir(dataset, data_dir, "an .npz file or a folder with data.npz")
    uri = base if base.endswith(".npz") else storage.join(base, "data.npz")
    raw = sources.read(uri, EXPECTED)
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as f:
            missing = [k for k in KEYS if k not in f.files]
            if missing:
                raise DatasetError(f"{uri}: missing {', '.join(missing)}; expected {EXPECTED}")
            arrays = {k: f[k] for k in KEYS}
            names = [str(s) for s in f["class_names"]] if "class_names" in f.files else None
    except DatasetError:
        raise
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise DatasetError(f"{uri}: holds object arrays (pickled data), which are not "
                               f"loaded; expected numeric arrays ({EXPECTED})") from e
        raise DatasetError(f"{uri}: corrupt or not an npz ({e}); expected {EXPECTED}") from e
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise DatasetError(f"{uri}: corrupt or not an npz ({e}); expected {EXPECTED}") from e
    x_train = _images(arrays["x_train"], "x_train", uri)
    x_test = _images(arrays["x_test"], "x_test", uri)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DatasetError(f"{uri}: x_train images {x_train.shape[1:]} differ from x_test "
                           f"{x_test.shape[1:]}")
    if x_train.dtype != x_test.dtype:
        raise DatasetError(f"{uri}: x_train is {x_train.dtype} but x_test is {x_test.dtype}; "
                           "expected the same scale")
    y_train = _labels(arrays["y_train"], len(x_train), "y_train", uri)
    y_test = _labels(arrays["y_test"], len(x_test), "y_test", uri)
    num_classes = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
    if names is not None:
        if len(names) < num_classes:
            raise DatasetError(
                f"{uri}: {len(names)} class_names for labels up to {num_classes - 1}")
        num_classes = len(names)
    return x_train, y_train, x_test, y_test, names, num_classes
