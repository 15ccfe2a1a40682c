"""The embedded demo: a robust digits CNN, dense vs GDWS built for a measured speed-up,
with a MAC-target (beta) sweep.

Everything it needs ships with the package: scikit-learn's digits (upsampled to 16x16)
and an adversarially trained :class:`~gdws_torch.models.DigitsCNN` checkpoint, built by::

    gdws train --model digits_cnn --dataset digits --attack pgd --epsilon 24 \\
        --pgd-alpha 6 --attack-iters 7 --epochs 30 --lr 0.05 --weight-decay 1e-2 \\
        --batch-size 64 --threads 1 --device cpu

Pipeline:

1. The headline: the GDWS model built for :data:`SPEED_TARGET` times the dense model's
   measured speed at batch 1 (:func:`gdws_torch.convert` with ``target_speedup``), on
   the backend where that speed costs the least error: each available graph runtime
   (ONNX Runtime, OpenVINO; torch eager when neither is installed) gets its latency
   table and a plan, and the least-error plan that reached the target wins. It is built
   with the frontier's best recipe (data weighting, joint refit on 1000 PGD training
   digits, BatchNorm re-estimated on 1000 natural ones; no training).
2. The sweep: LEGO with the smallest common ``beta`` reaching each target MAC reduction,
   by recipe (:data:`RECIPES`; the default three: unit weights, noise-gain channel
   weights, and the best recipe with the ``global`` MAC allocation).
3. Natural and Linf robust accuracy of every model under the same attack (PGD by
   default; APGD-CE or AutoAttack with ``attack=``), conv MACs, parameters, and batch-1
   FPS of every model on the headline's backend; the gradient-masking checks of the dense
   model (:func:`gdws_torch.robustness.masking.check_gradient_masking`).

Over 400 lines because the demo is one story told end to end (data, recipes, the
headline's backend and plan choice, the sweep, the plot); every step it runs is a
library call.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from gdws_approx.latency_planning import GDWS_FORMS
from gdws_torch.conversion.convert import convert, set_fused
from gdws_torch.conversion.eligibility import eligible_convs
from gdws_torch.conversion.options import (
    BatchNormStatistics,
    Latency,
    Recovery,
    Refit,
    Weighting,
)
from gdws_torch.conversion.pipeline import RecipeInputs, compress, recipe_inputs
from gdws_torch.conversion.recipes import RECIPES as LIBRARY_RECIPES
from gdws_torch.conversion.recipes import Recipe
from gdws_torch.cost.macs import count_macs
from gdws_torch.cost.throughput import available_backends, measure_throughput
from gdws_torch.io.checkpoints import load_checkpoint
from gdws_torch.io.datasets import load_dataset
from gdws_torch.io.figures import save_figure
from gdws_torch.models import DigitsCNN
from gdws_torch.robustness.apgd import APGD
from gdws_torch.robustness.attacks import PGD
from gdws_torch.robustness.autoattack import AutoAttack
from gdws_torch.robustness.evaluate import evaluate
from gdws_torch.robustness.masking import check_gradient_masking

__all__ = [
    "ATTACKS",
    "DEMO_ATTACK",
    "demo_inputs",
    "demo_network",
    "demo_recipes",
    "evaluation_attack",
    "plot_sweep",
    "run_demo",
    "sweep_models",
]

INPUT_SHAPE = (1, 16, 16)
# Linf PGD-20 with step 2.5 * eps / steps (Madry et al.'s rule), one random start.
DEMO_ATTACK = {"eps": 24 / 255, "alpha": 3 / 255, "steps": 20}
CALIBRATION_ATTACK = {"eps": 24 / 255, "alpha": 6 / 255, "steps": 10}
# The evaluation attacks ``run_demo(attack=...)`` takes, and their names in the tables.
ATTACKS = {
    "pgd": "PGD",
    "apgd": "APGD-CE",
    "autoattack": "AutoAttack",
    "autoattack-fast": "AutoAttack-fast",
}
MASKING_DIGITS = 100  # test digits the gradient-masking checks run on
DEFAULT_TARGET = 2.0
SWEEP_TARGETS = (1.5, 2.0, 2.5)
# The headline's speed-up over dense at batch 1. This network's layers run in tens of
# microseconds, where a runtime's per-operator cost eats most of what fewer MACs save:
# on a 2-core CPU with ONNX Runtime, 1.05 is met at 1.3x fewer MACs and costs about 0.7
# point of PGD accuracy; 1.1 costs 1.1 to 1.5 points; 1.5 costs 6 (docs/fps.md).
SPEED_TARGET = 1.05
# Backends the headline may be planned for, in order of preference on ties.
SPEED_BACKENDS = ("onnxruntime", "openvino")
# How each GDWS model is built (demo_recipes): LEGO with unit or noise-gain channel weights
# (the library's "unit" and "original" recipes), unit weights plus BatchNorm
# recalibration, unit weights plus the joint refit on adversarial training digits and
# BatchNorm recalibration, and (the default, the frontier's best: the library's "robust"
# recipe; docs/weightings.md) the patch-moment data weighting, the global MAC allocation,
# the joint (depthwise + pointwise) refit and BatchNorm recalibration.
BEST = "data, global + joint refit + BN"
RECIPES = ("unit", "noise gains", "unit + BN", "unit + refit + BN", BEST)
SWEEP_RECIPES = ("unit", "noise gains", BEST)
DEFAULT_WEIGHTING = BEST
SPEED_RECIPE = "data + joint refit + BN"
# Held-out digits that choose the headline's plan: the last 140 of the 540 test digits
# (the demo's figures are on the other 400). Training digits cannot: the network was
# adversarially trained on all of them and keeps 99 % PGD accuracy there, so they do not
# tell the candidates apart.
VALIDATION_DIGITS = 140
RECALIBRATION_SAMPLES = 1000
REFIT_SAMPLES = 1000
REFIT_ITERATIONS = 3


def demo_recipes(
    noise_gain_samples: int = 512,
    refit_depthwise: bool = True,
    refit_iterations: int = REFIT_ITERATIONS,
) -> dict[str, Recipe]:
    """The sweep's recipes by their names in the demo's tables (:data:`RECIPES`).

    ``refit_depthwise`` and ``refit_iterations``: the refit of "unit + refit + BN" (the
    joint refit by default; ``False``: the pointwise weights only) and the alternations
    of both refits.
    """
    batchnorm = BatchNormStatistics(RECALIBRATION_SAMPLES)
    refit = Refit(REFIT_SAMPLES, depthwise=refit_depthwise, iterations=refit_iterations)
    robust = LIBRARY_RECIPES["robust"]
    return {
        "unit": LIBRARY_RECIPES["unit"],
        "noise gains": LIBRARY_RECIPES["original"].replace(
            weighting=Weighting("noise_gains", samples=noise_gain_samples)
        ),
        "unit + BN": Recipe("unit + BN", recovery=Recovery(batchnorm=batchnorm)),
        "unit + refit + BN": Recipe(
            "unit + refit + BN", recovery=Recovery(refit=refit, batchnorm=batchnorm)
        ),
        BEST: robust.replace(
            recovery=Recovery(
                refit=dataclasses.replace(robust.recovery.refit, iterations=refit_iterations),
                batchnorm=robust.recovery.batchnorm,
            )
        ),
    }


def demo_inputs(
    network: nn.Module,
    train: Any,
    recipes: dict[str, Recipe],
    *,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, RecipeInputs]:
    """Every recipe's weights and calibration digits (:func:`gdws_torch.recipe_inputs`),
    computed once for all its targets: the training digits read in order (the first 1000
    calibrate), the calibration attack :data:`CALIBRATION_ATTACK`'s, seed 0."""
    fitting = DataLoader(train, batch_size=250)
    inputs = {}
    for name, recipe in recipes.items():
        log(f"recipe {name!r}: weights and calibration digits ...")
        inputs[name] = recipe_inputs(
            network,
            fitting,
            recipe,
            eps=CALIBRATION_ATTACK["eps"],
            attack_steps=CALIBRATION_ATTACK["steps"],
            input_size=INPUT_SHAPE,
            seed=0,
            progress=progress,
        )
    return inputs


