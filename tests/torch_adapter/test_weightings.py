"""Error weightings in the torch adapter: what each strategy computes, and that convert plans
exactly what the estimator fits under those weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _torch_models import INPUT_SIZE, small_resnet
from torch import nn

from gdws_approx import GDWSApproximator
from gdws_torch import ErrorWeights, GDWSConv2d, Weighting, convert
from gdws_torch.conversion.weightings import (
    batchnorm_output_weights,
    input_patch_transforms,
    strategy_weights,
)


def batches(n=12, batch=4):
    generator = torch.Generator().manual_seed(5)
    x = torch.rand(n, *INPUT_SIZE, dtype=torch.float64, generator=generator)
    return [
        (x[i : i + batch], torch.zeros(len(x[i : i + batch]), dtype=torch.long))
        for i in range(0, n, batch)
    ]


def test_output_weights_are_the_scale_of_the_batchnorm_right_after_each_conv():
    model = small_resnet()
    weights = batchnorm_output_weights(model, INPUT_SIZE)
    assert set(weights) == {"block.conv1", "block.conv2", "dilated", "reflect"}
    bn = model.block.bn1  # block.conv1 -> block.bn1
    expected = bn.weight.detach().abs() / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(weights["block.conv1"], expected.double())
    bn = model.bn2  # dilated -> bn2
    expected = bn.weight.detach().abs() / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(weights["dilated"], expected.double())
    # block.conv2 feeds an addition and reflect a ReLU: no BatchNorm right after them.
    assert torch.equal(weights["block.conv2"], torch.ones(24, dtype=torch.float64))
    assert torch.equal(weights["reflect"], torch.ones(32, dtype=torch.float64))


def test_patch_transforms_are_square_roots_of_each_channels_patch_moments():
    model = small_resnet()
    data = batches()
    ridge = 1e-2
    transforms = input_patch_transforms(model, data, 12, ridge=ridge)
    conv = model.dilated
    inputs = []
    handle = conv.register_forward_pre_hook(lambda m, i: inputs.append(i[0].detach()))
    with torch.no_grad():
        for x, _ in data:
            model(x)
    handle.remove()
    x = torch.cat(inputs)
    patches = F.unfold(x, 3, dilation=2, padding=2)  # (N, C*9, L): an independent unfold
    n, _, length = patches.shape
    by_channel = patches.reshape(n, 24, 9, length).permute(1, 2, 0, 3).reshape(24, 9, -1)
    moments = by_channel @ by_channel.transpose(1, 2) / (n * length)
    scale = torch.diagonal(moments, dim1=1, dim2=2).mean(1)
    expected = moments + ridge * scale[:, None, None] * torch.eye(9, dtype=torch.float64)
    B = transforms["dilated"]
    assert B.shape == (24, 9, 9)
    torch.testing.assert_close(B @ B, expected, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(B, B.transpose(1, 2))  # symmetric


@pytest.mark.parametrize("strategy", ["unit", "output", "data", "output+data", "noise_gains"])
def test_convert_plans_exactly_the_estimators_weighted_fit(strategy):
    model = small_resnet()
    kwargs = strategy_weights(strategy, model, INPUT_SIZE, data=batches(), n_samples=8)
    converted, report = convert(
        model,
        input_size=INPUT_SIZE,
        n_kernels=20,
        only_if_cheaper=False,
        error_weights=Weighting(strategy, samples=8).compute(model, batches(), INPUT_SIZE),
    )
    for layer in report.layers:
        conv = model.get_submodule(layer.name)
        fit_kwargs = {}
        if "channel_weights" in kwargs:
            fit_kwargs["alpha"] = kwargs["channel_weights"][f"{layer.name}.weight"]
        if "output_weights" in kwargs:
            fit_kwargs["output_weights"] = kwargs["output_weights"][layer.name]
        if "input_transforms" in kwargs:
            fit_kwargs["input_transforms"] = kwargs["input_transforms"][layer.name]
        reference = GDWSApproximator(solver="mego", n_kernels=20).fit(
            conv.weight.detach(), **fit_kwargs
        )
        module = converted.get_submodule(layer.name)
        assert isinstance(module, GDWSConv2d) and module.n_kernels == reference.n_kernels_
        torch.testing.assert_close(
            module.dense_weight().detach(),
            torch.as_tensor(reference.inverse_transform(reference.pointwise_weights_)),
        )


def test_global_allocation_through_convert_meets_the_target():
    model = small_resnet()
    weights = Weighting("data", samples=8).compute(model, batches(), INPUT_SIZE)
    _, report = convert(
        model,
        input_size=INPUT_SIZE,
        target_mac_reduction=1.6,
        error_weights=weights,
        allocation="global",
    )
    assert report.mac_reduction >= 1.6 and report.solver == "mego"


def test_bad_strategies_and_inputs():
    model = small_resnet()
    with pytest.raises(ValueError, match="strategy must be one of"):
        Weighting("whiten")
    with pytest.raises(ValueError, match="samples must be an integer >= 1; got 0"):
        Weighting("data", samples=0)
    with pytest.raises(ValueError, match="the 'data' weighting reads training data"):
        Weighting("data").compute(model, None, INPUT_SIZE)
    with pytest.raises(ValueError, match="strategy 'data' needs training data"):
        strategy_weights("data", model, INPUT_SIZE)
    with pytest.raises(ValueError, match="ran out after 12"):
        input_patch_transforms(model, batches(), 13)
    with pytest.raises(ValueError, match="n_samples must be an integer >= 1; got 0"):
        input_patch_transforms(model, batches(), 0)
    with pytest.raises(TypeError, match=r"n_samples must be an integer >= 1; got 2\.0 \(float\)"):
        input_patch_transforms(model, batches(), 2.0)
    with pytest.raises(TypeError, match="output_weights must be a mapping"):
        convert(model, input_size=INPUT_SIZE, error_weights=ErrorWeights(output_weights=[1.0]))
    bad = {"dilated": -torch.ones(24)}
    with pytest.raises(ValueError, match=r"layer 'dilated'.*positive"):
        convert(
            model, input_size=INPUT_SIZE, beta=0.2, error_weights=ErrorWeights(output_weights=bad)
        )


def test_no_batchnorm_means_unit_output_weights():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)
    ).double()
    weights = batchnorm_output_weights(model, INPUT_SIZE)
    assert list(weights) == ["2"] and torch.equal(weights["2"], torch.ones(8, dtype=torch.float64))
