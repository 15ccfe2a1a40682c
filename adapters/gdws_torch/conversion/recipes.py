"""Recipes: named, immutable conversion settings, and :func:`compress`, which runs one.

A recipe says how the error of each GDWS layer is weighted, how a MAC budget is shared
between layers, and which training-free recovery follows the conversion. The budget
(a MAC target, a measured speed-up, a LEGO ``beta``) and the threat model stay the
caller's. :func:`compress` runs the whole recipe on a model and a loader of training
data, crafting the adversarial calibration inputs itself.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from gdws_approx import NetworkPlan
from gdws_approx.checks import check_integer, check_real
from gdws_torch.common import take_samples
from gdws_torch.conversion.options import Latency, Recovery, Weighting, from_legacy_keywords
from gdws_torch.recovery.refit import DEFAULT_TOLERANCE

__all__ = ["RECIPES", "Recipe", "RecipeInputs", "compress", "get_recipe", "recipe_inputs"]

#: The keywords of :func:`compress` that ``latency=Latency(...)`` replaces (deprecated).
COMPRESS_LEGACY_KEYWORDS = ("backend", "latency_batch_size", "latency_table", "device")

_WEIGHTINGS = ("unit", "noise_gains", "output", "data", "output+data")


@dataclass(frozen=True)
class Recipe:
    """How a model is compressed, besides the budget: copy one with :meth:`replace`.

    Parameters
    ----------
    name : str
    weighting : {"unit", "noise_gains", "output", "data", "output+data"}, default="unit"
        The per-layer error weighting (:func:`gdws_torch.conversion.weightings.weighting`).
    weighting_samples : int, default=256
        Training inputs the data-driven weightings average over.
    allocation : {"common_beta", "global"}, default="common_beta"
        How a ``target_mac_reduction`` is shared between layers
        (:func:`gdws_approx.plan_network`); other budgets ignore it.
    refit_samples : int, default=0
        Calibration inputs the GDWS factors are re-solved on by least squares to match
        the dense network (:func:`gdws_torch.recovery.refit_gdws`); 0: no refit.
    refit_depthwise : bool, default=True
        Re-solve the depthwise kernels too (alternating least squares), not only the
        pointwise weights.
    refit_iterations : int, default=3
        Alternations of the depthwise refit, at most.
    refit_tolerance : float, default=1e-3
        A layer stops alternating when an alternation lowers its error by less than this
        fraction (:class:`gdws_torch.Recovery`).
    refit_adversarial : bool, default=True
        Calibrate on PGD inputs crafted against the dense model (the threat model's
        ``epsilon``), not on the natural ones.
    recalibrate_samples : int, default=0
        Natural training inputs the BatchNorm statistics are re-estimated on, after the
        refit (:func:`gdws_torch.recalibrate_batchnorm`); 0: none.
    description : str, default=""
    """

    name: str
    weighting: str = "unit"
    weighting_samples: int = 256
    allocation: str = "common_beta"
    refit_samples: int = 0
    refit_depthwise: bool = True
    refit_iterations: int = 3
    refit_tolerance: float = DEFAULT_TOLERANCE
    refit_adversarial: bool = True
    recalibrate_samples: int = 0
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"name must be a non-empty string; got {self.name!r}.")
        if self.weighting not in _WEIGHTINGS:
            raise ValueError(f"weighting must be one of {_WEIGHTINGS}; got {self.weighting!r}.")
        if self.allocation not in ("common_beta", "global"):
            raise ValueError(
                f"allocation must be 'common_beta' or 'global'; got {self.allocation!r}."
            )
        check_integer(self.weighting_samples, "weighting_samples", minimum=1)
        for field in ("refit_samples", "refit_iterations", "recalibrate_samples"):
            check_integer(getattr(self, field), field, minimum=0)
        check_real(self.refit_tolerance, "refit_tolerance", minimum=0)

    @property
    def needs_data(self) -> bool:
        """Whether the recipe reads training data (weighting or recovery)."""
        return self.weighting not in ("unit", "output") or bool(
            self.refit_samples or self.recalibrate_samples
        )

    def replace(self, **changes: Any) -> Recipe:
        """A copy with ``changes`` (e.g. ``RECIPES["robust"].replace(refit_samples=500)``)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every setting, JSON-ready."""
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """One line: what the recipe does."""
        parts = [f"{self.weighting} weighting"]
        if self.allocation == "global":
            parts.append("global MAC allocation")
        if self.refit_samples:
            what = "joint" if self.refit_depthwise else "pointwise"
            kind = "PGD" if self.refit_adversarial else "natural"
            parts.append(f"{what} refit on {self.refit_samples} {kind} inputs")
        if self.recalibrate_samples:
            parts.append(f"BatchNorm re-estimated on {self.recalibrate_samples} inputs")
        if not (self.refit_samples or self.recalibrate_samples):
            parts.append("no recovery")
        return f"recipe {self.name!r}: " + ", ".join(parts)


RECIPES: dict[str, Recipe] = {
    "robust": Recipe(
        "robust",
        weighting="data",
        allocation="global",
        refit_samples=1000,
        refit_depthwise=True,
        refit_iterations=3,
        refit_adversarial=True,
        recalibrate_samples=1000,
        description="the best measured recipe for robust accuracy: the input-patch data "
        "weighting, the global MAC allocation, the joint refit of depthwise kernels and "
        "pointwise weights on PGD inputs, then BatchNorm re-estimated on natural inputs",
    ),
    "original": Recipe(
        "original",
        weighting="noise_gains",
        weighting_samples=512,
        description="the original work: LEGO with noise-gain alphas from PGD inputs, a "
        "common beta, no recovery",
    ),
    "unit": Recipe(
        "unit",
        description="LEGO with unit alphas and a common beta, no recovery: needs no data",
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


@dataclass(frozen=True)
class RecipeInputs:
    """What a recipe computes from the dense model and the data before converting: the
    error weights and the calibration inputs. Independent of the budget, so one
    :func:`recipe_inputs` serves every :func:`compress` call on the same model and data
    (a sweep over targets computes them once).

    Attributes
    ----------
    recipe : Recipe
    weighting : Weighting
        The error weights (``alphas``, ``output_weights``, ``input_transforms``; none
        for unit weights), with the recipe's ``allocation``.
    recovery : Recovery
        The refit on the calibration batches (PGD-perturbed when the recipe asks) and the
        BatchNorm re-estimation, as the recipe sets them.
    attack : dict
        The calibration attack: ``norm``, ``eps``, ``alpha``, ``steps``, ``seed``.
    seconds : dict
        Wall-clock seconds of computing them: ``weighting``, ``calibration``.
    """

    recipe: Recipe
    weighting: Weighting
    recovery: Recovery
    attack: dict
    seconds: dict = dataclasses.field(default_factory=dict)


def recipe_inputs(
    model: nn.Module,
    data: Iterable | None,
    recipe: str | Recipe = "robust",
    *,
    epsilon: float = 8 / 255,
    attack_steps: int = 10,
    attack_alpha: float | None = None,
    input_size: Sequence[int] = (3, 32, 32),
    seed: int = 0,
    progress: bool = False,
) -> RecipeInputs:
    """The weights and calibration inputs of ``recipe`` for ``model`` and ``data``.

    See :func:`compress` for the parameters. ``model`` is not modified (it is put in eval
    mode for the attack and the statistics, and its mode restored).
    """
    from gdws_torch.nn.module_tree import eval_mode
    from gdws_torch.robustness.attacks import PGD

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    chosen = get_recipe(recipe)
    epsilon = check_real(epsilon, "epsilon", minimum=0, strict=True, maximum=1, unit="pixel units")
    check_integer(attack_steps, "attack_steps", minimum=1)
    if chosen.needs_data and data is None:
        raise ValueError(f"recipe {chosen.name!r} reads training data: give data (a loader).")
    if attack_alpha is None:
        attack_alpha = 2.5 * epsilon / attack_steps
    attack_alpha = check_real(
        attack_alpha, "attack_alpha", minimum=0, strict=True, unit="pixel units"
    )
    attack = {"eps": epsilon, "alpha": attack_alpha, "steps": attack_steps}
    seconds = {}
    with eval_mode(model):
        start = time.perf_counter()
        weighting = Weighting(allocation=chosen.allocation)
        if chosen.weighting != "unit":
            extra = {}
            if chosen.weighting == "noise_gains":
                attacker = PGD(model, **attack, seed=seed)
                extra["noise_gain_kwargs"] = {"attack": attacker, "progress": progress}
            weighting = Weighting.from_strategy(
                chosen.weighting,
                model,
                input_size,
                loader=data,
                n_samples=chosen.weighting_samples,
                allocation=chosen.allocation,
                **extra,
            )
        seconds["weighting"] = time.perf_counter() - start
        start = time.perf_counter()
        calibration = None
        if chosen.refit_samples:
            crafter = PGD(model, **attack, seed=seed) if chosen.refit_adversarial else None
            calibration = _first_inputs(data, chosen, crafter, progress)
        seconds["calibration"] = time.perf_counter() - start
    recovery = Recovery(
        refit=calibration,
        refit_samples=chosen.refit_samples or 1,
        refit_depthwise=chosen.refit_depthwise,
        refit_iterations=chosen.refit_iterations,
        refit_tolerance=chosen.refit_tolerance,
        recalibrate=data if chosen.recalibrate_samples else None,
        recalibrate_samples=chosen.recalibrate_samples or 1,
    )
    return RecipeInputs(
        chosen,
        weighting,
        recovery,
        {"norm": "Linf", **attack, "random_start": True, "seed": seed},
        seconds,
    )


def compress(
    model: nn.Module,
    data: Iterable | None = None,
    *,
    target_mac_reduction: float | None = None,
    target_speedup: float | None = None,
    beta: float | None = None,
    recipe: str | Recipe = "robust",
    epsilon: float = 8 / 255,
    attack_steps: int = 10,
    attack_alpha: float | None = None,
    input_size: Sequence[int] = (3, 32, 32),
    inputs: RecipeInputs | None = None,
    latency: Latency | None = None,
    seed: int = 0,
    progress: bool = False,
    convert_options: dict[str, Any] | None = None,
    require_target: bool = True,
    **deprecated: Any,
) -> tuple[nn.Module, NetworkPlan]:
    """``model`` converted to GDWS and recovered by ``recipe``, in one call.

    Give one budget: ``target_mac_reduction``, ``target_speedup`` (measured where
    ``latency`` says) or ``beta``. The recipe's weighting, allocation and recovery run in
    order; its adversarial calibration inputs are crafted here by Linf PGD against the
    dense model (radius ``epsilon`` in pixel units, ``attack_steps`` steps of
    ``attack_alpha``, one seeded random start).

    Parameters
    ----------
    model : torch.nn.Module
        Takes pixels in ``[0, 1]`` (normalisation inside). Not modified.
    data : iterable of (inputs, labels), optional
        Training data (a ``DataLoader``), read in its order: the first
        ``refit_samples`` inputs calibrate the refit, and the BatchNorm re-estimation
        and weightings read as many as they need. Needed when the recipe reads data
        (:attr:`Recipe.needs_data`).
    target_mac_reduction, target_speedup, beta : float, optional
        The budget (exactly one).
    recipe : str or Recipe, default="robust"
        A name from :data:`RECIPES` or a :class:`Recipe`.
    epsilon : float, default=8/255
        The Linf radius of the calibration attack (the threat model the model was
        trained for).
    attack_steps : int, default=10
    attack_alpha : float, optional
        The attack's step, default ``2.5 * epsilon / attack_steps`` (Madry et al.'s rule).
    input_size : sequence of int, default=(3, 32, 32)
        One sample's shape (MACs, weightings, latency).
    inputs : RecipeInputs, optional
        Computed by :func:`recipe_inputs` for this model and data: then ``data``,
        ``recipe``, ``epsilon``, ``attack_steps`` and ``seed`` are taken from it and
        nothing is computed again.
    latency : Latency, optional
        Where a ``target_speedup`` is measured, or ``keep_faster``
        (:class:`gdws_torch.Latency`, as :func:`gdws_torch.convert` takes it).
    seed : int, default=0
        Seed of the attack's random start.
    progress : bool, default=False
    convert_options : dict, optional
        Further :func:`gdws_torch.convert` keywords (``layers``, ``exclude``,
        ``skip_first``, ``only_if_cheaper``, ``svd_solver``).
    require_target : bool, default=True
        With ``target_speedup``: a target the measurement does not reach raises
        :class:`~gdws_torch.conversion.speed_target.SpeedTargetMissed` before the
        recovery runs; ``False`` accepts the closest model (``report.latency["reached"]``).
    **deprecated
        ``backend``, ``latency_batch_size``, ``latency_table``, ``device``: the settings
        ``latency`` replaces, with a ``FutureWarning`` until the next release.

    Returns
    -------
    converted : torch.nn.Module
        In ``model``'s train/eval mode.
    report : gdws_approx.NetworkPlan
        The conversion's report; ``report.recipe`` holds the recipe's settings and the
        calibration attack.

    Examples
    --------
    >>> from gdws_torch import compress, RECIPES  # doctest: +SKIP
    >>> fast, report = compress(model, train_loader, target_mac_reduction=2)  # doctest: +SKIP
    >>> gentle = RECIPES["robust"].replace(refit_samples=500)  # doctest: +SKIP
    """
    from gdws_torch.conversion.convert import convert

    if set(deprecated) - set(COMPRESS_LEGACY_KEYWORDS):
        unknown = sorted(set(deprecated) - set(COMPRESS_LEGACY_KEYWORDS))[0]
        raise TypeError(f"compress() got an unexpected keyword argument {unknown!r}.")
    latency = from_legacy_keywords(deprecated, {"latency": latency}, function="compress")["latency"]
    budgets = {
        "target_mac_reduction": target_mac_reduction,
        "target_speedup": target_speedup,
        "beta": beta,
    }
    given = {k: v for k, v in budgets.items() if v is not None}
    if len(given) != 1:
        raise ValueError(
            f"give exactly one of target_mac_reduction, target_speedup, beta; got {sorted(given)}."
        )
    computed_here = inputs is None
    if inputs is None:
        inputs = recipe_inputs(
            model,
            data,
            recipe,
            epsilon=epsilon,
            attack_steps=attack_steps,
            attack_alpha=attack_alpha,
            input_size=input_size,
            seed=seed,
            progress=progress,
        )
    elif not isinstance(inputs, RecipeInputs):
        raise TypeError(f"inputs must be a RecipeInputs; got {type(inputs).__name__}.")
    chosen = inputs.recipe
    weighting = inputs.weighting
    if target_mac_reduction is None:  # the allocation shares a MAC target only
        weighting = dataclasses.replace(weighting, allocation="common_beta")
    converted, report = convert(
        model,
        **given,
        **dict(convert_options or {}),
        weighting=weighting,
        recovery=inputs.recovery,
        latency=latency,
        input_size=input_size,
        progress=progress,
        require_target=require_target,
    )
    report.recipe = {**chosen.to_dict(), "calibration_attack": inputs.attack}
    if computed_here:  # the stages of this call, in the order they ran
        report.seconds = {**inputs.seconds, **(report.seconds or {})}
    return converted, report


def _first_inputs(
    data: Iterable, recipe: Recipe, crafter: Any, progress: bool = False
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``refit_samples`` inputs of ``data``, PGD-perturbed by ``crafter``."""
    batches = take_samples(
        data,
        recipe.refit_samples,
        stage="calibration",
        labels=True,
        name=f"recipe {recipe.name!r}: refit_samples",
        hint="Use recipe.replace(refit_samples=...).",
    )
    kind = "PGD calibration" if crafter else "calibration"
    crafted = []
    with tqdm(total=recipe.refit_samples, desc=kind, unit="input", disable=not progress) as bar:
        for images, labels, *_ in batches:
            crafted.append((crafter(images, labels) if crafter else images, labels))
            bar.update(len(images))
    return crafted
