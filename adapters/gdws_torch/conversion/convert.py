"""Whole-model conversion: replace the eligible convolutions of a torch model by GDWS ones."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gdws_approx import LayerSpec, NetworkPlan, plan_network
from gdws_torch.conversion.eligibility import LayerPredicate, eligible_convs
from gdws_torch.cost.latency import layer_input_shapes, time_layers
from gdws_torch.cost.macs import count_macs
from gdws_torch.nn.layers import GDWSConv2d
from gdws_torch.nn.module_tree import pad_kernels, replace_module, set_fused
from gdws_torch.recovery import recalibrate_batchnorm, refit_gdws

__all__ = ["convert", "pad_kernels", "replace_module", "set_fused"]


def convert(
    model: nn.Module,
    *,
    beta: float | None = None,
    alphas: Mapping[str, Any] | None = None,
    n_kernels: int | Mapping[str, int] | None = None,
    target_mac_reduction: float | None = None,
    input_size: Sequence[int] = (3, 32, 32),
    layers: Iterable[str] | LayerPredicate | None = None,
    exclude: Iterable[str] = (),
    skip_first: bool = True,
    only_if_cheaper: bool = True,
    fused: bool = False,
    inplace: bool = False,
    svd_solver: str = "auto",
    latency_aware: bool = False,
    backend: str = "eager",
    latency_batch_size: int = 1,
    device: Any = "cpu",
    recalibrate: Iterable | None = None,
    recalibrate_samples: int = 1000,
    refit: Iterable | None = None,
    refit_samples: int = 1000,
    refit_attack: Any = None,
    refit_depthwise: bool | None = None,
    refit_iterations: int = 3,
    output_weights: Mapping[str, Any] | None = None,
    input_transforms: Mapping[str, Any] | None = None,
    allocation: str = "common_beta",
    target_speedup: float | None = None,
    latency_table: Any = None,
    progress: bool = False,
) -> tuple[nn.Module, NetworkPlan]:
    """Replace the eligible convolutions of ``model`` by optimal GDWS convolutions.

    Give one budget: ``beta`` (LEGO with this error budget for every layer, each layer's
    error weighted by its ``alphas``, the original work's Algorithm 3), ``n_kernels``
    (MEGO: a kernel budget for all layers or one per layer name) or
    ``target_mac_reduction`` (LEGO with the smallest common ``beta`` that makes the
    network's convolutions that many times cheaper at ``input_size``). With none,
    ``beta=0``: an exact representation.

    Parameters
    ----------
    model : torch.nn.Module
        Not modified unless ``inplace=True``.
    beta : float, optional
        LEGO's budget on each layer's weighted squared error.
    alphas : mapping, optional
        Per-layer noise gains ``{name: tensor(C)}``, keyed by parameter name
        (``"layer1.0.conv1.weight"``, as :func:`gdws_torch.noise_gains` and the original's
        files) or module name, with or without a ``"module."`` prefix. Every converted
        layer must have one. Unit weights when ``None``.
    n_kernels : int or mapping of str to int, optional
        MEGO kernel budgets.
    target_mac_reduction : float, optional
        Overall ``dense conv MACs / converted conv MACs`` to reach (``> 1``), counting every
        convolution of the network, converted or not.
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
        was; an error of ``refit`` or ``recalibrate`` (which run last) leaves it
        converted but not recovered.
    svd_solver : {"auto", "full", "covariance_eigh"}, default="auto"
    latency_aware : bool, default=False
        Hardware-aware conversion: time every planned layer dense vs GDWS on ``backend``
        (``"eager"``, ``"channels_last"`` or ``"onnxruntime"``) and ``device``, on its own
        input shape at ``input_size`` with ``latency_batch_size`` samples, and keep the
        dense conv wherever GDWS is not faster. The report gives the measured times
        (``timings_ms``). Layers kept so lower the MAC reduction: a
        ``target_mac_reduction`` is then no longer guaranteed (the report says what was
        reached).
    backend, latency_batch_size, device
        Where and how ``latency_aware`` times the layers.
    recalibrate : iterable, optional
        A loader of (training) inputs: after the conversion, the converted model's
        BatchNorm statistics are re-estimated on ``recalibrate_samples`` of them
        (:func:`gdws_torch.recalibrate_batchnorm`, natural inputs; training-free
        recovery of accuracy).
    recalibrate_samples : int, default=1000
    refit : iterable, optional
        A loader of calibration inputs: every GDWS layer's pointwise weights (and with
        ``refit_depthwise`` its depthwise kernels) are then re-solved by least squares to
        match the dense network (:func:`gdws_torch.recovery.refit_gdws`), before any
        ``recalibrate``. ``G`` and the MACs do not change.
    refit_samples : int, default=1000
    refit_attack : callable, optional
        ``attack(model) -> attack``: refit on adversarial inputs crafted against ``model``.
    refit_depthwise : bool, optional
        Refit the depthwise kernels too, by alternating least squares. Not given: the
        pointwise weights only, with a ``FutureWarning`` when ``refit`` is given, because
        the default becomes ``True`` (the joint refit, as
        :func:`gdws_torch.recovery.refit_gdws` and the ``robust`` recipe do) in the next
        release.
    refit_iterations : int, default=3
        Alternations of the depthwise refit.
    output_weights, input_transforms : mapping, optional
        Per-layer ``A`` (``tensor(M)``) and ``B_c`` (``tensor(C, K2, K2)``) of the weighted
        error ``sum_c alpha_c ||A (W_c - What_c) B_c||^2``, keyed like ``alphas``; layers
        without an entry get identities. :func:`gdws_torch.conversion.weightings.weighting` computes
        them for the strategies "output" (BatchNorm scales) and "data" (input patch
        moments).
    allocation : {"common_beta", "global"}, default="common_beta"
        How ``target_mac_reduction`` is met (see :func:`gdws_approx.plan_network`):
        one LEGO ``beta`` for all layers, or the least total error for the MACs.
    target_speedup : float, optional
        A budget of its own: the measured speed-up (``> 1``) to reach on ``backend``,
        ``device`` and ``latency_batch_size``. Every eligible layer's latency is taken
        from ``latency_table`` (timed and cached when missing), each layer becomes dense,
        depthwise-separable or GDWS at the ``G`` of least total error whose predicted
        network latency meets the target (:func:`gdws_approx.plan_latency`); then the
        converted network is timed against the dense one and, if it misses the target
        by more than 5 % either way, planned again for the measured ratio (3 attempts at
        most; the least-error attempt that reached the target is kept).
        ``report.latency`` records the prediction, the measurement and whether the
        target was reached (:mod:`gdws_torch.conversion.speed_target`).
    latency_table : LatencyTable, path-like or None, default=None
        With ``target_speedup``: the table to use and extend, or the JSON file of one;
        ``None``: the user's cache (:func:`gdws_torch.cost.latency_tables.default_cache`).
    progress : bool, default=False
        Progress bars while timing layers for ``target_speedup``.

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
    ValueError
        No eligible convolution, an alpha missing or of the wrong length, a budget that
        keeps no kernel in a layer, an unreachable target. The model is untouched then.

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
    if refit_depthwise is None:
        if refit is not None:
            warnings.warn(
                "convert(refit=...) refits the pointwise weights only when refit_depthwise is "
                "not given; the default becomes refit_depthwise=True (the joint refit, as "
                "refit_gdws and the robust recipe) in the next release. Pass "
                "refit_depthwise=False to keep this behaviour, True for the joint refit.",
                FutureWarning,
                stacklevel=2,
            )
        refit_depthwise = False
    if refit is not None and (
        isinstance(refit_iterations, bool)
        or not isinstance(refit_iterations, int)
        or refit_iterations < 0
    ):
        raise ValueError(
            f"refit_iterations must be a non-negative integer; got {refit_iterations!r}."
        )
    if target_speedup is not None:
        given = [n for n, v in (("beta", beta), ("n_kernels", n_kernels)) if v is not None]
        if target_mac_reduction is not None:
            given.append("target_mac_reduction")
        if given or latency_aware or allocation != "common_beta":
            extra = (
                given
                + ["latency_aware"] * latency_aware
                + ["allocation"] * (allocation != "common_beta")
            )
            raise ValueError(
                f"target_speedup is a budget of its own; it excludes {', '.join(extra)}."
            )
    if latency_aware or target_speedup is not None:
        from gdws_torch.cost.throughput import BACKENDS

        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}.")
        if (
            isinstance(latency_batch_size, bool)
            or not isinstance(latency_batch_size, int)
            or latency_batch_size < 1
        ):
            raise ValueError(
                f"latency_batch_size must be a positive integer; got {latency_batch_size!r}."
            )
    # Plan on the original (read only); copy only once everything is known to work.
    chosen = eligible_convs(model, layers=layers, exclude=exclude, skip_first=skip_first)
    macs = count_macs(model, input_size)
    names = {name for name, _ in chosen}
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
        alpha = None if alphas is None else lookup_alpha(alphas, name, conv)
        specs.append(
            LayerSpec(
                name,
                conv.weight.detach(),
                calls[0].output_pixels,
                alpha,
                output_weights=_optional_entry(output_weights, name, "output_weights"),
                input_transforms=_optional_entry(input_transforms, name, "input_transforms"),
            )
        )
    other = sum(
        la.macs for la in macs.layers if la.kind in ("conv", "gdws") and la.name not in names
    )
    if not specs:
        raise ValueError(
            "none of the eligible convolutions runs in a forward pass at input_size "
            f"{tuple(input_size)}; nothing to convert."
        )
    if target_speedup is not None:
        return _convert_for_speedup(
            model,
            specs,
            other,
            input_size=input_size,
            target_speedup=target_speedup,
            table=latency_table,
            backend=backend,
            batch_size=latency_batch_size,
            device=device,
            svd_solver=svd_solver,
            fused=fused,
            inplace=inplace,
            progress=progress,
            recovery=(refit, refit_samples, refit_attack, refit_depthwise, refit_iterations),
            recalibration=(recalibrate, recalibrate_samples),
        )
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
    if latency_aware:
        names = [layer.name for layer in plan.layers if layer.replaced]
        input_shapes = layer_input_shapes(model, names, input_size)
    converted = model if inplace else copy.deepcopy(model)
    modules = dict(converted.named_modules())
    originals, built = {}, {}
    for layer in plan.layers:
        if layer.replaced:
            originals[layer.name] = modules[layer.name]
            built[layer.name] = GDWSConv2d.from_plan(layer, modules[layer.name], fused=fused)
            replace_module(converted, layer.name, built[layer.name])
    if latency_aware:
        plan, slower = time_layers(
            plan,
            originals,
            built,
            input_shapes,
            backend=backend,
            batch_size=latency_batch_size,
            device=device,
        )
        for name in slower:
            replace_module(converted, name, originals[name])
    _recover(
        model,
        converted,
        originals if built else {},
        inplace=inplace,
        recovery=(refit, refit_samples, refit_attack, refit_depthwise, refit_iterations),
        recalibration=(recalibrate, recalibrate_samples),
    )
    return converted, plan


