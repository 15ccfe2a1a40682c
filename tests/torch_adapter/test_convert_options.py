"""The settings (Weighting, ErrorWeights, Refit, BatchNormStatistics, Recovery, Latency):
validated when built, immutable, and the same defaults at every entry point."""

from __future__ import annotations

import argparse
import dataclasses
import inspect

import pytest
import torch
from _torch_models import INPUT_SIZE, small_resnet

from gdws_torch import (
    BatchNormStatistics,
    ErrorWeights,
    Latency,
    Recovery,
    Refit,
    Weighting,
    convert,
)
from gdws_torch.conversion.weightings import STRATEGIES, strategy_weights
from gdws_torch.recovery import refit_gdws


def batches(n_batches: int = 3, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(5)
    return [
        (
            torch.rand(size, *INPUT_SIZE, generator=generator, dtype=torch.float64),
            torch.randint(0, 5, (size,), generator=generator),
        )
        for _ in range(n_batches)
    ]


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: Weighting("whiten"), ValueError, "strategy must be one of"),
        (lambda: Weighting(samples=0), ValueError, "samples must be an integer >= 1; got 0"),
        (lambda: Weighting(samples=True), TypeError, "samples must be an integer"),
        (lambda: ErrorWeights(channel_weights=[1.0]), TypeError, "channel_weights must be a"),
        (lambda: ErrorWeights(input_transforms=3), TypeError, "input_transforms"),
        (lambda: ErrorWeights(input_moments=torch.eye(3)), TypeError, "input_moments"),
        (lambda: Refit(samples=0), ValueError, "samples must be an integer >= 1"),
        (lambda: Refit(samples=True), TypeError, "samples"),
        (lambda: Refit(iterations=1.5), TypeError, "iterations"),
        (lambda: Refit(tolerance=-0.1), ValueError, "tolerance must be a finite real number"),
        (lambda: Refit(depthwise=1), TypeError, "depthwise must be a bool"),
        (lambda: Refit(adversarial="yes"), TypeError, "adversarial must be a bool"),
        (lambda: BatchNormStatistics(samples=-2), ValueError, "samples"),
        (lambda: BatchNormStatistics(adversarial=1), TypeError, "adversarial must be a bool"),
        (lambda: Recovery(refit=100), TypeError, "refit must be a Refit or None"),
        (lambda: Recovery(batchnorm=Refit()), TypeError, "batchnorm must be a Batch"),
        (lambda: Latency(backend="tvm"), ValueError, "backend must be one of"),
        (lambda: Latency(batch_size=0), ValueError, "batch_size"),
        (lambda: Latency(batch_size="1"), TypeError, "batch_size"),
        (lambda: Latency(keep_faster="yes"), TypeError, "keep_faster must be a bool"),
        (lambda: Latency(forms=("magic",)), ValueError, "forms must name"),
    ],
)
def test_bad_settings_are_refused_when_built(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_the_settings_are_immutable_and_copied_with_a_change():
    refit = Refit(samples=10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        refit.samples = 5
    changed = dataclasses.replace(refit, iterations=1)
    assert (changed.samples, changed.iterations) == (10, 1)
    with pytest.raises(ValueError, match="samples"):
        dataclasses.replace(refit, samples=0)  # checked on every copy too


def test_off_is_none_everywhere():
    assert Recovery() == Recovery(refit=None, batchnorm=None)
    assert not Recovery().needs_data and Recovery().summary() == "recovery: none"
    assert ErrorWeights().summary() == "unit" and not Weighting().needs_data
    assert not Recovery(refit=Refit(adversarial=False)).adversarial
    assert Recovery(batchnorm=BatchNormStatistics(adversarial=True)).adversarial


def _cli_recipe(*flags: str):
    """The recipe ``gdws convert`` builds from ``flags`` (on the digits data)."""
    from gdws_torch.cli import _common as common

    parser = argparse.ArgumentParser()
    common.add_model_arguments(parser, device=False)
    common.add_gdws_arguments(parser)
    common.add_attack_arguments(parser)
    args = parser.parse_args(["--model", "digits_cnn", "--dataset", "digits", *flags])
    return common.cli_recipe(args, default=True)[0]


def _sweep_recipe():
    from gdws_torch.experiments.sweep import sweep_recipes

    return sweep_recipes("unit", refit_samples=100)["refit+BN"]


def _demo_recipe():
    from gdws_torch.experiments.demo import demo_recipes

    return demo_recipes()["unit + refit + BN"]


@pytest.mark.parametrize(
    "refit_of",
    [
        lambda: Refit(),
        lambda: _cli_recipe("--refit", "100").recovery.refit,
        lambda: _cli_recipe().recovery.refit,  # the default recipe, robust
        lambda: _sweep_recipe().recovery.refit,
        lambda: _demo_recipe().recovery.refit,
    ],
    ids=["Refit", "gdws convert --refit", "gdws convert", "sweep", "demo"],
)
def test_the_refit_is_the_joint_one_at_every_entry_point(refit_of):
    joint = inspect.signature(refit_gdws).parameters["depthwise"].default
    refit = refit_of()
    assert refit.depthwise is joint is True
    assert refit.iterations == Refit().iterations == 3


def test_the_pointwise_refit_is_there_when_asked():
    assert _cli_recipe("--refit", "100", "--no-refit-depthwise").recovery.refit.depthwise is False
    from gdws_torch.experiments.sweep import sweep_recipes

    recipes = sweep_recipes("unit", refit_samples=8, refit_variants=("pointwise",))
    assert recipes["pointwise refit+BN"].recovery.refit.depthwise is False


def test_the_recovery_summary_lists_the_steps_in_order():
    text = Recovery(
        refit=Refit(24, iterations=3), batchnorm=BatchNormStatistics(8, adversarial=True)
    ).summary(inputs="training inputs")
    assert text == (
        "recovery: pointwise and depthwise weights (3 alternations) refitted on 24 PGD "
        "training inputs; BatchNorm statistics re-estimated on 8 natural and PGD training "
        "inputs"
    )
    assert Recovery(refit=Refit(5, adversarial=False, depthwise=False)).summary() == (
        "recovery: pointwise weights refitted on 5 natural inputs"
    )


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_weighting_computes_its_strategys_weights(strategy):
    model, data = small_resnet(), batches()
    computed = Weighting(strategy, samples=16).compute(model, data, INPUT_SIZE)
    raw = strategy_weights(strategy, model, INPUT_SIZE, data=data, n_samples=16)
    for field in ("channel_weights", "output_weights", "input_transforms"):
        value = getattr(computed, field)
        assert (value is None) == (field not in raw)
        if value is not None:
            assert value.keys() == raw[field].keys()
            assert all(torch.equal(value[k], raw[field][k]) for k in value)
    assert computed.input_moments is None


def test_error_weights_are_looked_up_by_any_name_of_the_layer():
    model = small_resnet()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    gains = {n: torch.rand(model.get_submodule(n).in_channels) + 0.1 for n in names}
    common = {"beta": 0.5, "input_size": INPUT_SIZE, "only_if_cheaper": False}
    _, plain = convert(model, **common, error_weights=ErrorWeights(gains))
    for spelling in ("{}.weight", "module.{}", "module.{}.weight"):
        keyed = {spelling.format(n): v for n, v in gains.items()}
        _, again = convert(model, **common, error_weights=ErrorWeights(keyed))
        assert [la.n_kernels for la in again.layers] == [la.n_kernels for la in plain.layers]
    with pytest.raises(
        ValueError, match=r"channel_weights has no entry for layer 'block.conv1' \("
    ):
        convert(model, **common, error_weights=ErrorWeights({"dilated": gains["dilated"]}))
