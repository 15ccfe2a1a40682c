"""Depthwise and pointwise factors from a choice of channel multipliers.

Kernels are ordered by input channel, and within a channel by decreasing singular value:
kernel ``j`` reads input channel ``kernel_channels[j]``. For batched products the kernels
are also laid out *padded*, ``(C, n_slots, K2)`` with ``n_slots = max(g)``, where slot
``s`` of channel ``c`` holds a kernel when ``s < g_c`` and zeros otherwise. The padded
layout turns projection and reconstruction into one batched matmul each, with no
``(C*K2) x (C*K2)`` intermediate.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import array_api_compat

from gdws_approx._namespace import get_namespace, index_dtype

__all__ = [
    "KernelLayout",
    "kernel_layout",
    "pad_kernels",
    "project",
    "reconstruct",
    "uniform_multiplier",
]


class KernelLayout(NamedTuple):
    """Where each depthwise kernel sits in the padded ``(C, n_slots)`` layout.

    Attributes
    ----------
    n_slots : int
        ``max(g)``, slots per channel.
    slot_kernel : array of shape (C * n_slots,), integer (the namespace's index dtype)
        Kernel index of every slot; ``G`` (one past the last kernel) for empty slots.
    kernel_slots : array of shape (G,), integer (the namespace's index dtype)
        Flat slot of every kernel (the inverse map).
    kernel_channels : array of shape (G,), integer (the namespace's index dtype)
        Input channel of every kernel.
    """

    n_slots: int
    slot_kernel: Any
    kernel_slots: Any
    kernel_channels: Any


def kernel_layout(multipliers: Any) -> KernelLayout:
    """Padded layout of the kernels selected by channel multipliers ``g`` (shape ``(C,)``)."""
    xp = get_namespace(multipliers)
    device = array_api_compat.device(multipliers)
    integer = index_dtype(xp, device)
    g = xp.astype(multipliers, integer)
    n_slots = int(xp.max(g)) if g.shape[0] else 0
    n_kernels = int(xp.sum(g))
    first_kernel = xp.cumulative_sum(g) - g
    slot = xp.arange(n_slots, dtype=integer, device=device)
    occupied = slot[None, :] < g[:, None]
    slot_kernel = xp.where(
        occupied,
        first_kernel[:, None] + slot[None, :],
        xp.full_like(occupied, n_kernels, dtype=integer),
    )
    kernel_slots = xp.nonzero(xp.reshape(occupied, (-1,)))[0]
    kernel_slots = xp.astype(kernel_slots, integer)
    kernel_channels = kernel_slots // max(n_slots, 1)
    return KernelLayout(n_slots, xp.reshape(slot_kernel, (-1,)), kernel_slots, kernel_channels)


def uniform_multiplier(kernel_channels: Any, n_channels: int) -> int | None:
    """``m`` when every channel has exactly ``m`` kernels, in channel order, else ``None``.

    Kernels laid out as ``[0]*m + [1]*m + ... + [C-1]*m`` need no channel gather: a
    convolution with ``groups=C`` and ``C*m`` outputs (the depthwise conv with a channel
    multiplier) reads exactly those channels.

    Parameters
    ----------
    kernel_channels : array of shape (G,), integer
        The input channel of every kernel.
    n_channels : int
        ``C``.

    Returns
    -------
    int or None
    """
    xp = get_namespace(kernel_channels)
    n_kernels = int(kernel_channels.shape[0])
    if n_channels < 1 or n_kernels == 0 or n_kernels % n_channels:
        return None
    m = n_kernels // n_channels
    device = array_api_compat.device(kernel_channels)
    order = xp.arange(n_kernels, dtype=kernel_channels.dtype, device=device) // m
    return m if bool(xp.all(kernel_channels == order)) else None


def _append_zero_row(xp: Any, rows: Any) -> Any:
    zero = xp.zeros((1, rows.shape[1]), dtype=rows.dtype, device=array_api_compat.device(rows))
    return xp.concat([rows, zero], axis=0)


def pad_kernels(kernels: Any, layout: KernelLayout, n_channels: int) -> Any:
    """Depthwise kernels ``(G, K2)`` in the padded layout ``(C, n_slots, K2)``."""
    xp = get_namespace(kernels)
    padded = xp.take(_append_zero_row(xp, kernels), layout.slot_kernel, axis=0)
    return xp.reshape(padded, (n_channels, layout.n_slots, kernels.shape[1]))


def project(W3: Any, padded_kernels: Any, layout: KernelLayout) -> Any:
    """Pointwise weights: ``W3`` projected on the depthwise kernels.

    ``P[m, j] = <W3[m, c_j, :], D_j>``. With orthonormal kernels per channel (as fitted),
    this is the least-squares pointwise weight for those kernels.

    Parameters
    ----------
    W3 : array of shape (M, C, K2)
    padded_kernels : array of shape (C, n_slots, K2)
    layout : KernelLayout

    Returns
    -------
    array of shape (M, G)
        A transposed view of a ``(G, M)`` array: kernel-major, the layout a pointwise
        ``1 x 1`` convolution weight ``(M, G)`` is read from in column order.
    """
    xp = get_namespace(W3, padded_kernels)
    m, c, _ = W3.shape
    by_channel = xp.permute_dims(W3, (1, 2, 0))  # (C, K2, M)
    padded = xp.matmul(padded_kernels, by_channel)  # (C, n_slots, M)
    padded = xp.reshape(padded, (c * layout.n_slots, m))
    return xp.matrix_transpose(xp.take(padded, layout.kernel_slots, axis=0))


def reconstruct(pointwise: Any, padded_kernels: Any, layout: KernelLayout) -> Any:
    """Dense equivalent weight ``What[m, c, :] = sum_{j: c_j = c} P[m, j] D_j``.

    Parameters
    ----------
    pointwise : array of shape (M, G)
    padded_kernels : array of shape (C, n_slots, K2)
    layout : KernelLayout

    Returns
    -------
    array of shape (M, C, K2)
    """
    xp = get_namespace(pointwise, padded_kernels)
    c, n_slots, _ = padded_kernels.shape
    m = pointwise.shape[0]
    rows = _append_zero_row(xp, xp.matrix_transpose(pointwise))  # (G + 1, M)
    padded = xp.reshape(xp.take(rows, layout.slot_kernel, axis=0), (c, n_slots, m))
    dense = xp.matmul(xp.matrix_transpose(padded), padded_kernels)  # (C, M, K2)
    return xp.permute_dims(dense, (1, 0, 2))
