"""Independent float64 NumPy references: per-channel SVD and brute-force enumeration."""

from __future__ import annotations

import itertools

import numpy as np


def channel_singular_values(W: np.ndarray) -> np.ndarray:
    """(C, R) singular values of every ``W[:, c].reshape(M, K2)``, by numpy.linalg.svd."""
    n_out, n_in = W.shape[:2]
    slices = W.reshape(n_out, n_in, -1)
    return np.stack([np.linalg.svd(slices[:, c], compute_uv=False) for c in range(n_in)])


def weighted_error(W: np.ndarray, W_hat: np.ndarray, alpha: np.ndarray) -> float:
    """``sum_c alpha_c ||W_c - What_c||_F^2`` computed directly from a reconstruction."""
    diff = (np.asarray(W, np.float64) - np.asarray(W_hat, np.float64)).reshape(
        W.shape[0], W.shape[1], -1
    )
    return float(np.sum(alpha * np.sum(diff**2, axis=(0, 2))))


def all_allocations(values: np.ndarray):
    """Every multiplier vector ``g`` (``0 <= g_c <= R``) with its kernel count and error.

    The error of ``g`` is the Eckart-Young error of per-channel rank-``g_c`` truncation.
    """
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
