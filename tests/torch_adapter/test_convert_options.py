"""convert's option groups (Weighting, Recovery, Latency) and its deprecated keywords."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from _torch_models import INPUT_SIZE, SMALL_RESNET_ELIGIBLE, small_resnet

from gdws_torch import RECIPES, Latency, Recovery, Weighting, convert
from gdws_torch.conversion.options import LEGACY_KEYWORDS, from_legacy_keywords
from gdws_torch.conversion.weightings import strategy_weights, weighting
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


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: Weighting(alphas=[1.0]), TypeError, "alphas must be a mapping"),
        (lambda: Weighting(input_transforms=3), TypeError, "input_transforms"),
        (lambda: Weighting(allocation="greedy"), ValueError, "allocation"),
        (lambda: Recovery(refit_samples=0), ValueError, "refit_samples must be an integer >= 1"),
        (lambda: Recovery(refit_samples=True), TypeError, "refit_samples"),
        (lambda: Recovery(refit_iterations=1.5), TypeError, "refit_iterations"),
        (lambda: Recovery(recalibrate_samples=-2), ValueError, "recalibrate_samples"),
        (lambda: Recovery(refit_depthwise=1), TypeError, "refit_depthwise must be a bool"),
        (lambda: Recovery(refit_attack="pgd"), TypeError, "refit_attack must be a callable"),
        (lambda: Recovery(recalibrate_attack=3), TypeError, "recalibrate_attack"),
        (lambda: Latency(backend="tvm"), ValueError, "backend must be one of"),
        (lambda: Latency(batch_size=0), ValueError, "batch_size"),
        (lambda: Latency(batch_size="1"), TypeError, "batch_size"),
        (lambda: Latency(keep_faster="yes"), TypeError, "keep_faster must be a bool"),
    ],
)
def test_bad_settings_are_refused_when_the_group_is_built(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_the_groups_are_immutable_and_copied_with_a_change():
    recovery = Recovery(refit_samples=10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        recovery.refit_samples = 5
    changed = dataclasses.replace(recovery, refit_iterations=1)
    assert (changed.refit_samples, changed.refit_iterations) == (10, 1)
    with pytest.raises(ValueError, match="refit_samples"):
        dataclasses.replace(recovery, refit_samples=0)  # checked on every copy too


def test_the_joint_refit_is_the_default_everywhere():
    refit_default = inspect.signature(refit_gdws).parameters["depthwise"].default
    assert Recovery().refit_depthwise is refit_default is True
    assert RECIPES["robust"].refit_depthwise is True


def test_every_legacy_keyword_lands_in_its_field():
    loader, attack, table = batches(), (lambda model: None), object()
    legacy = {
        "alphas": {"a": torch.ones(3)},
        "output_weights": {"b": torch.ones(2)},
        "input_transforms": {"c": torch.eye(2)[None]},
        "allocation": "global",
        "refit": loader,
        "refit_samples": 7,
        "refit_attack": attack,
        "refit_depthwise": True,
        "refit_iterations": 2,
        "recalibrate": loader,
        "recalibrate_samples": 9,
        "backend": "channels_last",
        "latency_batch_size": 4,
        "device": "cpu",
        "latency_table": table,
        "latency_aware": True,
    }
    assert set(legacy) == {k for table_ in LEGACY_KEYWORDS.values() for k in table_}
    with pytest.warns(FutureWarning) as record:
        groups = from_legacy_keywords(legacy, {}, stacklevel=1)
    assert len(record) == 3  # one warning per group, naming the replacement
    assert {"Weighting(", "Recovery(", "Latency("} == {
        name for w in record for name in ("Weighting(", "Recovery(", "Latency(") if name in str(w)
    }
    assert groups["weighting"] == Weighting(
        alphas=legacy["alphas"],
        output_weights=legacy["output_weights"],
        input_transforms=legacy["input_transforms"],
        allocation="global",
    )
    assert groups["recovery"] == Recovery(
        refit=loader,
        refit_samples=7,
        refit_attack=attack,
        refit_depthwise=True,
        refit_iterations=2,
        recalibrate=loader,
        recalibrate_samples=9,
    )
    assert groups["latency"] == Latency(
        backend="channels_last", batch_size=4, device="cpu", table=table, keep_faster=True
    )


def test_old_keywords_keep_their_meaning_with_a_warning():
    """``refit=`` alone meant the pointwise refit: it still does, and says so."""
    model, data = small_resnet(), batches()
    common = {"beta": 0.5, "input_size": INPUT_SIZE, "only_if_cheaper": False}
    with pytest.warns(FutureWarning, match="pointwise weights only"):
        old, _ = convert(model, **common, refit=data, refit_samples=24)
    pointwise, _ = convert(
        model, **common, recovery=Recovery(refit=data, refit_samples=24, refit_depthwise=False)
    )
    joint, _ = convert(model, **common, recovery=Recovery(refit=data, refit_samples=24))
    assert same_weights(old, pointwise)
    assert not same_weights(old, joint)

    alphas = {
        f"{n}.weight": torch.rand(model.get_submodule(n).in_channels) + 0.1 for n in ["reflect"]
    }
    alphas |= {
        f"{n}.weight": torch.ones(model.get_submodule(n).in_channels)
        for n in SMALL_RESNET_ELIGIBLE
        if n != "reflect"
    }
    with pytest.warns(FutureWarning, match=r"weighting=Weighting\(alphas=...\)"):
        old, old_plan = convert(model, **common, alphas=alphas)
    new, new_plan = convert(model, **common, weighting=Weighting(alphas=alphas))
    old_plan.seconds = new_plan.seconds = None  # wall-clock times differ
    assert same_weights(old, new) and old_plan.to_dict() == new_plan.to_dict()


def test_a_keyword_and_its_group_together_are_refused():
    model = small_resnet()
    with pytest.raises(TypeError, match="recovery= and its old keyword"):
        convert(model, beta=0.5, recovery=Recovery(), refit=batches())
    with pytest.raises(TypeError, match="unexpected keyword argument 'refit_depth'"):
        convert(model, beta=0.5, refit_depth=True)


def test_recovery_summary_lists_the_steps_in_order():
    data = batches()
    assert Recovery().summary() == "recovery: none"
    text = Recovery(
        refit=data,
        refit_samples=24,
        refit_attack=lambda m: m,
        recalibrate=data,
        recalibrate_samples=8,
    ).summary()
    assert text == (
        "recovery: pointwise and depthwise weights (3 alternations) refitted on 24 adversarial "
        "inputs; BatchNorm statistics re-estimated on 8 natural inputs"
    )


def test_weighting_from_a_strategy_and_the_deprecated_helper_agree():
    model, data = small_resnet(), batches()
    built = Weighting.from_strategy(
        "output+data", model, INPUT_SIZE, loader=data, n_samples=16, allocation="global"
    )
    raw = strategy_weights("output+data", model, INPUT_SIZE, loader=data, n_samples=16)
    with pytest.warns(FutureWarning, match="Weighting.from_strategy"):
        old = weighting("output+data", model, INPUT_SIZE, loader=data, n_samples=16)
    assert built.allocation == "global" and built.alphas is None
    for key in ("output_weights", "input_transforms"):
        assert raw[key].keys() == old[key].keys() == getattr(built, key).keys()
        for name in raw[key]:
            assert torch.equal(raw[key][name], getattr(built, key)[name])
            assert torch.equal(raw[key][name], old[key][name])
