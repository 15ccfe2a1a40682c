"""Recipes and compress(): one call runs the weighting, the allocation and the recovery."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from gdws_torch import RECIPES, Latency, Recipe, compress, convert, get_recipe, recipe_inputs
from gdws_torch.conversion.noise_gains import noise_gains
from gdws_torch.conversion.options import Recovery, Weighting
from gdws_torch.experiments.demo import INPUT_SHAPE, demo_network
from gdws_torch.io.datasets import load_dataset
from gdws_torch.robustness.attacks import PGD

EPS = 24 / 255
# The robust recipe on fewer digits, to keep the tests short.
SMALL_ROBUST = RECIPES["robust"].replace(refit_samples=200, recalibrate_samples=300)


@pytest.fixture(scope="module")
def digits():
    train = load_dataset("digits", split="train", size=INPUT_SHAPE[-1])
    return DataLoader(Subset(train, range(600)), batch_size=100)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_compress_is_the_recipe_assembled_by_hand(digits):
    """The robust recipe, step by step with the library's parts, gives the same model."""
    net = demo_network()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fast, report = compress(
        net,
        digits,
        target_mac_reduction=2,
        recipe=SMALL_ROBUST,
        epsilon=EPS,
        input_size=INPUT_SHAPE,
    )
    # By hand: data weighting on 256 inputs, PGD-10 calibration on the first 200 inputs,
    # global allocation, joint refit, BatchNorm on 300 natural inputs.
    weights = Weighting.from_strategy(
        "data", net, INPUT_SHAPE, loader=digits, n_samples=256, allocation="global"
    )
    crafter = PGD(net, eps=EPS, alpha=2.5 * EPS / 10, steps=10, seed=0)
    calibration = [(crafter(x[:100], y[:100]), y[:100]) for x, y in list(digits)[:2]]
    by_hand, plan = convert(
        net,
        target_mac_reduction=2,
        input_size=INPUT_SHAPE,
        weighting=weights,
        recovery=Recovery(
            refit=calibration,
            refit_samples=200,
            refit_depthwise=True,
            refit_iterations=3,
            recalibrate=digits,
            recalibrate_samples=300,
        ),
    )
    assert same_weights(fast, by_hand)
    assert [layer.n_kernels for layer in report.layers] == [
        layer.n_kernels for layer in plan.layers
    ]
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not fast.training and report.mac_reduction >= 2
    assert report.recipe["name"] == "robust" and report.recipe["refit_samples"] == 200
    assert report.recipe["calibration_attack"]["eps"] == EPS
    assert "recipe 'robust'" in report.format_table()
    assert report.to_dict()["recipe"]["allocation"] == "global"
    stages = ["weighting", "calibration", "conversion", "refit", "recalibration"]
    assert list(report.seconds) == stages and all(t > 0 for t in report.seconds.values())
    assert "time: weighting" in report.format_table()
    assert list(report.to_dict()["seconds"]) == stages


def test_the_original_recipe_is_lego_with_noise_gains(digits):
    net = demo_network()
    original = RECIPES["original"].replace(weighting_samples=100)
    fast, report = compress(
        net, digits, beta=0.5, recipe=original, epsilon=EPS, input_size=INPUT_SHAPE
    )
    attack = PGD(net, eps=EPS, alpha=2.5 * EPS / 10, steps=10, seed=0)
    alphas = noise_gains(net, digits, 100, attack=attack, progress=False)
    by_hand, plan = convert(
        net, beta=0.5, input_size=INPUT_SHAPE, weighting=Weighting(alphas=alphas)
    )
    assert same_weights(fast, by_hand) and report.beta == plan.beta == 0.5
    assert report.recipe["weighting"] == "noise_gains"


def test_recipe_inputs_serve_several_budgets_unchanged(digits):
    net = demo_network()
    inputs = recipe_inputs(net, digits, SMALL_ROBUST, epsilon=EPS, input_size=INPUT_SHAPE)
    assert len(inputs.recovery.refit) == 2 and inputs.recipe is SMALL_ROBUST
    again, _ = compress(net, inputs=inputs, target_mac_reduction=2.5, input_size=INPUT_SHAPE)
    fresh, _ = compress(
        net,
        digits,
        target_mac_reduction=2.5,
        recipe=SMALL_ROBUST,
        epsilon=EPS,
        input_size=INPUT_SHAPE,
    )
    assert same_weights(again, fresh)


