"""Recipes and the pipeline (recipe_inputs -> convert -> recover = compress): properties of
the models they give, not the steps they take."""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import json

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from gdws_torch import (
    RECIPES,
    BatchNormStatistics,
    CalibrationAttack,
    ErrorWeights,
    Recipe,
    Recovery,
    Refit,
    Weighting,
    compress,
    convert,
    get_recipe,
    recipe_inputs,
    recover,
)
from gdws_torch.conversion.noise_gains import noise_gains
from gdws_torch.experiments.demo import INPUT_SHAPE, demo_network
from gdws_torch.io.datasets import load_dataset
from gdws_torch.recovery import recalibrate_batchnorm, refit_gdws
from gdws_torch.robustness.attacks import PGD

EPS = 24 / 255
# The robust recipe on fewer digits, to keep the tests short.
SMALL_ROBUST = RECIPES["robust"].replace(
    recovery=Recovery(refit=Refit(samples=200), batchnorm=BatchNormStatistics(samples=300))
)


@pytest.fixture(scope="module")
def digits():
    train = load_dataset("digits", split="train", size=INPUT_SHAPE[-1])
    return DataLoader(Subset(train, range(600)), batch_size=100)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def weighted_error(model, dense, transforms, names) -> dict[str, float]:
    """Each layer's error under the data weighting, ``sum_c ||(W_c - What_c) B_c||^2``,
    computed here in float64 from the built layers' dense equivalents."""
    errors = {}
    for name in names:
        W = dense.get_submodule(name).weight.detach().double()
        layer = model.get_submodule(name)
        W_hat = layer.dense_weight().detach().double() if hasattr(layer, "dense_weight") else W
        m, c = W.shape[:2]
        diff = (W - W_hat).reshape(m, c, -1).permute(1, 0, 2)  # (C, M, K2)
        errors[name] = float(((diff @ transforms[name].double()) ** 2).sum())
    return errors


def test_the_robust_recipe_is_its_stages_in_order(digits):
    """Bit-for-bit the model the robust recipe gave before the pipeline had stages: the data
    weighting on 256 inputs, Linf PGD-10 calibration on the first 200 (step 2.5 eps / 10,
    seed 0), the global allocation, the joint refit, BatchNorm on 300 natural inputs."""
    net = demo_network()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fast, report = compress(
        net, digits, target_mac_reduction=2, recipe=SMALL_ROBUST, eps=EPS, input_size=INPUT_SHAPE
    )
    weights = Weighting("data", samples=256).compute(net, digits, INPUT_SHAPE)
    crafter = PGD(net, eps=EPS, alpha=2.5 * EPS / 10, steps=10, seed=0)
    calibration = [(crafter(x[:100], y[:100]), y[:100]) for x, y in list(digits)[:2]]
    by_hand, plan = convert(
        net,
        target_mac_reduction=2,
        input_size=INPUT_SHAPE,
        error_weights=weights,
        allocation="global",
    )
    refit_gdws(net, by_hand, calibration, 200, inplace=True, progress=False)
    recalibrate_batchnorm(by_hand, digits, 300, inplace=True, progress=False)
    assert same_weights(fast, by_hand)
    assert [layer.n_kernels for layer in report.layers] == [
        layer.n_kernels for layer in plan.layers
    ]
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not fast.training and report.mac_reduction >= 2


def test_the_report_reads_the_plan_and_says_every_stage(digits):
    net = demo_network()
    _, report = compress(
        net, digits, target_mac_reduction=2, recipe=SMALL_ROBUST, eps=EPS, input_size=INPUT_SHAPE
    )
    plan = report.conversion.plan
    assert (report.layers, report.macs, report.beta) == (plan.layers, plan.macs, plan.beta)
    assert report.mac_reduction == plan.mac_reduction and report.error == plan.error
    stages = ["weighting", "calibration", "conversion", "refit", "batchnorm"]
    assert list(report.seconds) == stages and all(t > 0 for t in report.seconds.values())
    assert report.inputs["calibration_samples"] == 200 and report.inputs["calibration"] == "PGD"
    record = json.loads(json.dumps(report.to_dict()))
    assert record["recipe"]["name"] == "robust" and record["recipe"]["allocation"] == "global"
    assert record["recipe"]["recovery"]["refit"]["samples"] == 200
    assert record["recipe"]["calibration_attack"]["eps"] == EPS
    assert list(record["seconds"]) == stages and record["mac_reduction"] == plan.mac_reduction
    replaced = {layer.name for layer in report.layers if layer.replaced}
    assert set(record["recovery"]["refit_errors"]) == replaced
    table = report.format_table()
    assert "recipe 'robust'" in table and "time: weighting" in table
    assert "refitted on 200 PGD inputs" in table
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.seconds = {}


