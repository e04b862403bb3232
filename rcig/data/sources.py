"""Reading dataset files from a local path or a ``gs://`` URI, with one-line errors."""

from __future__ import annotations

import gzip
import zlib

from rcig import storage
from rcig.data.errors import DatasetError


def require_data_dir(dataset: str, data_dir: str | None, expected: str) -> str:
    """``data_dir`` normalised, or a `DatasetError` saying what the dataset needs."""
    if not data_dir:
        raise DatasetError(
            f"dataset '{dataset}' needs data_dir (a local path or gs:// URI holding {expected}); "
            "nothing is downloaded"
        )
    return storage.normalize(data_dir)


def exists(uri: str) -> bool:
    try:
        return storage.exists(uri)
    except OSError as e:
        raise DatasetError(f"{uri}: cannot check ({e})") from e


def read(uri: str, expected: str) -> bytes:
    """Bytes of ``uri``; `DatasetError` naming the URI and ``expected`` if missing or unreadable."""
    try:
        return storage.read_bytes(uri)
    except FileNotFoundError as e:
        raise DatasetError(f"{uri}: not found (expected {expected})") from e
    except (OSError, ValueError) as e:
        raise DatasetError(f"{uri}: cannot read ({e}); expected {expected}") from e


def read_many(uris: list[str], expected: str) -> list[bytes]:
    """Bytes of many files; remote ones are fetched concurrently (fsspec ``cat``)."""
    if not uris:
        return []
    if not storage.is_remote(uris[0]):
        return [read(u, expected) for u in uris]
    fs, _ = storage.filesystem(uris[0])
    paths = [storage.filesystem(u)[1] for u in uris]
    out: list[bytes] = []
    for i in range(0, len(paths), 512):
        batch = paths[i : i + 512]
        try:
            got = fs.cat(batch, on_error="return")
        except Exception as e:
            raise DatasetError(f"{uris[i]}: cannot read ({e}); expected {expected}") from e
        for uri, path in zip(uris[i : i + 512], batch):
            data = got.get(path) if isinstance(got, dict) else None
            if isinstance(data, FileNotFoundError) or data is None:
                raise DatasetError(f"{uri}: not found (expected {expected})")
            if isinstance(data, Exception):
                raise DatasetError(f"{uri}: cannot read ({data}); expected {expected}")
            out.append(data)
    return out


def gunzip(data: bytes, uri: str, expected: str) -> bytes:
    """Decompress gzip bytes read from ``uri``; `DatasetError` if they are not valid gzip."""
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{uri}: corrupt gzip data ({e}); expected {expected}") from e


def pick(candidates: list[str]) -> str | None:
    """The first URI in ``candidates`` that exists, else None."""
    for uri in candidates:
        if exists(uri):
            return uri
    return None
