"""GDWSApproximator behaviour: attributes, transform/inverse_transform, dtypes, no mutation."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from gdws_approx import GDWSApproximator, break_even_kernels, dense_macs, gdws_macs
from gdws_approx.testing import channel_singular_values, weighted_error


@pytest.fixture
def weight():
    return np.random.default_rng(0).standard_normal((24, 6, 3, 3))


def test_fitted_attributes_are_consistent(weight):
    est = GDWSApproximator(beta=20.0).fit(weight)
    M, C, kh, kw = weight.shape
    G = est.n_kernels_
    assert est.multipliers_.shape == (C,) and int(est.multipliers_.sum()) == G
    assert est.depthwise_kernels_.shape == (G, kh, kw)
    assert est.kernel_channels_.shape == (G,)
    assert est.pointwise_weights_.shape == (M, G)
    assert est.singular_values_.shape == (C, min(M, kh * kw))
    assert est.n_features_in_ == C * kh * kw
    assert (est.n_output_channels_, est.n_input_channels_, est.kernel_size_) == (M, C, (kh, kw))
    # Kernels are grouped by channel, g_c of them each.
    np.testing.assert_array_equal(np.bincount(est.kernel_channels_, minlength=C), est.multipliers_)
    assert np.all(np.diff(est.kernel_channels_) >= 0)
    # Orthonormal within each channel.
    for c in range(C):
        D = est.depthwise_kernels_[est.kernel_channels_ == c].reshape(-1, kh * kw)
        np.testing.assert_allclose(D @ D.T, np.eye(len(D)), atol=1e-12)
    np.testing.assert_allclose(est.singular_values_, channel_singular_values(weight), rtol=1e-10)
    np.testing.assert_allclose(est.weighted_spectrum_, est.singular_values_**2, rtol=1e-12)
    assert est.dense_macs_ == dense_macs(M, C, kh * kw) == M * C * kh * kw
    assert est.gdws_macs_ == gdws_macs(G, kh * kw, M) == G * (kh * kw + M)
    assert est.mac_reduction_ == pytest.approx(est.dense_macs_ / est.gdws_macs_)
    assert est.error_ == pytest.approx(float(est.channel_errors_.sum()))
    assert est.error_ <= 20.0


def test_transform_of_the_fitted_weight_is_the_fitted_pointwise(weight):
    est = GDWSApproximator(solver="mego", n_kernels=20).fit(weight)
    np.testing.assert_allclose(est.transform(weight), est.pointwise_weights_, atol=1e-12)
    np.testing.assert_allclose(
        GDWSApproximator(solver="mego", n_kernels=20).fit_transform(weight),
        est.pointwise_weights_,
    )


def test_transform_is_the_least_squares_projection(weight):
    est = GDWSApproximator(solver="mego", n_kernels=25).fit(weight)
    other = np.random.default_rng(1).standard_normal((5, *weight.shape[1:]))
    P = est.transform(other)
    M, _C, _kh, _kw = other.shape
    for j in range(est.n_kernels_):
        c = est.kernel_channels_[j]
        expected = other[:, c].reshape(M, -1) @ est.depthwise_kernels_[j].reshape(-1)
        np.testing.assert_allclose(P[:, j], expected, atol=1e-12)


def test_inverse_transform_is_the_sum_of_rank_one_terms(weight):
    est = GDWSApproximator(solver="mego", n_kernels=30).fit(weight)
    P = np.random.default_rng(2).standard_normal((7, est.n_kernels_))
    dense = est.inverse_transform(P)
    expected = np.zeros((7, *weight.shape[1:]))
    for j in range(est.n_kernels_):
        expected[:, est.kernel_channels_[j]] += np.multiply.outer(
            P[:, j], est.depthwise_kernels_[j]
        )
    np.testing.assert_allclose(dense, expected, atol=1e-12)


def test_two_dimensional_weight_gives_the_same_factors(weight):
    M = weight.shape[0]
    four_d = GDWSApproximator(beta=10.0).fit(weight)
    two_d = GDWSApproximator(beta=10.0, kernel_size=(3, 3)).fit(weight.reshape(M, -1))
    np.testing.assert_array_equal(four_d.multipliers_, two_d.multipliers_)
    np.testing.assert_allclose(four_d.pointwise_weights_, two_d.pointwise_weights_)
    assert two_d.inverse_transform(two_d.pointwise_weights_).shape == (M, weight[0].size)
    assert four_d.inverse_transform(four_d.pointwise_weights_).shape == weight.shape


def test_non_square_kernels_and_alpha_weighting():
    W = np.random.default_rng(3).standard_normal((10, 4, 1, 5))
    alpha = np.array([0.0, 1.0, 10.0, 0.5])
    est = GDWSApproximator(solver="mego", n_kernels=8).fit(W, alpha=alpha)
    assert est.depthwise_kernels_.shape[1:] == (1, 5)
    assert est.multipliers_[0] == 0  # a zero-weight channel never gets a kernel
    assert est.multipliers_[2] >= est.multipliers_[1]
    W_hat = est.inverse_transform(est.pointwise_weights_)
    assert weighted_error(W, W_hat, alpha) == pytest.approx(est.error_, rel=1e-10)


def test_break_even_matches_the_cost_model():
    for M, C, k2 in [(16, 16, 9), (64, 32, 9), (8, 3, 25)]:
        g = break_even_kernels(M, C, k2)
        assert gdws_macs(g, k2, M) < dense_macs(M, C, k2) <= gdws_macs(g + 1, k2, M)


def test_keeping_nothing_is_allowed(weight):
    est = GDWSApproximator(solver="mego", n_kernels=0).fit(weight)
    assert est.n_kernels_ == 0 and est.pointwise_weights_.shape == (24, 0)
    assert est.mac_reduction_ == np.inf
    assert est.error_ == pytest.approx(float((weight**2).sum()))
    np.testing.assert_array_equal(est.inverse_transform(est.pointwise_weights_), 0.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_low_precision_is_computed_wide_and_returned_in_its_dtype(weight, dtype):
    W = weight.astype(dtype)
    est = GDWSApproximator().fit(W)
    for name in ("depthwise_kernels_", "pointwise_weights_", "singular_values_"):
        assert getattr(est, name).dtype == dtype
    assert est.transform(W).dtype == dtype
    W_hat = est.inverse_transform(est.pointwise_weights_)
    assert W_hat.dtype == dtype
    # Wide computation: the only error left is the final rounding to `dtype`.
    tol = 20 * np.finfo(dtype).eps * np.abs(weight).max()
    np.testing.assert_allclose(W_hat.astype(np.float64), W.astype(np.float64), atol=tol)
    exact = GDWSApproximator().fit(W.astype(np.float64))
    np.testing.assert_array_equal(est.multipliers_, exact.multipliers_)


def test_float32_solvers_agree_with_float64(weight):
    W = weight.astype(np.float32)
    for beta in [0.0, 5.0, 50.0]:
        fast = GDWSApproximator(beta=beta).fit(W)
        assert fast.svd_solver_ == "covariance_eigh"
        full = GDWSApproximator(beta=beta, svd_solver="full").fit(W)
        np.testing.assert_array_equal(fast.multipliers_, full.multipliers_)
        assert fast.error_ == pytest.approx(full.error_, rel=1e-6, abs=1e-6)


def test_inputs_are_never_modified(weight):
    W = weight.copy()
    W.setflags(write=False)
    alpha = np.linspace(0.5, 2.0, weight.shape[1])
    alpha.setflags(write=False)
    est = GDWSApproximator(beta=3.0).fit(W, alpha=alpha)
    P = est.pointwise_weights_.copy()
    P.setflags(write=False)
    est.transform(W)
    est.inverse_transform(P)
    np.testing.assert_array_equal(W, weight)


def test_params_follow_scikit_learn_conventions(weight):
    est = GDWSApproximator(solver="mego", n_kernels=5, kernel_size=3)
    assert est.get_params()["n_kernels"] == 5
    twin = clone(est).set_params(n_kernels=7)
    assert twin.n_kernels == 7 and est.n_kernels == 5
    with pytest.raises(NotFittedError):
        est.transform(weight)
    assert est.fit(weight) is est
