"""Where sweeps live: the default storage root and NAME_OR_URI resolution.

A bare name (`quickstart`) means `<root>/<name>` with root `$RCIG_SWEEP_ROOT` or
`./sweep_results`; anything with a scheme (`gs://b/sweeps/quickstart`, `file://...`) or a
path separator is taken as the sweep folder itself.

Example:
    >>> resolve_sweep("gs://bucket/sweeps/quickstart", must_exist=False)
    'gs://bucket/sweeps/quickstart'
"""

from __future__ import annotations

import os

from orchestrator import manifest as mf
from rcig import storage


def default_root() -> str:
    """`$RCIG_SWEEP_ROOT`, else `./sweep_results` (absolute)."""
    return storage.normalize(os.environ.get("RCIG_SWEEP_ROOT") or "sweep_results")


def resolve_sweep(name_or_uri: str, must_exist: bool = True) -> str:
    """Sweep folder URI for a name or URI; with `must_exist`, a clear error if absent."""
    looks_like_path = "://" in name_or_uri or os.sep in name_or_uri or name_or_uri.startswith(".")
    uri = storage.normalize(name_or_uri) if looks_like_path else storage.join(default_root(), name_or_uri)
    if must_exist and not storage.exists(storage.join(uri, mf.MANIFEST)):
        if looks_like_path:
            raise mf.ManifestError(f"{uri}: no rcig sweep here ({mf.MANIFEST} not found)")
        root = default_root()
        known = [n for n in storage.listdir(root) if storage.exists(storage.join(root, n, mf.MANIFEST))]
        hint = f"; sweeps there: {', '.join(known)}" if known else ""
        raise mf.ManifestError(f"no sweep named {name_or_uri!r} under {root} "
                               f"(set RCIG_SWEEP_ROOT or pass the sweep's URI){hint}")
    return uri
