"""The pipeline: from a dense model and a recipe to a compressed model, in three stages.

1. :func:`recipe_inputs`: the recipe's error weights and calibration inputs (the first
   training inputs, PGD-perturbed against the dense model when the refit is
   adversarial). Independent of the budget: computed once, shared by every budget of a
   sweep.
2. :func:`gdws_torch.convert`: the conversion for one budget.
3. :func:`gdws_torch.recover`: the recipe's recovery on the calibration inputs and the
   training data.

:func:`compress` chains them: the one route from a model to a compressed model, which
the command line, the sweep, the demo and the benchmarks all take.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gdws_approx.checks import check_integer, check_real
from gdws_torch.conversion.convert import convert
from gdws_torch.conversion.eligibility import LayerPredicate, eligible_convs
from gdws_torch.conversion.options import ErrorWeights, Latency
from gdws_torch.conversion.recipes import Recipe, get_recipe
from gdws_torch.conversion.recover import recover
from gdws_torch.conversion.reports import CompressionReport
from gdws_torch.conversion.weightings import input_patch_moments
from gdws_torch.nn.module_tree import eval_mode
from gdws_torch.recovery.calibration import calibration_inputs
from gdws_torch.robustness.attacks import PGD

__all__ = ["CalibrationAttack", "RecipeInputs", "compress", "recipe_inputs"]


@dataclass(frozen=True)
class CalibrationAttack:
    """The attack that crafts a recipe's adversarial inputs: Linf PGD, one seeded random
    start (the noise gains' inputs, the refit's calibration inputs, and the BatchNorm
    statistics' adversarial inputs).

    Parameters
    ----------
    eps : float, default=8/255
        The Linf radius, in pixel units: the threat model the model was trained for.
    steps : int, default=10
    alpha : float, optional
        The step, in pixel units; default ``2.5 * eps / steps`` (Madry et al.'s rule).
    seed : int, default=0

    Calling it on a model gives the :class:`gdws_torch.PGD` attack on that model.
    """

    eps: float = 8 / 255
    steps: int = 10
    alpha: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_real(self.eps, "eps", minimum=0, strict=True, maximum=1, unit="pixel units")
        check_integer(self.steps, "attack_steps", minimum=1)
        if self.alpha is None:
            object.__setattr__(self, "alpha", 2.5 * self.eps / self.steps)
        check_real(self.alpha, "attack_alpha", minimum=0, strict=True, unit="pixel units")

    def __call__(self, model: nn.Module) -> PGD:
        """The attack on ``model``."""
        return PGD(model, eps=self.eps, alpha=self.alpha, steps=self.steps, seed=self.seed)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, in the attacks' keywords."""
        return {
            "norm": "Linf",
            "eps": self.eps,
            "alpha": self.alpha,
            "steps": self.steps,
            "random_start": True,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class RecipeInputs:
    """What a recipe computes from the dense model and the data before converting.

    Independent of the budget: one :func:`recipe_inputs` serves every :func:`compress`
    call on the same model and data (a sweep over targets computes them once).

    Attributes
    ----------
    recipe : Recipe
    error_weights : ErrorWeights
        The recipe's weighting computed on the model (or the weights given).
    calibration : list of tuple of torch.Tensor or None
        The first ``recipe.recovery.refit.samples`` training inputs as ``(images, labels)``
        batches, PGD-perturbed against the dense model when the refit is adversarial;
        ``None`` without a refit. The refit and the latency planner's input moments read
        them.
    attack : CalibrationAttack
        The attack that crafts the adversarial inputs.
    data : iterable or None
        The training data, which the BatchNorm statistics read.
    seconds : mapping of str to float
        Wall-clock seconds of computing them: ``weighting``, ``calibration``.
    """

    recipe: Recipe
    error_weights: ErrorWeights
    calibration: list[tuple[torch.Tensor, ...]] | None
    attack: CalibrationAttack
    data: Iterable | None = None
    seconds: Mapping[str, float] = field(default_factory=dict)
    _moments: dict[str, torch.Tensor] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def speed_weights(self, model: nn.Module, layers: Sequence[str]) -> ErrorWeights:
        """The error weights of a ``target_speedup`` plan of ``layers``: with the
        calibration inputs' input-patch moments of those layers, so that every form is
        compared by its response error on them (computed on ``model`` once per layer and
        kept); the error weights alone without calibration inputs or when they are given
        already."""
        if not self.calibration or self.error_weights.input_moments is not None:
            return self.error_weights
        missing = [name for name in layers if name not in self._moments]
        if missing:
            self._moments.update(
                input_patch_moments(model, self.calibration, self.n_calibration, layers=missing)
            )
        moments = {name: self._moments[name] for name in layers}
        return dataclasses.replace(self.error_weights, input_moments=moments)

    @property
    def n_calibration(self) -> int:
        """How many calibration inputs there are."""
        return sum(len(batch[0]) for batch in self.calibration or ())

    def summary(self) -> dict[str, Any]:
        """What the inputs are, JSON-ready: the weights, the calibration inputs, the attack."""
        refit = self.recipe.recovery.refit
        kind = None if refit is None else ("PGD" if refit.adversarial else "natural")
        return {
            "error_weights": self.error_weights.summary(),
            "calibration_samples": self.n_calibration,
            "calibration": kind,
            "calibration_attack": self.attack.to_dict(),
        }


def recipe_inputs(
    model: nn.Module,
    data: Iterable | None,
    recipe: str | Recipe = "robust",
    *,
    eps: float = 8 / 255,
    attack_steps: int = 10,
    attack_alpha: float | None = None,
    input_size: Sequence[int] = (3, 32, 32),
    error_weights: ErrorWeights | None = None,
    seed: int = 0,
    progress: bool = False,
    reuse: RecipeInputs | None = None,
) -> RecipeInputs:
    """The error weights and calibration inputs of ``recipe`` for ``model`` and ``data``.

    See :func:`compress` for the parameters. ``model`` is not modified (it is put in eval
    mode for the attack and the statistics, and its mode restored).

    Parameters
    ----------
    reuse : RecipeInputs, optional
        Inputs computed before for the same model, data and input size (another recipe's):
        their error weights are taken when the recipes' weightings are the same (and,
        for noise gains, the attack), their calibration inputs when both refits read the
        same ones (as many, natural or crafted by the same attack). The rest is computed.
        A sweep over recipes computes each thing once this way.

    Returns
    -------
    RecipeInputs
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    chosen = get_recipe(recipe)
    attack = CalibrationAttack(eps=eps, steps=attack_steps, alpha=attack_alpha, seed=seed)
    if error_weights is not None:
        if not isinstance(error_weights, ErrorWeights):
            raise TypeError(
                "error_weights must be an ErrorWeights or None; got "
                f"{type(error_weights).__name__}."
            )
        if chosen.weighting.strategy != "unit":
            raise ValueError(
                f"error_weights replace the recipe's weighting, but recipe {chosen.name!r} "
                f"computes the {chosen.weighting.strategy!r} weighting: give a recipe with "
                "Weighting('unit'), or no error_weights."
            )
    if chosen.needs_data and data is None:
        raise ValueError(f"recipe {chosen.name!r} reads training data: give data (a loader).")
    shared_weights, calibration = _reusable(reuse, chosen, attack, data)
    if error_weights is None:
        error_weights = shared_weights
    seconds = {}
    with eval_mode(model):
        start = time.perf_counter()
        if error_weights is None:
            noise_attack = attack(model) if chosen.weighting.strategy == "noise_gains" else None
            error_weights = chosen.weighting.compute(
                model, data, input_size, attack=noise_attack, progress=progress
            )
        seconds["weighting"] = time.perf_counter() - start
        start = time.perf_counter()
        refit = chosen.recovery.refit
        if refit is not None and calibration is None:
            calibration = calibration_inputs(
                data,
                refit.samples,
                attack(model) if refit.adversarial else None,
                progress=progress,
                name=f"recipe {chosen.name!r}: recovery.refit.samples",
                hint="Use recipe.replace(recovery=Recovery(refit=Refit(samples=...), ...)).",
            )
        seconds["calibration"] = time.perf_counter() - start
    return RecipeInputs(chosen, error_weights, calibration, attack, data, seconds)


def _reusable(
    reuse: RecipeInputs | None, recipe: Recipe, attack: CalibrationAttack, data: Any
) -> tuple[ErrorWeights | None, list | None]:
    """What of ``reuse`` serves ``recipe``: its error weights and its calibration inputs
    (``None`` for what does not)."""
    if reuse is None:
        return None, None
    if not isinstance(reuse, RecipeInputs):
        raise TypeError(f"reuse must be a RecipeInputs or None; got {type(reuse).__name__}.")
    if reuse.data is not data:
        raise ValueError("reuse holds inputs computed on other data; give the same data.")
    weights = None
    strategy = recipe.weighting.strategy
    same_attack = strategy != "noise_gains" or reuse.attack == attack
    # Unit weights are not reused: the reused inputs' may be weights given, not computed.
    if strategy != "unit" and reuse.recipe.weighting == recipe.weighting and same_attack:
        weights = reuse.error_weights
    mine, theirs = recipe.recovery.refit, reuse.recipe.recovery.refit
    same = (
        mine is not None
        and theirs is not None
        and reuse.calibration is not None
        and (mine.samples, mine.adversarial) == (theirs.samples, theirs.adversarial)
        and (not mine.adversarial or reuse.attack == attack)
    )
    return weights, reuse.calibration if same else None


def compress(
    model: nn.Module,
    data: Iterable | None = None,
    *,
    beta: float | None = None,
    n_kernels: int | Mapping[str, int] | None = None,
    target_mac_reduction: float | None = None,
    target_speedup: float | None = None,
    recipe: str | Recipe = "robust",
    eps: float = 8 / 255,
    attack_steps: int = 10,
    attack_alpha: float | None = None,
    error_weights: ErrorWeights | None = None,
    input_size: Sequence[int] = (3, 32, 32),
    inputs: RecipeInputs | None = None,
    latency: Latency | None = None,
    layers: Iterable[str] | LayerPredicate | None = None,
    exclude: Iterable[str] = (),
    skip_first: bool = True,
    only_if_cheaper: bool = True,
    svd_solver: str = "auto",
    seed: int = 0,
    progress: bool = False,
    require_target: bool = True,
) -> tuple[nn.Module, CompressionReport]:
    """``model`` converted to GDWS and recovered by ``recipe``, in one call.

    Give one budget: ``target_mac_reduction`` (shared between layers as the recipe's
    ``allocation`` says), ``target_speedup`` (measured where ``latency`` says), ``beta``
    or ``n_kernels``. The stages run in order: :func:`recipe_inputs` (the recipe's
    weighting, and its calibration inputs crafted by Linf PGD against the dense model:
    radius ``eps`` in pixel units, ``attack_steps`` steps of ``attack_alpha``, one seeded
    random start), :func:`gdws_torch.convert`, then :func:`gdws_torch.recover`.

    Parameters
    ----------
    model : torch.nn.Module
        Takes pixels in ``[0, 1]`` (normalisation inside). Not modified.
    data : iterable of (images, labels), optional
        Training data (a ``DataLoader``), read in its order: the weighting, the
        calibration and the BatchNorm statistics read their first inputs. Needed when the
        recipe reads data (:attr:`Recipe.needs_data`).
    beta, n_kernels, target_mac_reduction, target_speedup : optional
        The budget (exactly one); see :func:`gdws_torch.convert`.
    recipe : str or Recipe, default="robust"
        A name from :data:`gdws_torch.RECIPES` or a :class:`gdws_torch.Recipe`.
    eps : float, default=8/255
        The Linf radius of the calibration attack (the threat model the model was
        trained for), in pixel units.
    attack_steps : int, default=10
    attack_alpha : float, optional
        The attack's step, default ``2.5 * eps / attack_steps``.
    error_weights : ErrorWeights, optional
        Error weights of one's own (e.g. the original work's noise-gain file:
        ``ErrorWeights(channel_weights=load_channel_weights(path))``), used instead of the
        recipe's weighting, which must then be ``Weighting("unit")``.
    input_size : sequence of int, default=(3, 32, 32)
        One sample's shape (MACs, weightings, latency).
    inputs : RecipeInputs, optional
        Computed by :func:`recipe_inputs` for this model and data: then ``data``,
        ``recipe``, ``eps``, ``attack_steps``, ``attack_alpha``, ``error_weights`` and
        ``seed`` are taken from it and nothing is computed again.
    latency : Latency, optional
        Where a ``target_speedup`` is measured, or ``keep_faster``
        (:class:`gdws_torch.Latency`). A ``target_speedup`` plan compares the forms of
        every layer by their response error on the calibration inputs when the recipe
        has them (:class:`gdws_approx.ResponseErrors`).
    layers, exclude, skip_first, only_if_cheaper, svd_solver
        As :func:`gdws_torch.convert`.
    seed : int, default=0
        Seed of the attack's random start.
    progress : bool, default=False
    require_target : bool, default=True
        With ``target_speedup``: a target the measurement does not reach raises
        :class:`~gdws_torch.conversion.speed_target.SpeedTargetMissed` before the
        recovery runs; ``False`` accepts the closest model (``report.speed.reached``).

    Returns
    -------
    compressed : torch.nn.Module
        In ``model``'s train/eval mode.
    report : CompressionReport
        The recipe, what its inputs were, the conversion's and the recovery's reports,
        each stage's seconds; the plan's figures read directly (``report.mac_reduction``).

    Examples
    --------
    >>> from gdws_torch import RECIPES, Recovery, Refit, compress  # doctest: +SKIP
    >>> fast, report = compress(model, train_loader, target_mac_reduction=2)  # doctest: +SKIP
    >>> gentle = RECIPES["robust"].replace(recovery=Recovery(refit=Refit(500)))  # doctest: +SKIP
    """
    budgets = {
        "beta": beta,
        "n_kernels": n_kernels,
        "target_mac_reduction": target_mac_reduction,
        "target_speedup": target_speedup,
    }
    given = {k: v for k, v in budgets.items() if v is not None}
    if len(given) != 1:
        raise ValueError(f"give exactly one of {', '.join(budgets)}; got {sorted(given)}.")
    computed_here = inputs is None
    if inputs is None:
        inputs = recipe_inputs(
            model,
            data,
            recipe,
            eps=eps,
            attack_steps=attack_steps,
            attack_alpha=attack_alpha,
            input_size=input_size,
            error_weights=error_weights,
            seed=seed,
            progress=progress,
        )
    else:
        _check_shared_inputs(inputs, data, error_weights)
    chosen = inputs.recipe
    weights, seconds = inputs.error_weights, dict(inputs.seconds) if computed_here else {}
    if target_speedup is not None:
        start = time.perf_counter()
        chosen_convs = eligible_convs(model, layers=layers, exclude=exclude, skip_first=skip_first)
        weights = inputs.speed_weights(model, [name for name, _ in chosen_convs])
        if weights.input_moments is not None:
            seconds["input moments"] = time.perf_counter() - start
    converted, conversion = convert(
        model,
        **given,
        error_weights=weights,
        allocation=chosen.allocation if target_mac_reduction is not None else "common_beta",
        latency=latency,
        input_size=input_size,
        layers=layers,
        exclude=exclude,
        skip_first=skip_first,
        only_if_cheaper=only_if_cheaper,
        svd_solver=svd_solver,
        progress=progress,
        require_target=require_target,
    )
    seconds["conversion"] = conversion.seconds
    recovered, recovery = recover(
        converted,
        model,
        chosen.recovery,
        calibration=inputs.calibration,
        data=inputs.data,
        attack=inputs.attack,
        inplace=True,
        progress=progress,
    )
    seconds.update(recovery.seconds)
    report = CompressionReport(conversion, chosen, inputs.summary(), recovery, seconds)
    return recovered, report


def _check_shared_inputs(inputs: Any, data: Any, error_weights: Any) -> None:
    """``inputs`` given to :func:`compress`: nothing it holds may be given again."""
    if not isinstance(inputs, RecipeInputs):
        raise TypeError(f"inputs must be a RecipeInputs; got {type(inputs).__name__}.")
    if data is not None and data is not inputs.data:
        raise ValueError(
            "inputs hold the training data they were computed from; give data or inputs, "
            "not other data with them."
        )
    if error_weights is not None:
        raise ValueError("inputs hold the error weights; give error_weights or inputs.")
