"""Counting multiply-accumulates (MACs) of a torch model at a given input size."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gdws_torch.nn.layers import GDWSConv2d
from gdws_torch.nn.module_tree import eval_mode

__all__ = ["LayerMacs", "MacCount", "count_macs", "example_input"]


@dataclass
class LayerMacs:
    """MACs of one layer for one input sample.

    Attributes
    ----------
    name : str
    kind : {"conv", "gdws", "linear"}
    macs : int
    output_shape : tuple of int
        Output shape without the batch dimension.
    """

    name: str
    kind: str
    macs: int
    output_shape: tuple[int, ...]

    @property
    def output_pixels(self) -> int:
        """``H' * W'`` for a convolution."""
        return int(self.output_shape[-2] * self.output_shape[-1])


@dataclass
class MacCount:
    """Per-layer MACs of a model (per input sample), in execution order.

    Attributes
    ----------
    layers : list of LayerMacs
    conv_macs : int
        Convolutions (dense, grouped and GDWS).
    linear_macs : int
    total : int
    """

    layers: list[LayerMacs]
    conv_macs: int = field(init=False)
    linear_macs: int = field(init=False)
    total: int = field(init=False)

    def __post_init__(self) -> None:
        self.conv_macs = sum(la.macs for la in self.layers if la.kind in ("conv", "gdws"))
        self.linear_macs = sum(la.macs for la in self.layers if la.kind == "linear")
        self.total = self.conv_macs + self.linear_macs

    def __getitem__(self, name: str) -> LayerMacs:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no counted layer named {name!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "layers": [
                {"name": la.name, "kind": la.kind, "macs": la.macs, "output_shape": la.output_shape}
                for la in self.layers
            ],
            "conv_macs": self.conv_macs,
            "linear_macs": self.linear_macs,
            "total": self.total,
        }


def example_input(model: nn.Module, input_size: Sequence[int]) -> torch.Tensor:
    """A zero batch of one sample of shape ``(1, *input_size)`` on the model's device/dtype."""
    if isinstance(input_size, torch.Tensor) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in input_size
    ):
        raise ValueError(
            f"input_size must be a sequence of positive ints without the batch dimension, "
            f"for example (3, 32, 32); got {input_size!r}."
        )
    reference = next(iter(model.parameters()), None)
    if reference is None:
        reference = next(iter(model.buffers()), torch.empty(0))
    dtype = reference.dtype if reference.is_floating_point() else torch.get_default_dtype()
    return torch.zeros(1, *input_size, dtype=dtype, device=reference.device)


def _conv_macs(module: nn.Conv2d, output: torch.Tensor) -> int:
    kh, kw = module.kernel_size
    per_pixel = module.out_channels * (module.in_channels // module.groups) * kh * kw
    return per_pixel * output.shape[-2] * output.shape[-1]


def _layer_macs(module: nn.Module, output: torch.Tensor) -> tuple[str, int]:
    if isinstance(module, GDWSConv2d):
        return "gdws", module.gdws_macs * output.shape[-2] * output.shape[-1]
    if isinstance(module, nn.Conv2d):
        return "conv", _conv_macs(module, output)
    # Linear: in * out per output row; leading dimensions beyond the batch multiply it.
    rows = output[0].numel() // module.out_features
    return "linear", module.in_features * module.out_features * rows


@torch.no_grad()
def count_macs(model: nn.Module, input_size: Sequence[int]) -> MacCount:
    """MACs per input sample of every conv, GDWS conv and linear layer of ``model``.

    Runs one forward pass on a zero input of shape ``(1, *input_size)`` in eval mode (the
    model's mode is restored; nothing else changes) and counts, per call:
    ``M * (C / groups) * Kh * Kw * H' * W'`` for a convolution (grouped included),
    ``G * (Kh * Kw + M) * H' * W'`` for a :class:`GDWSConv2d` (the explicit form's cost,
    also when it runs fused), ``in_features * out_features`` per row for a linear layer.
    A layer called twice is counted twice. Other operations (BatchNorm, activations,
    pooling, additions) are not counted.

    Parameters
    ----------
    model : torch.nn.Module
    input_size : sequence of int
        One sample's shape without the batch dimension, for example ``(3, 32, 32)``.

    Returns
    -------
    MacCount
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    x = example_input(model, input_size)
    inside_gdws = {
        id(sub) for m in model.modules() if isinstance(m, GDWSConv2d) for sub in m.modules()
    } - {id(m) for m in model.modules() if isinstance(m, GDWSConv2d)}
    counted: list[LayerMacs] = []
    handles = []

    def hook(name: str):
        def record(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            kind, macs = _layer_macs(module, output)
            counted.append(LayerMacs(name, kind, int(macs), tuple(output.shape[1:])))

        return record

    for name, module in model.named_modules():
        if id(module) in inside_gdws:
            continue
        if isinstance(module, (GDWSConv2d, nn.Conv2d, nn.Linear)):
            handles.append(module.register_forward_hook(hook(name)))
    try:
        with eval_mode(model):
            try:
                model(x)
            except RuntimeError as exc:
                raise ValueError(
                    f"the model does not run on an input of size {tuple(input_size)} "
                    f"(batch dimension excluded): {exc}. Pass the input_size your model "
                    "expects."
                ) from exc
    finally:
        for handle in handles:
            handle.remove()
    return MacCount(counted)
