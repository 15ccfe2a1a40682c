"""MEGO and LEGO against brute-force enumeration of every allocation (docs/algorithms.md)."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from gdws_approx import GDWSApproximator
from gdws_approx.testing import (
    STRUCTURES,
    all_allocations,
    brute_force_lego,
    brute_force_mego,
    channel_singular_values,
    conv_weights,
    structured_weight,
    weighted_error,
)


@st.composite
def problems(draw):
    """A small weight with structure, and per-channel weights with zeros and ties."""
    n_out = draw(st.integers(1, 6))
    n_in = draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    structure = draw(st.sampled_from(STRUCTURES))
    W = structured_weight(draw(st.integers(0, 2**31)), n_out, n_in, kh, kw, structure)
    alpha_kind = draw(st.sampled_from(["none", "random", "with_zeros", "equal"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    alpha = {
        "none": None,
        "random": rng.uniform(0.1, 3.0, n_in),
        "with_zeros": np.where(rng.random(n_in) < 0.5, 0.0, rng.uniform(0.1, 3.0, n_in)),
        "equal": np.full(n_in, 0.7),
    }[alpha_kind]
    svd_solver = draw(st.sampled_from(["full", "covariance_eigh"]))
    return W, alpha, svd_solver


def _weighted_values(W, alpha):
    weights = np.ones(W.shape[1]) if alpha is None else alpha
    return weights[:, None] * channel_singular_values(W) ** 2, weights


@given(problems(), st.floats(0.0, 1.2))
def test_mego_error_is_minimal_and_budget_respected(problem, budget_fraction):
    W, alpha, svd_solver = problem
    values, weights = _weighted_values(W, alpha)
    n_kernels = round(budget_fraction * values.size)
    est = GDWSApproximator(solver="mego", n_kernels=n_kernels, svd_solver=svd_solver).fit(
        W, alpha=alpha
    )
    tol = 1e-9 * (1.0 + values.sum())
    assert est.n_kernels_ <= n_kernels
    assert est.error_ <= brute_force_mego(values, n_kernels) + tol
    W_hat = est.inverse_transform(est.pointwise_weights_)
    assert abs(weighted_error(W, W_hat, weights) - est.error_) <= tol


@given(problems(), st.floats(0.0, 1.2))
def test_lego_kernel_count_is_minimal_within_budget(problem, beta_fraction):
    W, alpha, svd_solver = problem
    values, weights = _weighted_values(W, alpha)
    beta = beta_fraction * float(values.sum())
    est = GDWSApproximator(solver="lego", beta=beta, svd_solver=svd_solver).fit(W, alpha=alpha)
    tol = 1e-9 * (1.0 + values.sum())
    assert est.error_ <= beta + tol
    # No allocation that is clearly within the budget uses fewer kernels.
    assert est.n_kernels_ <= brute_force_lego(values, max(beta - tol, 0.0))
    W_hat = est.inverse_transform(est.pointwise_weights_)
    assert abs(weighted_error(W, W_hat, weights) - est.error_) <= tol


@given(problems(), st.lists(st.floats(0.0, 1.0), min_size=2, max_size=6))
def test_lego_kernels_non_increasing_in_beta(problem, fractions):
    W, alpha, svd_solver = problem
    values, _ = _weighted_values(W, alpha)
    betas = sorted(f * float(values.sum()) for f in fractions)
    counts = [
        GDWSApproximator(beta=b, svd_solver=svd_solver).fit(W, alpha=alpha).n_kernels_
        for b in betas
    ]
    assert counts == sorted(counts, reverse=True)


@given(problems(), st.lists(st.integers(0, 40), min_size=2, max_size=6))
def test_mego_error_non_increasing_in_budget(problem, budgets):
    W, alpha, svd_solver = problem
    errors = [
        GDWSApproximator(solver="mego", n_kernels=n, svd_solver=svd_solver)
        .fit(W, alpha=alpha)
        .error_
        for n in sorted(budgets)
    ]
    assert all(later <= earlier + 1e-12 for earlier, later in itertools.pairwise(errors))


@given(problems())
def test_beta_zero_reconstructs_exactly(problem):
    W, alpha, svd_solver = problem
    est = GDWSApproximator(beta=0.0, svd_solver=svd_solver).fit(W, alpha=alpha)
    W_hat = est.inverse_transform(est.pointwise_weights_)
    weights = np.ones(W.shape[1]) if alpha is None else alpha
    scale = 1e-10 * (1.0 + np.abs(W).max())
    # Channels with alpha = 0 carry no weight, so LEGO may (optimally) drop them.
    kept_channels = weights > 0
    np.testing.assert_allclose(W_hat[:, kept_channels], W[:, kept_channels], rtol=0, atol=scale)
    assert est.error_ == 0.0


@given(problems())
def test_zero_singular_values_are_never_kept(problem):
    W, alpha, svd_solver = problem
    values, _ = _weighted_values(W, alpha)
    est = GDWSApproximator(solver="mego", n_kernels=values.size, svd_solver=svd_solver).fit(
        W, alpha=alpha
    )
    numerical_rank = (values > 1e-18 * (1.0 + values.max())).sum(axis=1)
    assert np.all(est.multipliers_ <= numerical_rank)


@given(problems(), st.floats(0.0, 1.0))
def test_fitting_twice_gives_the_same_allocation(problem, beta_fraction):
    W, alpha, svd_solver = problem
    values, _ = _weighted_values(W, alpha)
    beta = beta_fraction * float(values.sum())
    first = GDWSApproximator(beta=beta, svd_solver=svd_solver).fit(W, alpha=alpha)
    second = GDWSApproximator(beta=beta, svd_solver=svd_solver).fit(W.copy(), alpha=alpha)
    np.testing.assert_array_equal(first.multipliers_, second.multipliers_)
    np.testing.assert_array_equal(first.depthwise_kernels_, second.depthwise_kernels_)


@given(conv_weights(), st.integers(0, 8))
def test_the_public_testing_kit_checks_mego(W, n_kernels):
    values = channel_singular_values(W) ** 2
    est = GDWSApproximator(solver="mego", n_kernels=n_kernels).fit(W)
    assert est.error_ <= brute_force_mego(values, n_kernels) + 1e-9 * (1 + values.sum())
    assert W.ndim == 4 and W.shape[0] <= 6 and W.shape[1] <= 3


def test_the_oracles_on_a_case_worked_by_hand():
    values = np.array([[4.0, 1.0], [3.0, 0.0]])  # channel errors: tails of each row
    assert brute_force_mego(values, 1) == 4.0  # keep the 4: drop 1 + 3
    assert brute_force_mego(values, 2) == 1.0  # keep 4 and 3
    assert brute_force_lego(values, 1.0) == 2 and brute_force_lego(values, 0.0) == 3
    assert len(list(all_allocations(values))) == 9
