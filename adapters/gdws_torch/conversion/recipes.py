"""Recipes: named, immutable conversion settings besides the budget.

A recipe composes the option objects: how the error of each layer is weighted
(:class:`~gdws_torch.conversion.options.Weighting`), how a MAC budget is shared between
layers (``allocation``) and which training-free recovery follows the conversion
(:class:`~gdws_torch.conversion.options.Recovery`). The budget (a MAC target, a measured
speed-up, a LEGO ``beta``, kernels) and the threat model stay the caller's.
:func:`gdws_torch.compress` runs one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from gdws_torch.conversion.options import (
    BatchNormStatistics,
    Recovery,
    Refit,
    Weighting,
    check_allocation,
)

__all__ = ["RECIPES", "Recipe", "get_recipe"]


@dataclass(frozen=True)
class Recipe:
    """How a model is compressed, besides the budget: copy one with :meth:`replace`.

    Parameters
    ----------
    name : str
    weighting : Weighting, default=Weighting()
        The per-layer error weighting (unit by default).
    allocation : {"common_beta", "global"}, default="common_beta"
        How a ``target_mac_reduction`` is shared between layers
        (:func:`gdws_approx.plan_network`); other budgets ignore it.
    recovery : Recovery, default=Recovery()
        The training-free recovery after the conversion (none by default).
    description : str, default=""

    Examples
    --------
    >>> from gdws_torch import RECIPES, Recovery, Refit
    >>> gentle = RECIPES["robust"].replace(name="gentle", recovery=Recovery(refit=Refit(500)))
    >>> gentle.recovery.refit.samples, gentle.recovery.batchnorm
    (500, None)
    """

    name: str
    weighting: Weighting = field(default_factory=Weighting)
    allocation: str = "common_beta"
    recovery: Recovery = field(default_factory=Recovery)
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"name must be a non-empty string; got {self.name!r}.")
        if not isinstance(self.weighting, Weighting):
            raise TypeError(
                f"weighting must be a Weighting; got {type(self.weighting).__name__} "
                "(e.g. Weighting('data'))."
            )
        check_allocation(self.allocation)
        if not isinstance(self.recovery, Recovery):
            raise TypeError(f"recovery must be a Recovery; got {type(self.recovery).__name__}.")
        if not isinstance(self.description, str):
            raise TypeError(f"description must be a string; got {self.description!r}.")

    @property
    def needs_data(self) -> bool:
        """Whether the recipe reads training data (weighting or recovery)."""
        return self.weighting.needs_data or self.recovery.needs_data

    @property
    def crafts(self) -> bool:
        """Whether the recipe crafts adversarial inputs (noise gains, refit, BatchNorm)."""
        return self.weighting.strategy == "noise_gains" or self.recovery.adversarial

    def replace(self, **changes: Any) -> Recipe:
        """A copy with ``changes`` (e.g. ``recipe.replace(allocation="common_beta")``)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every setting, JSON-ready (an option that is off is ``None``)."""
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """One line: what the recipe does."""
        parts = [self.weighting.summary()]
        if self.allocation == "global":
            parts.append("global MAC allocation")
        refit, batchnorm = self.recovery.refit, self.recovery.batchnorm
        if refit is not None:
            what = "joint" if refit.depthwise else "pointwise"
            kind = "PGD" if refit.adversarial else "natural"
            parts.append(f"{what} refit on {refit.samples} {kind} inputs")
        if batchnorm is not None:
            kind = " natural and PGD" if batchnorm.adversarial else ""
            parts.append(f"BatchNorm re-estimated on {batchnorm.samples}{kind} inputs")
        if refit is None and batchnorm is None:
            parts.append("no recovery")
        return f"recipe {self.name!r}: " + ", ".join(parts)


RECIPES: dict[str, Recipe] = {
    "robust": Recipe(
        "robust",
        weighting=Weighting("data", samples=256),
        allocation="global",
        recovery=Recovery(
            refit=Refit(samples=1000, adversarial=True, depthwise=True, iterations=3),
            batchnorm=BatchNormStatistics(samples=1000),
        ),
        description="the best measured recipe for robust accuracy: the input-patch data "
        "weighting, the global MAC allocation, the joint refit of depthwise kernels and "
        "pointwise weights on PGD inputs, then BatchNorm re-estimated on natural inputs",
    ),
    "original": Recipe(
        "original",
        weighting=Weighting("noise_gains", samples=512),
        description="the original work: LEGO with noise-gain channel weights from PGD "
        "inputs, a common beta, no recovery",
    ),
    "unit": Recipe(
        "unit",
        description="LEGO with unit weights and a common beta, no recovery: needs no data",
    ),
}


def get_recipe(recipe: str | Recipe) -> Recipe:
    """The :class:`Recipe` of a name from :data:`RECIPES`, or ``recipe`` itself."""
    if isinstance(recipe, Recipe):
        return recipe
    if not isinstance(recipe, str):
        raise TypeError(f"recipe must be a name or a Recipe; got {type(recipe).__name__}.")
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)} or a Recipe; got {recipe!r}.")
    return RECIPES[recipe]
