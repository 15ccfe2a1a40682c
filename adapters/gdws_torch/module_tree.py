"""Operations on a model's tree of modules."""

from __future__ import annotations

from torch import nn

__all__ = ["replace_module"]


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Set the submodule at dotted path ``name`` of ``model`` to ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
