"""The robustness vs cost frontier: every weighting strategy, with and without recovery,
and the training-free baselines (DWS, low-rank, channel pruning) at the same MAC targets.

Every GDWS row is a :class:`~gdws_torch.Recipe` (strategy x allocation x recovery
variant, :func:`sweep_recipes`) run by :func:`gdws_torch.compress` at one budget, each
recipe's inputs computed once for all budgets (and shared between recipes where they
agree: :func:`gdws_torch.recipe_inputs`' ``reuse``).
"""

from __future__ import annotations

import copy
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
from gdws_torch.conversion.convert import set_fused
from gdws_torch.conversion.eligibility import eligible_convs
from gdws_torch.conversion.options import (
    BatchNormStatistics,
    Latency,
    Recovery,
    Refit,
    Weighting,
)
from gdws_torch.conversion.pipeline import CalibrationAttack, compress, recipe_inputs
from gdws_torch.conversion.recipes import Recipe
from gdws_torch.conversion.weightings import STRATEGIES
from gdws_torch.cost.macs import count_macs
from gdws_torch.cost.throughput import measure_throughput
from gdws_torch.io.figures import save_figure
from gdws_torch.recovery import batchnorm_layers
from gdws_torch.robustness.evaluate import evaluate

__all__ = [
    "METHODS",
    "REFITS",
    "max_mac_reduction",
    "plot_frontier",
    "run_sweep",
    "sweep_recipes",
]

#: The refits a sweep can compare: the joint refit (depthwise kernels and pointwise
#: weights, rows "refit+BN") and the pointwise weights only (rows "pointwise refit+BN").
REFITS = ("joint", "pointwise")
#: What a sweep can compare: GDWS and the baselines of :mod:`gdws_torch.baselines`.
METHODS = ("gdws", *BASELINES)
#: How the plot names each method.
METHOD_LABELS = {"gdws": "GDWS", "dws": "DWS", "lowrank": "low-rank", "prune": "pruning"}


