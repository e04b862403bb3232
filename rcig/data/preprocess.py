"""Pre-processing (docs/algorithm.md §1.5): per-channel standardisation, then ZCA whitening where the spec says.

Pixels enter in [0, 1] scale (the loaders divide by 255, or by 16 for `digits`). The
`Preprocessor` maps [0,1]-scale pixels to model space (`from_pixels`) and back
(`to_pixels`, not clipped). ZCA statistics are computed in float64 with numpy and stored
and applied in float32 (the difference to applying them in float64 is float32 rounding).

ZCA (§1.5, steps 1-7): mean ``mu`` and covariance ``Sigma = X^T X / n`` of the flattened
standardised training images, ``r = zca_reg * trace(Sigma) / d``, eigen-decomposition
``Sigma + r I = U diag(s) U^T`` (descending ``s``), ``W = U diag(s^-1/2) U^T``,
``W^-1 = U diag(s^1/2) U^T``; if ``n < d`` the factors outside the data's span are set
to 1 (rank control, see `compute_zca`); applied as ``z = (x - mu) W``. Whitened training
data therefore have covariance ``U diag(lambda / (lambda + r)) U^T``, with ``lambda`` the
eigenvalues of ``Sigma``: the identity up to the regulariser.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass

import numpy as np

from rcig import storage

ZCA_REG = 0.1
_CHUNK = 4096
_CACHE_FORMAT = 1


@dataclass(frozen=True, eq=False)
class Zca:
    """ZCA statistics of flattened images: ``z = (x - mean) @ W``, ``W`` symmetric.

    Dense form (``n_train >= d``): ``W = whiten``, ``W^-1 = unwhiten`` (d x d).
    Low-rank form (``n_train < d``, where every direction outside the data's span is left
    unscaled by rank control): ``W = I + B diag(whiten - 1) B^T`` and
    ``W^-1 = I + B diag(unwhiten - 1) B^T`` with orthonormal ``basis`` B (d x k); then
    ``whiten``/``unwhiten`` hold the k factors.
    """

    mean: np.ndarray  # (d,) float32
    whiten: np.ndarray  # (d, d) or, with `basis`, (k,) float32
    unwhiten: np.ndarray  # likewise
    reg: float = ZCA_REG
    basis: np.ndarray | None = None  # (d, k) float32, low-rank form only

    def _apply(self, x: np.ndarray, factors: np.ndarray) -> np.ndarray:
        if self.basis is None:
            return x @ factors
        return x + ((x @ self.basis) * (factors - 1.0)) @ self.basis.T

    def whiten_flat(self, x_flat: np.ndarray) -> np.ndarray:
        """``(x - mean) W`` for rows of flattened standardised images."""
        return self._apply(x_flat - self.mean, self.whiten)

    def unwhiten_flat(self, z_flat: np.ndarray) -> np.ndarray:
        """``z W^-1 + mean``, the inverse of `whiten_flat`."""
        return self._apply(z_flat, self.unwhiten) + self.mean

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"mean": self.mean, "whiten": self.whiten, "unwhiten": self.unwhiten,
               "reg": np.float64(self.reg)}
        if self.basis is not None:
            out["basis"] = self.basis
        return out

    @classmethod
    def from_arrays(cls, arrays) -> Zca:
        basis = np.asarray(arrays["basis"]) if "basis" in arrays else None
        return cls(np.asarray(arrays["mean"]), np.asarray(arrays["whiten"]),
                   np.asarray(arrays["unwhiten"]), float(arrays["reg"]), basis)


@dataclass(frozen=True, eq=False)
class Preprocessor:
    """Standardise per channel, then ZCA (optional). Works on ``(..., H, W, C)`` arrays.

    Example:
        >>> p = Preprocessor(mean=np.array([0.5]), std=np.array([0.25]))
        >>> float(p.from_pixels(np.ones((1, 2, 2, 1)))[0, 0, 0, 0])
        2.0
        >>> round(float(p.to_pixels(p.from_pixels(np.full((2, 2, 1), 0.3)))[0, 0, 0]), 6)
        0.3
    """

    mean: np.ndarray  # (C,) per-channel mean in [0,1] pixel scale
    std: np.ndarray  # (C,)
    zca: Zca | None = None

    def __post_init__(self):
        object.__setattr__(self, "mean", np.asarray(self.mean, np.float32).reshape(-1))
        object.__setattr__(self, "std", np.asarray(self.std, np.float32).reshape(-1))

    def standardize(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, np.float32) - self.mean) / self.std

    def from_pixels(self, x: np.ndarray) -> np.ndarray:
        """[0,1]-scale pixels ``(..., H, W, C)`` -> model space (float32, same shape)."""
        x = self.standardize(x)
        if self.zca is None:
            return x
        d = self.zca.mean.shape[0]
        return self.zca.whiten_flat(x.reshape(-1, d)).reshape(x.shape)

    def to_pixels(self, x: np.ndarray) -> np.ndarray:
        """Model space -> [0,1]-scale pixels (float32, not clipped)."""
        x = np.asarray(x, np.float32)
        if self.zca is not None:
            d = self.zca.mean.shape[0]
            x = self.zca.unwhiten_flat(x.reshape(-1, d)).reshape(x.shape)
        return x * self.std + self.mean

    def state_dict(self) -> dict[str, np.ndarray]:
        """Arrays that rebuild this preprocessor with `Preprocessor.from_state_dict`."""
        out = {"mean": self.mean, "std": self.std}
        if self.zca is not None:
            out.update({f"zca_{k}": v for k, v in self.zca.arrays().items()})
        return out

    @classmethod
    def from_state_dict(cls, state) -> Preprocessor:
        zca = None
        if "zca_mean" in state:
            zca = Zca.from_arrays({k[4:]: state[k] for k in state if k.startswith("zca_")})
        return cls(np.asarray(state["mean"]), np.asarray(state["std"]), zca)


def channel_stats(x_pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (population) std of ``(N, H, W, C)`` pixels, in float64."""
    c = x_pixels.shape[-1]
    total = np.zeros(c)
    total_sq = np.zeros(c)
    for i in range(0, len(x_pixels), _CHUNK):
        chunk = np.asarray(x_pixels[i : i + _CHUNK], np.float64).reshape(-1, c)
        total += chunk.sum(0)
        total_sq += (chunk * chunk).sum(0)
    count = x_pixels.size // c
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
    return mean, np.where(std > 0, std, 1.0)


