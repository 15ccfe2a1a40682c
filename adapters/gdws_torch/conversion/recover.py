"""The recovery stage: a converted model brought back towards the dense one, no training.

:func:`recover` runs the steps a :class:`~gdws_torch.conversion.options.Recovery` sets,
in order, each timed: the least-squares refit of every compressed layer on the
calibration inputs (:func:`gdws_torch.recovery.refit_gdws`), then the BatchNorm
statistics re-estimated on training inputs (:func:`gdws_torch.recalibrate_batchnorm`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from gdws_torch.conversion.options import Recovery
from gdws_torch.conversion.reports import RecoveryReport
from gdws_torch.nn.planned import compressed_layers
from gdws_torch.recovery import batchnorm_layers, recalibrate_batchnorm, refit_gdws

__all__ = ["recover"]


def recover(
    converted: nn.Module,
    dense: nn.Module,
    recovery: Recovery,
    *,
    calibration: Sequence[tuple[torch.Tensor, ...]] | None = None,
    data: Iterable | None = None,
    attack: Callable[[nn.Module], Any] | None = None,
    inplace: bool = False,
    progress: bool = False,
) -> tuple[nn.Module, RecoveryReport]:
    """``converted`` recovered by the steps of ``recovery``, in order.

    1. ``recovery.refit``: every compressed layer of ``converted`` (GDWS, low-rank) is
       re-solved by least squares to match the conv of ``dense`` it replaces, on the
       first ``refit.samples`` inputs of ``calibration`` (skipped when no layer is
       compressed).
    2. ``recovery.batchnorm``: the BatchNorm statistics are re-estimated on the first
       ``batchnorm.samples`` inputs of ``data`` (and, when ``adversarial``, on inputs
       crafted by ``attack`` against the converted model); skipped when the model has no
       BatchNorm layer.

    Parameters
    ----------
    converted : torch.nn.Module
        The converted model (:func:`gdws_torch.convert`); copied unless ``inplace``.
    dense : torch.nn.Module
        The model it was converted from (read only).
    recovery : Recovery
    calibration : sequence of (images, ...) tuples or of images, optional
        The calibration inputs, as :func:`gdws_torch.recipe_inputs` crafts them (natural
        or adversarial against ``dense``), or any loader of them; needed by
        ``recovery.refit``.
    data : iterable of (images, labels), optional
        Training data; needed by ``recovery.batchnorm``.
    attack : callable, optional
        ``attack(model) -> attack``: crafts the adversarial inputs of
        ``BatchNormStatistics(adversarial=True)`` against the converted model (e.g. a
        :class:`gdws_torch.CalibrationAttack`).
    inplace : bool, default=False
    progress : bool, default=False

    Returns
    -------
    recovered : torch.nn.Module
        In ``converted``'s train/eval modes.
    report : RecoveryReport
        The steps that ran and their seconds, those skipped and why, each refitted
        layer's error before and after.

    Raises
    ------
    TypeError
        ``recovery`` not a :class:`Recovery`, a model not a module.
    ValueError
        A step without its inputs (``calibration``, ``data``, ``attack``) or with fewer
        than it asks for. Checked before any step runs.
    """
    for name, value in (("converted", converted), ("dense", dense)):
        if not isinstance(value, nn.Module):
            raise TypeError(f"{name} must be a torch.nn.Module; got {type(value).__name__}.")
    if not isinstance(recovery, Recovery):
        raise TypeError(f"recovery must be a Recovery; got {type(recovery).__name__}.")
    _check_inputs(recovery, calibration, data, attack)
    model = converted if inplace else copy.deepcopy(converted)
    seconds, skipped, errors = {}, {}, {}
    if recovery.refit is not None:
        if not compressed_layers(model):
            skipped["refit"] = "no compressed layer"
        else:
            start = time.perf_counter()
            _, errors = refit_gdws(
                dense,
                model,
                calibration,
                recovery.refit.samples,
                depthwise=recovery.refit.depthwise,
                iterations=recovery.refit.iterations,
                tolerance=recovery.refit.tolerance,
                inplace=True,
                progress=progress,
                return_errors=True,
            )
            seconds["refit"] = time.perf_counter() - start
    if recovery.batchnorm is not None:
        if not batchnorm_layers(model):
            skipped["batchnorm"] = "no BatchNorm layer"
        else:
            start = time.perf_counter()
            recalibrate_batchnorm(
                model,
                data,
                recovery.batchnorm.samples,
                attack=attack if recovery.batchnorm.adversarial else None,
                inplace=True,
                progress=progress,
            )
            seconds["batchnorm"] = time.perf_counter() - start
    errors = {name: tuple(values) for name, values in errors.items()}
    return model, RecoveryReport(recovery, seconds, skipped, errors)


def _check_inputs(recovery: Recovery, calibration, data, attack) -> None:
    """Every step has what it reads, before any runs."""
    refit, batchnorm = recovery.refit, recovery.batchnorm
    if refit is not None:
        if calibration is None:
            raise ValueError(
                "recovery.refit needs calibration inputs: give calibration= (as "
                "gdws_torch.recipe_inputs crafts them)."
            )
        available = (
            sum(len(b[0] if isinstance(b, (tuple, list)) else b) for b in calibration)
            if isinstance(calibration, Sequence)
            else refit.samples  # a loader: the refit says when it runs out
        )
        if available < refit.samples:
            raise ValueError(
                f"calibration holds {available} inputs; recovery.refit.samples="
                f"{refit.samples} asks for more."
            )
    if batchnorm is not None:
        if data is None:
            raise ValueError("recovery.batchnorm needs training data: give data= (a loader).")
        if batchnorm.adversarial and attack is None:
            raise ValueError(
                "recovery.batchnorm.adversarial needs the attack that crafts its inputs: "
                "give attack= (e.g. gdws_torch.CalibrationAttack())."
            )