def sweep_models(
    network: nn.Module,
    inputs: dict[str, RecipeInputs],
    targets: Sequence[float],
    *,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, tuple[str, float, nn.Module, Any]]:
    """The demo sweep's GDWS models: each recipe's at each MAC target, by
    :func:`gdws_torch.compress` on that recipe's shared inputs.

    Parameters
    ----------
    network : torch.nn.Module
        The dense network.
    inputs : dict of str to RecipeInputs
        Each recipe's inputs (:func:`gdws_torch.recipe_inputs`), by its name.
    targets : sequence of float
        Conv MAC reductions.

    Returns
    -------
    dict
        ``{model name: (recipe name, target, model, report)}``, recipe-major; a target a
        recipe cannot reach is left out (and logged).
    """
    from tqdm.auto import tqdm

    built = {}
    jobs = [(name, target) for name in inputs for target in targets]
    for recipe, target in tqdm(jobs, desc="GDWS sweep", unit="model", disable=not progress):
        name = f"GDWS {target:g}x, {recipe}"
        try:
            converted, report = compress(
                network, inputs=inputs[recipe], target_mac_reduction=target, input_size=INPUT_SHAPE
            )
        except ValueError as exc:  # e.g. a target this network cannot reach
            log(f"{name}: skipped ({exc})")
            continue
        built[name] = (recipe, target, converted, report)
    return built


