"""Per-channel spectra against numpy.linalg.svd in float64."""

from __future__ import annotations

import numpy as np
import pytest

from gdws_approx import channel_spectra
from gdws_approx.testing import channel_singular_values


@pytest.mark.parametrize("method", ["full", "covariance_eigh"])
@pytest.mark.parametrize("shape", [(32, 7, 9), (4, 3, 9), (9, 2, 25), (1, 3, 4)])
def test_spectra_match_numpy_svd(method, shape):
    W3 = np.random.default_rng(0).standard_normal(shape)
    spectra = channel_spectra(W3, method=method)
    expected = channel_singular_values(W3.reshape(*shape, 1))
    assert spectra.squared_singular_values.shape == (shape[1], min(shape[0], shape[2]))
    np.testing.assert_allclose(np.sqrt(spectra.squared_singular_values), expected, rtol=1e-9)
    # The rows are right singular vectors: W_c v = sigma u, so ||W_c v||^2 = sigma^2.
    squared_norms = (np.einsum("mck,crk->mcr", W3, spectra.right_singular_vectors) ** 2).sum(0)
    np.testing.assert_allclose(squared_norms, spectra.squared_singular_values, rtol=1e-8)


def test_rank_deficient_channels_report_exact_zeros():
    rng = np.random.default_rng(1)
    W3 = np.stack([rng.standard_normal((16, 2)) @ rng.standard_normal((2, 9)) for _ in range(3)], 1)
    W3[:, 1] = 0.0
    for method in ("full", "covariance_eigh"):
        values = channel_spectra(W3, method=method).squared_singular_values
        np.testing.assert_array_equal((values > 0).sum(axis=1), [2, 0, 2])


def test_vectors_have_a_deterministic_sign():
    W3 = np.random.default_rng(2).standard_normal((12, 4, 9))
    for method in ("full", "covariance_eigh"):
        vt = channel_spectra(W3, method=method).right_singular_vectors
        pivot = np.take_along_axis(vt, np.abs(vt).argmax(-1)[..., None], -1)
        assert np.all(pivot > 0)
    full = channel_spectra(W3, method="full").right_singular_vectors
    eigh = channel_spectra(W3, method="covariance_eigh").right_singular_vectors
    np.testing.assert_allclose(full, eigh, atol=1e-8)
