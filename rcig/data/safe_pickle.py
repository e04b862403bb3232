"""A restricted unpickler for the CIFAR python archives.

The official CIFAR pickles hold dicts of strings, lists of ints and uint8 numpy arrays.
`load_pickle` admits exactly the globals needed to rebuild those (numpy's array
reconstructors and `numpy.dtype`, a few builtin containers, and `_codecs.encode`, which
Python 3 uses for bytes in protocol-2 pickles). Any other global is refused with a
`DatasetError` naming it and the file, *before* it is imported or called: admitted names
map to objects resolved here from already-imported numpy, never via ``__import__``.
"""

from __future__ import annotations

import builtins
import codecs
import io
import pickle

import numpy as np

from rcig.data.errors import DatasetError


def _allowed() -> dict[tuple[str, str], object]:
    from numpy._core import multiarray, numeric  # numpy >= 2 layout; numpy.core is a shim

    table: dict[tuple[str, str], object] = {}
    for core in ("numpy.core", "numpy._core"):
        table[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        table[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        table[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    table[("numpy", "ndarray")] = np.ndarray
    table[("numpy", "dtype")] = np.dtype
    for mod in ("builtins", "__builtin__"):
        for name in ("dict", "list", "tuple", "set", "frozenset", "bytearray", "bytes"):
            table[(mod, name)] = getattr(builtins, name)
    table[("_codecs", "encode")] = codecs.encode
    return table


class RestrictedUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` whose `find_class` only returns allow-listed objects."""

    def __init__(self, file, source: str, **kwargs):
        super().__init__(file, **kwargs)
        self._source = source
        self._table = _allowed()

    def find_class(self, module: str, name: str):
        try:
            return self._table[(module, name)]
        except KeyError:
            raise DatasetError(
                f"{self._source}: pickle refers to {module}.{name}, which is not allowed "
                "(expected only numpy arrays and plain containers, as in the official archive)"
            ) from None

    def persistent_load(self, pid):
        raise DatasetError(f"{self._source}: pickle uses persistent ids; not allowed")


def load_pickle(data: bytes, source: str):
    """Unpickle CIFAR-style data with `RestrictedUnpickler` (``encoding='latin1'``).

    Example:
        >>> load_pickle(pickle.dumps({"labels": [1, 2]}), "example")
        {'labels': [1, 2]}
        >>> try:
        ...     load_pickle(pickle.dumps(eval), "example")
        ... except DatasetError as e:
        ...     print(str(e).split(" (")[0])
        example: pickle refers to builtins.eval, which is not allowed
    """
    try:
        return RestrictedUnpickler(io.BytesIO(data), source, encoding="latin1").load()
    except DatasetError:
        raise
    except Exception as e:  # truncated / garbage bytes
        raise DatasetError(f"{source}: corrupt pickle ({type(e).__name__}: {e})") from e
