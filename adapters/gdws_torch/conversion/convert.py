"""Whole-model conversion: replace the eligible convolutions of a torch model by GDWS ones.

The conversion stage of the pipeline (:func:`gdws_torch.compress` chains
:func:`gdws_torch.recipe_inputs`, :func:`convert` and :func:`gdws_torch.recover`): it
plans every layer for the budget and builds the layers; the recovery is the next stage.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gdws_approx import LayerSpec, plan_network
from gdws_approx.layer_names import find_entry
from gdws_torch.conversion.eligibility import LayerPredicate, eligible_convs
from gdws_torch.conversion.options import ErrorWeights, Latency, check_allocation
from gdws_torch.conversion.reports import ConversionReport
from gdws_torch.cost.latency import layer_input_shapes, time_layers
from gdws_torch.cost.macs import count_macs
from gdws_torch.nn.module_tree import pad_kernels, replace_module, set_fused
from gdws_torch.nn.planned import build_layer

__all__ = ["channel_weight", "convert", "pad_kernels", "replace_module", "set_fused"]


def convert(
    model: nn.Module,
    *,
    beta: float | None = None,
    n_kernels: int | Mapping[str, int] | None = None,
    target_mac_reduction: float | None = None,
    target_speedup: float | None = None,
    error_weights: ErrorWeights | None = None,
    allocation: str = "common_beta",
    latency: Latency | None = None,
    input_size: Sequence[int] = (3, 32, 32),
    layers: Iterable[str] | LayerPredicate | None = None,
    exclude: Iterable[str] = (),
    skip_first: bool = True,
    only_if_cheaper: bool = True,
    fused: bool = False,
    inplace: bool = False,
    svd_solver: str = "auto",
    progress: bool = False,
    require_target: bool = True,
) -> tuple[nn.Module, ConversionReport]:
    """Replace the eligible convolutions of ``model`` by optimal GDWS convolutions.

    Give one budget: ``beta`` (LEGO with this error budget for every layer, the original
    work's Algorithm 3), ``n_kernels`` (MEGO: a kernel budget for all layers or one per
    layer name), ``target_mac_reduction`` (the network's convolutions that many times
    cheaper at ``input_size``) or ``target_speedup`` (that many times faster, measured).
    With none, ``beta=0``: an exact representation. Conversion only: the recovery is
    :func:`gdws_torch.recover` (:func:`gdws_torch.compress` runs both).

    Parameters
    ----------
    model : torch.nn.Module
        Not modified unless ``inplace=True``.
    beta : float, optional
        LEGO's budget on each layer's weighted squared error.
    n_kernels : int or mapping of str to int, optional
        MEGO kernel budgets.
    target_mac_reduction : float, optional
        Overall ``dense conv MACs / converted conv MACs`` to reach (``> 1``), counting every
        convolution of the network, converted or not; shared between layers as
        ``allocation`` says.
    target_speedup : float, optional
        The measured speed-up (``> 1``) to reach on ``latency.backend``, ``.device`` and
        ``.batch_size``. Every eligible layer's latency, and the dense network's, are
        taken from ``latency.table`` (timed and cached when missing; a table file that
        fails its checks is refused), each layer becomes dense, GDWS, grouped
        (depthwise-separable at ``m = 1``), low-rank, ... (the forms of
        ``latency.forms``) at the size of least total response error whose predicted
        network latency meets the target (:func:`gdws_approx.plan_latency`; the error of
        every form is measured on ``error_weights.input_moments`` when given); then the
        converted network is timed against the dense one and, if it misses the target by
        more than 5 % either way and by more than the timing's spread, planned again (3
        attempts at most; the least-error attempt that reached the target is kept). The
        target is reached when the measured speed-up is at least 95 % of it and above 1.
        ``report.speed`` records the measurement, its spread and whether the target was
        reached (:mod:`gdws_torch.conversion.speed_target`).
    error_weights : ErrorWeights, optional
        The per-layer error weights (channel weights ``alpha``, output weights ``A``,
        input transforms ``B_c``, input moments); unit weights when ``None``.
        :meth:`gdws_torch.Weighting.compute` computes a named strategy's.
    allocation : {"common_beta", "global"}, default="common_beta"
        How a ``target_mac_reduction`` is met (:func:`gdws_approx.plan_network`): one
        LEGO ``beta`` for all layers, or the least total weighted error for the MACs.
        Only with ``target_mac_reduction``.
    latency : Latency, optional
        Backend, device, batch size and table for ``target_speedup``, and
        ``keep_faster`` (time every planned layer, keep the dense conv wherever GDWS is
        not faster). Eager PyTorch on the CPU at batch 1 when ``None``.
    input_size : sequence of int, default=(3, 32, 32)
        One input sample's shape (no batch dimension), for the MAC counts.
    layers, exclude, skip_first
        Which convolutions are eligible; see :func:`gdws_torch.eligible_convs`. A conv
        that the forward pass never calls is left as it is.
    only_if_cheaper : bool, default=True
        Keep a layer dense when its GDWS form would not need fewer MACs (the report says
        so). ``False`` replaces every eligible layer, as the original did.
    fused : bool, default=False
        Build the layers in fused mode (one dense conv with the reconstructed weight:
        faster robustness evaluation in eager PyTorch; the explicit form is the deployed one).
    inplace : bool, default=False
        Modify ``model`` itself instead of a deep copy. Planning errors leave it as it was.
    svd_solver : {"auto", "full", "covariance_eigh"}, default="auto"
    progress : bool, default=False
        Progress bars of timing layers for ``target_speedup``.
    require_target : bool, default=True
        With ``target_speedup``: a target not reached raises
        :class:`~gdws_torch.conversion.speed_target.SpeedTargetMissed` (a miss is never
        silent). ``False`` accepts the closest model; ``report.speed.reached`` then says
        whether it reached the target.

    Returns
    -------
    converted : torch.nn.Module
        The converted copy (or ``model`` when ``inplace``), in ``model``'s train/eval mode.
    report : ConversionReport
        The plan (per layer: name, shape, form, ``G``, multiplier histogram, weighted
        error, MACs before and after, whether it stays dense and why; network totals over
        all convolutions: ``report.dense_macs``, ``report.macs``,
        ``report.mac_reduction``), the speed measured, the seconds. Print it for a table,
        ``report.to_dict()`` for JSON.

    Raises
    ------
    TypeError
        A setting of the wrong type.
    ValueError
        No eligible convolution, a channel weight missing or of the wrong length, a
        budget that keeps no kernel in a layer, an unreachable target, a latency table
        refused. The model is untouched then.
    SpeedTargetMissed
        ``target_speedup`` measured out of reach, with ``require_target`` (the model is
        untouched; the exception's ``report`` has the measurements).

    Examples
    --------
    >>> from gdws_torch import convert
    >>> from gdws_torch.models import PreActResNet18
    >>> net = PreActResNet18().eval()
    >>> fast, report = convert(net, target_mac_reduction=2.0)  # doctest: +SKIP
    >>> print(report)  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    error_weights = ErrorWeights() if error_weights is None else error_weights
    latency = Latency() if latency is None else latency
    for name, value, cls in (
        ("error_weights", error_weights, ErrorWeights),
        ("latency", latency, Latency),
    ):
        if not isinstance(value, cls):
            article = "an" if cls.__name__[0] in "AEIOU" else "a"
            raise TypeError(
                f"{name} must be {article} {cls.__name__} or None; got {type(value).__name__}."
            )
    check_allocation(allocation)
    if not isinstance(require_target, bool):
        raise TypeError(f"require_target must be a bool; got {require_target!r}.")
    if allocation != "common_beta" and target_mac_reduction is None:
        raise ValueError(
            f"allocation={allocation!r} shares a target_mac_reduction between layers; give "
            "target_mac_reduction, or allocation='common_beta'."
        )
    if target_speedup is not None:
        budgets = {"beta": beta, "n_kernels": n_kernels}
        given = [name for name, value in budgets.items() if value is not None]
        given += ["target_mac_reduction"] * (target_mac_reduction is not None)
        given += ["latency.keep_faster"] * latency.keep_faster
        if given:
            raise ValueError(
                f"target_speedup is a budget of its own; it excludes {', '.join(given)}."
            )
    start = time.perf_counter()
    # Plan on the original (read only); copy only once everything is known to work.
    chosen = eligible_convs(model, layers=layers, exclude=exclude, skip_first=skip_first)
    macs = count_macs(model, input_size)
    specs = _layer_specs(chosen, macs, error_weights, input_size)
    names = {name for name, _ in chosen}
    other = sum(
        la.macs for la in macs.layers if la.kind in ("conv", "gdws") and la.name not in names
    )
    speed = None
    if target_speedup is not None:
        converted, plan, speed = _convert_for_speedup(
            model,
            specs,
            other,
            latency,
            input_size=input_size,
            target_speedup=target_speedup,
            svd_solver=svd_solver,
            fused=fused,
            inplace=inplace,
            require_target=require_target,
            progress=progress,
        )
    else:
        plan = plan_network(
            specs,
            beta=beta,
            n_kernels=n_kernels,
            target_mac_reduction=target_mac_reduction,
            other_macs=other,
            only_if_cheaper=only_if_cheaper,
            svd_solver=svd_solver,
            allocation=allocation,
        )
        converted, plan = _build(
            model, plan, latency, input_size=input_size, fused=fused, inplace=inplace
        )
    return converted, ConversionReport(plan, speed, time.perf_counter() - start)


def _layer_specs(chosen, macs, weights: ErrorWeights, input_size) -> list[LayerSpec]:
    """One :class:`~gdws_approx.LayerSpec` per eligible conv that runs exactly once."""
    specs = []
    for name, conv in chosen:
        calls = [layer for layer in macs.layers if layer.name == name]
        if not calls:  # defined but never called (e.g. WRN's sub_block1): nothing to convert
            continue
        if len(calls) != 1:
            raise ValueError(
                f"layer {name!r} runs {len(calls)} times in one forward pass at input_size "
                f"{tuple(input_size)}; only convolutions called exactly once can be planned. "
                "Exclude it with exclude=[...]."
            )
        specs.append(
            LayerSpec(
                name,
                conv.weight.detach(),
                calls[0].output_pixels,
                channel_weight(weights.channel_weights, name, conv),
                output_weights=_entry(weights.output_weights, name, "output_weights"),
                input_transforms=_entry(weights.input_transforms, name, "input_transforms"),
                input_moment=_input_moment(weights.input_moments, name, conv),
            )
        )
    if not specs:
        raise ValueError(
            "none of the eligible convolutions runs in a forward pass at input_size "
            f"{tuple(input_size)}; nothing to convert."
        )
    return specs


def _build(model, plan, latency: Latency, *, input_size, fused, inplace):
    """``model`` with the plan's layers built (and, with ``keep_faster``, timed)."""
    if latency.keep_faster:
        names = [layer.name for layer in plan.layers if layer.replaced]
        input_shapes = layer_input_shapes(model, names, input_size)
    converted = model if inplace else copy.deepcopy(model)
    modules = dict(converted.named_modules())
    originals, built = {}, {}
    for layer in plan.layers:
        if layer.replaced:
            originals[layer.name] = modules[layer.name]
            built[layer.name] = build_layer(layer, modules[layer.name], fused=fused)
            replace_module(converted, layer.name, built[layer.name])
    if latency.keep_faster:
        plan, slower = time_layers(
            plan,
            originals,
            built,
            input_shapes,
            backend=latency.backend,
            batch_size=latency.batch_size,
            device=latency.device,
        )
        for name in slower:
            replace_module(converted, name, originals[name])
    return converted, plan


def _convert_for_speedup(model, specs, other, latency: Latency, **kw):
    from gdws_torch.conversion.speed_target import convert_for_speedup
    from gdws_torch.cost.latency_tables import LatencyTable

    table = latency.table
    gdws_lowrank = "gdws_lowrank" in latency.forms
    if table is None:
        table = LatencyTable.default(
            latency.backend, latency.batch_size, latency.device, gdws_lowrank=gdws_lowrank
        )
    elif not isinstance(table, LatencyTable):
        table = LatencyTable(
            latency.backend, latency.batch_size, latency.device, table, gdws_lowrank=gdws_lowrank
        )
    elif (table.backend, table.batch_size) != (latency.backend, latency.batch_size):
        raise ValueError(
            f"latency.table is for {table.backend} at batch {table.batch_size}, not "
            f"backend={latency.backend!r} at batch_size={latency.batch_size}."
        )
    elif gdws_lowrank and not table.gdws_lowrank:
        raise ValueError(
            "latency.forms includes 'gdws_lowrank' but latency.table does not time that "
            "form: build it with LatencyTable(..., gdws_lowrank=True)."
        )
    names = [spec.name for spec in specs]
    input_shapes = layer_input_shapes(model, names, kw["input_size"])
    return convert_for_speedup(
        model, specs, input_shapes, table=table, other_macs=other, forms=latency.forms, **kw
    )


def _entry(mapping: Mapping[str, Any] | None, name: str, what: str) -> Any:
    """``mapping``'s entry for layer ``name`` as a float64 tensor; ``None`` when absent."""
    found = find_entry(mapping, name, what=what)
    if found is None:
        return None
    key, value = found
    return _real(torch.as_tensor(value), f"{what}[{key!r}]").to(torch.float64)


def _input_moment(moments: Mapping[str, Any] | None, name: str, conv: nn.Conv2d) -> Any:
    """Layer ``name``'s input moment, checked now (before any layer is timed)."""
    moment = _entry(moments, name, "input_moments")
    n = conv.weight[0].numel()
    if moment is not None and tuple(moment.shape) != (n, n):
        raise ValueError(
            f"input_moments[{name!r}] must have shape (C*Kh*Kw, C*Kh*Kw) = ({n}, {n}); got "
            f"{tuple(moment.shape)}."
        )
    if moments is not None and moment is None:
        raise ValueError(
            f"input_moments has no entry for layer {name!r}: give one for every converted "
            "layer (gdws_torch.conversion.weightings.input_patch_moments computes them)."
        )
    return moment


def _real(value: torch.Tensor, name: str) -> torch.Tensor:
    """``value`` detached; a ``TypeError`` naming it unless it holds real numbers."""
    if value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name} must hold real numbers; got dtype {value.dtype}.")
    return value.detach()


def channel_weight(
    channel_weights: Mapping[str, Any] | None, name: str, conv: nn.Conv2d
) -> torch.Tensor | None:
    """Layer ``name``'s channel weights (the paper's alpha) from a mapping keyed as the
    original's files (:func:`gdws_approx.layer_names.find_entry`), checked against the
    conv; ``None`` when ``channel_weights`` is ``None`` (unit weights).

    Raises
    ------
    ValueError
        No entry for the layer (the message lists the keys looked for), or not one value
        per input channel.
    """
    found = find_entry(channel_weights, name, what="channel_weights", required=True)
    if found is None:
        return None
    key, value = found
    weight = _real(torch.as_tensor(value), f"channel_weights[{key!r}]")
    n_in = conv.in_channels
    if weight.ndim != 1 or weight.shape[0] != n_in:
        raise ValueError(
            f"channel_weights[{key!r}] must have one value per input channel of {name!r} "
            f"(C={n_in}); got shape {tuple(weight.shape)}."
        )
    return weight.to(device=conv.weight.device, dtype=torch.float64)
