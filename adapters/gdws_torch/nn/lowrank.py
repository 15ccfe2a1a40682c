"""``LowRankConv2d``: a convolution through ``R`` channels, as a ``torch.nn`` module.

A ``Kh x Kw`` stage ``C -> R`` (no bias), then a ``1 x 1`` conv ``R -> M`` with the bias:
the dense weight ``second @ first`` has rank ``R``. The first stage is

- a dense ``nn.Conv2d``: the low-rank form, ``R (C Kh Kw + M)`` MACs per output pixel;
- or a :class:`~gdws_torch.GDWSConv2d` ``C -> R`` (``kernel_channels`` given): GDWS whose
  pointwise matrix is low-rank (``M x G`` as ``(M x R)(R x G)``), ``G Kh Kw + G R + R M``.

Both export to ONNX in their own operators (two ``Conv`` nodes; gather, depthwise and
two ``1 x 1`` ``Conv`` nodes), no dense weight rebuilt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gdws_approx import LayerPlan, cost
from gdws_torch.nn.layers import GDWSConv2d

__all__ = ["LowRankConv2d"]


class LowRankConv2d(nn.Module):
    """A conv factored through ``R`` channels: ``second(first(x))``.

    Parameters
    ----------
    in_channels, out_channels : int
        ``C`` and ``M``.
    rank : int
        ``R``, the channels between the two stages.
    kernel_size, stride, padding, dilation, padding_mode
        Of ``first``, as :class:`torch.nn.Conv2d`.
    bias : bool, default=True
        Of ``second``.
    kernel_channels : sequence of int or LongTensor of shape (G,), optional
        Make ``first`` a :class:`~gdws_torch.GDWSConv2d` ``C -> R`` with these kernels'
        channels (GDWS with a low-rank pointwise); ``None``: a dense ``nn.Conv2d``.
    device, dtype
        As :class:`torch.nn.Conv2d`.

    Attributes
    ----------
    first : torch.nn.Conv2d or GDWSConv2d
        ``C -> R``, ``Kh x Kw`` geometry, no bias.
    second : torch.nn.Conv2d
        ``R -> M``, ``1 x 1``, the bias.

    Examples
    --------
    >>> import torch
    >>> from gdws_approx import ResponseErrors
    >>> from gdws_torch import LowRankConv2d
    >>> conv = torch.nn.Conv2d(16, 32, 3, padding=1)
    >>> first, second = ResponseErrors(conv.weight.detach()).lowrank_factors(8)
    >>> layer = LowRankConv2d.from_factors(conv, first, second)
    >>> layer(torch.randn(1, 16, 8, 8)).shape
    torch.Size([1, 32, 8, 8])
    """

    # Python-side descriptions, not part of the forward pass (TorchScript skips them).
    __jit_unused_properties__ = ("rank", "in_channels", "out_channels", "gdws", "geometry", "macs")

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        rank: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        kernel_channels: Sequence[int] | torch.Tensor | None = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        geometry = {
            "stride": stride,
            "padding": padding,
            "dilation": dilation,
            "bias": False,
            "padding_mode": padding_mode,
            "device": device,
            "dtype": dtype,
        }
        if kernel_channels is None:
            self.first = nn.Conv2d(in_channels, rank, kernel_size, **geometry)
        else:
            self.first = GDWSConv2d(in_channels, rank, kernel_size, kernel_channels, **geometry)
        self.second = nn.Conv2d(rank, out_channels, 1, bias=bias, device=device, dtype=dtype)

    # -- construction -------------------------------------------------------------------

    @classmethod
    def _like(cls, conv: nn.Conv2d, rank: int, kernel_channels: Any = None) -> LowRankConv2d:
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
            raise TypeError("conv must be a torch.nn.Conv2d with groups=1.")
        m, c, kh, kw = conv.weight.shape
        return cls(
            c,
            m,
            rank,
            (kh, kw),
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            kernel_channels=kernel_channels,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )

    @classmethod
    def from_factors(cls, conv: nn.Conv2d, first: Any, second: Any) -> LowRankConv2d:
        """The pair with weights ``first (R, C*Kh*Kw)`` and ``second (M, R)`` replacing
        ``conv`` (its geometry, bias, dtype and device; ``conv`` is not modified)."""
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
            raise TypeError("conv must be a torch.nn.Conv2d with groups=1.")
        m, c, kh, kw = conv.weight.shape
        to = {"dtype": conv.weight.dtype, "device": conv.weight.device}
        first = torch.as_tensor(first, **to)
        second = torch.as_tensor(second, **to)
        rank = second.shape[1] if second.ndim == 2 else -1
        if first.shape != (rank, c * kh * kw) or second.shape != (m, rank):
            raise ValueError(
                f"factors of shapes (R, C*Kh*Kw) = (R, {c * kh * kw}) and (M, R) = ({m}, R) "
                f"expected; got {tuple(first.shape)} and {tuple(second.shape)}."
            )
        layer = cls._like(conv, rank)
        with torch.no_grad():
            layer.first.weight.copy_(first.reshape(rank, c, kh, kw))
            layer._set_second(conv, second)
        layer.train(conv.training)
        return layer

    @classmethod
    def from_gdws_factors(
        cls,
        conv: nn.Conv2d,
        depthwise_kernels: Any,
        kernel_channels: Any,
        inner: Any,
        outer: Any,
        fused: bool = False,
    ) -> LowRankConv2d:
        """GDWS with a low-rank pointwise replacing ``conv``: depthwise kernels
        ``(G, Kh, Kw)`` reading ``kernel_channels`` ``(G,)``, then ``1 x 1`` convs
        ``inner (R, G)`` and ``outer (M, R)`` (``outer`` with ``conv``'s bias)."""
        to = {"dtype": conv.weight.dtype, "device": conv.weight.device}
        inner = torch.as_tensor(inner, **to)
        outer = torch.as_tensor(outer, **to)
        channels = torch.as_tensor(kernel_channels, device=conv.weight.device)
        m, rank = outer.shape if outer.ndim == 2 else (-1, -1)
        if m != conv.out_channels or tuple(inner.shape) != (rank, channels.numel()):
            raise ValueError(
                f"inner must be (R, G) = (R, {channels.numel()}) and outer (M, R) = "
                f"({conv.out_channels}, R); got {tuple(inner.shape)} and {tuple(outer.shape)}."
            )
        layer = cls._like(conv, rank, channels)
        kh, kw = layer.first.kernel_size
        kernels = torch.as_tensor(depthwise_kernels, **to).reshape(-1, 1, kh, kw)
        with torch.no_grad():
            layer.first.depthwise.weight.copy_(kernels)
            layer.first.pointwise.weight.copy_(inner.reshape(rank, -1, 1, 1))
            layer._set_second(conv, outer)
        layer.first.fused = fused
        layer.train(conv.training)
        return layer

    @classmethod
    def from_plan(cls, layer: LayerPlan, conv: nn.Conv2d, fused: bool = False) -> LowRankConv2d:
        """The layer a :class:`~gdws_approx.LayerPlan` of form ``"lowrank"`` or
        ``"gdws_lowrank"`` planned for ``conv`` (``fused``: of the GDWS first stage)."""
        if layer.form == "lowrank":
            return cls.from_factors(conv, *layer.factors)
        if layer.form != "gdws_lowrank":
            raise ValueError(f"a {layer.form!r} plan does not build a LowRankConv2d.")
        estimator = layer.estimator
        return cls.from_gdws_factors(
            conv,
            estimator.depthwise_kernels_,
            estimator.kernel_channels_,
            *layer.factors,
            fused=fused,
        )

    def _set_second(self, conv: nn.Conv2d, second: torch.Tensor) -> None:
        self.second.weight.copy_(second.reshape(*second.shape, 1, 1))
        if conv.bias is not None:
            self.second.bias.copy_(conv.bias)

    # -- behaviour ----------------------------------------------------------------------

    @property
    def rank(self) -> int:
        """``R``."""
        return self.second.in_channels

    @property
    def in_channels(self) -> int:
        return self.first.in_channels

    @property
    def out_channels(self) -> int:
        return self.second.out_channels

    @property
    def gdws(self) -> bool:
        """Whether the first stage is a GDWS conv (a low-rank pointwise)."""
        return isinstance(self.first, GDWSConv2d)

    @property
    def geometry(self) -> nn.Conv2d:
        """The conv whose stride, padding, dilation and padding mode read the input."""
        return self.first.depthwise if self.gdws else self.first

    @property
    def macs(self) -> int:
        """MACs per output pixel: ``R (C K2 + M)``, or ``G K2 + G R + R M``."""
        kh, kw = self.geometry.kernel_size
        m = self.out_channels
        if self.gdws:
            return cost.gdws_lowrank_macs(self.first.n_kernels, kh * kw, self.rank, m)
        return cost.lowrank_macs(self.rank, self.in_channels, kh * kw, m)

    def first_weight(self) -> torch.Tensor:
        """The first stage's dense weight ``(R, C, Kh, Kw)``."""
        return self.first.dense_weight() if self.gdws else self.first.weight

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense weight ``(M, C, Kh, Kw)``."""
        first = self.first_weight()
        r, c, kh, kw = first.shape
        second = self.second.weight.reshape(-1, r)
        return (second @ first.reshape(r, -1)).reshape(-1, c, kh, kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-ready) that rebuild this layer's structure."""
        conv = self.geometry
        padding = conv.padding if isinstance(conv.padding, str) else list(conv.padding)
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "rank": self.rank,
            "kernel_size": list(conv.kernel_size),
            "stride": list(conv.stride),
            "padding": padding,
            "dilation": list(conv.dilation),
            "bias": self.second.bias is not None,
            "padding_mode": conv.padding_mode,
            "kernel_channels": self.first.kernel_channels.tolist() if self.gdws else None,
        }

    def extra_repr(self) -> str:
        kh, kw = self.geometry.kernel_size
        dense = cost.dense_macs(self.out_channels, self.in_channels, kh * kw)
        kind = f"gdws G={self.first.n_kernels}, " if self.gdws else ""
        return (
            f"C={self.in_channels}, R={self.rank}, M={self.out_channels}, {kind}"
            f"mac_reduction={cost.mac_reduction(dense, self.macs):.2f}x"
        )
