"""MEGO and LEGO: which weighted singular values to keep.

Both solvers work on the matrix ``values[c, i] = alpha_c * sigma_{c,i}**2`` (shape
``(C, R)``, non-increasing along each row). Keeping value ``(c, i)`` costs one depthwise
kernel; dropping it adds ``values[c, i]`` to the weighted squared error. Because each row
is sorted, the ``k`` largest values overall always form a prefix of every row, so a choice
of values is a valid vector of channel multipliers ``g``.

Ties are broken deterministically and identically on every backend: values are ranked
by a key quantised to about 40 bits (12 significant decimal digits) of the largest value,
so that floating-point noise between backends cannot reorder equal values, and among
equal keys the lower channel, then the lower index, is kept first.
"""

from __future__ import annotations

from typing import Any

import array_api_compat

from gdws_approx._namespace import get_namespace, index_dtype
from gdws_approx.checks import check_integer, check_real

__all__ = [
    "channel_errors",
    "keep_order",
    "lego_breakpoints",
    "lego_multipliers",
    "mego_multipliers",
]


def _check_values(values: Any) -> Any:
    xp = get_namespace(values)
    if values.ndim != 2:
        raise ValueError(f"values must be a 2-D array (C, R); got shape {tuple(values.shape)}.")
    if not bool(xp.all(xp.isfinite(values))):
        raise ValueError(
            "values contains NaN or inf; the weighted squared singular values must be finite "
            "(values too large: scale the weights first)."
        )
    return xp


def keep_order(values: Any) -> Any:
    """Flat indices (into ``values.reshape(-1)``) from the first to keep to the last.

    Parameters
    ----------
    values : array of shape (C, R)
        Non-negative weighted squared singular values, non-increasing along each row.

    Returns
    -------
    array of shape (C * R,)
        A permutation: the largest value first; ties by channel, then index, ascending.
    """
    xp = _check_values(values)
    flat = xp.reshape(values, (-1,))
    if flat.shape[0] == 0:
        device = array_api_compat.device(values)
        return xp.zeros(0, dtype=index_dtype(xp, device), device=device)
    bits = 40 if xp.finfo(flat.dtype).bits >= 64 else 20
    scale = xp.max(flat)
    key = flat if float(scale) == 0.0 else xp.round(flat / (scale * 2.0**-bits))
    # Zeros rank after every positive value, however small.
    key = xp.where(flat > 0, key, -xp.ones_like(key))
    # Ascending sort of the negated key: stable, so equal keys keep flat (c, i) order.
    return xp.argsort(-key, stable=True)


def _keep_mask(values: Any, n_keep: int, order: Any = None) -> Any:
    """Multipliers for keeping the first ``n_keep`` entries of :func:`keep_order`."""
    xp = get_namespace(values)
    if order is None:
        order = keep_order(values)
    rank = xp.argsort(order, stable=True)  # inverse permutation: position of each value
    kept = rank < n_keep
    kept = xp.logical_and(kept, xp.reshape(values, (-1,)) > 0)
    integer = index_dtype(xp, array_api_compat.device(values))
    return xp.sum(xp.astype(xp.reshape(kept, values.shape), integer), axis=1)


def mego_multipliers(values: Any, n_kernels: int) -> Any:
    """MEGO: the multipliers of least weighted error using at most ``n_kernels`` kernels.

    Keeps the ``n_kernels`` largest non-zero values; any other allocation of the same
    size drops a set whose sum is at least as large (an exchange argument), so the error
    is minimal.

    Parameters
    ----------
    values : array of shape (C, R)
        Weighted squared singular values (non-negative, non-increasing per row).
    n_kernels : int
        The kernel budget ``gamma >= 0``.

    Returns
    -------
    array of shape (C,), integer (the namespace's index dtype, int64 almost everywhere)
        Channel multipliers ``g`` with ``sum(g) <= n_kernels``.
    """
    _check_values(values)
    return _keep_mask(values, check_integer(n_kernels, "n_kernels", minimum=0))


def lego_multipliers(values: Any, beta: float) -> Any:
    """LEGO: the fewest kernels whose weighted squared error is at most ``beta``.

    Drops the smallest values while their running sum stays ``<= beta``. Any set of ``k``
    dropped values sums to at least the ``k`` smallest, so no allocation drops more within
    the budget: the kernel count is minimal. ``beta = 0`` drops only zero values, an exact
    representation.

    Parameters
    ----------
    values : array of shape (C, R)
        Weighted squared singular values (non-negative, non-increasing per row).
    beta : float
        Budget on the weighted squared error, ``beta >= 0``.

    Returns
    -------
    array of shape (C,), integer (the namespace's index dtype, int64 almost everywhere)
        Channel multipliers ``g``.
    """
    xp = _check_values(values)
    check_real(beta, "beta", minimum=0)
    if values.shape[0] * values.shape[1] == 0:
        return _keep_mask(values, 0)
    order = keep_order(values)
    n_dropped = int(xp.count_nonzero(lego_breakpoints(values, order) <= float(beta)))
    return _keep_mask(values, values.shape[0] * values.shape[1] - n_dropped, order)


def lego_breakpoints(values: Any, order: Any = None) -> Any:
    """The error budgets at which LEGO drops one more kernel.

    Entry ``k`` is the sum of the ``k + 1`` values LEGO drops first (the smallest, in
    reverse :func:`keep_order`). LEGO with budget ``beta`` drops exactly the values whose
    breakpoint is ``<= beta``, so it keeps ``C * R - count(breakpoints <= beta)`` kernels:
    a non-increasing step function of ``beta``, which is what a network-level search on
    ``beta`` walks.

    Parameters
    ----------
    values : array of shape (C, R)
        Weighted squared singular values (non-negative, non-increasing per row).
    order : array, optional
        ``keep_order(values)`` when already computed.

    Returns
    -------
    array of shape (C * R,)
        Non-decreasing; the last entry is the total ``sum(values)``.
    """
    xp = _check_values(values)
    if order is None:
        order = keep_order(values)
    smallest_first = xp.flip(xp.take(xp.reshape(values, (-1,)), order), axis=0)
    return xp.cumulative_sum(smallest_first)


def channel_errors(values: Any, multipliers: Any) -> Any:
    """Weighted squared error of each channel: the sum of its dropped values.

    Parameters
    ----------
    values : array of shape (C, R)
    multipliers : array of shape (C,)

    Returns
    -------
    array of shape (C,)
        ``sum_{i >= g_c} values[c, i]``.
    """
    xp = _check_values(values)
    index = xp.arange(values.shape[1], device=array_api_compat.device(values))
    dropped = index[None, :] >= xp.astype(multipliers, index.dtype)[:, None]
    return xp.sum(xp.where(dropped, values, xp.zeros_like(values)), axis=1)
