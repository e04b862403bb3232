"""Find and check a saved distilled set (`distilled.npz`, read by `rcig.run_folder`) for
evaluation, from a file, run folder or checkpoint folder, local or remote (any URI
`rcig.storage` understands).

`distilled.npz` keys (written by `rcig distill`): `x_proto` (N,H,W,C float32, model
space), `y_proto` (N,C float32 learned labels), `dataset` (str), and optionally
`x_pixels`, `log_temp`, `y_class`, `ipc`, `use_flip`, `step`, `config_json`
(`DistillConfig.to_json()`). Missing optional metadata falls back to the config
(`config_json`, else the dataset's preset).

Example:
    >>> d = load_distilled("runs/digits-ipc1")  # doctest: +SKIP
    >>> d.x_proto.shape, d.ipc, d.use_flip  # doctest: +SKIP
    ((10, 8, 8, 1), 1, False)
"""

from __future__ import annotations

import json
import os
import posixpath
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np

from rcig import storage
from rcig.config import ConfigError, DistillConfig, make_config
from rcig.run_folder import DISTILLED_NPZ as NPZ_NAME
from rcig.run_folder import read_distilled

REQUIRED_KEYS = ("x_proto", "y_proto", "dataset")


class DistilledError(ValueError):
    """A distilled set cannot be found or read; the message names the file/URI and key."""


@dataclass(frozen=True)
class Distilled:
    path: str
    x_proto: np.ndarray
    y_proto: np.ndarray
    dataset: str
    ipc: int
    use_flip: bool
    step: int | None
    config: DistillConfig


def _parent(uri: str) -> str:
    uri = storage.normalize(uri)
    return posixpath.dirname(uri) if storage.is_remote(uri) else os.path.dirname(uri)


def _basename(uri: str) -> str:
    return posixpath.basename(storage.normalize(uri).rstrip("/"))


def candidate_paths(source: str) -> list[str]:
    """Where `source` may keep its distilled.npz, in the order they are tried.

    A `.npz` is taken as is; a folder is tried for `distilled.npz` inside it; a checkpoint
    folder `<run>/checkpoints` (or a step folder `<run>/checkpoints/<n>`) also tries the
    run's `distilled.npz` next to it.

    Example:
        >>> [p.split("/")[-2:] for p in candidate_paths("/r/run1/checkpoints")]
        [['checkpoints', 'distilled.npz'], ['run1', 'distilled.npz']]
    """
    src = storage.normalize(source)
    if src.endswith(".npz"):
        return [src]
    out = [storage.join(src, NPZ_NAME)]
    if _basename(src) == "checkpoints":
        out.append(storage.join(_parent(src), NPZ_NAME))
    elif _basename(_parent(src)) == "checkpoints":
        out.append(storage.join(_parent(_parent(src)), NPZ_NAME))
    return out


def resolve(source: str) -> str:
    """The distilled.npz URI for `source`, or DistilledError saying what is supported."""
    tried = candidate_paths(source)
    for p in tried:
        try:
            if storage.exists(p):
                return p
        except storage.StorageError as e:
            raise DistilledError(str(e)) from None
    if storage.normalize(source).endswith(".npz"):
        raise DistilledError(f"{tried[0]}: no such file")
    raise DistilledError(
        f"{source}: no {NPZ_NAME} found (looked at {', '.join(tried)}); SOURCE must be a "
        f"{NPZ_NAME}, a run folder from `rcig distill`, or that run's checkpoints folder"
    )


def _scalar(z, key, path, kind):
    try:
        v = z[key]
        return kind(v.item() if hasattr(v, "item") else v)
    except Exception as e:
        raise DistilledError(f"{path}: key {key!r} is not a {kind.__name__} scalar ({e})") from None


def load_distilled(source: str) -> Distilled:
    """Find and read a distilled set; every error is a one-line DistilledError naming the file."""
    path = resolve(source)
    try:
        z = read_distilled(path)
    except (FileNotFoundError, storage.StorageError) as e:
        raise DistilledError(str(e)) from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DistilledError(f"{path}: not a readable .npz file ({e})") from None
    keys = set(z)
    for k in REQUIRED_KEYS:
        if k not in keys:
            raise DistilledError(f"{path}: missing key {k!r} (has {', '.join(sorted(keys)) or 'nothing'})")
    x = np.asarray(z["x_proto"], np.float32)
    y = np.asarray(z["y_proto"], np.float32)
    dataset = _scalar(z, "dataset", path, str)
    if x.ndim != 4:
        raise DistilledError(f"{path}: key 'x_proto' has shape {x.shape}, expected (N, H, W, C)")
    if y.ndim != 2 or y.shape[0] != x.shape[0]:
        raise DistilledError(f"{path}: key 'y_proto' has shape {y.shape}, expected ({x.shape[0]}, C)")
    cfg = None
    if "config_json" in keys:
        try:
            cfg = DistillConfig.from_dict(json.loads(_scalar(z, "config_json", path, str)))
        except (json.JSONDecodeError, ConfigError) as e:
            raise DistilledError(f"{path}: key 'config_json' is not a valid config ({e})") from None
    if "ipc" in keys:
        ipc = _scalar(z, "ipc", path, int)
    elif cfg is not None:
        ipc = cfg.ipc
    else:
        ipc = max(1, x.shape[0] // y.shape[1])
    if cfg is None:
        try:
            cfg = make_config(dataset=dataset, ipc=ipc)
        except ConfigError as e:
            raise DistilledError(f"{path}: no config_json and no preset for {dataset!r} ({e})") from None
    use_flip = _scalar(z, "use_flip", path, bool) if "use_flip" in keys else cfg.outer.use_flip
    step = _scalar(z, "step", path, int) if "step" in keys else None
    return Distilled(path, x, y, dataset, int(ipc), bool(use_flip), step, cfg)