def _recover(model, converted, originals, *, inplace, recovery, recalibration) -> None:
    """The refit (if any GDWS layer was built), then the BatchNorm recalibration."""
    refit, samples, attack, depthwise, iterations = recovery
    if refit is not None and originals:
        refit_gdws(
            model if not inplace else _dense_twin(converted, originals),
            converted,
            refit,
            samples,
            depthwise=depthwise,
            iterations=iterations,
            attack=attack,
            inplace=True,
            progress=False,
        )
    loader, n = recalibration
    if loader is not None:
        recalibrate_batchnorm(converted, loader, n, inplace=True, progress=False)


def _convert_for_speedup(
    model, specs, other, *, table, backend, batch_size, device, recovery, recalibration, **kw
):
    from gdws_torch.conversion.speed_target import convert_for_speedup
    from gdws_torch.cost.latency_tables import LatencyTable, default_cache

    if not isinstance(table, LatencyTable):
        table = LatencyTable(
            backend, batch_size, device, default_cache() if table is None else table
        )
    elif (table.backend, table.batch_size) != (backend, batch_size):
        raise ValueError(
            f"latency_table is for {table.backend} at batch {table.batch_size}, not "
            f"backend={backend!r} at latency_batch_size={batch_size}."
        )
    names = [spec.name for spec in specs]
    input_shapes = layer_input_shapes(model, names, kw["input_size"])
    converted, plan, originals = convert_for_speedup(
        model, specs, input_shapes, table=table, other_macs=other, **kw
    )
    _recover(
        model,
        converted,
        originals,
        inplace=kw["inplace"],
        recovery=recovery,
        recalibration=recalibration,
    )
    return converted, plan


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
