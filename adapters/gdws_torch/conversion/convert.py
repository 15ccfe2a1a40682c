"""Whole-model conversion: replace the eligible convolutions of a torch model by GDWS ones."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gdws_approx import LayerSpec, NetworkPlan, plan_network
from gdws_torch.conversion.eligibility import LayerPredicate, eligible_convs
from gdws_torch.conversion.options import Latency, Recovery, Weighting, from_legacy_keywords
from gdws_torch.cost.latency import layer_input_shapes, time_layers
from gdws_torch.cost.macs import count_macs
from gdws_torch.nn.module_tree import pad_kernels, replace_module, set_fused
from gdws_torch.nn.planned import build_layer
from gdws_torch.recovery import recalibrate_batchnorm, refit_gdws

__all__ = ["convert", "pad_kernels", "replace_module", "set_fused"]


def convert(
    model: nn.Module,
    *,
    beta: float | None = None,
    n_kernels: int | Mapping[str, int] | None = None,
    target_mac_reduction: float | None = None,
    target_speedup: float | None = None,
    weighting: Weighting | None = None,
    recovery: Recovery | None = None,
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
    **deprecated: Any,
) -> tuple[nn.Module, NetworkPlan]:
    """Replace the eligible convolutions of ``model`` by optimal GDWS convolutions.

    Give one budget: ``beta`` (LEGO with this error budget for every layer, the original
    work's Algorithm 3), ``n_kernels`` (MEGO: a kernel budget for all layers or one per
    layer name), ``target_mac_reduction`` (the network's convolutions that many times
    cheaper at ``input_size``) or ``target_speedup`` (that many times faster, measured).
    With none, ``beta=0``: an exact representation. The other settings come in three
    groups: how errors are weighted (``weighting``), the training-free recovery that
    follows (``recovery``) and where layers are timed (``latency``).

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
        ``weighting.allocation`` says.
    target_speedup : float, optional
        The measured speed-up (``> 1``) to reach on ``latency.backend``, ``.device`` and
        ``.batch_size``. Every eligible layer's latency, and the dense network's, are
        taken from ``latency.table`` (timed and cached when missing; a table file that
        fails its checks is refused), each layer becomes dense, GDWS, grouped
        (depthwise-separable at ``m = 1``), low-rank, ... (the forms of
        ``latency.forms``) at the size of least total response error whose predicted
        network latency meets the target (:func:`gdws_approx.plan_latency`; the error of
        every form is measured on ``weighting.input_moments`` when given); then the
        converted network is timed against the dense one and, if it misses the target by
        more than 5 % either way and by more than the timing's spread, planned again (3
        attempts at most; the least-error attempt that reached the target is kept). The
        target is reached when the measured speed-up is at least 95 % of it and above 1.
        ``report.latency`` records the prediction, the measurement, its spread and
        whether the target was reached (:mod:`gdws_torch.conversion.speed_target`).
    weighting : Weighting, optional
        The per-layer error weights (``alphas``, output weights ``A``, input transforms
        ``B_c``) and the MAC allocation; unit weights and a common ``beta`` when
        ``None``. :meth:`Weighting.from_strategy` computes a named strategy's.
    recovery : Recovery, optional
        Least-squares refit of every compressed layer (GDWS and low-rank), then BatchNorm
        re-estimation, after the conversion; none when ``None``.
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
        Modify ``model`` itself instead of a deep copy. Planning errors leave it as it
        was; an error of the recovery (which runs last) leaves it converted but not
        recovered.
    svd_solver : {"auto", "full", "covariance_eigh"}, default="auto"
    progress : bool, default=False
        Progress bars: timing layers for ``target_speedup``, the refit (per layer) and
        the BatchNorm re-estimation. ``report.seconds`` gives each stage's time.
    require_target : bool, default=True
        With ``target_speedup``: a target not reached raises
        :class:`~gdws_torch.conversion.speed_target.SpeedTargetMissed` (a miss is never
        silent). ``False`` accepts the closest model; ``report.latency["reached"]`` then
        says whether it reached the target.
    **deprecated
        The keywords the option groups replace (``alphas``, ``output_weights``,
        ``input_transforms``, ``allocation``; ``refit``, ``refit_samples``,
        ``refit_attack``, ``refit_depthwise``, ``refit_iterations``, ``recalibrate``,
        ``recalibrate_samples``; ``latency_aware``, ``backend``, ``latency_batch_size``,
        ``device``, ``latency_table``) still work until the next release, with a
        ``FutureWarning`` and their old meaning (``refit=`` without ``refit_depthwise``
        refits the pointwise weights only).

    Returns
    -------
    converted : torch.nn.Module
        The converted copy (or ``model`` when ``inplace``), in ``model``'s train/eval mode.
    report : gdws_approx.NetworkPlan
        Per layer: name, shape, ``G``, multiplier histogram, weighted error, MACs before
        and after, whether it stays dense and why; network totals over all convolutions
        (``report.dense_macs``, ``report.macs``, ``report.mac_reduction``). Print it for a
        table, ``report.to_dict()`` for JSON.

    Raises
    ------
    TypeError
        A setting of the wrong type, an unknown keyword.
    ValueError
        No eligible convolution, an alpha missing or of the wrong length, a budget that
        keeps no kernel in a layer, an unreachable target, a latency table refused. The
        model is untouched then.
    SpeedTargetMissed
        ``target_speedup`` measured out of reach, with ``require_target`` (the model is
        untouched; the exception's ``report`` has the measurements).

    Examples
    --------
    >>> from gdws_torch import Recovery, convert
    >>> from gdws_torch.models import PreActResNet18
    >>> net = PreActResNet18().eval()
    >>> fast, report = convert(net, target_mac_reduction=2.0)  # doctest: +SKIP
    >>> fast, report = convert(  # doctest: +SKIP
    ...     net, target_mac_reduction=2.0, recovery=Recovery(refit=train_loader)
    ... )
    >>> print(report)  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    groups = {"weighting": weighting, "recovery": recovery, "latency": latency}
    for name, cls in (("weighting", Weighting), ("recovery", Recovery), ("latency", Latency)):
        if groups[name] is not None and not isinstance(groups[name], cls):
            raise TypeError(
                f"{name} must be a {cls.__name__} or None; got {type(groups[name]).__name__}."
            )
    if not isinstance(require_target, bool):
        raise TypeError(f"require_target must be a bool; got {require_target!r}.")
    groups = from_legacy_keywords(deprecated, groups)
    weighting, recovery, latency = groups["weighting"], groups["recovery"], groups["latency"]
    if target_speedup is not None:
        budgets = {
            "beta": beta,
            "n_kernels": n_kernels,
            "target_mac_reduction": target_mac_reduction,
        }
        given = [name for name, value in budgets.items() if value is not None]
        given += ["latency.keep_faster"] * latency.keep_faster
        given += ["weighting.allocation"] * (weighting.allocation != "common_beta")
        if given:
            raise ValueError(
                f"target_speedup is a budget of its own; it excludes {', '.join(given)}."
            )
    start = time.perf_counter()
    # Plan on the original (read only); copy only once everything is known to work.
    chosen = eligible_convs(model, layers=layers, exclude=exclude, skip_first=skip_first)
    macs = count_macs(model, input_size)
    specs = _layer_specs(model, chosen, macs, weighting, input_size)
    names = {name for name, _ in chosen}
    other = sum(
        la.macs for la in macs.layers if la.kind in ("conv", "gdws") and la.name not in names
    )
    if target_speedup is not None:
        converted, plan, originals = _convert_for_speedup(
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
            allocation=weighting.allocation,
        )
        converted, plan, originals = _build(
            model, plan, latency, input_size=input_size, fused=fused, inplace=inplace
        )
    seconds = {"conversion": time.perf_counter() - start}
    seconds.update(
        _recover(model, converted, originals, recovery, inplace=inplace, progress=progress)
    )
    plan.seconds = {**(plan.seconds or {}), **seconds}
    return converted, plan


def _layer_specs(model, chosen, macs, weighting: Weighting, input_size) -> list[LayerSpec]:
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
        alphas = weighting.alphas
        specs.append(
            LayerSpec(
                name,
                conv.weight.detach(),
                calls[0].output_pixels,
                None if alphas is None else lookup_alpha(alphas, name, conv),
                output_weights=_optional_entry(weighting.output_weights, name, "output_weights"),
                input_transforms=_optional_entry(
                    weighting.input_transforms, name, "input_transforms"
                ),
                input_moment=_input_moment(weighting.input_moments, name, conv),
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
    return converted, plan, originals


def _recover(model, converted, originals, recovery: Recovery, *, inplace, progress) -> dict:
    """The refit (if any GDWS layer was built), then the BatchNorm recalibration; returns
    the seconds of each."""
    seconds = {}
    start = time.perf_counter()
    if recovery.refit is not None and originals:
        refit_gdws(
            model if not inplace else _dense_twin(converted, originals),
            converted,
            recovery.refit,
            recovery.refit_samples,
            depthwise=recovery.refit_depthwise,
            iterations=recovery.refit_iterations,
            attack=recovery.refit_attack,
            tolerance=recovery.refit_tolerance,
            inplace=True,
            progress=progress,
        )
        seconds["refit"] = time.perf_counter() - start
        start = time.perf_counter()
    if recovery.recalibrate is not None:
        recalibrate_batchnorm(
            converted,
            recovery.recalibrate,
            recovery.recalibrate_samples,
            attack=recovery.recalibrate_attack,
            inplace=True,
            progress=progress,
        )
        seconds["recalibration"] = time.perf_counter() - start
    return seconds


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


def _dense_twin(converted: nn.Module, originals: Mapping[str, nn.Module]) -> nn.Module:
    """A copy of ``converted`` with the original convs back (``inplace`` lost the model)."""
    twin = copy.deepcopy(converted)
    for name, conv in originals.items():
        replace_module(twin, name, copy.deepcopy(conv))
    return twin


def _optional_entry(mapping: Mapping[str, Any] | None, name: str, what: str) -> Any:
    """``mapping``'s entry for layer ``name`` (module or parameter name, with or without
    ``module.``), as a float64 tensor; ``None`` when absent."""
    if mapping is None:
        return None
    if not isinstance(mapping, Mapping):
        raise TypeError(
            f"{what} must be a mapping {{layer name: tensor}}; got {type(mapping).__name__}."
        )
    bare = name.removeprefix("module.")
    for key in (bare, f"{bare}.weight", f"module.{bare}", f"module.{bare}.weight"):
        if key in mapping:
            return _real(torch.as_tensor(mapping[key]), f"{what}[{key!r}]").to(torch.float64)
    return None


def _input_moment(moments: Mapping[str, Any] | None, name: str, conv: nn.Conv2d) -> Any:
    """Layer ``name``'s input moment, checked now (before any layer is timed)."""
    moment = _optional_entry(moments, name, "input_moments")
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


def lookup_alpha(alphas: Mapping[str, Any], name: str, conv: nn.Conv2d) -> torch.Tensor:
    """The noise gains of layer ``name`` from a mapping keyed as the original's files."""
    if not isinstance(alphas, Mapping):
        raise TypeError(
            f"alphas must be a mapping {{layer name: tensor(C)}}; got {type(alphas).__name__}."
        )
    bare = name.removeprefix("module.")
    candidates = (f"{bare}.weight", bare, f"module.{bare}.weight", f"module.{bare}")
    for key in candidates:
        if key in alphas:
            alpha = _real(torch.as_tensor(alphas[key]), f"alphas[{key!r}]")
            break
    else:
        raise ValueError(
            f"alphas has no entry for layer {name!r} (looked for {candidates[0]!r}, "
            f"{candidates[1]!r} and their 'module.' forms); it has {len(alphas)} entries, "
            f"for example {sorted(alphas)[:3]}."
        )
    n_in = conv.in_channels
    if alpha.ndim != 1 or alpha.shape[0] != n_in:
        raise ValueError(
            f"alphas[{key!r}] must have one value per input channel of {name!r} (C={n_in}); "
            f"got shape {tuple(alpha.shape)}."
        )
    return alpha.to(device=conv.weight.device, dtype=torch.float64)
