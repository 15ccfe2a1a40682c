"""Response errors of every form, against float64 NumPy brute force: explicit What,
explicit trace, and no candidate of the same form doing better where the form is optimal."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gdws_approx import GDWSApproximator, ResponseErrors, reduced_rank_fit, response_error
from gdws_approx.testing import STRUCTURES, structured_weight


def explicit_error(W, W_hat, moment, a):
    """``tr(A (W - What) Sigma (W - What)^T A)`` with every matrix written out."""
    m = W.shape[0]
    diff = (np.asarray(W, np.float64) - np.asarray(W_hat, np.float64)).reshape(m, -1)
    A = np.diag(np.ones(m) if a is None else a)
    sigma = np.eye(diff.shape[1]) if moment is None else moment
    return float(np.trace(A @ diff @ sigma @ diff.T @ A))


def block_moment(alpha, transforms, c, k2):
    """The weighting's own moment written out: ``blockdiag(alpha_c B_c B_c^T)``."""
    sigma = np.zeros((c * k2, c * k2))
    for ch in range(c):
        block = np.eye(k2) if transforms is None else transforms[ch] @ transforms[ch].T
        sigma[ch * k2 : (ch + 1) * k2, ch * k2 : (ch + 1) * k2] = alpha[ch] * block
    return sigma


