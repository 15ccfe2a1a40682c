"""The embedded demo: a robust digits CNN, dense vs GDWS, with a MAC-target (beta) sweep.

Everything it needs ships with the package: scikit-learn's digits (upsampled to 16x16)
and an adversarially trained :class:`~gdws_torch.models.DigitsCNN` checkpoint, built by::

    gdws train --model digits_cnn --dataset digits --attack pgd --epsilon 24 \\
        --pgd-alpha 6 --attack-iters 7 --epochs 30 --lr 0.05 --weight-decay 1e-2 \\
        --batch-size 64 --threads 1 --device cpu

Pipeline: noise gains (on PGD-perturbed training digits) -> LEGO with the smallest common
``beta`` reaching each target MAC reduction, with unit alphas, with noise-gain alphas, and
with unit alphas followed by re-estimated BatchNorm statistics (1000 natural training
digits, no labels, no training), with the pointwise weights also re-solved to match the
dense convs on 1000 PGD training digits, and (the default) with the input-patch ``data``
weighting, the ``global`` MAC allocation and the joint refit of depthwise kernels and
pointwise weights -> natural and l_inf PGD accuracy (the same attack on every model),
conv MACs, parameters and batch-1 CPU FPS.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from gdws_torch.attacks import PGD
from gdws_torch.checkpoints import load_checkpoint
from gdws_torch.convert import convert, set_fused
from gdws_torch.datasets import load_dataset
from gdws_torch.evaluate import evaluate
from gdws_torch.figures import save_figure
from gdws_torch.macs import count_macs
from gdws_torch.models import DigitsCNN
from gdws_torch.noise_gains import noise_gains
from gdws_torch.throughput import measure_fps
from gdws_torch.weightings import weighting as error_weighting

__all__ = ["DEMO_ATTACK", "demo_network", "plot_sweep", "run_demo"]

INPUT_SHAPE = (1, 16, 16)
# l_inf PGD-20 with step 2.5 * eps / steps (Madry et al.'s rule), one random start.
DEMO_ATTACK = {"eps": 24 / 255, "alpha": 3 / 255, "steps": 20}
ALPHA_ATTACK = {"eps": 24 / 255, "alpha": 6 / 255, "steps": 10}
DEFAULT_TARGET = 2.0
SWEEP_TARGETS = (1.5, 2.0, 2.5)
# How each GDWS model is built: LEGO with unit or noise-gain alphas (the original work),
# unit alphas plus BatchNorm recalibration, unit alphas plus the pointwise refit on
# adversarial training digits and BatchNorm recalibration, and (the default, the
# frontier's best; docs/weightings.md) the patch-moment data weighting, the global MAC
# allocation, the joint (depthwise + pointwise) refit and BatchNorm recalibration.
BEST = "data, global + joint refit + BN"
WEIGHTINGS = ("unit", "noise gains", "unit + BN", "unit + refit + BN", BEST)
DEFAULT_WEIGHTING = BEST
RECALIBRATION_SAMPLES = 1000
REFIT_SAMPLES = 1000
# The refit of "unit + refit + BN" (keyword arguments of gdws_torch.recovery.refit_gdws).
REFIT = {"depthwise": False, "iterations": 3}


def demo_network() -> DigitsCNN:
    """The shipped adversarially trained digits CNN, in eval mode."""
    path = resources.files("gdws_torch") / "data" / "digits_cnn.pth"
    with resources.as_file(path) as file:
        return load_checkpoint(DigitsCNN(), file).eval()


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_demo(
    *,
    targets: Sequence[float] = SWEEP_TARGETS,
    default_target: float = DEFAULT_TARGET,
    n_test: int | None = None,
    alpha_samples: int = 512,
    attack_steps: int = DEMO_ATTACK["steps"],
    fps_rounds: int = 15,
    refit_depthwise: bool = REFIT["depthwise"],
    refit_iterations: int = REFIT["iterations"],
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the demo pipeline and return its results (see :func:`format_results`).

    Parameters
    ----------
    targets : sequence of float
        Overall conv MAC reductions of the sweep; each is met by LEGO with the smallest
        common ``beta`` (reported), once with unit and once with noise-gain alphas.
    default_target : float
        The GDWS model the headline table compares with the dense one (the
        :data:`DEFAULT_WEIGHTING` recipe); added to ``targets`` when missing.
    n_test : int, optional
        Evaluate on the first ``n_test`` of the 540 test digits (all by default).
    alpha_samples : int
        Training digits the noise gains average over.
    attack_steps : int
        PGD iterations of the evaluation attack.
    fps_rounds : int
        Interleaved timing rounds of :func:`gdws_torch.throughput.measure_fps`.
    refit_depthwise, refit_iterations
        The refit of "unit + refit + BN" (:func:`gdws_torch.recovery.refit_gdws`): the
        depthwise kernels too (alternating least squares) or the pointwise weights only,
        and the alternations.
    """
    start = time.perf_counter()
    targets = sorted(set(float(t) for t in targets) | {float(default_target)})
    network = demo_network()
    test = load_dataset("digits", split="test", size=INPUT_SHAPE[-1])
    train = load_dataset("digits", split="train", size=INPUT_SHAPE[-1])
    test_loader = DataLoader(test, batch_size=270)
    recalibration_loader = DataLoader(
        train, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    attack_settings = {**DEMO_ATTACK, "steps": attack_steps}

    def assess(model: nn.Module) -> dict[str, float]:
        attack = PGD(model, **attack_settings, seed=0)
        result = evaluate(model, test_loader, {"pgd": attack}, n_samples=n_test, progress=False)
        return {"natural": result["natural"], "robust": result["attacks"]["pgd"]}

    log("dense model: evaluating ...")
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
    log("noise gains on PGD-perturbed training digits ...")
    alphas = noise_gains(
        network,
        DataLoader(train, batch_size=128),
        alpha_samples,
        attack=PGD(network, **ALPHA_ATTACK, seed=0),
        progress=progress,
    )
    log("input patch statistics for the data weighting ...")
    data_weighting = error_weighting("data", network, INPUT_SHAPE, loader=DataLoader(train, 128))
    log("adversarial calibration digits for the refits ...")
    crafter = PGD(network, **ALPHA_ATTACK, seed=0)
    calibration = [
        (crafter(images, labels), labels)
        for images, labels in DataLoader(Subset(train, range(REFIT_SAMPLES)), batch_size=250)
    ]
    models: dict[str, nn.Module] = {"dense": network}
    jobs = [(w, t) for w in WEIGHTINGS for t in targets]
    try:
        from tqdm.auto import tqdm

        jobs_bar = tqdm(jobs, desc="GDWS sweep", unit="model", disable=not progress)
    except ImportError:  # pragma: no cover - tqdm comes with the torch extra
        jobs_bar = jobs
    for recipe, target in jobs_bar:
        name = f"GDWS {target:g}x, {recipe}"
        best = recipe == BEST
        try:
            converted, report = convert(
                network,
                target_mac_reduction=target,
                alphas=alphas if recipe == "noise gains" else None,
                **(data_weighting if best else {}),
                allocation="global" if best else "common_beta",
                input_size=INPUT_SHAPE,
                recalibrate=recalibration_loader if recipe.endswith("+ BN") else None,
                recalibrate_samples=RECALIBRATION_SAMPLES,
                refit=calibration if "refit" in recipe else None,
                refit_samples=REFIT_SAMPLES,
                refit_depthwise=True if best else refit_depthwise,
                refit_iterations=refit_iterations,
            )
        except ValueError as exc:  # e.g. a target this network cannot reach
            log(f"{name}: skipped ({exc})")
            continue
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
                **assess(set_fused(copy.deepcopy(converted), True)),
            }
        )
    log(f"timing {len(models)} models at batch 1 ({torch.get_num_threads()} threads) ...")
    fps = measure_fps(models, INPUT_SHAPE, batch_size=1, rounds=fps_rounds)
    for row in rows:
        row["fps"] = fps[row["model"]]["fps"]
        row["speedup"] = row["fps"] / fps["dense"]["fps"]
    default = next(
        (
            r
            for r in rows
            if r["weighting"] == DEFAULT_WEIGHTING and r["target"] == float(default_target)
        ),
        None,
    )
    return {
        "dataset": "scikit-learn digits, 16x16, 1257 train / 540 test",
        "n_test": len(test) if n_test is None else min(n_test, len(test)),
        "attack": {"norm": "l_inf", **attack_settings, "random_start": True, "seed": 0},
        "alphas": {"n_samples": alpha_samples, "attack": {"norm": "l_inf", **ALPHA_ATTACK}},
        "default_target": float(default_target),
        "default_weighting": DEFAULT_WEIGHTING,
        "recalibration_samples": RECALIBRATION_SAMPLES,
        "refit": {
            "n_samples": REFIT_SAMPLES,
            "attack": {"norm": "l_inf", **ALPHA_ATTACK},
            "depthwise": refit_depthwise,
            "iterations": refit_iterations,
        },
        "dense": rows[0],
        "default": default,
        "sweep": rows[1:],
        "threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - start,
    }


