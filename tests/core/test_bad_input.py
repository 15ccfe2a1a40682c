"""Bad input: clear errors naming the argument, the value and what is allowed."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse

from gdws_approx import GDWSApproximator, lego_multipliers, mego_multipliers

W = np.random.default_rng(0).standard_normal((8, 4, 3, 3))
SKLEARN = "The '%s' parameter of GDWSApproximator must be"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights(bad):
    W_bad = W.copy()
    W_bad[1, 2, 0, 0] = bad
    with pytest.raises(ValueError, match=r"W contains NaN or inf"):
        GDWSApproximator().fit(W_bad)


@pytest.mark.parametrize("shape", [(8,), (8, 4, 9), (1, 8, 4, 3, 3), ()])
def test_wrong_ndim(shape):
    with pytest.raises(ValueError, match=r"W must be a 4-D array .* got ndim=\d"):
        GDWSApproximator(kernel_size=3).fit(np.ones(shape))


def test_two_dimensional_weight_needs_a_matching_kernel_size():
    with pytest.raises(ValueError, match=r"kernel_size is required for a 2-D W"):
        GDWSApproximator().fit(W.reshape(8, -1))
    with pytest.raises(ValueError, match=r"W has 36 columns, not a multiple of Kh\*Kw = 25"):
        GDWSApproximator(kernel_size=5).fit(W.reshape(8, -1))
    with pytest.raises(ValueError, match=r"W has kernel 3x3 .* but kernel_size=\(5, 5\)"):
        GDWSApproximator(kernel_size=5).fit(W)


@pytest.mark.parametrize("kernel_size", [0, (3, 0), (3,), "3", 2.5, (3, 3.0), True])
def test_bad_kernel_size(kernel_size):
    # scikit-learn's parameter validation names it first; the shape check then.
    with pytest.raises((ValueError, TypeError), match=r"kernel_size('? parameter .*)? must be"):
        GDWSApproximator(kernel_size=kernel_size).fit(W)


@pytest.mark.parametrize(
    ("alpha", "message"),
    [
        (np.ones(3), r"alpha must be a 1-D array of length C=4 .* got shape \(3,\)"),
        (np.ones((4, 1)), r"alpha must be a 1-D array of length C=4"),
        (np.array([1.0, -0.5, 1.0, 1.0]), r"alpha must be non-negative; got minimum -0.5"),
        (np.array([1.0, np.nan, 1.0, 1.0]), r"alpha contains NaN or inf"),
    ],
)
def test_bad_alpha(alpha, message):
    with pytest.raises(ValueError, match=message):
        GDWSApproximator().fit(W, alpha=alpha)


@pytest.mark.parametrize(
    ("params", "error", "message"),
    [
        # scikit-learn's parameter validation (_parameter_constraints), before any work:
        (
            {"beta": -1.0},
            ValueError,
            rf"{SKLEARN % 'beta'} a float in the range \[0\.0, inf\)\. Got -1\.0",
        ),
        ({"beta": float("nan")}, ValueError, rf"{SKLEARN % 'beta'} .* Got nan"),
        ({"beta": "0.1"}, TypeError, rf"{SKLEARN % 'beta'} .* Got '0\.1'"),
        ({"beta": float("inf")}, ValueError, rf"{SKLEARN % 'beta'} .* Got inf"),
        ({"solver": "svd"}, ValueError, rf"{SKLEARN % 'solver'} a str among .*'lego'.* Got 'svd'"),
        ({"solver": "mego"}, ValueError, r"solver='mego' needs its kernel budget"),
        ({"solver": "mego", "n_kernels": -1}, ValueError, rf"{SKLEARN % 'n_kernels'} .* Got -1"),
        ({"solver": "mego", "n_kernels": 2.5}, TypeError, rf"{SKLEARN % 'n_kernels'} .* Got 2\.5"),
        ({"solver": "mego", "n_kernels": True}, TypeError, r"n_kernels must be .* got True"),
        ({"n_kernels": 5}, ValueError, r"n_kernels=5 is MEGO's kernel budget"),
        (
            {"solver": "mego", "n_kernels": 5, "beta": 0.5},
            ValueError,
            r"beta=0.5 is LEGO's error budget",
        ),
        ({"svd_solver": "qr"}, ValueError, rf"{SKLEARN % 'svd_solver'} .* Got 'qr'"),
    ],
)
def test_bad_or_contradicting_parameters(params, error, message):
    with pytest.raises(error, match=message):
        GDWSApproximator(**params).fit(W)


def test_unusable_data_kinds():
    with pytest.raises(ValueError, match=r"Complex data not supported"):
        GDWSApproximator().fit(W.astype(np.complex128))
    with pytest.raises(TypeError, match=r"sparse input is not supported"):
        GDWSApproximator(kernel_size=1).fit(scipy.sparse.csr_matrix(np.eye(3)))
    with pytest.raises(ValueError, match=r"0 output channels"):
        GDWSApproximator().fit(np.ones((0, 4, 3, 3)))


def test_transform_and_inverse_transform_check_shapes():
    est = GDWSApproximator(beta=1.0).fit(W)
    with pytest.raises(ValueError, match=r"expecting 36 features .* got shape \(8, 3, 3, 3\)"):
        est.transform(W[:, :3])
    with pytest.raises(ValueError, match=r"W has kernel 3x3 .* but kernel_size=\(1, 1\)"):
        GDWSApproximator(kernel_size=1).fit(W[:, :, :1, :1]).transform(W)
    with pytest.raises(
        ValueError, match=rf"P must be a 2-D array \(M, G\) with G={est.n_kernels_}"
    ):
        est.inverse_transform(np.ones((2, est.n_kernels_ + 1)))


def test_mixing_array_libraries_is_refused():
    torch = pytest.importorskip("torch")
    est = GDWSApproximator().fit(W)
    with pytest.raises(ValueError, match=r"transform\(\): inputs must use the same namespace"):
        est.transform(torch.from_numpy(W))
    with pytest.raises(TypeError, match=r"same array library"):
        GDWSApproximator().fit(torch.from_numpy(W), alpha=np.ones(4))


def test_functional_solvers_validate_their_budget():
    values = np.array([[3.0, 1.0], [2.0, 0.0]])
    with pytest.raises(ValueError, match=r"n_kernels must be an integer >= 0; got -2"):
        mego_multipliers(values, -2)
    with pytest.raises(TypeError, match=r"n_kernels must be an integer >= 0; got True \(bool\)"):
        mego_multipliers(values, True)
    with pytest.raises(ValueError, match=r"beta must be a finite real number >= 0; got -0.1"):
        lego_multipliers(values, -0.1)
    with pytest.raises(TypeError, match=r"beta must be a finite real number >= 0; got '1' \(str\)"):
        lego_multipliers(values, "1")
    with pytest.raises(ValueError, match=r"values must be a 2-D array \(C, R\)"):
        lego_multipliers(values.ravel(), 0.0)
