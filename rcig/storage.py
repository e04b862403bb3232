"""Storage addressed by URI: `/local/path`, `file:///path`, `gs://bucket/prefix`.

Thin helpers over fsspec (gcsfs for `gs://`, imported lazily so `rcig` works on machines
without gcsfs). Every error names the URI.

Loopback/emulator use: when `STORAGE_EMULATOR_HOST` is set, gcsfs talks to it; the token
is taken from `RCIG_GCS_TOKEN` (e.g. "anon" for the emulator), else google-auth's default.
"""

from __future__ import annotations

import os
import posixpath
from typing import Any


class StorageError(OSError):
    """A storage operation failed; the message names the URI."""


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def normalize(uri: str) -> str:
    """Strip `file://`, expand `~`, make local paths absolute; keep remote URIs as given."""
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if is_remote(uri):
        return uri.rstrip("/")
    return os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    uri = normalize(uri)
    if is_remote(uri):
        return posixpath.join(uri, *parts)
    return os.path.join(uri, *parts)


def filesystem(uri: str):
    """(fsspec filesystem, path-within-it) for a URI."""
    uri = normalize(uri)
    if uri.startswith("gs://"):
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        try:
            import gcsfs  # noqa: F401
        except ImportError as e:  # pragma: no cover - depends on the machine
            raise StorageError(f"{uri}: reading gs:// needs gcsfs (pip install gcsfs)") from e
        import fsspec

        kwargs: dict[str, Any] = {}
        token = os.environ.get("RCIG_GCS_TOKEN")
        if token:
            kwargs["token"] = token
        emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        if emulator:
            kwargs["endpoint_url"] = emulator if "://" in emulator else f"http://{emulator}"
        fs = fsspec.filesystem("gcs", **kwargs)
        return fs, uri[len("gs://") :]
    if is_remote(uri):
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        return fs, path
    import fsspec

    return fsspec.filesystem("file"), uri


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    try:
        return bool(fs.exists(path))
    except Exception as e:
        raise StorageError(f"{uri}: cannot check existence: {e}") from e


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{uri}: no such file") from e
    except Exception as e:
        raise StorageError(f"{uri}: cannot read: {e}") from e


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object. Local files are written to a temp name and renamed (atomic)."""
    fs, path = filesystem(uri)
    try:
        if not is_remote(uri):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            return
        with fs.open(path, "wb") as f:
            f.write(data)
    except Exception as e:
        raise StorageError(f"{uri}: cannot write: {e}") from e


def read_text(uri: str) -> str:
    return read_bytes(uri).decode()


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode())


def append_text(uri: str, text: str) -> None:
    """Append to a local file; for object stores, read-modify-write the object."""
    if not is_remote(uri):
        path = normalize(uri)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "a") as f:
            f.write(text)
        return
    old = read_text(uri) if exists(uri) else ""
    write_text(uri, old + text)


def listdir(uri: str) -> list[str]:
    """Base names of the entries directly under `uri` (empty if it does not exist)."""
    fs, path = filesystem(uri)
    try:
        if not fs.exists(path):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        return []
    except Exception as e:
        raise StorageError(f"{uri}: cannot list: {e}") from e


def makedirs(uri: str) -> None:
    if not is_remote(uri):
        os.makedirs(normalize(uri), exist_ok=True)


def remove(uri: str, recursive: bool = False) -> None:
    fs, path = filesystem(uri)
    try:
        if fs.exists(path):
            fs.rm(path, recursive=recursive)
    except Exception as e:
        raise StorageError(f"{uri}: cannot remove: {e}") from e


def download(uri: str, local_path: str) -> None:
    """Copy a file or folder at `uri` to a local path."""
    fs, path = filesystem(uri)
    try:
        if fs.isdir(path):
            fs.get(path.rstrip("/") + "/", local_path, recursive=True)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(local_path)) or ".", exist_ok=True)
            fs.get(path, local_path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{uri}: no such file or folder") from e
    except Exception as e:
        raise StorageError(f"{uri}: cannot download: {e}") from e
