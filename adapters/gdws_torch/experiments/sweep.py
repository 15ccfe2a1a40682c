"""The robustness vs cost frontier: every weighting strategy, with and without recovery,
and the training-free baselines (DWS, low-rank, channel pruning) at the same MAC targets."""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from gdws_approx import cost
from gdws_torch.baselines.compress import METHODS as BASELINES
from gdws_torch.baselines.compress import compress_baseline
from gdws_torch.common import take_samples
from gdws_torch.conversion.convert import convert, set_fused
from gdws_torch.conversion.eligibility import eligible_convs
from gdws_torch.conversion.options import Latency, Weighting
from gdws_torch.conversion.weightings import STRATEGIES
from gdws_torch.cost.macs import count_macs
from gdws_torch.cost.throughput import measure_throughput
from gdws_torch.io.figures import save_figure
from gdws_torch.recovery import batchnorm_layers, calibration_inputs
from gdws_torch.robustness.evaluate import evaluate

__all__ = [
    "DEFAULT_REFIT",
    "METHODS",
    "REFIT_VARIANTS",
    "max_mac_reduction",
    "plot_frontier",
    "run_sweep",
]

#: The refits a sweep can compare (keyword arguments of :func:`gdws_torch.recovery.refit_gdws`):
#: the pointwise weights only, or the depthwise kernels too (alternating least squares).
REFIT_VARIANTS = {"pointwise": {"depthwise": False}, "joint": {"depthwise": True}}
#: The variant whose rows are labelled plain "refit+BN" (others: "<variant> refit+BN").
DEFAULT_REFIT = "pointwise"
#: What a sweep can compare: GDWS and the baselines of :mod:`gdws_torch.baselines`.
METHODS = ("gdws", *BASELINES)
#: How the plot names each method.
METHOD_LABELS = {"gdws": "GDWS", "dws": "DWS", "lowrank": "low-rank", "prune": "pruning"}