def demo_network() -> DigitsCNN:
    """The shipped adversarially trained digits CNN, in eval mode."""
    path = resources.files("gdws_torch") / "data" / "digits_cnn.pth"
    with resources.as_file(path) as file:
        return load_checkpoint(DigitsCNN(), file).eval()


def evaluation_attack(model: nn.Module, attack: str = "pgd", steps: int | None = None):
    """The demo's Linf attack at ``DEMO_ATTACK["eps"]`` on ``model``, seed 0.

    ``attack``: a key of :data:`ATTACKS`; ``steps``: PGD's (default 20) or APGD's (default
    100) iterations (AutoAttack's are fixed).
    """
    eps = DEMO_ATTACK["eps"]
    if attack == "pgd":
        return PGD(model, **{**DEMO_ATTACK, "steps": steps or DEMO_ATTACK["steps"]}, seed=0)
    if attack == "apgd":
        return APGD(model, norm="Linf", eps=eps, steps=steps or 100, seed=0)
    if attack in ("autoattack", "autoattack-fast"):
        version = "fast" if attack == "autoattack-fast" else "standard"
        return AutoAttack(model, norm="Linf", eps=eps, version=version, seed=0)
    raise ValueError(f"attack must be one of {tuple(ATTACKS)}; got {attack!r}.")