def plot_sweep(results: dict[str, Any], path: str | Path) -> Path:
    """Robust accuracy against conv MAC reduction and against FPS, one PNG (atomic write)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    dense = results["dense"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    markers = {"unit": "o", "noise gains": "s", "unit + BN": "^", "unit + refit + BN": "D"}
    markers[BEST] = "P"
    labels = {
        "unit": "GDWS, unit alphas",
        "noise gains": "GDWS, noise-gain alphas",
        "unit + BN": "GDWS, unit alphas + BN recalibration",
        "unit + refit + BN": "GDWS, unit alphas + pointwise refit (PGD) + BN",
        BEST: "GDWS, data weighting, global allocation + joint refit (PGD) + BN",
    }
    if results.get("refit", {}).get("depthwise"):
        labels["unit + refit + BN"] = "GDWS, unit alphas + joint refit (PGD) + BN"
    for weighting in WEIGHTINGS:
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
    for axis, x in ((left, 1.0), (right, dense["fps"])):
        axis.scatter(
            [x], [dense["robust"]], marker="*", s=180, color="black", label="dense", zorder=3
        )
        axis.axhline(dense["robust"] - 1, color="grey", linestyle=":", linewidth=1)
        axis.set_ylabel("robust accuracy (%)")
        axis.grid(alpha=0.3)
    left.set_xlabel("conv MAC reduction (x fewer than dense)")
    right.set_xlabel(f"frames per second, batch 1, CPU ({results['threads']} threads)")
    attack = results["attack"]
    figure.suptitle(
        f"Robust digits CNN: l_inf PGD-{attack['steps']} at eps {attack['eps'] * 255:.0f}/255, "
        "LEGO sweep (dotted: 1 point below dense)"
    )
    left.legend(loc="lower left")
    return save_figure(figure, path)