def sweep_recipes(
    strategy: str,
    allocation: str = "common_beta",
    *,
    weighting_samples: int = 256,
    recalibration_samples: int = 1000,
    refit_samples: int = 0,
    refit_variants: Sequence[str] = ("joint",),
    refit_iterations: int = 3,
) -> dict[str, Recipe]:
    """The recipes of one strategy and allocation, by recovery: ``"none"``; with
    ``recalibration_samples``, ``"BN"`` (BatchNorm statistics); with ``refit_samples``
    too, ``"refit+BN"`` (the joint refit on PGD inputs, then BatchNorm) and
    ``"pointwise refit+BN"`` as ``refit_variants`` ask (:data:`REFITS`)."""
    unknown = [v for v in refit_variants if v not in REFITS]
    if unknown or not refit_variants:
        raise ValueError(
            f"refit_variants must be a non-empty sequence of {REFITS}; got "
            f"{list(refit_variants)!r}."
        )
    weighting = Weighting(strategy, samples=weighting_samples)
    name = f"{strategy}, {allocation}"
    recipes = {"none": Recipe(name, weighting, allocation)}
    if recalibration_samples:
        batchnorm = BatchNormStatistics(recalibration_samples)
        recipes["BN"] = Recipe(f"{name} + BN", weighting, allocation, Recovery(batchnorm=batchnorm))
        for variant in refit_variants if refit_samples else ():
            label = "refit+BN" if variant == "joint" else f"{variant} refit+BN"
            refit = Refit(refit_samples, depthwise=variant == "joint", iterations=refit_iterations)
            recovery = Recovery(refit=refit, batchnorm=batchnorm)
            recipes[label] = Recipe(f"{name} + {label}", weighting, allocation, recovery)
    return recipes


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
    refit_variants: Sequence[str] = ("joint",),
    refit_iterations: int = 3,
    calibration: CalibrationAttack | None = None,
    n_test: int | None = None,
    wrap: Callable[[nn.Module], nn.Module] = lambda model: model,
    fps_backend: str | None = "eager",
    keep_models: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Evaluate every (strategy, allocation, recovery, MAC target) on the same attack.

    Parameters
    ----------
    network : torch.nn.Module
        The dense network (not modified); ``wrap(network)`` is what is compressed and
        evaluated (e.g. with its input normalisation).
    input_shape : sequence of int
    test_loader, train_loader : iterables of (images, labels)
        Evaluation data; training data for the weightings, the calibration and the
        BatchNorm statistics (read in order: shuffle it yourself).
    attack : callable
        ``attack(model) -> attack(images, labels)``, the evaluation attack of every model.
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
        Measured speed-ups: each strategy is also compressed with ``target_speedup``
        (rows with ``allocation="latency"``, ``target`` the speed-up, and what was
        measured: ``measured_speedup``, ``spread``, ``reached``; a model that misses its
        target is kept, and its row says so). Each recovery's row is a conversion of its
        own (its own measured plan). GDWS only: refused with other methods alone.
    latency : Latency, optional
        Where those conversions are timed (:class:`gdws_torch.Latency`: backend, batch
        size, table).
    recalibration_samples : int
        ``0``: no recovery rows; otherwise every model also has a "BN" twin (BatchNorm
        statistics re-estimated on that many training inputs).
    weighting_samples : int
        Inputs for the data-driven weightings (noise gains, patch moments).
    refit_samples : int
        ``> 0``: every model also has a twin per refit variant: its compressed layers
        refitted on that many training inputs made adversarial by ``calibration``
        against the dense network (crafted once), then BatchNorm recalibrated.
    refit_variants : sequence of str
        From :data:`REFITS`: rows "refit+BN" (the joint refit) and "pointwise refit+BN".
    refit_iterations : int
        Alternations of the joint refit.
    calibration : CalibrationAttack, optional
        The attack crafting the noise gains' and the refit's inputs (default: Linf PGD-10
        at 8/255).
    n_test : int, optional
    fps_backend : str or None
        Batch-1 FPS of every model on this backend (``None``: not measured).
    keep_models : bool, default=False
        Also return every model built, by row key (``results["models"]``; not JSON).

    Returns
    -------
    dict
        ``{"dense": row, "rows": [row, ...], "seconds": ...}``; a row has ``method``,
        ``strategy`` (a baseline's: its criterion), ``allocation``, ``recovery``,
        ``target``, ``beta``, ``conv_macs``, ``mac_reduction``, ``natural``, ``robust``,
        ``fps``, ``speedup``, a GDWS row its ``recipe``; the rows of a speed target also
        ``measured_speedup``, ``spread`` and ``reached``.

    Raises
    ------
    ValueError
        Before any work: unknown methods or refit variants, speed targets without GDWS,
        or (GDWS alone) a MAC target above :func:`max_mac_reduction`.
    """
    if not methods or any(m not in METHODS for m in methods):
        raise ValueError(f"methods must be a non-empty sequence of {METHODS}; got {methods!r}.")
    sweep_recipes("unit", refit_variants=refit_variants)  # the variants, checked now
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
    calibration = CalibrationAttack() if calibration is None else calibration
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
    models: dict[str, nn.Module] = {"dense": wrap(network)}
    rows, crafted = [], None
    if "gdws" in methods:
        rows, crafted = _gdws_rows(
            network,
            input_shape,
            train_loader,
            strategies,
            [(a, t) for a in allocations for t in targets]
            + [("latency", t) for t in speedup_targets],
            latency,
            {
                "weighting_samples": weighting_samples,
                "recalibration_samples": recalibration_samples if recover else 0,
                "refit_samples": refit_samples,
                "refit_variants": refit_variants,
                "refit_iterations": refit_iterations,
            },
            calibration,
            wrap,
            assess,
            models,
            progress,
            log,
        )
    baselines = [m for m in methods if m != "gdws"]
    if baselines:
        if crafted is None:  # the baselines' data-driven criteria: natural inputs
            data = [
                b[0]
                for b in take_samples(train_loader, weighting_samples, stage="baseline criterion")
            ]
        else:
            data = crafted
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
                refit_samples if recover and crafted is not None else 0,
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
    results = {
        "dense": dense,
        "methods": list(methods),
        "rows": rows,
        "refit": {
            "samples": refit_samples,
            "variants": list(refit_variants),
            "iterations": refit_iterations,
            "calibration_attack": calibration.to_dict(),
        }
        if refit_samples and recover
        else None,
        "fps_backend": fps_backend,
        "threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - start,
    }
    if keep_models:
        results["models"] = {key: model for key, model in models.items() if key != "dense"}
    return results


def _gdws_rows(
    network, input_shape, train_loader, strategies, budgets, latency, counts, calibration,
    wrap, assess, models, progress, log,
):  # fmt: skip
    """The GDWS rows: every strategy's recipes (:func:`sweep_recipes`) at every budget,
    each by :func:`gdws_torch.compress`; returns them and the refit's calibration images
    (``None`` without a refit), which the baselines' criteria read."""
    model = wrap(network)
    inputs, order, shared, crafted = {}, {}, None, None
    for strategy in strategies:
        for allocation in dict.fromkeys(a if a != "latency" else "common_beta" for a, _ in budgets):
            recipes = sweep_recipes(strategy, allocation, **counts)
            order[strategy, allocation] = list(recipes)
            # The refits first: their calibration inputs serve every recipe after them.
            for label in sorted(recipes, key=lambda k: recipes[k].recovery.refit is None):
                log(f"recipe {recipes[label].name!r}: weights and calibration inputs ...")
                shared = recipe_inputs(
                    model,
                    train_loader,
                    recipes[label],
                    eps=calibration.eps,
                    attack_steps=calibration.steps,
                    attack_alpha=calibration.alpha,
                    input_size=input_shape,
                    seed=calibration.seed,
                    reuse=shared,
                )
                inputs[strategy, allocation, label] = shared
                if shared.calibration is not None and crafted is None:
                    crafted = [batch[0] for batch in shared.calibration]
    rows = []
    jobs = [(s, a, t) for s in strategies for a, t in budgets]
    for strategy, allocation, target in tqdm(jobs, desc="sweep", disable=not progress):
        planned = "common_beta" if allocation == "latency" else allocation
        for label in order[strategy, planned]:
            recipe_in = inputs[strategy, planned, label]
            if allocation == "latency":  # a miss is kept: its row says so
                budget = {"target_speedup": target, "latency": latency, "require_target": False}
            else:
                budget = {"target_mac_reduction": target}
            try:
                compressed, report = compress(
                    model, inputs=recipe_in, input_size=input_shape, **budget
                )
            except ValueError as exc:
                log(f"{strategy}, {allocation}, {target:g}x, {label}: skipped ({exc})")
                continue
            compressed = _unwrapped(compressed, network)
            measured = {}
            if report.speed is not None:
                speed = report.speed
                measured = {
                    "measured_speedup": speed.realised_speedup,
                    "spread": speed.spread,
                    "reached": speed.reached,
                }
                if not speed.reached and label == "none":
                    log(
                        f"{strategy}, speed {target:g}x: not reached (measured "
                        f"{speed.realised_speedup:.3g}x); the row says so"
                    )
            key = f"{strategy}|{allocation}|{label}|{target:g}"
            models[key] = wrap(compressed)
            rows.append(
                {
                    "key": key,
                    "method": "gdws",
                    "strategy": strategy,
                    "allocation": allocation,
                    "recovery": label,
                    "target": target,
                    "beta": report.beta,
                    "conv_macs": count_macs(compressed, input_shape).conv_macs,
                    "mac_reduction": report.mac_reduction,
                    "recipe": recipe_in.recipe.to_dict(),
                    **measured,
                    **assess(compressed),
                }
            )
    return rows, crafted


def _unwrapped(compressed: nn.Module, network: nn.Module) -> nn.Module:
    """The compressed network without the wrapper ``wrap`` put around ``network``."""
    if type(compressed) is type(network):
        return compressed
    inner = getattr(compressed, "module", None)
    if inner is None or type(inner) is not type(network):
        raise TypeError(
            "wrap(network) must return network itself or a module holding it as .module "
            f"(as gdws_torch.nn.normalization.Normalized); got a {type(compressed).__name__}."
        )
    return inner


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
    recalibration, dash-dotted with the joint refit, dotted with the pointwise refit;
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