def compute_zca(x_std: np.ndarray, reg: float = ZCA_REG) -> Zca:
    """ZCA statistics of standardised images ``(N, H, W, C)`` per §1.5 (float64 inside).

    With ``N >= d`` this is the dense eigen-decomposition of ``Sigma + r I``. With ``N < d``
    the same matrix is built from the N x N Gram matrix: directions in the span of the
    centred data get ``(lambda + r)^(-1/2)``, all others 1 (rank control). The original
    also scales ``N - rank`` arbitrary null-space directions by ``r^(-1/2)`` (its SVD picks
    them); here they stay unscaled. Both give the same whitened training data.

    Example:
        >>> x = np.random.default_rng(0).normal(size=(50, 2, 2, 1)).astype(np.float32)
        >>> compute_zca(x).whiten.shape
        (4, 4)
    """
    n = len(x_std)
    d = int(np.prod(x_std.shape[1:]))
    mean = np.zeros(d)
    for i in range(0, n, _CHUNK):
        mean += np.asarray(x_std[i : i + _CHUNK], np.float64).reshape(-1, d).sum(0)
    mean /= n
    if n < d:
        return _low_rank_zca(np.asarray(x_std, np.float64).reshape(n, d) - mean, mean, reg)
    cov = np.zeros((d, d))
    for i in range(0, n, _CHUNK):
        centred = np.asarray(x_std[i : i + _CHUNK], np.float64).reshape(-1, d) - mean
        cov += centred.T @ centred
    cov /= n
    r = reg * np.trace(cov) / d
    cov[np.diag_indices(d)] += r
    s, u = np.linalg.eigh(cov)
    del cov
    whiten = ((u * (1.0 / np.sqrt(s))) @ u.T).astype(np.float32)
    unwhiten = ((u * np.sqrt(s)) @ u.T).astype(np.float32)
    return Zca(mean.astype(np.float32), whiten, unwhiten, float(reg))


def _low_rank_zca(centred: np.ndarray, mean: np.ndarray, reg: float) -> Zca:
    n, d = centred.shape
    gram = centred @ centred.T / n  # same non-zero eigenvalues as Sigma
    r = reg * np.trace(gram) / d
    lam, v = np.linalg.eigh(gram)
    keep = lam > max(lam.max(), 0.0) * 1e-10
    lam, v = lam[keep], v[:, keep]
    basis = centred.T @ v / np.sqrt(n * lam)  # orthonormal eigenvectors of Sigma
    s = lam + r
    return Zca(mean.astype(np.float32), (1.0 / np.sqrt(s)).astype(np.float32),
               np.sqrt(s).astype(np.float32), float(reg), basis.astype(np.float32))


def cache_root(cache_dir: str | None = None) -> str:
    """Cache root: ``cache_dir``, else ``$RCIG_CACHE_DIR``, else ``~/.cache/rcig-sweep``."""
    default = os.path.join("~", ".cache", "rcig-sweep")
    return cache_dir or os.environ.get("RCIG_CACHE_DIR") or default


def zca_cache_key(name: str, x_std: np.ndarray, reg: float) -> str:
    """Hash of dataset name, ZCA settings, shape and the standardised training data."""
    h = hashlib.sha256()
    h.update(json.dumps({"name": name, "reg": reg, "shape": list(x_std.shape),
                         "dtype": str(x_std.dtype), "format": _CACHE_FORMAT}).encode())
    for i in range(0, len(x_std), _CHUNK):
        h.update(np.ascontiguousarray(x_std[i : i + _CHUNK]).tobytes())
    return h.hexdigest()


def cached_zca(name: str, x_std: np.ndarray, cache_dir: str | None = None,
               reg: float = ZCA_REG) -> Zca:
    """`compute_zca`, memoised as ``<cache root>/zca/<name>-<key>.npz`` (local or gs://).

    A cache file that cannot be read or does not match is recomputed and overwritten.
    """
    key = zca_cache_key(name, x_std, reg)
    uri = storage.join(cache_root(cache_dir), "zca", f"{name}-{key[:20]}.npz")
    d = int(np.prod(x_std.shape[1:]))
    try:
        if storage.exists(uri):
            with np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False) as f:
                if str(f["key"]) == key and f["mean"].shape == (d,):
                    return Zca.from_arrays({k: f[k] for k in f.files if k != "key"})
            warnings.warn(f"{uri}: ZCA cache does not match the data; recomputing", stacklevel=2)
    except Exception as e:  # a broken cache file is ours to replace
        warnings.warn(f"{uri}: unreadable ZCA cache ({e}); recomputing", stacklevel=2)
    zca = compute_zca(x_std, reg)
    buf = io.BytesIO()
    np.savez(buf, key=np.array(key), **zca.arrays())
    try:
        storage.write_bytes(uri, buf.getvalue())
    except OSError as e:
        warnings.warn(f"{uri}: cannot write ZCA cache ({e}); continuing without it", stacklevel=2)
    return zca
