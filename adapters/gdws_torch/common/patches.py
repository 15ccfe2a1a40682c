"""The input patches of a convolution, as the matrix its weight multiplies."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["conv_patch_rows", "conv_patches"]


def conv_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The input patches ``conv`` multiplies, ``(N, C * Kh * Kw, L)``.

    Honours the conv's stride, padding (including ``"same"``), dilation and padding mode,
    so that ``conv._conv_forward(x, W, None)`` equals ``W.reshape(M, -1) @ patches``
    (reshaped to the output's ``(N, M, H', W')``). Rows are ordered as
    ``W.reshape(M, -1)``'s columns: channel-major, then the kernel positions row by row.
    What ``F.unfold`` gives, built as one strided view of the padded input and copied
    once: several times faster than ``F.unfold`` on CPU, in float64 above all.

    Parameters
    ----------
    conv : torch.nn.Conv2d
        Any conv with the geometry (a GDWS layer's ``depthwise`` conv, or the dense one).
    x : torch.Tensor of shape (N, C, H, W)

    Returns
    -------
    torch.Tensor of shape (N, C * Kh * Kw, L)
    """
    view = _patch_view(conv, x)  # (N, C, Kh, Kw, H', W')
    n, c, kh, kw, ho, wo = view.shape
    return view.reshape(n, c * kh * kw, ho * wo)


def conv_patch_rows(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The patches of :func:`conv_patches` as rows, ``(N * L, C * Kh * Kw)``.

    One patch per row (sample-major, then output position), its entries in the order of
    ``W.reshape(M, -1)``'s columns: ``conv_patches(conv, x).transpose(1, 2)`` flattened
    to rows, in one copy instead of two. Row-major patches make the patch Gram matrix
    ``rows.T @ rows`` one matrix product without a further copy.

    Parameters
    ----------
    conv : torch.nn.Conv2d
    x : torch.Tensor of shape (N, C, H, W)

    Returns
    -------
    torch.Tensor of shape (N * L, C * Kh * Kw)
    """
    view = _patch_view(conv, x)  # (N, C, Kh, Kw, H', W')
    n, c, kh, kw, ho, wo = view.shape
    return view.permute(0, 4, 5, 1, 2, 3).reshape(n * ho * wo, c * kh * kw)


def _patch_view(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The padded input as a strided ``(N, C, Kh, Kw, H', W')`` view (no copy)."""
    if any(conv._reversed_padding_repeated_twice):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    n, c, h, w = x.shape
    (kh, kw), (dh, dw), (sh, sw) = conv.kernel_size, conv.dilation, conv.stride
    ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    stride_n, stride_c, stride_h, stride_w = x.stride()
    return x.as_strided(
        (n, c, kh, kw, ho, wo),
        (stride_n, stride_c, dh * stride_h, dw * stride_w, sh * stride_h, sw * stride_w),
    )