def attack_label(attack: str, steps: int | None = None) -> str:
    """``"Linf PGD-20 (eps 24/255)"``, ``"Linf AutoAttack (eps 24/255)"``, ..."""
    name = ATTACKS[attack]
    if attack in ("pgd", "apgd"):
        name += f"-{steps or (DEMO_ATTACK['steps'] if attack == 'pgd' else 100)}"
    return f"Linf {name} (eps {DEMO_ATTACK['eps'] * 255:.0f}/255)"


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_demo(
    *,
    targets: Sequence[float] = SWEEP_TARGETS,
    default_target: float = DEFAULT_TARGET,
    recipes: Sequence[str] = SWEEP_RECIPES,
    speed_target: float = SPEED_TARGET,
    backend: str | None = None,
    n_test: int | None = None,
    noise_gain_samples: int = 512,
    attack_steps: int = DEMO_ATTACK["steps"],
    fps_rounds: int = 15,
    refit_depthwise: bool = True,
    refit_iterations: int = REFIT_ITERATIONS,
    attack: str = "pgd",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the demo pipeline and return its results (see the module notes).

    Parameters
    ----------
    targets : sequence of float
        Overall conv MAC reductions of the sweep; each is met by LEGO with the smallest
        common ``beta`` (reported), once per recipe.
    default_target : float
        The MAC-targeted model of the best recipe shown in the headline table next to the
        speed-targeted one; added to ``targets`` when missing.
    recipes : sequence of str
        The sweep's recipes, from :data:`RECIPES`.
    speed_target : float
        The headline model's speed-up over dense at batch 1, ``> 1``.
    backend : str or None, default=None
        The backend the headline is planned for and every model is timed on; ``None``:
        the one of :data:`SPEED_BACKENDS` (installed) whose plan reaches the target at the
        least error (eager when none is installed).
    n_test : int, optional
        Evaluate on the first ``n_test`` of the 400 test digits (all by default).
    noise_gain_samples : int
        Training digits the noise gains average over.
    attack_steps : int
        PGD (or APGD) iterations of the evaluation attack.
    fps_rounds : int
        Interleaved timing rounds of the models' FPS.
    refit_depthwise, refit_iterations
        The refit of "unit + refit + BN" (:func:`demo_recipes`): the joint refit (depthwise
        kernels too, by alternating least squares) or, with ``False``, the pointwise
        weights only; and the alternations of both refits.
    attack : str, default="pgd"
        The evaluation attack, a key of :data:`ATTACKS` (:func:`evaluation_attack`). The
        headline's plan is chosen with PGD on the validation digits whatever this is.
    """
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {tuple(ATTACKS)}; got {attack!r}.")
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown or not recipes:
        raise ValueError(f"recipes must be from {RECIPES}; got {list(recipes)!r}.")
    start = time.perf_counter()
    targets = sorted(set(float(t) for t in targets) | {float(default_target)})
    network = demo_network()
    held_out = load_dataset("digits", split="test", size=INPUT_SHAPE[-1])
    test = Subset(held_out, range(len(held_out) - VALIDATION_DIGITS))
    validation = DataLoader(
        Subset(held_out, range(len(test), len(held_out))), batch_size=VALIDATION_DIGITS
    )
    train = load_dataset("digits", split="train", size=INPUT_SHAPE[-1])
    test_loader = DataLoader(test, batch_size=200)
    attack_settings = {**DEMO_ATTACK, "steps": attack_steps}
    label = attack_label(attack, attack_steps)
    evaluations = {}

    def assess(model: nn.Module) -> dict[str, float]:
        attacker = evaluation_attack(model, attack, attack_steps)
        result = evaluate(model, test_loader, {"a": attacker}, n_samples=n_test, progress=False)
        evaluations.setdefault("first", result)  # the dense model's
        return {"natural": result["natural"], "robust": result["attacks"]["a"]}

    log(f"dense model: evaluating ({label}) ...")
    dense_macs = count_macs(network, INPUT_SHAPE).conv_macs
    rows = [
        {
            "model": "dense",
            "weighting": None,
            "target": None,
            "beta": None,
            "conv_macs": dense_macs,
            "mac_reduction": 1.0,
            "params": _parameters(network),
            **assess(network),
        }
    ]
    available = demo_recipes(noise_gain_samples, refit_depthwise, refit_iterations)
    chosen = {name: available[name] for name in dict.fromkeys([*recipes, BEST])}
    cooked = demo_inputs(network, train, chosen, progress=progress, log=log)

    log(f"the headline: {speed_target:g}x the dense speed at batch 1 ...")
    speed = _speed_headline(network, speed_target, backend, cooked[BEST], validation)
    backend = speed["backend"]
    models: dict[str, nn.Module] = {"dense": network, speed["name"]: speed.pop("model")}
    report = speed.pop("report")
    rows.append(
        {
            "model": speed["name"],
            "weighting": SPEED_RECIPE,
            "target": None,
            "target_speedup": speed_target,
            "beta": None,
            "conv_macs": count_macs(models[speed["name"]], INPUT_SHAPE).conv_macs,
            "mac_reduction": report.mac_reduction,
            "params": _parameters(models[speed["name"]]),
            "layers": [layer.to_dict() for layer in report.layers],
            "latency_plan": report.to_dict()["latency"],
            "recipe": report.to_dict()["recipe"],
            **assess(set_fused(copy.deepcopy(models[speed["name"]]), True)),
        }
    )

    swept = sweep_models(
        network, {name: cooked[name] for name in recipes}, targets, progress=progress, log=log
    )
    for name, (recipe, target, converted, report) in swept.items():
        models[name] = converted
        rows.append(
            {
                "model": name,
                "weighting": recipe,
                "target": target,
                "beta": report.beta,
                "conv_macs": count_macs(converted, INPUT_SHAPE).conv_macs,
                "mac_reduction": report.mac_reduction,
                "params": _parameters(converted),
                "layers": [layer.to_dict() for layer in report.layers],
                "recipe": report.to_dict()["recipe"],
                **assess(set_fused(copy.deepcopy(converted), True)),
            }
        )
    log(
        f"timing {len(models)} models on {backend} at batch 1 "
        f"({torch.get_num_threads()} threads) ..."
    )
    timed = measure_throughput(
        models, INPUT_SHAPE, backends=(backend,), batch_sizes=(1,), rounds=fps_rounds
    )
    fps = {row["model"]: row["fps"] for row in timed}
    for row in rows:
        row["fps"] = fps[row["model"]]
        row["speedup"] = row["fps"] / fps["dense"]
    digits = Subset(test, range(min(MASKING_DIGITS, n_test or len(test))))
    images, labels = next(iter(DataLoader(digits, batch_size=len(digits))))
    by_attack = evaluations["first"].get("by_attack", {}).get("a")
    masking = check_gradient_masking(network, images, labels, by_attack=by_attack)
    default = next(
        (
            r
            for r in rows
            if r["weighting"] == DEFAULT_WEIGHTING and r["target"] == float(default_target)
        ),
        None,
    )
    return {
        "dataset": (
            f"scikit-learn digits, 16x16, 1257 train / {len(test)} test / "
            f"{VALIDATION_DIGITS} validation"
        ),
        "n_test": len(test) if n_test is None else min(n_test, len(test)),
        "attack": {
            "name": attack,
            "label": label,
            "norm": "Linf",
            **(attack_settings if attack == "pgd" else {"eps": DEMO_ATTACK["eps"]}),
            **({"steps": attack_steps} if attack == "apgd" else {}),
            "seed": 0,
            **({"random_start": True} if attack == "pgd" else {}),
            **({"by_attack": by_attack} if by_attack else {}),
        },
        "masking_checks": masking.to_dict(),
        "recipes": {name: inputs.recipe.to_dict() for name, inputs in cooked.items()},
        "calibration_attack": cooked[BEST].attack.to_dict(),
        "backend": backend,
        "speed_target": float(speed_target),
        "backend_choice": speed["backends"],
        "headline_candidates": speed["candidates"],
        "dense_validation_robust": speed["dense_validation_robust"],
        "headline_rule": speed["rule"],
        "default_target": float(default_target),
        "default_weighting": DEFAULT_WEIGHTING,
        "dense": rows[0],
        "speed": rows[1],
        "default": default,
        "sweep": rows[2:],
        "threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - start,
    }


def _speed_headline(
    network: nn.Module,
    target: float,
    backend: str | None,
    inputs: RecipeInputs,
    validation: DataLoader,
) -> dict[str, Any]:
    """The GDWS model built for ``target`` times the dense speed, by ``inputs``' recipe.

    1. The backend: each candidate gets a plan for the target (the recipe's weighting,
       without recovery: cheap); the least weighted error among those that reached it
       wins (else the fastest).
    2. The plan: on this network the least-weighted-error plan is not always the one
       that keeps robust accuracy best (the weighting measures each layer's error, not
       what the next layers and the classifier make of it). So the plan for all layers
       and the plans that change a single layer, those that reached the target, are
       built with the whole recipe; the fastest (measured) whose PGD accuracy on the
       :data:`VALIDATION_DIGITS` validation digits is within 1 point of the dense
       model's wins (else the most robust there). The test digits the demo reports play
       no part in the choice.

    Latency tables come from the user's cache (timed and added there on the first run).
    The plans offer the GDWS forms only (``GDWS_FORMS``): the headline is a GDWS model.
    """
    from gdws_torch.cost.latency_tables import LatencyTable

    installed = available_backends()
    candidates = [backend] if backend else [b for b in SPEED_BACKENDS if b in installed]
    candidates = candidates or ["eager"]
    tables, backends = {}, []
    # The planner's error weights, as compress gives them for a speed target (with the
    # calibration digits' input moments): the backends' plans compare as the built ones.
    weights = inputs.speed_weights(network, [name for name, _ in eligible_convs(network)])
    for name in candidates:
        tables[name] = LatencyTable.default(name)
        try:
            _, plan = convert(
                network,
                target_speedup=target,
                latency=Latency(backend=name, table=tables[name], forms=GDWS_FORMS),
                input_size=INPUT_SHAPE,
                error_weights=weights,
                require_target=False,  # the candidates are compared by what they reached
            )
        except ValueError as exc:  # out of reach on this backend
            backends.append({"backend": name, "reached": False, "why": str(exc)})
            continue
        backends.append({"backend": name, **_plan_record(plan)})
    planned = [t for t in backends if "error" in t]
    if not planned:
        raise ValueError(
            f"a {target:g}x speed-up is out of reach on every backend tried: "
            + "; ".join(f"{t['backend']}: {t['why']}" for t in backends)
        )
    chosen = _least_error_reached(planned)
    for entry in backends:
        entry["chosen"] = entry is chosen
    name = chosen["backend"]

    def build(layers: list[str] | None) -> tuple[nn.Module, Any]:
        return compress(
            network,
            inputs=inputs,
            target_speedup=target,
            input_size=INPUT_SHAPE,
            latency=Latency(backend=name, table=tables[name], forms=GDWS_FORMS),
            layers=layers,
            require_target=False,  # the plans that reached the target are kept below
        )

    built = []
    for layers in [None] + [[layer] for layer, _ in eligible_convs(network)]:
        try:
            model, report = build(layers)
        except ValueError:  # out of reach with this layer alone
            continue
        record = {"layers": layers or "all", **_plan_record(report)}
        if not record["reached"]:
            continue
        record["validation_robust"] = _robust_accuracy(model, validation)
        built.append((record, model, report))
    if not built:  # nothing reached the target: the least-error plan, as it came out
        model, report = build(None)
        built.append(({"layers": "all", **_plan_record(report)}, model, report))
    dense_validation = _robust_accuracy(network, validation)
    floor = dense_validation - 1.0
    kept = [b for b in built if b[0].get("validation_robust", floor) >= floor]
    if kept:  # the fastest that holds robust accuracy
        record, model, report = max(kept, key=lambda b: b[0]["realised_speedup"])
        rule = "the fastest within 1 point of dense on the validation digits"
    else:
        record, model, report = max(built, key=lambda b: b[0].get("validation_robust", 0))
        rule = "none within 1 point of dense on the validation digits: the most robust there"
    for entry, _, _ in built:
        entry["chosen"] = entry is record
    return {
        "backend": name,
        "name": f"GDWS {target:g}x speed, {SPEED_RECIPE} ({name})",
        "model": model,
        "report": report,
        "backends": backends,
        "candidates": [entry for entry, _, _ in built],
        "dense_validation_robust": dense_validation,
        "rule": rule,
    }


def _robust_accuracy(model: nn.Module, loader: DataLoader) -> float:
    """PGD accuracy (%) of ``model`` on ``loader`` under the demo's attack."""
    attack = PGD(model, **DEMO_ATTACK, seed=0)
    return evaluate(model, loader, {"pgd": attack}, progress=False)["attacks"]["pgd"]


def _plan_record(report: Any) -> dict[str, Any]:
    speed = report.speed
    return {
        "reached": speed.reached,
        "error": report.error,
        "realised_speedup": speed.realised_speedup,
        "dense_ms": speed.measured_dense_ms,
        "mac_reduction": report.mac_reduction,
    }


def _least_error_reached(planned: list[dict]) -> dict:
    reached = [t for t in planned if t["reached"]]
    if reached:
        return min(reached, key=lambda t: t["error"])
    return max(planned, key=lambda t: t["realised_speedup"])


def plot_sweep(results: dict[str, Any], path: str | Path) -> Path:
    """Robust accuracy against conv MAC reduction and against FPS on the headline's
    backend, one PNG (atomic write)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    dense = results["dense"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 5.2), layout="constrained")
    markers = {"unit": "o", "noise gains": "s", "unit + BN": "^", "unit + refit + BN": "D"}
    markers[BEST] = "P"
    labels = {
        "unit": "GDWS, unit weights",
        "noise gains": "GDWS, noise-gain channel weights",
        "unit + BN": "GDWS, unit weights + BN recalibration",
        "unit + refit + BN": "GDWS, unit weights + joint refit (PGD) + BN",
        BEST: "GDWS, data weighting, global allocation + joint refit (PGD) + BN",
    }
    refit = results.get("recipes", {}).get("unit + refit + BN", {}).get("recovery", {})
    if refit.get("refit") and not refit["refit"]["depthwise"]:
        labels["unit + refit + BN"] = "GDWS, unit weights + pointwise refit (PGD) + BN"
    for weighting in RECIPES:
        rows = [r for r in results["sweep"] if r["weighting"] == weighting]
        if not rows:
            continue
        label = labels[weighting]
        left.plot(
            [r["mac_reduction"] for r in rows],
            [r["robust"] for r in rows],
            marker=markers[weighting],
            label=label,
        )
        right.plot(
            [r["fps"] for r in rows],
            [r["robust"] for r in rows],
            marker=markers[weighting],
            linestyle="none",
            label=label,
        )
    speed = results.get("speed")
    for axis, x in ((left, 1.0), (right, dense["fps"])):
        axis.scatter(
            [x], [dense["robust"]], marker="*", s=180, color="black", label="dense", zorder=3
        )
        if speed:
            axis.scatter(
                [speed["mac_reduction"] if axis is left else speed["fps"]],
                [speed["robust"]],
                marker="X",
                s=140,
                color="crimson",
                label=f"GDWS built for {speed['target_speedup']:g}x speed ({results['backend']})",
                zorder=4,
            )
        axis.axhline(dense["robust"] - 1, color="grey", linestyle=":", linewidth=1)
        axis.set_ylabel("robust accuracy (%)")
        axis.grid(alpha=0.3)
    left.set_xlabel("conv MAC reduction (x fewer than dense)")
    right.set_xlabel(
        f"frames per second, batch 1, {results['backend']}, CPU ({results['threads']} threads)"
    )
    right.axvline(dense["fps"], color="grey", linestyle=":", linewidth=1)
    attack = results["attack"]
    label = attack.get("label") or f"Linf PGD-{attack['steps']} (eps {attack['eps'] * 255:.0f}/255)"
    figure.suptitle(
        f"Robust digits CNN: {label}, LEGO sweep (dotted: 1 point below dense; dense FPS)"
    )
    handles, labels = left.get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=2, fontsize="small")
    return save_figure(figure, path)
