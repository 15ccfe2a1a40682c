"""The two-sided weighted error ``sum_c alpha_c ||A (W_c - What_c) B_c||_F^2``: MEGO and LEGO
stay exact under it (brute force), the reported error is the reconstruction's, and each
channel's approximation beats any other of the same rank (random competitors)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gdws_approx import GDWSApproximator
from gdws_approx.testing import brute_force_lego, brute_force_mego


@st.composite
def weighted_problems(draw):
    n_out = draw(st.integers(1, 5))
    n_in = draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    W = rng.standard_normal((n_out, n_in, kh, kw))
    if draw(st.booleans()):  # low-rank channel slices: ties and zero singular values
        W[:, 0] = np.outer(rng.standard_normal(n_out), rng.standard_normal(kh * kw)).reshape(
            n_out, kh, kw
        )
    a = rng.uniform(0.2, 3.0, n_out) if draw(st.booleans()) else None
    k2 = kh * kw
    kind = draw(st.sampled_from(["none", "shared", "per_channel"]))
    B = None
    if kind != "none":
        shape = (k2, k2) if kind == "shared" else (n_in, k2, k2)
        B = rng.standard_normal(shape) + 2.0 * np.eye(k2)  # invertible, well conditioned
    alpha = rng.uniform(0.0, 2.0, n_in) if draw(st.booleans()) else None
    return W, alpha, a, B


def weighted_slices(W, alpha, a, B) -> list[np.ndarray]:
    """``sqrt(alpha_c) diag(a) W_c B_c`` for every channel, float64."""
    n_out, n_in = W.shape[:2]
    slices = []
    for c in range(n_in):
        Z = W[:, c].reshape(n_out, -1)
        if a is not None:
            Z = a[:, None] * Z
        if B is not None:
            Z = Z @ (B if B.ndim == 2 else B[c])
        slices.append(np.sqrt(1.0 if alpha is None else alpha[c]) * Z)
    return slices


def weighted_error(W, W_hat, alpha, a, B) -> float:
    diff = np.asarray(W, np.float64) - np.asarray(W_hat, np.float64)
    return float(sum(np.sum(Z**2) for Z in weighted_slices(diff, alpha, a, B)))


def spectra(W, alpha, a, B) -> np.ndarray:
    """Squared singular values of every weighted slice, padded to a common length."""
    slices = weighted_slices(W, alpha, a, B)
    rank = min(slices[0].shape)
    return np.stack([np.linalg.svd(Z, compute_uv=False)[:rank] ** 2 for Z in slices])


def fit(W, alpha, a, B, **params) -> GDWSApproximator:
    return GDWSApproximator(svd_solver="full", **params).fit(
        W, alpha=alpha, output_weights=a, input_transforms=B
    )


@given(weighted_problems(), st.integers(0, 12))
def test_mego_is_optimal_under_the_weighted_error(problem, budget):
    W, alpha, a, B = problem
    est = fit(W, alpha, a, B, solver="mego", n_kernels=budget)
    expected = brute_force_mego(spectra(W, alpha, a, B), budget)
    assert est.n_kernels_ <= budget
    assert est.error_ == pytest.approx(expected, rel=1e-7, abs=1e-9)
    reconstruction = est.inverse_transform(est.pointwise_weights_)
    assert weighted_error(W, reconstruction, alpha, a, B) == pytest.approx(
        est.error_, rel=1e-7, abs=1e-9
    )


@given(weighted_problems(), st.floats(0.0, 1.0))
def test_lego_keeps_the_fewest_kernels_under_the_weighted_error(problem, fraction):
    W, alpha, a, B = problem
    values = spectra(W, alpha, a, B)
    beta = fraction * float(values.sum())
    est = fit(W, alpha, a, B, beta=beta)
    # Exact up to rounding of budgets that sit on a breakpoint (beta = a partial sum).
    fewest = brute_force_lego(values, beta * (1 + 1e-9) + 1e-12)
    assert fewest <= est.n_kernels_ <= brute_force_lego(values, beta * (1 - 1e-9))
    reconstruction = est.inverse_transform(est.pointwise_weights_)
    assert weighted_error(W, reconstruction, alpha, a, B) <= beta * (1 + 1e-7) + 1e-9


@given(weighted_problems(), st.integers(0, 2**31))
def test_each_channel_beats_random_approximations_of_the_same_rank(problem, seed):
    W, _, a, B = problem
    est = fit(W, None, a, B, solver="mego", n_kernels=W.shape[1])  # about one per channel
    reconstruction = est.inverse_transform(est.pointwise_weights_)
    ours = weighted_error(W, reconstruction, None, a, B)
    rng = np.random.default_rng(seed)
    n_out, n_in = W.shape[:2]
    g = np.asarray(est.multipliers_)
    for _ in range(5):  # a random competitor with the same multipliers
        other = np.zeros_like(W).reshape(n_out, n_in, -1)
        for c in range(n_in):
            if g[c]:
                left = rng.standard_normal((n_out, g[c]))
                right = rng.standard_normal((g[c], other.shape[2]))
                other[:, c] = left @ right
        assert ours <= weighted_error(W, other.reshape(W.shape), None, a, B) + 1e-9
    plain = GDWSApproximator(svd_solver="full", solver="mego", n_kernels=W.shape[1]).fit(W)
    if np.array_equal(np.asarray(plain.multipliers_), g):  # same ranks: compare directly
        unweighted = plain.inverse_transform(plain.pointwise_weights_)
        assert ours <= weighted_error(W, unweighted, None, a, B) + 1e-9


def test_transform_is_the_weighted_least_squares_pointwise_weight():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((6, 3, 3, 3))
    a = rng.uniform(0.5, 2.0, 6)
    B = rng.standard_normal((3, 9, 9)) + 3 * np.eye(9)
    est = fit(W, None, a, B, beta=0.3 * float(np.sum(W**2)))
    np.testing.assert_allclose(est.transform(W), est.pointwise_weights_, rtol=1e-10, atol=1e-12)
    base = weighted_error(W, est.inverse_transform(est.pointwise_weights_), None, a, B)
    for _ in range(5):
        moved = est.pointwise_weights_ + 1e-3 * rng.standard_normal(est.pointwise_weights_.shape)
        assert weighted_error(W, est.inverse_transform(moved), None, a, B) > base
    assert est.input_transforms_.shape == (3, 9, 9) and est.output_weights_.shape == (6,)


def test_identity_weights_give_the_plain_fit():
    rng = np.random.default_rng(1)
    W = rng.standard_normal((8, 4, 3, 3))
    plain = GDWSApproximator(beta=5.0).fit(W)
    same = GDWSApproximator(beta=5.0).fit(W, output_weights=np.ones(8), input_transforms=np.eye(9))
    np.testing.assert_array_equal(same.multipliers_, plain.multipliers_)
    assert same.error_ == pytest.approx(plain.error_, rel=1e-10)
    np.testing.assert_allclose(
        same.inverse_transform(same.pointwise_weights_),
        plain.inverse_transform(plain.pointwise_weights_),
        atol=1e-10,
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"output_weights": np.ones(3)}, ValueError, "length M=4"),
        ({"output_weights": -np.ones(4)}, ValueError, "positive"),
        ({"output_weights": np.full(4, np.nan)}, ValueError, "output_weights"),
        ({"input_transforms": np.eye(4)}, ValueError, "shape \\(K2, K2\\)"),
        ({"input_transforms": np.zeros((9, 9))}, ValueError, "invertible"),
        ({"input_transforms": np.eye(9)[None].repeat(3, 0)}, ValueError, "\\(C, K2, K2\\)"),
        ({"input_transforms": np.full((9, 9), np.inf)}, ValueError, "input_transforms"),
    ],
)
def test_bad_weights_are_refused(kwargs, error, match):
    W = np.random.default_rng(2).standard_normal((4, 2, 3, 3))
    with pytest.raises(error, match=match):
        GDWSApproximator(beta=1.0).fit(W, **kwargs)


@pytest.mark.parametrize("library", ["torch", "array_api_strict"])
def test_weighted_fit_on_other_array_libraries_matches_numpy(library):
    xp = pytest.importorskip(library)
    rng = np.random.default_rng(3)
    W = rng.standard_normal((6, 3, 3, 3))
    a = rng.uniform(0.5, 2.0, 6)
    B = rng.standard_normal((3, 9, 9)) + 3 * np.eye(9)
    expected = GDWSApproximator(beta=20.0).fit(W, output_weights=a, input_transforms=B)
    got = GDWSApproximator(beta=20.0).fit(
        xp.asarray(W), output_weights=xp.asarray(a), input_transforms=xp.asarray(B)
    )
    np.testing.assert_array_equal(np.asarray(got.multipliers_), expected.multipliers_)
    np.testing.assert_allclose(
        np.asarray(got.inverse_transform(got.pointwise_weights_)),
        expected.inverse_transform(expected.pointwise_weights_),
        atol=1e-9,
    )
    assert type(got.input_transforms_) is type(xp.asarray(W))
