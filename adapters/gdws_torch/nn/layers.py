"""``GDWSConv2d``: a generalized depthwise-separable convolution as a ``torch.nn`` module.

One class, over 400 lines because its forms (gather, grouped, padded, fused) and their
conversions (from factors, an estimator, a plan; to a dense conv) share its invariants
and stay together; the docstrings are most of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.utils.validation import check_is_fitted
from torch import nn

from gdws_approx import GDWSApproximator, LayerPlan, cost, uniform_multiplier

__all__ = ["GDWSConv2d"]


class GDWSConv2d(nn.Module):
    """A GDWS convolution: per-channel depthwise kernels, then a ``1 x 1`` pointwise conv.

    Input channel ``c`` is convolved with its own ``g_c`` depthwise kernels (stride,
    padding, dilation and padding mode of the convolution it replaces), giving ``G``
    intermediate channels; a ``1 x 1`` convolution with the original bias maps them to the
    ``M`` outputs. Its output equals a dense convolution with the reconstructed weight
    ``What[:, c] = sum_{j: c_j = c} P[:, j] D_j`` (:meth:`dense_weight`).

    Build it from a fitted :class:`~gdws_approx.GDWSApproximator` with
    :meth:`from_estimator`, or from factors with :meth:`from_factors`. The constructor
    makes a layer of the right structure with uninitialised weights (for loading a
    ``state_dict``).

    Parameters
    ----------
    in_channels : int
        ``C``.
    out_channels : int
        ``M``.
    kernel_size : int or (int, int)
    kernel_channels : sequence of int or LongTensor of shape (G,)
        The input channel each depthwise kernel reads (``G >= 1`` entries in ``[0, C)``).
    stride, padding, dilation, padding_mode
        As :class:`torch.nn.Conv2d`.
    bias : bool, default=True
    fused : bool, default=False
        ``False``: run the explicit two-stage form (what a deployment runs; fewer MACs).
        ``True``: run one dense convolution with :meth:`dense_weight` (same output; the
        fast way to evaluate robustness in eager PyTorch). Switch by setting the attribute.
    device, dtype
        As :class:`torch.nn.Conv2d`.

    Attributes
    ----------
    depthwise : torch.nn.Conv2d
        ``G -> G`` channels, ``groups=G``: weight of shape ``(G, 1, Kh, Kw)``. Without a
        gather its weight is applied as ``C -> G`` channels, ``groups=C`` (the same
        weight).
    pointwise : torch.nn.Conv2d
        ``G -> M`` channels, ``1 x 1``: weight of shape ``(M, G, 1, 1)``, the bias.
    kernel_channels : torch.LongTensor of shape (G,)
        Buffer: input channel of each depthwise kernel.
    gathers : bool
        Whether the forward pass gathers input channels: ``False`` for a ``grouped``
        layer and when every channel has exactly one kernel, in channel order (an
        ordinary depthwise-separable layer).

    Examples
    --------
    >>> import torch
    >>> from gdws_approx import GDWSApproximator
    >>> from gdws_torch import GDWSConv2d
    >>> conv = torch.nn.Conv2d(16, 32, 3, padding=1)
    >>> gdws = GDWSApproximator(beta=0.5).fit(conv.weight.detach())
    >>> layer = GDWSConv2d.from_estimator(gdws, conv)
    >>> layer(torch.randn(1, 16, 8, 8)).shape
    torch.Size([1, 32, 8, 8])
    """

    # Properties TorchScript need not compile: array-API code, and a return it cannot type.
    __jit_unused_properties__ = ("multiplier", "geometry")

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        kernel_channels: Sequence[int] | torch.Tensor,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        fused: bool = False,
        grouped: bool = False,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        kernel_channels = torch.as_tensor(kernel_channels, device=device)
        n_kernels = int(kernel_channels.numel())
        if n_kernels == 0:
            raise ValueError(
                "kernel_channels is empty: a GDWS convolution needs at least one depthwise "
                "kernel (G >= 1); a budget that keeps no kernel cannot be built."
            )
        if kernel_channels.ndim != 1 or kernel_channels.dtype.is_floating_point:
            raise ValueError(
                "kernel_channels must be a 1-D sequence of channel indices; got "
                f"shape {tuple(kernel_channels.shape)}, dtype {kernel_channels.dtype}."
            )
        if int(kernel_channels.min()) < 0 or int(kernel_channels.max()) >= in_channels:
            raise ValueError(
                f"kernel_channels must lie in [0, in_channels={in_channels}); got values from "
                f"{int(kernel_channels.min())} to {int(kernel_channels.max())}."
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.fused = fused
        self.grouped = bool(grouped)
        if self.grouped and uniform_multiplier(kernel_channels, in_channels) is None:
            raise ValueError(
                "grouped=True needs the same number of kernels for every channel, in channel "
                f"order; got kernel_channels {kernel_channels.tolist()[:12]}... for "
                f"in_channels={in_channels} (GDWSConv2d.uniform() pads a layer so)."
            )
        self.depthwise = nn.Conv2d(
            n_kernels,
            n_kernels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=n_kernels,
            bias=False,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        self.pointwise = nn.Conv2d(
            n_kernels, out_channels, 1, bias=bias, device=device, dtype=dtype
        )
        self.register_buffer("kernel_channels", kernel_channels.to(torch.long))
        self._note_gather()

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_factors(
        cls,
        conv: nn.Conv2d,
        depthwise_kernels: Any,
        kernel_channels: Any,
        pointwise_weights: Any,
        fused: bool = False,
    ) -> GDWSConv2d:
        """The GDWS layer with the given factors and every other option of ``conv``.

        Parameters
        ----------
        conv : torch.nn.Conv2d
            The convolution replaced (``groups=1``): stride, padding, dilation, padding
            mode, bias (copied), dtype and device are taken from it. Not modified.
        depthwise_kernels : array of shape (G, Kh, Kw)
        kernel_channels : array of shape (G,), integer
        pointwise_weights : array of shape (M, G)
            Arrays of any library that ``torch.as_tensor`` accepts (torch, NumPy).
        fused : bool, default=False

        Returns
        -------
        GDWSConv2d
        """
        _check_conv(conv)
        weight = conv.weight
        to = {"dtype": weight.dtype, "device": weight.device}
        depthwise = torch.as_tensor(depthwise_kernels, **to)
        pointwise = torch.as_tensor(pointwise_weights, **to)
        channels = torch.as_tensor(kernel_channels, device=weight.device)
        m, c, kh, kw = weight.shape
        g = channels.numel()
        if tuple(depthwise.shape) != (g, kh, kw):
            raise ValueError(
                f"depthwise_kernels must have shape (G, Kh, Kw) = ({g}, {kh}, {kw}) for this "
                f"conv and kernel_channels; got {tuple(depthwise.shape)}."
            )
        if tuple(pointwise.shape) != (m, g):
            raise ValueError(
                f"pointwise_weights must have shape (M, G) = ({m}, {g}); got "
                f"{tuple(pointwise.shape)}."
            )
        layer = cls(
            c,
            m,
            (kh, kw),
            channels,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            fused=fused,
            **to,
        )
        with torch.no_grad():
            layer.depthwise.weight.copy_(depthwise.reshape(g, 1, kh, kw))
            layer.pointwise.weight.copy_(pointwise.reshape(m, g, 1, 1))
            if conv.bias is not None:
                layer.pointwise.bias.copy_(conv.bias)
        layer.train(conv.training)
        return layer

    @classmethod
    def from_estimator(
        cls, estimator: GDWSApproximator, conv: nn.Conv2d, fused: bool = False
    ) -> GDWSConv2d:
        """The GDWS layer of an estimator fitted on ``conv.weight``.

        Parameters
        ----------
        estimator : GDWSApproximator
            Fitted (on ``conv.weight`` or any weight of its shape, any array library).
        conv : torch.nn.Conv2d
            The convolution replaced; see :meth:`from_factors`.
        fused : bool, default=False

        Returns
        -------
        GDWSConv2d
        """
        if not isinstance(estimator, GDWSApproximator):
            raise TypeError(
                f"estimator must be a GDWSApproximator; got {type(estimator).__name__}."
            )
        check_is_fitted(estimator)
        _check_conv(conv)
        shape = (estimator.n_output_channels_, estimator.n_input_channels_, *estimator.kernel_size_)
        if shape != tuple(conv.weight.shape):
            raise ValueError(
                f"the estimator was fitted on a weight of shape {shape}, but conv.weight has "
                f"shape {tuple(conv.weight.shape)}."
            )
        return cls.from_factors(
            conv,
            estimator.depthwise_kernels_,
            estimator.kernel_channels_,
            estimator.pointwise_weights_,
            fused=fused,
        )

    @classmethod
    def from_plan(cls, layer: LayerPlan, conv: nn.Conv2d, fused: bool = False) -> GDWSConv2d:
        """The GDWS layer a :class:`~gdws_approx.LayerPlan` planned for ``conv``, in the
        planned form (:meth:`uniform` for a layer planned grouped).

        Parameters
        ----------
        layer : gdws_approx.LayerPlan
        conv : torch.nn.Conv2d
            The convolution replaced; see :meth:`from_factors`.
        fused : bool, default=False

        Returns
        -------
        GDWSConv2d
        """
        built = cls.from_estimator(layer.estimator, conv, fused=fused)
        return built if layer.grouped_multiplier is None else built.uniform()

    # -- behaviour ----------------------------------------------------------------------

    @property
    def n_kernels(self) -> int:
        """``G``: the number of depthwise kernels."""
        return self.depthwise.out_channels

    @property
    def kernel_size(self) -> tuple[int, int]:
        return tuple(self.depthwise.kernel_size)

    @property
    def geometry(self) -> nn.Conv2d:
        """The conv that reads the input (stride, padding, dilation, padding mode): the
        depthwise conv."""
        return self.depthwise

    @property
    def multipliers(self) -> torch.Tensor:
        """Channel multipliers ``g`` (kernels per input channel), shape ``(C,)``."""
        return torch.bincount(self.kernel_channels, minlength=self.in_channels)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.pointwise.bias

    @property
    def dense_macs(self) -> int:
        """MACs per output pixel of the dense equivalent, ``M * C * K2``."""
        kh, kw = self.kernel_size
        return cost.dense_macs(self.out_channels, self.in_channels, kh * kw)

    @property
    def gdws_macs(self) -> int:
        """MACs per output pixel of the explicit form, ``G * (K2 + M)``."""
        kh, kw = self.kernel_size
        return cost.gdws_macs(self.n_kernels, kh * kw, self.out_channels)

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense weight ``(M, C, Kh, Kw)`` (differentiable)."""
        g = self.n_kernels
        kh, kw = self.kernel_size
        pointwise = self.pointwise.weight.reshape(self.out_channels, g, 1)
        depthwise = self.depthwise.weight.reshape(1, g, kh * kw)
        dense = pointwise.new_zeros(self.out_channels, self.in_channels, kh * kw)
        dense = dense.index_add(1, self.kernel_channels, pointwise * depthwise)
        return dense.reshape(self.out_channels, self.in_channels, kh, kw)

    @property
    def multiplier(self) -> int | None:
        """``m`` when every channel has ``m`` kernels in channel order (no gather), else
        ``None``."""
        return uniform_multiplier(self.kernel_channels, self.in_channels)

    def _note_gather(self) -> None:
        # One kernel per channel in order: the gather is the identity, and skipping it
        # saves a copy. With more kernels per channel the grouped conv is often slower
        # than the gather (ONNX Runtime, torch at batch 32), so only `grouped` skips it.
        multiplier = self.multiplier
        if self.grouped and multiplier is None:
            raise ValueError("a grouped GDWSConv2d needs uniform kernel_channels in order.")
        self.gathers = not (self.grouped or multiplier == 1)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        # A method rather than a hook holding a lambda: the layer stays picklable
        # (torch.save(model), multiprocessing), and a loaded kernel_channels is noted.
        super()._load_from_state_dict(*args, **kwargs)
        self._note_gather()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return self._dense_forward(x)
        if not self.gathers:
            return self.pointwise(self._conv(x, self.depthwise.weight, None, self.in_channels))
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            # NHWC: gather along the contiguous channel axis of a (N*H*W, C) view, which
            # stays channels-last for the convs (no layout copies). Measured on
            # PreActResNet-18 in channels-last at batch 32: 124 ms vs 182 ms per forward.
            n, c, h, w = x.shape
            pixels = x.permute(0, 2, 3, 1).reshape(n * h * w, c)
            gathered = pixels.index_select(1, self.kernel_channels)
            gathered = gathered.view(n, h, w, self.n_kernels).permute(0, 3, 1, 2)
            return self.pointwise(self.depthwise(gathered))
        return self.pointwise(self.depthwise(x.index_select(1, self.kernel_channels)))

    def _dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x, self.dense_weight(), self.pointwise.bias, 1)

    def _conv(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int
    ) -> torch.Tensor:
        """``x`` convolved with the depthwise conv's geometry and padding mode."""
        dw = self.depthwise
        if dw.padding_mode != "zeros":
            x = F.pad(x, dw._reversed_padding_repeated_twice, mode=dw.padding_mode)
            return F.conv2d(x, weight, bias, dw.stride, 0, dw.dilation, groups)
        return F.conv2d(x, weight, bias, dw.stride, dw.padding, dw.dilation, groups)

    def padded(self, multiple: int) -> GDWSConv2d:
        """An equal layer whose ``G`` is a multiple of ``multiple`` (zero kernels added).

        The extra depthwise kernels are zero, read the last kernel's channel and have zero
        pointwise weights, so the output is unchanged; some backends run a depthwise conv
        whose channel count is a multiple of 4 much faster (ONNX Runtime's CPU
        convolutions: 2.2 to 2.4x). Returns ``self`` when nothing needs adding, and for a
        layer without a gather (:attr:`gathers`), which padding would give one.
        """
        multiple = cost.check_kernel_multiple(multiple, "multiple")
        extra = -self.n_kernels % multiple
        if extra == 0 or not self.gathers:
            return self
        channels = torch.cat([self.kernel_channels, self.kernel_channels[-1:].repeat(extra)])
        source = torch.cat([torch.arange(self.n_kernels), torch.full((extra,), -1)])
        return self._with_kernels(channels, source)

    def uniform(self) -> GDWSConv2d:
        """An equal ``grouped`` layer (no gather): every channel padded with zero kernels
        to the largest multiplier ``m``, kernels in channel order.

        It runs the depthwise stage as one grouped conv (``groups=C``, ``C*m`` outputs),
        with ``C*m - G`` more kernels than this layer; whether that is faster than the
        gather depends on the backend and the layer (the latency tables measure both).
        Returns ``self`` when the layer already has no gather.
        """
        if not self.gathers:
            return self
        counts = self.multipliers
        m = int(counts.max())
        channels = torch.arange(self.in_channels, device=counts.device).repeat_interleave(m)
        # Kernels of each channel first, in their order, then that channel's zero slots.
        order = torch.argsort(self.kernel_channels, stable=True)
        first = torch.cumsum(counts, 0) - counts
        slot = torch.arange(channels.numel(), device=counts.device) % m
        source = torch.where(
            slot < counts[channels],
            order[(first[channels] + slot).clamp(max=self.n_kernels - 1)],
            torch.full_like(slot, -1),
        )
        return self._with_kernels(channels, source, grouped=True)

    def _with_kernels(
        self, channels: torch.Tensor, source: torch.Tensor, grouped: bool = False
    ) -> GDWSConv2d:
        """This layer with kernel ``j`` reading ``channels[j]`` and holding this layer's
        kernel ``source[j]`` (``-1``: a zero kernel)."""
        dw, pw = self.depthwise, self.pointwise
        layer = GDWSConv2d(
            self.in_channels,
            self.out_channels,
            dw.kernel_size,
            channels,
            stride=dw.stride,
            padding=dw.padding,
            dilation=dw.dilation,
            bias=pw.bias is not None,
            padding_mode=dw.padding_mode,
            fused=self.fused,
            grouped=grouped,
            device=dw.weight.device,
            dtype=dw.weight.dtype,
        )
        source = source.to(self.kernel_channels.device)
        kept = torch.nonzero(source >= 0).flatten()
        with torch.no_grad():
            layer.depthwise.weight.zero_()
            layer.depthwise.weight[kept] = dw.weight[source[kept]]
            layer.pointwise.weight.zero_()
            layer.pointwise.weight[:, kept] = pw.weight[:, source[kept]]
            if pw.bias is not None:
                layer.pointwise.bias.copy_(pw.bias)
        layer.train(self.training)
        return layer

    def to_conv2d(self) -> nn.Conv2d:
        """A dense ``nn.Conv2d`` with the reconstructed weight (same options and bias)."""
        dw = self.depthwise
        weight = self.pointwise.weight
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            dw.kernel_size,
            stride=dw.stride,
            padding=dw.padding,
            dilation=dw.dilation,
            bias=self.bias is not None,
            padding_mode=dw.padding_mode,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.dense_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-ready) that rebuild this layer's structure."""
        dw = self.depthwise
        padding = dw.padding if isinstance(dw.padding, str) else list(dw.padding)
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(dw.kernel_size),
            "kernel_channels": self.kernel_channels.tolist(),
            "stride": list(dw.stride),
            "padding": padding,
            "dilation": list(dw.dilation),
            "bias": self.bias is not None,
            "padding_mode": dw.padding_mode,
            "fused": bool(self.fused),
            "grouped": self.grouped,
        }

    def extra_repr(self) -> str:
        dw = self.depthwise
        parts = [
            f"C={self.in_channels}, G={self.n_kernels}, M={self.out_channels}",
            f"kernel_size={tuple(dw.kernel_size)}",
            f"stride={tuple(dw.stride)}",
        ]
        if dw.padding != (0, 0):
            parts.append(f"padding={dw.padding}")
        if dw.dilation != (1, 1):
            parts.append(f"dilation={tuple(dw.dilation)}")
        if dw.padding_mode != "zeros":
            parts.append(f"padding_mode={dw.padding_mode!r}")
        if self.bias is None:
            parts.append("bias=False")
        reduction = cost.mac_reduction(self.dense_macs, self.gdws_macs)
        parts.append(f"mac_reduction={reduction:.2f}x")
        parts.append(f"fused={self.fused}")
        if self.grouped:
            parts.append("grouped=True")
        return ", ".join(parts)


def _check_conv(conv: Any) -> None:
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv must be a torch.nn.Conv2d; got {type(conv).__name__}.")
    if conv.groups != 1:
        raise ValueError(
            f"conv has groups={conv.groups}; GDWS replaces convolutions with groups=1."
        )