def test_the_data_weighted_recipe_is_never_worse_in_its_weighted_error_than_unit(digits):
    """At the same kernels in every layer (the same MACs), the data weighting's MEGO is the
    least weighted error: the unit recipe's layers, measured under those weights, are never
    better."""
    net = demo_network()
    unit, unit_report = compress(net, target_mac_reduction=2, recipe="unit", input_size=INPUT_SHAPE)
    kernels = {layer.name: layer.n_kernels for layer in unit_report.layers if layer.replaced}
    data = Recipe("data", weighting=Weighting("data", samples=256))
    weighted, report = compress(
        net, digits, n_kernels=kernels, recipe=data, input_size=INPUT_SHAPE, layers=list(kernels)
    )
    assert report.macs == unit_report.macs
    transforms = Weighting("data", samples=256).compute(net, digits, INPUT_SHAPE).input_transforms
    ours = weighted_error(weighted, net, transforms, kernels)
    theirs = weighted_error(unit, net, transforms, kernels)
    # float32 layers: their dense weights are exact to about 1e-7 of the weight's scale
    assert all(ours[n] <= theirs[n] * (1 + 1e-4) + 1e-9 for n in kernels)
    assert sum(ours.values()) < 0.99 * sum(theirs.values())  # and strictly better
    for layer in report.layers:  # the report's error is the error measured here
        assert layer.error == pytest.approx(ours[layer.name], rel=1e-4)


def test_the_refit_never_raises_a_layers_error_on_its_calibration_inputs(digits):
    net = demo_network()
    _, report = compress(
        net, digits, target_mac_reduction=2.5, recipe=SMALL_ROBUST, eps=EPS, input_size=INPUT_SHAPE
    )
    errors = report.recovery.refit_errors
    steps = [pair for e in errors.values() for pair in itertools.pairwise(e)]
    assert errors and all(later <= earlier * (1 + 1e-9) for earlier, later in steps)
    assert all(e[-1] < e[0] for e in errors.values())  # and lowers every layer's


def test_the_original_recipe_is_lego_with_noise_gains(digits):
    net = demo_network()
    original = RECIPES["original"].replace(weighting=Weighting("noise_gains", samples=100))
    fast, report = compress(net, digits, beta=0.5, recipe=original, eps=EPS, input_size=INPUT_SHAPE)
    attack = PGD(net, eps=EPS, alpha=2.5 * EPS / 10, steps=10, seed=0)
    gains = noise_gains(net, digits, 100, attack=attack, progress=False)
    by_hand, plan = convert(
        net, beta=0.5, input_size=INPUT_SHAPE, error_weights=ErrorWeights(gains)
    )
    assert same_weights(fast, by_hand) and report.beta == plan.beta == 0.5
    assert report.to_dict()["recipe"]["weighting"]["strategy"] == "noise_gains"


def test_channel_weights_given_replace_the_unit_recipes_weighting(digits):
    net = demo_network()
    gains = noise_gains(net, digits, 50, progress=False)
    given, _ = compress(
        net,
        target_mac_reduction=2,
        recipe="unit",
        error_weights=ErrorWeights(gains),
        input_size=INPUT_SHAPE,
    )
    by_hand, _ = convert(
        net, target_mac_reduction=2, input_size=INPUT_SHAPE, error_weights=ErrorWeights(gains)
    )
    plain, _ = compress(net, target_mac_reduction=2, recipe="unit", input_size=INPUT_SHAPE)
    assert same_weights(given, by_hand) and not same_weights(given, plain)
    with pytest.raises(ValueError, match="error_weights replace the recipe's weighting"):
        compress(
            net,
            digits,
            target_mac_reduction=2,
            error_weights=ErrorWeights(gains),
            input_size=INPUT_SHAPE,
        )