def test_the_unit_recipe_needs_no_data():
    net = demo_network()
    fast, report = compress(net, target_mac_reduction=1.5, recipe="unit", input_size=INPUT_SHAPE)
    by_hand, _ = convert(net, target_mac_reduction=1.5, input_size=INPUT_SHAPE)
    assert same_weights(fast, by_hand) and report.recipe["name"] == "unit"
    assert not RECIPES["unit"].needs_data and RECIPES["robust"].needs_data


def test_recipes_are_immutable_copyable_and_validated():
    robust = get_recipe("robust")
    assert robust is RECIPES["robust"] and get_recipe(robust) is robust
    with pytest.raises(dataclasses.FrozenInstanceError):
        robust.refit_samples = 10
    gentle = robust.replace(name="gentle", refit_samples=500)
    assert gentle.refit_samples == 500 and robust.refit_samples == 1000
    assert "joint refit on 500 PGD inputs" in gentle.summary()
    with pytest.raises(ValueError, match="recipe must be one of"):
        get_recipe("fastest")
    with pytest.raises(TypeError, match="recipe must be a name or a Recipe"):
        get_recipe(3)
    with pytest.raises(ValueError, match="weighting must be one of"):
        Recipe("x", weighting="magic")
    with pytest.raises(ValueError, match="allocation must be"):
        Recipe("x", allocation="greedy")
    with pytest.raises(TypeError, match="refit_samples must be an integer"):
        Recipe("x", refit_samples=1.5)
    with pytest.raises(ValueError, match="recalibrate_samples must be an integer >= 0"):
        Recipe("x", recalibrate_samples=-1)
    with pytest.raises(ValueError, match="refit_tolerance must be a finite real number >= 0"):
        Recipe("x", refit_tolerance=-0.1)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "exactly one of"),
        ({"beta": 1.0, "target_mac_reduction": 2.0}, ValueError, "exactly one of"),
        (
            {"beta": 1.0, "epsilon": 0.0},
            ValueError,
            r"epsilon must be a finite real number > 0 and <= 1 \(pixel units\); got 0\.0",
        ),
        (
            {"beta": 1.0, "epsilon": 8.0},
            ValueError,
            r"epsilon must be a finite real number > 0 and <= 1 \(pixel units\); got 8\.0",
        ),
        ({"beta": 1.0, "epsilon": "8/255"}, TypeError, "epsilon must be a finite real number"),
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
    ],
)
def test_compress_bad_arguments(digits, kwargs, error, match):
    with pytest.raises(error, match=match):
        compress(demo_network(), digits, input_size=INPUT_SHAPE, **kwargs)


def test_compress_needs_data_for_a_recipe_that_reads_it_and_enough_of_it(digits):
    net = demo_network()
    with pytest.raises(ValueError, match="reads training data"):
        compress(net, target_mac_reduction=2, input_size=INPUT_SHAPE)
    too_many = RECIPES["robust"].replace(refit_samples=5000)
    with pytest.raises(
        ValueError, match=r"ran out after 600 samples; recipe .robust.: refit_samples=5000"
    ):
        compress(net, digits, target_mac_reduction=2, recipe=too_many, input_size=INPUT_SHAPE)
    with pytest.raises(TypeError, match="model must be"):
        compress("net", digits, beta=1.0)


def test_compress_takes_where_to_time_as_a_latency_group_and_its_old_keywords_warn(monkeypatch):
    """``backend=``... still reach convert as the same ``Latency``, with a FutureWarning."""
    from gdws_torch.conversion import convert as convert_module

    seen = []

    def recording_convert(model, **kwargs):
        seen.append(kwargs["latency"])
        raise RuntimeError("stop here")  # the conversion itself is tested elsewhere

    monkeypatch.setattr(convert_module, "convert", recording_convert)
    net = demo_network()
    unit = {"recipe": "unit", "input_size": INPUT_SHAPE, "target_speedup": 1.2}
    wanted = Latency(backend="channels_last", batch_size=4, table="t.json")
    with pytest.raises(RuntimeError, match="stop here"):
        compress(net, latency=wanted, **unit)
    with pytest.warns(FutureWarning, match=r"compress\(\)'s keywords .* latency=Latency\("):
        with pytest.raises(RuntimeError, match="stop here"):
            compress(
                net, backend="channels_last", latency_batch_size=4, latency_table="t.json", **unit
            )
    assert seen == [wanted, wanted]
    with pytest.raises(TypeError, match="latency= and its old keyword"):
        compress(net, latency=wanted, backend="eager", **unit)
    with pytest.raises(TypeError, match="unexpected keyword argument 'latency_aware'"):
        compress(net, latency_aware=True, **unit)