def run_sweep(
    network: nn.Module,
    input_shape: Sequence[int],
    test_loader: Iterable,
    train_loader: Iterable,
    attack: Callable[[nn.Module], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
    *,
    methods: Sequence[str] = ("gdws",),
    strategies: Sequence[str] = STRATEGIES,
    targets: Sequence[float] = (1.5, 2.0, 2.5),
    allocations: Sequence[str] = ("common_beta",),
    speedup_targets: Sequence[float] = (),
    latency: Latency | None = None,
    recalibration_samples: int = 1000,
    weighting_samples: int = 256,
    refit_samples: int = 0,
    refit_variants: Sequence[str] = (DEFAULT_REFIT,),
    refit_iterations: int = 3,
    n_test: int | None = None,
    wrap: Callable[[nn.Module], nn.Module] = lambda model: model,
    fps_backend: str | None = "eager",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Evaluate every (strategy, allocation, recovery, MAC target) on the same attack.

    Parameters
    ----------
    network : torch.nn.Module
        The dense network (not modified); ``wrap(network)`` is what is evaluated
        (e.g. with its input normalisation).
    input_shape : sequence of int
    test_loader, train_loader : iterables of (images, labels)
        Evaluation data; data for the weightings and the BatchNorm recalibration (not
        shuffled here: shuffle it yourself).
    attack : callable
        ``attack(model) -> attack(images, labels)``, applied to every model.
    methods : sequence of str
        From :data:`METHODS`: ``"gdws"`` (every strategy, allocation and speed-up target
        below) and the baselines of :func:`gdws_torch.compress_baseline` (``"dws"``,
        ``"lowrank"``, ``"prune"``: each at every MAC target, with the same recoveries;
        their data-driven criteria use the refit's calibration inputs, or else the first
        ``weighting_samples`` training inputs).
    strategies : sequence of str
        From :data:`gdws_torch.conversion.weightings.STRATEGIES`.
    targets : sequence of float
        Conv MAC reductions.
    allocations : sequence of {"common_beta", "global"}
    speedup_targets : sequence of float
        Measured speed-ups: each strategy is also converted with ``target_speedup``
        (rows with ``allocation="latency"``, ``target`` the speed-up, and what was
        measured: ``measured_speedup``, ``spread``, ``reached``; a model that misses its
        target is kept, and its row says so). GDWS only: refused with other methods
        alone.
    latency : Latency, optional
        Where those conversions are timed (:class:`gdws_torch.Latency`: backend, batch
        size, table).
    recalibration_samples : int
        ``0``: no recovery rows; otherwise every model also gets a recalibrated twin.
    weighting_samples : int
        Inputs for the data-driven weightings (noise gains, patch moments).
    refit_samples : int
        ``> 0``: every model also gets a "refit+BN" twin per refit variant: its GDWS
        factors refitted (:func:`gdws_torch.recovery.refit_gdws`) on that many training
        inputs made adversarial by ``attack`` against the dense network (crafted once),
        then BatchNorm recalibrated.
    refit_variants : sequence of str
        Keys of :data:`REFIT_VARIANTS`: one refit row per variant, labelled "refit+BN" for
        :data:`DEFAULT_REFIT` and "<variant> refit+BN" for the others.
    refit_iterations : int
        Alternations of the joint variants.
    n_test : int, optional
    fps_backend : str or None
        Batch-1 FPS of every model on this backend (``None``: not measured).

    Returns
    -------
    dict
        ``{"dense": row, "rows": [row, ...], "seconds": ...}``; a row has ``method``,
        ``strategy`` (a baseline's: its criterion), ``allocation``, ``recovery``,
        ``target``, ``beta``, ``conv_macs``, ``mac_reduction``, ``natural``, ``robust``,
        ``fps``, ``speedup``; the rows of a speed target also ``measured_speedup``,
        ``spread`` and ``reached``.

    Raises
    ------
    ValueError
        Before any work: unknown methods or refit variants, speed targets without GDWS,
        or (GDWS alone) a MAC target above :func:`max_mac_reduction`.
    """
    from gdws_torch.recovery import recalibrate_batchnorm

    if not methods or any(m not in METHODS for m in methods):
        raise ValueError(f"methods must be a non-empty sequence of {METHODS}; got {methods!r}.")
    unknown = [v for v in refit_variants if v not in REFIT_VARIANTS]
    if unknown or not refit_variants:
        raise ValueError(
            f"refit_variants must be a non-empty sequence of {tuple(REFIT_VARIANTS)}; "
            f"got {list(refit_variants)!r}."
        )
    if speedup_targets and "gdws" not in methods:
        raise ValueError(
            f"speedup_targets {list(speedup_targets)} apply to GDWS only (the baselines are "
            f"built for MAC targets); methods {list(methods)} have no 'gdws'."
        )
    if list(methods) == ["gdws"] and targets:
        ceiling = max_mac_reduction(network, input_shape)
        beyond = [t for t in targets if t > ceiling]
        if beyond:
            raise ValueError(
                f"targets {beyond} are out of reach: with one kernel per layer GDWS reaches "
                f"at most {ceiling:.4g}x fewer conv MACs on this network."
            )
    start = time.perf_counter()
    recover = recalibration_samples > 0 and bool(batchnorm_layers(network))
    if recalibration_samples > 0 and not recover:
        log("no BatchNorm layer: the sweep has no recovery rows")

    def assess(model: nn.Module, wrapped: bool = False) -> dict[str, float]:
        model = set_fused(copy.deepcopy(model), True)
        model = model if wrapped else wrap(model)
        result = evaluate(
            model, test_loader, {"a": attack(model)}, n_samples=n_test, progress=False
        )
        return {"natural": result["natural"], "robust": result["attacks"]["a"]}

    dense_macs = count_macs(network, input_shape).conv_macs
    dense = {"strategy": "dense", "conv_macs": dense_macs, "mac_reduction": 1.0, **assess(network)}
    weights = {}
    for strategy in strategies if "gdws" in methods else ():
        log(f"weighting {strategy!r} ...")
        weights[strategy] = Weighting.from_strategy(
            strategy, wrap(network), input_shape, loader=train_loader, n_samples=weighting_samples
        )
        # Names under a wrapper carry ``module.``; convert's lookups accept both forms.
    calibration = None
    if refit_samples > 0:
        log(f"crafting {refit_samples} adversarial calibration inputs ...")
        calibration = calibration_inputs(
            train_loader, refit_samples, wrap(network), attack, next(network.parameters()).device
        )
    models: dict[str, nn.Module] = {"dense": wrap(network)}
    rows = []
    jobs = [(s, a, t) for s in strategies for a in allocations for t in targets]
    jobs += [(s, "latency", t) for s in strategies for t in speedup_targets]
    jobs = jobs if "gdws" in methods else []
    for strategy, allocation, target in tqdm(jobs, desc="sweep", disable=not progress):
        if allocation == "latency":  # a miss is kept: its row says so
            budget = {"target_speedup": target, "latency": latency, "require_target": False}
            weights_used = weights[strategy]
        else:
            budget = {"target_mac_reduction": target}
            weights_used = dataclasses.replace(weights[strategy], allocation=allocation)
        try:
            converted, report = convert(
                network, input_size=input_shape, **budget, weighting=weights_used
            )
        except ValueError as exc:
            log(f"{strategy}, {allocation}, {target:g}x: skipped ({exc})")
            continue
        variants = [("none", converted)]
        if recover:
            recalibrated = copy.deepcopy(converted)
            # In place through the wrapper: the wrapped network's BatchNorm layers change.
            recalibrate_batchnorm(
                wrap(recalibrated),
                train_loader,
                recalibration_samples,
                inplace=True,
                progress=False,
            )
            variants.append(("BN", recalibrated))
        if recover and calibration is not None:
            from gdws_torch.recovery import refit_gdws

            for variant in refit_variants:
                refitted = copy.deepcopy(converted)
                refit_gdws(
                    wrap(network),
                    wrap(refitted),
                    calibration,
                    refit_samples,
                    iterations=refit_iterations,
                    inplace=True,
                    progress=False,
                    **REFIT_VARIANTS[variant],
                )
                recalibrate_batchnorm(
                    wrap(refitted),
                    train_loader,
                    recalibration_samples,
                    inplace=True,
                    progress=False,
                )
                label = "refit+BN" if variant == DEFAULT_REFIT else f"{variant} refit+BN"
                variants.append((label, refitted))
        measured = {}
        if allocation == "latency":
            record = report.latency
            measured = {
                "measured_speedup": record["realised_speedup"],
                "spread": record["spread"],
                "reached": record["reached"],
            }
            if not record["reached"]:
                log(
                    f"{strategy}, speed {target:g}x: not reached (measured "
                    f"{record['realised_speedup']:.3g}x); the row says so"
                )
        for recovery, model in variants:
            key = f"{strategy}|{allocation}|{recovery}|{target:g}"
            models[key] = wrap(model)
            rows.append(
                {
                    "key": key,
                    "method": "gdws",
                    "strategy": strategy,
                    "allocation": allocation,
                    "recovery": recovery,
                    "target": target,
                    "beta": report.beta,
                    "conv_macs": count_macs(model, input_shape).conv_macs,
                    "mac_reduction": report.mac_reduction,
                    **measured,
                    **assess(model),
                }
            )
    baselines = [m for m in methods if m != "gdws"]
    if baselines:
        if calibration is None:  # the baselines' data-driven criteria: natural inputs
            data = [
                b[0]
                for b in take_samples(train_loader, weighting_samples, stage="baseline criterion")
            ]
        else:
            data = calibration
        jobs = [(m, t) for m in baselines for t in targets]
        for method, target in tqdm(jobs, desc="baselines", disable=not progress):
            rows += _baseline_rows(
                method,
                target,
                network,
                wrap,
                input_shape,
                data,
                min(weighting_samples, sum(len(x) for x in data)),
                train_loader,
                recalibration_samples if recover else 0,
                refit_samples if recover and calibration is not None else 0,
                assess,
                models,
                log,
            )
    if fps_backend is not None:
        log(f"timing {len(models)} models at batch 1 on {fps_backend} ...")
        timed = measure_throughput(
            models, input_shape, backends=(fps_backend,), rounds=9, progress=progress
        )
        fps = {row["model"]: row["fps"] for row in timed}
        dense["fps"] = fps["dense"]
        for row in rows:
            row["fps"] = fps[row["key"]]
            row["speedup"] = row["fps"] / fps["dense"]
    return {
        "dense": dense,
        "methods": list(methods),
        "rows": rows,
        "refit": {
            "n_samples": refit_samples,
            "variants": {v: REFIT_VARIANTS[v] for v in refit_variants},
            "iterations": refit_iterations,
        }
        if calibration is not None
        else None,
        "fps_backend": fps_backend,
        "threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - start,
    }


def max_mac_reduction(network: nn.Module, input_shape: Sequence[int]) -> float:
    """The most conv MAC reduction GDWS can give ``network`` (one kernel in each eligible
    layer, the others dense): a MAC target above it is out of reach."""
    modules = dict(network.named_modules())
    eligible = {name for name, _ in eligible_convs(network)}
    dense = floor = 0
    for layer in count_macs(network, input_shape).layers:
        if layer.kind not in ("conv", "gdws"):
            continue
        dense += layer.macs
        if layer.name in eligible:
            m, _, kh, kw = modules[layer.name].weight.shape
            floor += cost.gdws_macs(1, kh * kw, m) * layer.output_pixels
        else:
            floor += layer.macs
    return dense / floor


def _baseline_rows(
    method: str,
    target: float,
    network: nn.Module,
    wrap: Callable[[nn.Module], nn.Module],
    input_shape: Sequence[int],
    data: list[torch.Tensor],
    n_samples: int,
    train_loader: Iterable,
    recalibration_samples: int,
    refit_samples: int,
    assess: Callable[..., dict[str, float]],
    models: dict[str, nn.Module],
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """The rows of one baseline at one MAC target: no recovery, BatchNorm, refit + BN
    (those the sweep asks for); the models go into ``models`` (wrapped)."""
    from gdws_torch.recovery import recalibrate_batchnorm

    def build(refit: int):
        return compress_baseline(
            wrap(network),
            method,
            data,
            target_mac_reduction=target,
            input_size=input_shape,
            n_samples=n_samples,
            refit=refit,
        )

    try:
        compressed, report = build(0)
    except ValueError as exc:
        log(f"{method}, {target:g}x: skipped ({exc})")
        return []
    variants = [("none", compressed)]
    if recalibration_samples > 0:
        recalibrated = copy.deepcopy(compressed)
        recalibrate_batchnorm(
            recalibrated, train_loader, recalibration_samples, inplace=True, progress=False
        )
        variants.append(("BN", recalibrated))
        if refit_samples > 0:
            refitted, _ = build(refit_samples)
            recalibrate_batchnorm(
                refitted, train_loader, recalibration_samples, inplace=True, progress=False
            )
            variants.append(("refit+BN", refitted))
    rows = []
    for recovery, model in variants:
        key = f"{method}|{report.criterion}|{recovery}|{target:g}"
        models[key] = model
        rows.append(
            {
                "key": key,
                "method": method,
                "strategy": report.criterion,
                "allocation": "uniform" if report.criterion == "l1" else "global",
                "recovery": recovery,
                "target": target,
                "beta": None,
                "conv_macs": count_macs(model, input_shape).conv_macs,
                "mac_reduction": report.mac_reduction,
                **assess(model, wrapped=True),
            }
        )
    return rows


def plot_frontier(results: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Robust accuracy against conv MAC reduction (and FPS): one line per strategy (GDWS)
    and per baseline method, dashed without recovery, solid with BatchNorm
    recalibration, dash-dotted with the default refit, dotted with the other refits;
    written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    rows, dense = results["rows"], results["dense"]
    with_fps = results.get("fps_backend") is not None
    figure, axes = plt.subplots(
        1, 2 if with_fps else 1, figsize=(15 if with_fps else 9, 5), constrained_layout=True
    )
    axes = list(axes) if with_fps else [axes]

    def method(row: dict[str, Any]) -> str:
        return row.get("method", "gdws")

    def series(row: dict[str, Any]) -> str:  # what a colour stands for
        return row["strategy"] if method(row) == "gdws" else method(row)

    names = list(dict.fromkeys(series(r) for r in rows))
    colours = dict(zip(names, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    groups = dict.fromkeys((method(r), r["strategy"], r["allocation"], r["recovery"]) for r in rows)
    allocations = {r["allocation"] for r in rows if method(r) == "gdws"}
    baselines = any(method(r) != "gdws" for r in rows)
    for kind, strategy, allocation, recovery in groups:
        line = sorted(
            (
                r
                for r in rows
                if (method(r), r["strategy"], r["allocation"], r["recovery"])
                == (kind, strategy, allocation, recovery)
            ),
            key=lambda r: r["mac_reduction"],
        )
        if kind == "gdws":
            label = ("GDWS " if baselines else "") + strategy
            label += f", {allocation}" if len(allocations) > 1 else ""
            marker = {"common_beta": "o", "global": "s"}.get(allocation, "^")
        else:
            label = f"{METHOD_LABELS.get(kind, kind)} ({strategy})"
            marker = {"dws": "D", "lowrank": "v", "prune": "P"}.get(kind, "x")
        if recovery == "BN":
            label += " + BN recalibration"
        elif recovery.endswith("refit+BN"):
            label += " + " + recovery.replace("refit+BN", "refit").strip() + " + BN"
        style = {
            "color": colours[series(line[0])],
            "linestyle": {"none": "--", "BN": "-", "refit+BN": "-."}.get(recovery, ":"),
            "marker": marker,
        }
        axes[0].plot(
            [r["mac_reduction"] for r in line], [r["robust"] for r in line], label=label, **style
        )
        if with_fps:  # measured FPS is noisy: points, not lines
            axes[1].plot(
                [r["fps"] for r in line],
                [r["robust"] for r in line],
                color=style["color"],
                marker=style["marker"],
                linestyle="none",
                fillstyle="none" if recovery == "none" else "full",
            )
    for row in rows:  # what a speed target gave, beside its point
        if row.get("measured_speedup") is not None and row["recovery"] == "none":
            note = f"{row['target']:g}x speed: {row['measured_speedup']:.2f}x measured"
            note += "" if row.get("reached") else " (missed)"
            axes[0].annotate(
                note,
                (row["mac_reduction"], row["robust"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=6,
                color="black" if row.get("reached") else "red",
            )
    axes[0].scatter(
        [1.0], [dense["robust"]], marker="*", s=180, color="black", label="dense", zorder=3
    )
    axes[0].set_xlabel("conv MAC reduction (x fewer than dense)")
    if with_fps:
        axes[1].scatter(
            [dense["fps"]], [dense["robust"]], marker="*", s=180, color="black", zorder=3
        )
        axes[1].set_xlabel(f"frames per second, batch 1, {results['fps_backend']}")
    for axis in axes:
        axis.axhline(dense["robust"] - 1, color="grey", linestyle=":", linewidth=1)
        axis.set_ylabel("robust accuracy (%)")
        axis.grid(alpha=0.3)
    figure.legend(loc="outside right center", fontsize=7)
    what = "GDWS and baselines" if baselines else "GDWS"
    figure.suptitle(title or f"{what} frontier (dotted: 1 point below dense; dashed: no recovery)")
    return save_figure(figure, path)
