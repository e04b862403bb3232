"""Pre-processing (docs/algorithm.md §1.5): standardisation, ZCA whitening, inverse transform, ZCA cache."""

from __future__ import annotations

import os

import numpy as np
import pytest

from rcig.data import Preprocessor, compute_zca
from rcig.data.preprocess import cached_zca


def _correlated_images(n: int, shape, seed: int = 0) -> np.ndarray:
    """Images whose pixels are strongly correlated (a random low-dim mixture + noise)."""
    rng = np.random.default_rng(seed)
    d = int(np.prod(shape))
    latent = rng.normal(size=(n, 6)) @ rng.normal(size=(6, d)) * 2.0
    return (latent + 0.3 * rng.normal(size=(n, d)) + 1.5).reshape((n, *shape)).astype(np.float32)


def _expected_whitened_cov(x_std: np.ndarray, reg: float = 0.1) -> np.ndarray:
    """Sigma (Sigma + r I)^-1 = U diag(lambda / (lambda + r)) U^T, written without eigh
    via the push-through identity Xc^T (Xc Xc^T / n + r I)^-1 Xc / n."""
    n = len(x_std)
    xc = x_std.reshape(n, -1).astype(np.float64)
    xc -= xc.mean(0)
    d = xc.shape[1]
    gram = xc @ xc.T / n
    r = reg * np.trace(gram) / d
    return xc.T @ np.linalg.solve(gram + r * np.eye(n), xc) / n


def _cov(z: np.ndarray) -> np.ndarray:
    z = z.reshape(len(z), -1).astype(np.float64)
    z -= z.mean(0)
    return z.T @ z / len(z)


@pytest.mark.parametrize("n,shape", [(400, (4, 4, 3)), (30, (8, 8, 3))], ids=["dense", "low_rank"])
def test_zca_whitened_covariance_is_identity_up_to_the_regulariser(n, shape):
    x = _correlated_images(n, shape)
    zca = compute_zca(x)
    p = Preprocessor(np.zeros(3), np.ones(3), zca)
    z = p.from_pixels(x)
    cov_z = _cov(z)
    np.testing.assert_allclose(cov_z, _expected_whitened_cov(x), atol=2e-5)
    # Eigenvalues of the whitened covariance are lambda / (lambda + r) in [0, 1).
    ev = np.linalg.eigvalsh(cov_z)
    assert ev.max() < 1.0 and ev.min() > -1e-5
    # ZCA (not PCA) whitening: W is symmetric, so whitened images stay image-like.
    if zca.basis is None:
        np.testing.assert_allclose(zca.whiten, zca.whiten.T, atol=1e-5)
    # Round trip back to pixels.
    np.testing.assert_allclose(p.to_pixels(z), x, rtol=5e-5, atol=2e-4)


def test_zca_tiny_regulariser_gives_identity_covariance():
    x = _correlated_images(500, (3, 3, 3), seed=1)
    z = Preprocessor(np.zeros(3), np.ones(3), compute_zca(x, reg=1e-7)).from_pixels(x)
    np.testing.assert_allclose(_cov(z), np.eye(27), atol=2e-3)


def test_low_rank_zca_matches_the_literal_spec_rule_on_training_data():
    """§1.5 read literally: eigh of Sigma + rI, descending, factors with index >= n set to 1."""
    n, shape = 20, (6, 6, 3)
    x = _correlated_images(n, shape, seed=2)
    flat = x.reshape(n, -1).astype(np.float64)
    mu = flat.mean(0)
    sigma = (flat - mu).T @ (flat - mu) / n
    d = sigma.shape[0]
    s, u = np.linalg.eigh(sigma + 0.1 * np.trace(sigma) / d * np.eye(d))
    s, u = s[::-1], u[:, ::-1]
    f = 1 / np.sqrt(s)
    f[n:] = 1.0
    literal = (flat - mu) @ (u * f) @ u.T
    ours = Preprocessor(np.zeros(3), np.ones(3), compute_zca(x)).from_pixels(x)
    np.testing.assert_allclose(ours.reshape(n, -1), literal, atol=1e-4)
    # Outside the data's span (rank control) the low-rank form leaves vectors unchanged.
    zca = compute_zca(x)
    v = np.random.default_rng(0).normal(size=d)
    v -= zca.basis @ (zca.basis.T @ v)
    np.testing.assert_allclose(zca.whiten_flat(v[None] + zca.mean)[0], v, atol=1e-4)


def test_standardisation_and_inverse_without_zca():
    p = Preprocessor(np.array([0.1307]), np.array([0.3081]))
    x = np.random.default_rng(0).uniform(size=(5, 28, 28, 1)).astype(np.float32)
    np.testing.assert_allclose(p.from_pixels(x), (x - 0.1307) / 0.3081, rtol=1e-6)
    np.testing.assert_allclose(p.to_pixels(p.from_pixels(x)), x, atol=1e-6)
    q = Preprocessor.from_state_dict(p.state_dict())
    np.testing.assert_array_equal(q.from_pixels(x), p.from_pixels(x))


def test_state_dict_round_trip_with_zca():
    x = _correlated_images(30, (4, 4, 3))
    p = Preprocessor(np.full(3, 0.5), np.full(3, 0.25), compute_zca(x))
    q = Preprocessor.from_state_dict(dict(np.load(_save(p.state_dict()))))
    np.testing.assert_allclose(q.from_pixels(x), p.from_pixels(x), atol=1e-6)


def _save(state):
    import io

    buf = io.BytesIO()
    np.savez(buf, **state)
    buf.seek(0)
    return buf


def test_zca_cache_is_written_once_reused_and_recomputed_when_broken(tmp_path, monkeypatch):
    x = _correlated_images(40, (4, 4, 3))
    first = cached_zca("toy", x, str(tmp_path))
    (path,) = (tmp_path / "zca").iterdir()
    assert path.name.startswith("toy-") and path.suffix == ".npz"
    stamp = path.stat().st_mtime_ns
    second = cached_zca("toy", x, str(tmp_path))
    assert path.stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(first.whiten, second.whiten)
    # Different data -> different key -> a second file.
    cached_zca("toy", x[:-1], str(tmp_path))
    assert len(list((tmp_path / "zca").iterdir())) == 2
    # A broken cache file is replaced, with a warning.
    path.write_bytes(b"not an npz")
    with pytest.warns(UserWarning, match="unreadable ZCA cache"):
        third = cached_zca("toy", x, str(tmp_path))
    np.testing.assert_array_equal(first.whiten, third.whiten)
    # RCIG_CACHE_DIR is the default root.
    monkeypatch.setenv("RCIG_CACHE_DIR", str(tmp_path / "env"))
    cached_zca("toy", x)
    assert len(os.listdir(tmp_path / "env" / "zca")) == 1
