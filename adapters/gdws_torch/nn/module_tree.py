"""Operations on a model's tree of modules."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from gdws_approx import cost
from gdws_torch.nn.layers import GDWSConv2d

__all__ = ["eval_mode", "pad_kernels", "replace_module", "set_fused"]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with every module in eval mode; on exit (errors included) each module gets
    back its own mode, not just the root's (a model may hold frozen submodules)."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for module, training in modes:
            module.training = training


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Set the submodule at dotted path ``name`` of ``model`` to ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def pad_kernels(model: nn.Module, multiple: int = 4) -> nn.Module:
    """Pad every :class:`GDWSConv2d` of ``model`` (in place) to ``G`` a multiple of ``multiple``.

    Outputs do not change (zero kernels, see :meth:`GDWSConv2d.padded`); returns ``model``.
    ``multiple`` is an integer from 1 to 64.
    """
    multiple = cost.check_kernel_multiple(multiple, "multiple")
    for name, module in list(model.named_modules()):
        if isinstance(module, GDWSConv2d):
            padded = module.padded(multiple)
            if padded is not module:
                replace_module(model, name, padded)
    return model


def set_fused(model: nn.Module, fused: bool = True) -> nn.Module:
    """Switch every :class:`GDWSConv2d` of ``model`` to fused (or explicit) mode; returns it."""
    for module in model.modules():
        if isinstance(module, GDWSConv2d):
            module.fused = bool(fused)
    return model
