"""Cost model: multiply-accumulates (MACs) per output pixel.

A dense ``groups=1`` convolution with weight ``(M, C, Kh, Kw)`` costs ``M * C * K2`` MACs
per output pixel (``K2 = Kh * Kw``). Its GDWS form with ``G`` depthwise kernels costs
``G * K2`` (depthwise) plus ``G * M`` (pointwise): ``G * (K2 + M)``. Its low-rank form at rank
``R`` (a ``Kh x Kw`` conv ``C -> R``, then a ``1 x 1`` conv ``R -> M``) costs ``R * (C * K2 + M)``,
and GDWS with a rank-``R`` pointwise (``1 x 1`` convs ``G -> R -> M``) ``G * K2 + G * R + R * M``.
Multiply by the output height and width for a layer's total.
"""

from __future__ import annotations

import math
from typing import Any

from gdws_approx.checks import check_integer

__all__ = [
    "MAX_KERNEL_MULTIPLE",
    "break_even_kernels",
    "check_kernel_multiple",
    "dense_macs",
    "gdws_lowrank_macs",
    "gdws_macs",
    "lowrank_macs",
    "mac_reduction",
]

# Largest multiple ``G`` may be padded to: beyond it, padding only adds zero kernels.
MAX_KERNEL_MULTIPLE = 64


def dense_macs(n_out: int, n_in: int, kernel_area: int) -> int:
    """MACs per output pixel of a dense convolution: ``M * C * K2``."""
    return n_out * n_in * kernel_area


def gdws_macs(n_kernels: int, kernel_area: int, n_out: int) -> int:
    """MACs per output pixel of a GDWS convolution: ``G * (K2 + M)``."""
    return n_kernels * (kernel_area + n_out)


def lowrank_macs(rank: int, n_in: int, kernel_area: int, n_out: int) -> int:
    """MACs per output pixel of a rank-``R`` convolution: ``R * (C * K2 + M)``."""
    return rank * (n_in * kernel_area + n_out)


def gdws_lowrank_macs(n_kernels: int, kernel_area: int, rank: int, n_out: int) -> int:
    """MACs per output pixel of GDWS with a rank-``R`` pointwise: ``G * K2 + G * R + R * M``."""
    return n_kernels * kernel_area + n_kernels * rank + rank * n_out


def mac_reduction(dense: int, gdws: int) -> float:
    """``dense / gdws``: how many times fewer MACs (``inf`` when GDWS keeps no kernel)."""
    return math.inf if gdws == 0 else dense / gdws


def break_even_kernels(n_out: int, n_in: int, kernel_area: int) -> int:
    """Largest ``G`` for which GDWS is strictly cheaper than the dense convolution.

    GDWS pays only while ``G * (K2 + M) < M * C * K2``.
    """
    dense = dense_macs(n_out, n_in, kernel_area)
    return (dense - 1) // (kernel_area + n_out)


def check_kernel_multiple(value: Any, name: str = "kernel_multiple") -> int:
    """Validate the multiple a layer's ``G`` is padded up to (zero kernels).

    Parameters
    ----------
    value : int
        From 1 (no padding) to :data:`MAX_KERNEL_MULTIPLE`.
    name : str, default="kernel_multiple"
        The argument's name, for the error message.

    Returns
    -------
    int

    Raises
    ------
    TypeError
        ``value`` is not an integer.
    ValueError
        ``value`` is outside ``[1, MAX_KERNEL_MULTIPLE]``.
    """
    number = check_integer(value, name)
    if not 1 <= number <= MAX_KERNEL_MULTIPLE:
        raise ValueError(
            f"{name} must be an integer from 1 (no padding) to {MAX_KERNEL_MULTIPLE}; "
            f"got {value!r}."
        )
    return number
