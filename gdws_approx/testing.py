"""A testing kit: conv weights that stress a solver, and brute-force oracles.

Use it to property-test GDWS approximations, this library's or your own, against an
independent float64 NumPy reference::

    from hypothesis import given
    from gdws_approx.testing import brute_force_mego, channel_singular_values, conv_weights

    @given(conv_weights(), st.integers(0, 12))
    def test_my_solver_is_optimal(W, n_kernels):
        values = channel_singular_values(W) ** 2
        assert my_error(W, n_kernels) <= brute_force_mego(values, n_kernels) + 1e-9

The oracles enumerate every allocation ``g`` (``0 <= g_c <= min(M, Kh*Kw)``), so keep the
weights small (the strategy's defaults: at most 6 outputs, 3 inputs, 2x3 kernels).
:func:`conv_weights` needs ``hypothesis``; nothing else here does.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = [
    "STRUCTURES",
    "all_allocations",
    "brute_force_lego",
    "brute_force_mego",
    "channel_singular_values",
    "conv_weights",
    "structured_weight",
    "weighted_error",
]

#: The structures :func:`structured_weight` builds.
STRUCTURES = ("random", "low_rank", "zero_channel", "duplicate", "flat_spectrum", "integer")


def structured_weight(
    seed: int, n_out: int, n_in: int, kh: int, kw: int, structure: str
) -> np.ndarray:
    """A float64 conv weight ``(M, C, Kh, Kw)`` with a structure solvers must get right.

    Parameters
    ----------
    seed : int
    n_out, n_in, kh, kw : int
        ``M``, ``C``, ``Kh``, ``Kw``.
    structure : str
        One of :data:`STRUCTURES`: ``"random"``, ``"low_rank"`` (rank-deficient
        slices), ``"zero_channel"``, ``"duplicate"`` (identical channels: exact ties
        across channels), ``"flat_spectrum"`` (equal singular values within a channel:
        ties inside a channel) or ``"integer"`` (small integers: frequent exact ties).
    """
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {STRUCTURES}; got {structure!r}.")
    rng = np.random.default_rng(seed)
    k2 = kh * kw
    rank = min(n_out, k2)
    W = rng.standard_normal((n_out, n_in, k2))
    if structure == "low_rank":
        for c in range(n_in):
            r = int(rng.integers(0, rank + 1))
            W[:, c] = rng.standard_normal((n_out, r)) @ rng.standard_normal((r, k2))
    elif structure == "zero_channel":
        W[:, int(rng.integers(0, n_in))] = 0.0
    elif structure == "duplicate":
        W[:, :] = W[:, :1]
    elif structure == "flat_spectrum":
        for c in range(n_in):
            q_left, _ = np.linalg.qr(rng.standard_normal((n_out, rank)))
            q_right, _ = np.linalg.qr(rng.standard_normal((k2, rank)))
            W[:, c] = 2.0 * q_left @ q_right.T
    elif structure == "integer":
        W = rng.integers(-2, 3, size=W.shape).astype(np.float64)
    return W.reshape(n_out, n_in, kh, kw)


def conv_weights(max_out: int = 6, max_in: int = 3, max_kh: int = 2, max_kw: int = 3) -> Any:
    """A hypothesis strategy of small structured conv weights (:func:`structured_weight`).

    Needs ``hypothesis`` (``pip install hypothesis``).
    """
    from hypothesis import strategies as st

    return st.builds(
        structured_weight,
        st.integers(0, 2**31 - 1),
        st.integers(1, max_out),
        st.integers(1, max_in),
        st.integers(1, max_kh),
        st.integers(1, max_kw),
        st.sampled_from(STRUCTURES),
    )


def channel_singular_values(W: np.ndarray) -> np.ndarray:
    """``(C, R)`` singular values of every ``W[:, c].reshape(M, K2)``, by numpy.linalg.svd."""
    W = np.asarray(W, dtype=np.float64)
    n_out, n_in = W.shape[:2]
    slices = W.reshape(n_out, n_in, -1)
    return np.stack([np.linalg.svd(slices[:, c], compute_uv=False) for c in range(n_in)])


def weighted_error(W: np.ndarray, W_hat: np.ndarray, alpha: np.ndarray) -> float:
    """``sum_c alpha_c ||W_c - What_c||_F^2`` computed directly from a reconstruction."""
    diff = (np.asarray(W, np.float64) - np.asarray(W_hat, np.float64)).reshape(
        W.shape[0], W.shape[1], -1
    )
    return float(np.sum(alpha * np.sum(diff**2, axis=(0, 2))))


def all_allocations(values: np.ndarray) -> Iterator[tuple[np.ndarray, int, float]]:
    """Every multiplier vector ``g`` (``0 <= g_c <= R``) with its kernel count and error.

    ``values`` are the weighted squared singular values ``(C, R)``, non-increasing per
    row; the error of ``g`` is the Eckart-Young error of per-channel rank-``g_c``
    truncation.
    """
    values = np.asarray(values, dtype=np.float64)
    n_in, rank = values.shape
    tail = np.concatenate([np.cumsum(values[:, ::-1], axis=1)[:, ::-1], np.zeros((n_in, 1))], 1)
    for g in itertools.product(range(rank + 1), repeat=n_in):
        yield np.array(g), sum(g), float(sum(tail[c, g[c]] for c in range(n_in)))


def brute_force_mego(values: np.ndarray, n_kernels: int) -> float:
    """Least error over all allocations with at most ``n_kernels`` kernels."""
    return min(err for _, count, err in all_allocations(values) if count <= n_kernels)


def brute_force_lego(values: np.ndarray, beta: float) -> int:
    """Fewest kernels over all allocations with error at most ``beta``."""
    return min(count for _, count, err in all_allocations(values) if err <= beta)
