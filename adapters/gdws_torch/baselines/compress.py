"""``compress_baseline``: one entry for the three training-free baselines."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from gdws_approx.checks import check_integer, check_real
from gdws_torch.baselines import dws, lowrank, pruning
from gdws_torch.baselines.common import (
    BaselineReport,
    OutOfReach,
    layer_sites,
    take_batches,
)
from gdws_torch.conversion.eligibility import LayerPredicate, eligible_convs
from gdws_torch.cost.macs import count_macs
from gdws_torch.recovery import calibration_inputs, recalibrate_batchnorm, refit_gdws

__all__ = ["CRITERIA", "METHODS", "compress_baseline"]

#: The baselines :func:`compress_baseline` builds.
METHODS = ("dws", "lowrank", "prune")
#: The criteria of each method; the first is the data-free one.
CRITERIA = {
    "dws": ("weights",),
    "lowrank": ("weights", "responses"),
    "prune": ("l1", "reconstruction"),
}
#: The criteria that need calibration data.
DATA_CRITERIA = ("responses", "reconstruction")


def compress_baseline(
    model: nn.Module,
    method: str,
    data: Iterable | None = None,
    *,
    target_mac_reduction: float,
    input_size: Sequence[int],
    criterion: str | None = None,
    n_samples: int = 256,
    refit: int = 0,
    refit_attack: Callable[[nn.Module], Any] | None = None,
    recalibrate: int = 0,
    ridge: float = 1e-4,
    layers: Iterable[str] | LayerPredicate | None = None,
    exclude: Iterable[str] = (),
    skip_first: bool = True,
    progress: bool = False,
) -> tuple[nn.Module, BaselineReport]:
    """``model`` compressed by a training-free baseline to a conv MAC target.

    The same budget as :func:`gdws_torch.convert`'s ``target_mac_reduction`` (every
    convolution of the network counted, by :func:`gdws_torch.count_macs`), the same
    eligible convolutions and the same recovery (least-squares refit, then BatchNorm
    re-estimation), so that a GDWS model and a baseline of equal conv MACs compare
    directly. ``docs/baselines.md`` describes each method.

    Parameters
    ----------
    model : torch.nn.Module
        The dense network; not modified.
    method : {"dws", "lowrank", "prune"}
        ``"dws"``: chosen layers become depthwise-separable (one depthwise kernel per input
        channel, the best such factors), the others stay dense. ``"lowrank"``: each layer
        a ``Kh x Kw`` conv to ``R`` channels then a ``1 x 1`` conv, ranks chosen over the
        network. ``"prune"``: whole output channels removed from the convs that feed one
        conv through BatchNorm and activations only, with that conv's matching inputs.
    data : iterable of images or of (images, labels), optional
        Calibration inputs (training data): for the data-driven criteria, the refit and
        the BatchNorm re-estimation. Not shuffled here.
    target_mac_reduction : float
        ``dense conv MACs / compressed conv MACs`` to reach, ``> 1``; the compressed
        model's conv MACs are at most ``dense / target`` (they may be fewer: DWS changes
        whole layers).
    input_size : sequence of int
        One input sample's shape (no batch dimension), for the MAC counts.
    criterion : str, optional
        What ranks the options: ``"weights"`` (``dws``, ``lowrank``: the weight error),
        ``"responses"`` (``lowrank``: the PCA of the dense layer's responses on ``data``),
        ``"l1"`` (``prune``: the filters' L1 norms, a uniform fraction per layer) or
        ``"reconstruction"`` (``prune``: each channel's share of the next conv's output
        on ``data``). Default: the data-driven one when ``data`` is given.
    n_samples : int, default=256
        Inputs of ``data`` (its first) the data-driven criteria average over.
    refit : int, default=0
        ``> 0``: refit on that many inputs of ``data`` by least squares, layer after layer
        in execution order, so that each changed layer matches the dense one: DWS's
        pointwise weights (:func:`gdws_torch.refit_pointwise`), the low-rank ``1 x 1``
        conv, the pruned convs' consumers (on the dense network's responses).
    refit_attack : callable, optional
        ``attack(model) -> attack(images, labels)``: refit on inputs made adversarial
        against the dense model (``data`` must carry labels).
    recalibrate : int, default=0
        ``> 0``: then re-estimate the BatchNorm statistics on that many inputs of ``data``
        (:func:`gdws_torch.recalibrate_batchnorm`).
    ridge : float, default=1e-4
        Relative Tikhonov regularisation of the refits (``0``: plain least squares).
    layers, exclude, skip_first
        The convolutions a method may change, as :func:`gdws_torch.eligible_convs` (for
        ``prune``: the convs whose outputs may be pruned).
    progress : bool, default=False
        Progress bars of the refit and the recalibration.

    Returns
    -------
    compressed : torch.nn.Module
        A new model, in ``model``'s train/eval modes.
    report : BaselineReport
        Per layer what it became and its MACs; the network's conv MACs before and after.

    Raises
    ------
    ValueError
        An unknown method or criterion, a target ``<= 1`` or out of reach (the message
        gives the largest reachable), no eligible or prunable convolution, missing data,
        a model ``torch.fx`` cannot trace (``prune``).
    TypeError
        ``model`` not a module, a count or target of the wrong type.

    Examples
    --------
    >>> from gdws_torch import compress_baseline
    >>> from gdws_torch.experiments.demo import INPUT_SHAPE, demo_network
    >>> small, report = compress_baseline(
    ...     demo_network(), "lowrank", target_mac_reduction=2.0, input_size=INPUT_SHAPE
    ... )
    >>> report.mac_reduction >= 2.0
    True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    if method not in METHODS:
        raise ValueError(
            f"method must be one of {METHODS}; got {method!r} (GDWS itself: "
            "gdws_torch.convert or gdws_torch.compress)."
        )
    target = check_real(
        target_mac_reduction,
        "target_mac_reduction",
        minimum=1,
        strict=True,
        unit="for example 2.0 for half the conv MACs",
    )
    n_samples = check_integer(n_samples, "n_samples", minimum=1)
    refit = check_integer(refit, "refit", minimum=0)
    recalibrate = check_integer(recalibrate, "recalibrate", minimum=0)
    ridge = check_real(ridge, "ridge", minimum=0)
    if refit_attack is not None and not callable(refit_attack):
        raise TypeError(f"refit_attack must be callable; got {type(refit_attack).__name__}.")
    if criterion is None:
        criterion = CRITERIA[method][-1 if data is not None else 0]
    if criterion not in CRITERIA[method]:
        raise ValueError(
            f"criterion for {method!r} must be one of {CRITERIA[method]}; got {criterion!r}."
        )
    needs = [
        what
        for what, needed in (
            (f"criterion {criterion!r}", criterion in DATA_CRITERIA),
            ("refit", refit > 0),
            ("recalibrate", recalibrate > 0),
        )
        if needed
    ]
    if needs and data is None:
        verb = "needs" if len(needs) == 1 else "need"
        raise ValueError(f"{' and '.join(needs)} {verb} calibration data: pass data=loader.")

    start = time.perf_counter()
    device = _device(model)
    chosen = eligible_convs(model, layers=layers, exclude=exclude, skip_first=skip_first)
    dense_count = count_macs(model, input_size)
    dense_total = dense_count.conv_macs
    budget = dense_total / target
    batches = take_batches(data, n_samples, device) if criterion in DATA_CRITERIA else None
    try:
        built = _BUILDERS[method](
            model, chosen, dense_count, budget, criterion, batches, input_size, exclude
        )
    except OutOfReach as exc:
        reachable = dense_total / exc.least
        raise ValueError(
            f"target_mac_reduction={target:g} is out of reach for {method!r}: the network "
            f"reaches at most {reachable:.3f}x fewer conv MACs with it."
        ) from None
    compressed, finish = built
    seconds = {"compression": time.perf_counter() - start}

    refit_errors: dict[str, tuple[float, float]] = {}
    if refit > 0:
        start = time.perf_counter()
        crafter = None if refit_attack is None else refit_attack(copy.deepcopy(model).eval())
        calibration = [
            batch[0]
            for batch in calibration_inputs(data, refit, crafter, device=device, stage="refit")
        ]
        refit_errors = finish.refit(compressed, calibration, ridge, progress)
        seconds["refit"] = time.perf_counter() - start
    if recalibrate > 0:
        start = time.perf_counter()
        recalibrate_batchnorm(compressed, data, recalibrate, inplace=True, progress=progress)
        seconds["recalibration"] = time.perf_counter() - start
    count = count_macs(compressed, input_size)
    if count.conv_macs > budget * (1 + 1e-9):
        raise RuntimeError(
            f"internal error: {method} planned within {budget:,.0f} conv MACs but the "
            f"compressed model counts {count.conv_macs:,}."
        )
    report = BaselineReport(
        method=method,
        criterion=criterion,
        target_mac_reduction=target,
        dense_macs=dense_total,
        macs=count.conv_macs,
        layers=finish.report(count),
        refit_samples=refit,
        recalibrate_samples=recalibrate,
        refit_errors=refit_errors,
        seconds=seconds,
    )
    return compressed, report


def _device(model: nn.Module) -> torch.device:
    reference = next(iter(model.parameters()), None)
    return torch.device("cpu") if reference is None else reference.device


class _Finish:
    """What a builder leaves for the refit and the report."""

    def __init__(self, refit, report) -> None:
        self.refit, self.report = refit, report


def _build_dws(model, chosen, dense_count, budget, criterion, batches, input_size, exclude):
    sites = layer_sites(dense_count, chosen, input_size)
    other = dense_count.conv_macs - sum(site.macs for site in sites)
    try:
        replaced, errors = dws.plan_dws(sites, budget - other)
    except OutOfReach as exc:
        raise OutOfReach(exc.least + other) from None
    compressed = copy.deepcopy(model)
    dws.build_dws(compressed, sites, replaced)

    def refit(compressed, calibration, ridge, progress):
        if not any(replaced.values()):
            return {}
        _, errors = refit_gdws(
            model,
            compressed,
            calibration,
            sum(len(batch) for batch in calibration),
            depthwise=False,
            ridge=ridge,
            inplace=True,
            progress=progress,
            return_errors=True,
        )
        return {name: (values[0], values[-1]) for name, values in errors.items()}

    return compressed, _Finish(refit, lambda count: dws.dws_report(sites, replaced, errors, count))


def _build_lowrank(model, chosen, dense_count, budget, criterion, batches, input_size, exclude):
    sites = layer_sites(dense_count, chosen, input_size)
    other = dense_count.conv_macs - sum(site.macs for site in sites)
    moments = None
    if criterion == "responses":
        moments = lowrank.response_moments(model, sites, batches)
    try:
        ranks, errors, bases = lowrank.plan_lowrank(sites, budget - other, moments)
    except OutOfReach as exc:
        raise OutOfReach(exc.least + other) from None
    compressed = copy.deepcopy(model)
    lowrank.build_lowrank(compressed, sites, ranks, bases)

    def refit(compressed, calibration, ridge, progress):
        return lowrank.refit_lowrank(compressed, sites, calibration, ridge)

    return compressed, _Finish(
        refit, lambda count: lowrank.lowrank_report(sites, ranks, errors, count)
    )


def _build_prune(model, chosen, dense_count, budget, criterion, batches, input_size, exclude):
    names = {name for name, _ in chosen}
    excluded = set(exclude)
    pairs = [
        pair
        for pair in pruning.prunable_pairs(model)
        if pair.producer in names and pair.consumer not in excluded
    ]
    if not pairs:
        raise ValueError(
            f"{type(model).__name__} has no prunable convolution: none of the eligible convs "
            "feeds exactly one conv through BatchNorm and activations only (docs/baselines.md)."
        )
    for pair in pairs:
        for name in (pair.producer, pair.consumer):
            calls = [layer for layer in dense_count.layers if layer.name == name]
            if len(calls) != 1:
                raise ValueError(
                    f"layer {name!r} runs {len(calls)} times at input_size "
                    f"{tuple(input_size)}; only convolutions called once can be pruned."
                )
    involved = {n for pair in pairs for n in (pair.producer, pair.consumer)}
    other = dense_count.conv_macs - sum(dense_count[name].macs for name in involved)
    errors = pruning.channel_errors(model, pairs, criterion, batches)
    try:
        keep = pruning.plan_pruning(model, pairs, errors, criterion, dense_count, budget - other)
    except OutOfReach as exc:
        raise OutOfReach(exc.least + other) from None
    compressed = pruning.prune_channels(model, keep)

    def refit(compressed, calibration, ridge, progress):
        return pruning.refit_pruned(model, compressed, pairs, keep, calibration, ridge)

    return compressed, _Finish(
        refit,
        lambda count: pruning.pruning_report(model, pairs, keep, errors, dense_count, count),
    )


_BUILDERS = {"dws": _build_dws, "lowrank": _build_lowrank, "prune": _build_prune}
