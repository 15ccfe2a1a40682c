"""Every entry point is compress: the sweep's and the demo's models are state_dict-identical
to compress with the same recipe, threat model and seed (the command line's: tests/cli)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from gdws_torch import (
    BatchNormStatistics,
    CalibrationAttack,
    Recipe,
    Recovery,
    Refit,
    Weighting,
    compress,
)
from gdws_torch.experiments import demo
from gdws_torch.experiments.sweep import run_sweep
from gdws_torch.io.datasets import load_dataset

EPS = 24 / 255


@pytest.fixture(scope="module")
def train():
    return Subset(load_dataset("digits", split="train", size=16), range(400))


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_sweeps_models_are_compress_with_each_rows_recipe(train):
    network = demo.demo_network()
    data = DataLoader(train, batch_size=100)
    test = DataLoader(Subset(load_dataset("digits", split="test", size=16), range(20)), 20)
    results = run_sweep(
        network,
        demo.INPUT_SHAPE,
        test,
        data,
        lambda model: lambda images, labels: images,  # the evaluation plays no part here
        strategies=("unit", "data"),
        targets=(2.0,),
        allocations=("common_beta", "global"),
        recalibration_samples=100,
        weighting_samples=64,
        refit_samples=100,
        refit_variants=("joint", "pointwise"),
        refit_iterations=1,
        calibration=CalibrationAttack(EPS, 2, seed=1),
        fps_backend=None,
        keep_models=True,
        progress=False,
        log=lambda message: None,
    )
    batchnorm = BatchNormStatistics(100)
    recoveries = {
        "none": Recovery(),
        "BN": Recovery(batchnorm=batchnorm),
        "refit+BN": Recovery(refit=Refit(100, iterations=1), batchnorm=batchnorm),
        "pointwise refit+BN": Recovery(
            refit=Refit(100, depthwise=False, iterations=1), batchnorm=batchnorm
        ),
    }
    rows = results["rows"]
    assert len(rows) == 2 * 2 * 4 == len(results["models"])
    for row in rows:
        recipe = Recipe(
            "expected",
            weighting=Weighting(row["strategy"], samples=64),
            allocation=row["allocation"],
            recovery=recoveries[row["recovery"]],
        )
        expected, report = compress(
            network,
            data,
            target_mac_reduction=2.0,
            recipe=recipe,
            eps=EPS,
            attack_steps=2,
            seed=1,
            input_size=demo.INPUT_SHAPE,
        )
        assert same_weights(results["models"][row["key"]], expected), row["key"]
        assert row["mac_reduction"] == report.mac_reduction and row["beta"] == report.beta


def test_the_demos_models_are_compress_with_each_recipe():
    train = load_dataset("digits", split="train", size=16)  # the demo's 1000 refit digits
    network = demo.demo_network()
    recipes = demo.demo_recipes(noise_gain_samples=64, refit_iterations=1)
    chosen = {name: recipes[name] for name in ("noise gains", "unit + refit + BN", demo.BEST)}
    built = demo.sweep_models(
        network,
        demo.demo_inputs(network, train, chosen, log=lambda message: None),
        (2.0,),
        log=lambda message: None,
    )
    assert len(built) == len(chosen)
    for recipe_name, target, model, _ in built.values():
        expected, _ = compress(
            network,
            DataLoader(train, batch_size=250),
            target_mac_reduction=target,
            recipe=chosen[recipe_name],
            eps=demo.CALIBRATION_ATTACK["eps"],
            attack_steps=demo.CALIBRATION_ATTACK["steps"],
            input_size=demo.INPUT_SHAPE,
        )
        assert same_weights(model, expected), recipe_name
    assert chosen["unit + refit + BN"].recovery.refit.depthwise  # the joint refit