@st.composite
def layers(draw):
    m, c = draw(st.integers(1, 5)), draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2**31 - 1))
    W = structured_weight(seed, m, c, kh, kw, draw(st.sampled_from(STRUCTURES)))
    rng = np.random.default_rng(seed + 1)
    n, k2 = c * kh * kw, kh * kw
    kind = draw(st.sampled_from(["none", "full", "singular", "weighted"]))
    moment = alpha = transforms = None
    if kind in ("full", "singular"):
        samples = rng.standard_normal((n, n + 3 if kind == "full" else max(1, n // 2)))
        moment = samples @ samples.T
    if kind == "weighted":
        alpha = rng.uniform(0.2, 3.0, c)
        transforms = rng.standard_normal((c, k2, k2)) + 3 * np.eye(k2)
    a = rng.uniform(0.3, 2.0, m) if draw(st.booleans()) else None
    return W, moment, alpha, transforms, a


def _fit(W, n_kernels, alpha, transforms, a, cap=None):
    return GDWSApproximator(solver="mego", n_kernels=n_kernels, max_multiplier=cap).fit(
        W, alpha=alpha, output_weights=a, input_transforms=transforms
    )


def _metric(W, moment, alpha, transforms):
    c, k2 = W.shape[1], W.shape[2] * W.shape[3]
    if moment is not None:
        return moment
    return block_moment(np.ones(c) if alpha is None else alpha, transforms, c, k2)


@settings(max_examples=40)
@given(layers())
def test_gdws_and_grouped_errors_are_the_explicit_traces(layer):
    W, moment, alpha, transforms, a = layer
    errors = ResponseErrors(
        W, moment=moment, alpha=alpha, output_weights=a, input_transforms=transforms
    )
    sigma = _metric(W, moment, alpha, transforms)
    tol = 1e-8 * (1 + errors.energy)
    prefix = errors.gdws_errors()
    assert prefix.shape == (errors.max_kernels + 1,)
    assert prefix[0] == pytest.approx(explicit_error(W, np.zeros_like(W), sigma, a), abs=tol)
    for g in range(1, errors.max_kernels + 1):
        est = _fit(W, g, alpha, transforms, a)
        W_hat = est.inverse_transform(est.pointwise_weights_)
        assert abs(prefix[g] - explicit_error(W, W_hat, sigma, a)) <= tol
        if moment is None:  # the weighting's own moment: MEGO's weighted error
            assert abs(prefix[g] - est.error_) <= tol
    for m in range(1, W.shape[2] * W.shape[3] + 1):
        if errors.max_kernels:
            est = _fit(W, W.shape[1] * m, alpha, transforms, a, cap=m)
            W_hat = est.inverse_transform(est.pointwise_weights_)
            assert abs(errors.grouped(m) - explicit_error(W, W_hat, sigma, a)) <= tol


@settings(max_examples=40)
@given(layers(), st.integers(0, 2**31 - 1))
def test_lowrank_errors_are_the_least_of_any_rank_r_weight(layer, seed):
    W, moment, alpha, transforms, a = layer
    errors = ResponseErrors(
        W, moment=moment, alpha=alpha, output_weights=a, input_transforms=transforms
    )
    sigma = _metric(W, moment, alpha, transforms)
    m = W.shape[0]
    weights = np.ones(m) if a is None else a
    # The optimum by an independent route: the SVD of A W L, L L^T = Sigma.
    values, vectors = np.linalg.eigh(sigma)
    root = vectors * np.sqrt(np.clip(values, 0, None))
    singular = np.linalg.svd(weights[:, None] * W.reshape(m, -1) @ root, compute_uv=False)
    tol = 1e-8 * (1 + errors.energy)
    rng = np.random.default_rng(seed)
    assert errors.max_rank == min(m, W[0].size)
    for rank in range(1, errors.max_rank + 1):
        first, second = errors.lowrank_factors(rank)
        assert first.shape == (rank, W[0].size) and second.shape == (m, rank)
        W_hat = (second @ first).reshape(W.shape)
        assert abs(errors.lowrank(rank) - explicit_error(W, W_hat, sigma, a)) <= tol
        assert abs(errors.lowrank(rank) - float(np.sum(singular[rank:] ** 2))) <= tol
        for _ in range(5):  # no other rank-R weight does better (perturbed factors)
            near_second = second + 0.1 * rng.standard_normal(second.shape)
            other = (near_second @ (first + 0.1 * rng.standard_normal(first.shape))).reshape(
                W.shape
            )
            assert explicit_error(W, other, sigma, a) >= errors.lowrank(rank) - tol
    assert errors.lowrank(0) == pytest.approx(errors.energy, abs=tol)


@settings(max_examples=40)
@given(layers(), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_gdws_with_a_lowrank_pointwise(layer, rank, seed):
    W, moment, alpha, transforms, a = layer
    errors = ResponseErrors(
        W, moment=moment, alpha=alpha, output_weights=a, input_transforms=transforms
    )
    if errors.max_kernels == 0:
        return
    sigma = _metric(W, moment, alpha, transforms)
    tol = 1e-8 * (1 + errors.energy)
    rng = np.random.default_rng(seed)
    for g in range(1, errors.max_kernels + 1):
        est = _fit(W, g, alpha, transforms, a)
        inner, outer = errors.gdws_lowrank_factors(g, rank)
        kept = min(rank, W.shape[0])
        assert inner.shape == (kept, est.n_kernels_) and outer.shape == (W.shape[0], kept)
        W_hat = est.inverse_transform(outer @ inner)
        error = errors.gdws_lowrank(g, rank)
        assert abs(error - explicit_error(W, W_hat, sigma, a)) <= tol
        assert error >= errors.gdws(g) - tol  # a constraint on MEGO's pointwise matrix
        if moment is None:  # then exactly the least error for MEGO's kernels
            for _ in range(5):  # perturbed factors: still rank R
                near_outer = outer + 0.1 * rng.standard_normal(outer.shape)
                other = est.inverse_transform(
                    near_outer @ (inner + 0.1 * rng.standard_normal(inner.shape))
                )
                assert explicit_error(W, other, sigma, a) >= error - tol


@settings(max_examples=40)
@given(
    st.integers(1, 5),
    st.integers(1, 5),
    st.integers(1, 4),
    st.integers(0, 2**31 - 1),
    st.sampled_from([0.0, 1e-3]),
)
def test_reduced_rank_fit_is_reduced_rank_regression(m, g, rank, seed, ridge):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((g, 3 + g))
    y = rng.standard_normal((m, g)) @ z + 0.3 * rng.standard_normal((m, z.shape[1]))
    features, cross = z @ z.T, y @ z.T
    inner, outer = reduced_rank_fit(cross, features, rank, ridge=ridge)
    kept = min(rank, m)
    assert inner.shape == (kept, g) and outer.shape == (m, kept)
    # Independent route: rows augmented by the ridge, least squares, then the SVD of the
    # fitted values (Izenman's reduced-rank regression).
    penalty = ridge * np.mean(np.diag(features))
    z_aug = np.concatenate([z, np.sqrt(penalty) * np.eye(g)], axis=1)
    y_aug = np.concatenate([y, np.zeros((m, g))], axis=1)
    full = np.linalg.lstsq(z_aug.T, y_aug.T, rcond=None)[0].T
    u = np.linalg.svd(full @ z_aug, full_matrices=False)[0][:, :kept]
    expected = u @ u.T @ full

    def loss(p):
        return float(np.sum((y_aug - p @ z_aug) ** 2))

    assert loss(outer @ inner) == pytest.approx(loss(expected), rel=1e-8, abs=1e-8)
    for _ in range(5):  # perturbed factors: still rank R
        near_outer = outer + 0.1 * rng.standard_normal(outer.shape)
        other = near_outer @ (inner + 0.1 * rng.standard_normal(inner.shape))
        assert loss(other) >= loss(outer @ inner) - 1e-8


def test_response_error_matches_the_trace_for_full_and_block_moments():
    rng = np.random.default_rng(0)
    W, W_hat = rng.standard_normal((2, 4, 3, 2, 2))
    blocks = rng.standard_normal((3, 4, 4))
    blocks = blocks @ np.transpose(blocks, (0, 2, 1))
    full = np.zeros((12, 12))
    for c in range(3):
        full[4 * c : 4 * c + 4, 4 * c : 4 * c + 4] = blocks[c]
    a = rng.uniform(0.5, 2, 4)
    expected = explicit_error(W, W_hat, full, a)
    assert response_error(W, W_hat, full, a) == pytest.approx(expected)
    assert response_error(W, W_hat, blocks, a) == pytest.approx(expected)
    assert response_error(W, W_hat) == pytest.approx(float(np.sum((W - W_hat) ** 2)))


def test_other_array_libraries_give_the_same_errors():
    torch = pytest.importorskip("torch")
    xps = pytest.importorskip("array_api_strict")
    rng = np.random.default_rng(1)
    W = rng.standard_normal((6, 3, 3, 3))
    x = rng.standard_normal((27, 40))
    moment = x @ x.T
    reference = ResponseErrors(W, moment=moment)
    for to in (torch.from_numpy, xps.asarray):
        errors = ResponseErrors(to(W), moment=to(moment))
        for name in ("gdws_errors", "lowrank_errors"):
            got = getattr(errors, name)()
            assert type(got) is type(to(W))
            np.testing.assert_allclose(
                np.asarray(got), getattr(reference, name)(), rtol=1e-10, atol=1e-9
            )
        assert errors.gdws_lowrank(10, 3) == pytest.approx(reference.gdws_lowrank(10, 3))
        assert errors.grouped(2) == pytest.approx(reference.grouped(2))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"moment": np.eye(5)}, ValueError, r"moment must have shape \(C\*Kh\*Kw"),
        ({"moment": np.full((12, 12), np.nan)}, ValueError, "moment contains NaN"),
        ({"moment": np.eye(12).astype(complex)}, TypeError, "moment must hold real"),
        ({"output_weights": -np.ones(4)}, ValueError, "output_weights must be positive"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(kwargs, error, match):
    with pytest.raises(error, match=match):
        ResponseErrors(np.ones((4, 3, 2, 2)), **kwargs)


def test_bad_ranks_are_refused():
    errors = ResponseErrors(np.ones((4, 3, 2, 2)))
    with pytest.raises(ValueError, match=r"rank must be at most min\(M, C\*Kh\*Kw\) = 4"):
        errors.lowrank_factors(5)
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        errors.lowrank_factors(0)
