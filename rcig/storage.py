"""Storage addressed by URI: `/local/path`, `file:///path`, `gs://bucket/prefix`.

Thin helpers over fsspec (gcsfs for `gs://`, imported lazily so `rcig` works on machines
without gcsfs). Every error names the URI.

Loopback/emulator use: when `STORAGE_EMULATOR_HOST` is set, gcsfs talks to it; the token
is taken from `RCIG_GCS_TOKEN` (e.g. "anon" for the emulator), else google-auth's default.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote


class StorageError(OSError):
    """A storage operation failed; the message names the URI."""


class PreconditionFailed(StorageError):
    """A conditional write lost: the object was not at the version the writer expected."""


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


# ---- conditional (compare-and-swap) objects --------------------------------------------
# A small object that several processes update (a trial's record, its lease) is read with
# its version and written back only if it is still at that version. On gs:// the version
# is the object's generation and the write carries `ifGenerationMatch` (0 = "must not
# exist"), so GCS itself decides the race. Locally the version is a hash of the content and
# the check-and-replace runs under an exclusive `flock` of the object's folder; a create
# is a hard link of a fully written temp file (fails if the name exists).


@dataclass(frozen=True)
class Versioned:
    """An object's text and the version a conditional write must name to replace it."""

    text: str
    version: str


def _content_version(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def read_versioned(uri: str) -> Versioned | None:
    """The object's text and version, or None if it does not exist."""
    uri = normalize(uri)
    if not is_remote(uri):
        try:
            with open(uri, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StorageError(f"{uri}: cannot read: {e}") from e
        return Versioned(data.decode(errors="replace"), _content_version(data))
    if not uri.startswith("gs://"):
        raise StorageError(f"{uri}: conditional objects need a local path or gs://")
    fs, path = filesystem(uri)
    bucket, key = path.split("/", 1)
    try:
        # One media GET: GCS sends the content's generation as `x-goog-generation`.
        headers, data = _gcs_call(fs, "GET", fs.url(path))
        gen = headers.get("x-goog-generation") if headers is not None else None
        if gen is None:  # a server without the header: pin the content to a generation
            gen = _gcs_call(fs, "GET", "b/{}/o/{}", bucket, key, json_out=True)["generation"]
            _, data = _gcs_call(fs, "GET", fs.url(path, generation=gen))
    except FileNotFoundError:
        return None
    except Exception as e:
        raise StorageError(f"{uri}: cannot read: {e}") from e
    return Versioned(data.decode(errors="replace"), f"gen:{gen}")


def write_if(uri: str, text: str, expected: str | None) -> str:
    """Write `text` only if the object is at version `expected` (None: only if it does not
    exist); return the new version. Raises `PreconditionFailed` if another writer won."""
    uri = normalize(uri)
    data = text.encode()
    if not is_remote(uri):
        return _local_write_if(uri, data, expected)
    if not uri.startswith("gs://"):
        raise StorageError(f"{uri}: conditional objects need a local path or gs://")
    fs, path = filesystem(uri)
    bucket, key = path.split("/", 1)
    if expected is not None and not expected.startswith("gen:"):
        raise PreconditionFailed(f"{uri}: version {expected!r} is not a GCS generation")
    gen = "0" if expected is None else expected[len("gen:"):]
    try:
        out = _gcs_call(fs, "POST", f"{fs._location}/upload/storage/v1/b/{quote(bucket)}/o",
                        uploadType="media", name=key, ifGenerationMatch=gen,
                        headers={"Content-Type": "application/octet-stream"}, data=data, json_out=True)
    except Exception as e:
        if _is_precondition_failure(e):
            raise PreconditionFailed(f"{uri}: changed by another writer (expected {expected})") from None
        raise StorageError(f"{uri}: cannot write: {e}") from e
    fs.invalidate_cache(path)
    return f"gen:{out['generation']}"


def create_exclusive(uri: str, text: str) -> bool:
    """Create the object if it does not exist; False (nothing written) if it does."""
    try:
        write_if(uri, text, None)
        return True
    except PreconditionFailed:
        return False


def _local_write_if(path: str, data: bytes, expected: str | None) -> str:
    folder = os.path.dirname(path) or "."
    try:
        os.makedirs(folder, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        lock = os.open(folder, os.O_RDONLY)
    except OSError as e:
        raise StorageError(f"{path}: cannot write: {e}") from e
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(path, "rb") as f:
                current = _content_version(f.read())
        except FileNotFoundError:
            current = None
        if current != expected:
            raise PreconditionFailed(f"{path}: changed by another writer (expected {expected}, found {current})")
        if expected is None:
            os.link(tmp, path)  # atomic create: fails if the name appeared meanwhile
        else:
            os.replace(tmp, path)
        return _content_version(data)
    except FileExistsError:
        raise PreconditionFailed(f"{path}: created by another writer") from None
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        os.close(lock)
        if os.path.exists(tmp):
            os.unlink(tmp)


def _gcs_call(fs, method: str, url: str, *args, **kwargs):
    from fsspec.asyn import sync

    return sync(fs.loop, fs._call, method, url, *args, **kwargs)


def _is_precondition_failure(exc: BaseException) -> bool:
    if isinstance(exc, FileExistsError):  # gcsfs's translation of HTTP 412
        return True
    code = getattr(exc, "code", None) or getattr(exc, "status", None)
    return code == 412 or "412" in str(exc) or "precondition" in str(exc).lower()
