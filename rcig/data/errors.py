"""The one error type of `rcig.data`."""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset cannot be loaded: unknown name, missing or corrupt file.

    The message is one line naming the file or URI and what was expected, e.g.
    ``"/data/mnist/train-images-idx3-ubyte.gz: not found (expected the official MNIST IDX file)"``.
    """