def test_recipe_inputs_serve_several_budgets_unchanged(digits):
    net = demo_network()
    inputs = recipe_inputs(net, digits, SMALL_ROBUST, eps=EPS, input_size=INPUT_SHAPE)
    assert inputs.n_calibration == 200 and inputs.recipe is SMALL_ROBUST
    again, _ = compress(net, inputs=inputs, target_mac_reduction=2.5, input_size=INPUT_SHAPE)
    fresh, report = compress(
        net,
        digits,
        target_mac_reduction=2.5,
        recipe=SMALL_ROBUST,
        eps=EPS,
        input_size=INPUT_SHAPE,
    )
    assert same_weights(again, fresh)
    assert list(report.seconds)[:2] == ["weighting", "calibration"]
    with pytest.raises(ValueError, match="give data or inputs"):
        compress(net, list(digits), inputs=inputs, beta=0.5, input_size=INPUT_SHAPE)


def test_inputs_reused_from_another_recipe_give_the_same_models(digits):
    """What ``reuse`` takes (the weights of the same weighting, the calibration inputs of
    the same refit) is what a fresh computation gives: the models are identical."""
    net = demo_network()
    weighting = Weighting("data", samples=128)
    with_refit = Recipe(
        "a", weighting, recovery=Recovery(refit=Refit(100, depthwise=False), batchnorm=None)
    )
    other = Recipe("b", weighting, "global", Recovery(refit=Refit(100, iterations=1)))
    first = recipe_inputs(net, digits, with_refit, eps=EPS, input_size=INPUT_SHAPE)
    shared = recipe_inputs(net, digits, other, eps=EPS, input_size=INPUT_SHAPE, reuse=first)
    fresh = recipe_inputs(net, digits, other, eps=EPS, input_size=INPUT_SHAPE)
    assert shared.calibration is first.calibration
    assert shared.error_weights is first.error_weights
    a, _ = compress(net, inputs=shared, target_mac_reduction=2, input_size=INPUT_SHAPE)
    b, _ = compress(net, inputs=fresh, target_mac_reduction=2, input_size=INPUT_SHAPE)
    assert same_weights(a, b)
    stronger = recipe_inputs(net, digits, other, eps=2 * EPS, input_size=INPUT_SHAPE, reuse=first)
    assert stronger.calibration is not first.calibration  # another attack: crafted again
    with pytest.raises(ValueError, match="reuse holds inputs computed on other data"):
        recipe_inputs(net, list(digits), other, input_size=INPUT_SHAPE, reuse=first)


def test_the_unit_recipe_needs_no_data_and_is_the_plain_conversion():
    net = demo_network()
    fast, report = compress(net, target_mac_reduction=1.5, recipe="unit", input_size=INPUT_SHAPE)
    by_hand, _ = convert(net, target_mac_reduction=1.5, input_size=INPUT_SHAPE)
    assert same_weights(fast, by_hand) and report.recipe.name == "unit"
    assert not RECIPES["unit"].needs_data and RECIPES["robust"].needs_data
    assert report.recovery.seconds == {} and report.inputs["calibration_samples"] == 0


def test_recovery_on_the_calibration_inputs_is_what_compress_runs(digits):
    """compress = recipe_inputs -> convert -> recover, whatever the recovery."""
    net = demo_network()
    recipe = Recipe(
        "bn+",
        recovery=Recovery(
            refit=Refit(100, iterations=1), batchnorm=BatchNormStatistics(100, adversarial=True)
        ),
    )
    inputs = recipe_inputs(net, digits, recipe, eps=EPS, attack_steps=2, input_size=INPUT_SHAPE)
    converted, _ = convert(net, beta=0.01, input_size=INPUT_SHAPE)
    recovered, _ = recover(
        converted,
        net,
        recipe.recovery,
        calibration=inputs.calibration,
        data=digits,
        attack=CalibrationAttack(EPS, 2),
    )
    fast, _ = compress(
        net, digits, beta=0.01, recipe=recipe, eps=EPS, attack_steps=2, input_size=INPUT_SHAPE
    )
    assert same_weights(fast, recovered)


