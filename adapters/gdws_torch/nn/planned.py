"""Every planned form: one builder (the module a :class:`~gdws_approx.LayerPlan` says), and
the compressed layers of a model."""

from __future__ import annotations

from torch import nn

from gdws_approx import LayerPlan
from gdws_torch.nn.layers import GDWSConv2d
from gdws_torch.nn.lowrank import LowRankConv2d

__all__ = ["build_layer", "compressed_layers"]


def build_layer(plan: LayerPlan, conv: nn.Conv2d, fused: bool = False) -> nn.Module:
    """The layer ``plan`` planned for ``conv``, in its form (:attr:`LayerPlan.form`).

    ``"gdws"`` and ``"grouped"``: a :class:`~gdws_torch.GDWSConv2d`
    (:meth:`GDWSConv2d.from_plan`); ``"lowrank"`` and ``"gdws_lowrank"``: a
    :class:`~gdws_torch.LowRankConv2d` (:meth:`LowRankConv2d.from_plan`). ``fused`` sets
    the GDWS convs' fused mode. ``conv`` is not modified.

    Raises
    ------
    ValueError
        A plan that keeps the layer dense (nothing to build).
    """
    if plan.form == "dense":
        raise ValueError(f"layer {plan.name!r} is planned dense: there is nothing to build.")
    if plan.form in ("lowrank", "gdws_lowrank"):
        return LowRankConv2d.from_plan(plan, conv, fused=fused)
    return GDWSConv2d.from_plan(plan, conv, fused=fused)


def compressed_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``model``'s compressed layers by name, in module order: every
    :class:`~gdws_torch.LowRankConv2d` and every :class:`~gdws_torch.GDWSConv2d` that is
    not the first stage of one."""
    inner = {id(m.first) for m in model.modules() if isinstance(m, LowRankConv2d)}
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, LowRankConv2d)
        or (isinstance(module, GDWSConv2d) and id(module) not in inner)
    ]