def test_recipes_are_immutable_copyable_and_validated():
    robust = get_recipe("robust")
    assert robust is RECIPES["robust"] and get_recipe(robust) is robust
    with pytest.raises(dataclasses.FrozenInstanceError):
        robust.allocation = "common_beta"
    gentle = robust.replace(name="gentle", recovery=Recovery(refit=Refit(500)))
    assert gentle.recovery.refit.samples == 500 and robust.recovery.refit.samples == 1000
    assert "joint refit on 500 PGD inputs" in gentle.summary()
    assert "BatchNorm" not in gentle.summary()
    assert json.loads(json.dumps(robust.to_dict()))["recovery"]["batchnorm"]["samples"] == 1000
    with pytest.raises(ValueError, match="recipe must be one of"):
        get_recipe("fastest")
    with pytest.raises(TypeError, match="recipe must be a name or a Recipe"):
        get_recipe(3)
    with pytest.raises(TypeError, match="weighting must be a Weighting"):
        Recipe("x", weighting="data")
    with pytest.raises(ValueError, match="allocation must be"):
        Recipe("x", allocation="greedy")
    with pytest.raises(TypeError, match="recovery must be a Recovery"):
        Recipe("x", recovery=Refit())
    with pytest.raises(TypeError, match="name must be a non-empty string"):
        Recipe("")


@pytest.mark.parametrize("stage", [compress, convert, recipe_inputs, recover])
def test_the_stages_show_their_real_signatures(stage):
    kinds = {p.kind for p in inspect.signature(stage).parameters.values()}
    assert inspect.Parameter.VAR_KEYWORD not in kinds
    assert inspect.Parameter.VAR_POSITIONAL not in kinds


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "exactly one of"),
        ({"beta": 1.0, "target_mac_reduction": 2.0}, ValueError, "exactly one of"),
        (
            {"beta": 1.0, "eps": 0.0},
            ValueError,
            r"eps must be a finite real number > 0 and <= 1 \(pixel units\); got 0\.0",
        ),
        (
            {"beta": 1.0, "eps": 8.0},
            ValueError,
            r"eps must be a finite real number > 0 and <= 1 \(pixel units\); got 8\.0",
        ),
        ({"beta": 1.0, "eps": "8/255"}, TypeError, "eps must be a finite real number"),
        (
            {"beta": 1.0, "attack_steps": 0},
            ValueError,
            "attack_steps must be an integer >= 1; got 0",
        ),
        ({"beta": 1.0, "attack_steps": 2.0}, TypeError, "attack_steps must be an integer"),
        (
            {"beta": 1.0, "attack_alpha": -0.1},
            ValueError,
            "attack_alpha must be a finite real number > 0",
        ),
        ({"beta": 1.0, "inputs": {}}, TypeError, "RecipeInputs"),
        ({"beta": 1.0, "error_weights": {}}, TypeError, "error_weights must be an ErrorWeights"),
        ({"beta": 1.0, "epsilon": 8 / 255}, TypeError, "unexpected keyword argument 'epsilon'"),
    ],
)
def test_compress_bad_arguments(digits, kwargs, error, match):
    with pytest.raises(error, match=match):
        compress(demo_network(), digits, input_size=INPUT_SHAPE, **kwargs)


def test_compress_needs_data_for_a_recipe_that_reads_it_and_enough_of_it(digits):
    net = demo_network()
    with pytest.raises(ValueError, match="reads training data"):
        compress(net, target_mac_reduction=2, input_size=INPUT_SHAPE)
    too_many = RECIPES["robust"].replace(recovery=Recovery(refit=Refit(5000)))
    with pytest.raises(
        ValueError,
        match=r"ran out after 600 samples; recipe .robust.: recovery.refit.samples=5000",
    ):
        compress(net, digits, target_mac_reduction=2, recipe=too_many, input_size=INPUT_SHAPE)
    with pytest.raises(TypeError, match="model must be"):
        compress("net", digits, beta=1.0)
