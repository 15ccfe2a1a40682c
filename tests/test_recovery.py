"""Training-free recovery: BatchNorm statistics re-estimated after the approximation."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from _torch_models import INPUT_SIZE, NoEligible, small_resnet
from torch import nn

from gdws_torch import GDWSConv2d, convert, recalibrate_batchnorm, refit_pointwise
from gdws_torch.recovery import batchnorm_layers

N_SAMPLES, BATCH = 24, 8


def loader(n: int = N_SAMPLES, batch: int = BATCH, labels: bool = True, shape=INPUT_SIZE):
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(n, *shape, dtype=torch.float64, generator=generator)
    targets = torch.randint(0, 5, (n,), generator=generator)
    return [
        (images[i : i + batch], targets[i : i + batch]) if labels else images[i : i + batch]
        for i in range(0, n, batch)
    ]


def captured_inputs(model: nn.Module, batches) -> dict[str, list[torch.Tensor]]:
    """Inputs of every BatchNorm, batch by batch, with BatchNorm using batch statistics
    (computed here by hand: the module's own normalisation is replaced)."""
    seen: dict[str, list[torch.Tensor]] = {}

    def hook(name):
        def forward(module, inputs):
            x = inputs[0]
            seen.setdefault(name, []).append(x.detach().clone())
            mean = x.mean((0, 2, 3), keepdim=True)
            var = x.var((0, 2, 3), unbiased=False, keepdim=True)
            weight = module.weight.view(1, -1, 1, 1)
            bias = module.bias.view(1, -1, 1, 1)
            return ((x - mean) / torch.sqrt(var + module.eps) * weight + bias,)

        return forward

    handles = []
    for name, module in batchnorm_layers(model):
        handles.append(module.register_forward_pre_hook(hook(name)))
        module.forward = lambda x: x  # the pre-hook already normalised
    with torch.no_grad():
        for images, _ in batches:
            model.eval()(images)
    for handle in handles:
        handle.remove()
    return seen


def test_statistics_are_the_batch_averages_of_each_layers_inputs():
    model, _ = convert(small_resnet(), input_size=INPUT_SIZE, beta=0.5, only_if_cheaper=False)
    batches = loader()
    got = recalibrate_batchnorm(model, batches, N_SAMPLES, progress=False)
    reference = captured_inputs(model, batches)  # ``model`` itself was not modified
    for name, module in batchnorm_layers(got):
        inputs = reference[name]
        mean = torch.stack([x.mean((0, 2, 3)) for x in inputs]).mean(0)
        var = torch.stack([x.var((0, 2, 3), unbiased=True) for x in inputs]).mean(0)
        torch.testing.assert_close(module.running_mean, mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(module.running_var, var, rtol=1e-10, atol=1e-12)
        assert int(module.num_batches_tracked) == len(batches)


def test_the_model_is_copied_modes_and_momenta_kept_and_weights_untouched():
    model, _ = convert(small_resnet(), input_size=INPUT_SIZE, beta=0.5, only_if_cheaper=False)
    model.train()
    model.bn0.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = recalibrate_batchnorm(model, loader(), N_SAMPLES, progress=False)
    assert out is not model
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert [m.training for m in out.modules()] == [m.training for m in model.modules()]
    assert all(m.momentum == 0.1 for _, m in batchnorm_layers(out))
    changed = {k for k, v in out.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(
        k.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked")
        for k in changed
    )

    same = recalibrate_batchnorm(model, loader(), N_SAMPLES, inplace=True, progress=False)
    assert same is model
    for k, v in out.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)


def test_adversarial_inputs_are_crafted_on_a_frozen_copy():
    model, _ = convert(small_resnet(), input_size=INPUT_SIZE, beta=0.5, only_if_cheaper=False)
    calls = []

    def factory(frozen):
        assert frozen is not model and not frozen.training

        def attack(images, labels):
            calls.append((len(images), frozen.bn0.running_mean.clone()))
            return (images + 0.01).clamp(0, 1)

        return attack

    both = recalibrate_batchnorm(model, loader(), N_SAMPLES, attack=factory, progress=False)
    assert [n for n, _ in calls] == [BATCH] * (N_SAMPLES // BATCH)
    assert all(torch.equal(m, model.bn0.running_mean) for _, m in calls)  # never updated
    assert int(both.bn0.num_batches_tracked) == 2 * (N_SAMPLES // BATCH)
    only = recalibrate_batchnorm(
        model, loader(), N_SAMPLES, natural=False, attack=factory, progress=False
    )
    assert int(only.bn0.num_batches_tracked) == N_SAMPLES // BATCH


def test_a_model_without_batchnorm_is_left_as_it_is():
    model = NoEligible().double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="no BatchNorm"):
        out = recalibrate_batchnorm(model, loader(), N_SAMPLES, progress=False)
    for k, v in out.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("kwargs", "batches", "match"),
    [
        ({"n_samples": 0}, None, "n_samples"),
        ({"n_samples": True}, None, "n_samples"),
        ({"n_samples": N_SAMPLES + 1}, None, "ran out after 24"),
        ({"natural": False}, None, "nothing to recalibrate on"),
        ({}, loader(shape=(5, 16, 16)), "rejects the loader's inputs of shape"),
        ({"attack": lambda m: lambda x, y: x}, loader(labels=False), "needs \\(images, labels\\)"),
    ],
)
def test_bad_input_is_refused_and_an_inplace_model_left_untouched(kwargs, batches, match):
    model, _ = convert(small_resnet(), input_size=INPUT_SIZE, beta=0.5, only_if_cheaper=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kwargs = {"n_samples": N_SAMPLES, **kwargs}
    with warnings.catch_warnings(), pytest.raises(ValueError, match=match):
        recalibrate_batchnorm(model, batches or loader(), inplace=True, progress=False, **kwargs)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(m.momentum == 0.1 for _, m in batchnorm_layers(model))


# -- pointwise refit ------------------------------------------------------------------------


def first_layer_error(dense, converted, name, images) -> float:
    """``||W * x - L(x)||^2`` of GDWS layer ``name`` on the inputs ``converted`` feeds it."""
    layer, conv = converted.get_submodule(name), dense.get_submodule(name)
    seen = {}
    handle = layer.register_forward_pre_hook(lambda m, i: seen.__setitem__("x", i[0]))
    with torch.no_grad():
        converted(images)
        handle.remove()
        x = seen["x"]
        wanted = conv._conv_forward(x, conv.weight, None)
        got = layer(x) - (layer.bias.view(1, -1, 1, 1) if layer.bias is not None else 0)
    return float(((wanted - got) ** 2).sum())


def test_refit_solves_each_layers_least_squares_and_keeps_the_rest():
    dense = small_resnet()
    converted, _ = convert(dense, input_size=INPUT_SIZE, target_mac_reduction=1.6)
    batches = loader(48, 16)
    refitted = refit_pointwise(dense, converted, batches, 48, ridge=0.0, progress=False)
    images = torch.cat([x for x, _ in batches])
    names = [n for n, m in converted.named_modules() if isinstance(m, GDWSConv2d)]
    # The first GDWS layer sees the same inputs before and after: least squares can only
    # lower its error, and matches an independent lstsq.
    first = names[0]
    assert first_layer_error(dense, refitted, first, images) <= first_layer_error(
        dense, converted, first, images
    ) * (1 + 1e-12)
    layer = converted.get_submodule(first)
    seen = {}
    handle = layer.register_forward_pre_hook(lambda m, i: seen.__setitem__("x", i[0]))
    with torch.no_grad():
        converted(images)
    handle.remove()
    with torch.no_grad():
        features = layer.depthwise(seen["x"].index_select(1, layer.kernel_channels))
        conv = dense.get_submodule(first)
        wanted = conv._conv_forward(seen["x"], conv.weight, None)
    F_ = features.transpose(0, 1).reshape(layer.n_kernels, -1).T.numpy()
    Y = wanted.transpose(0, 1).reshape(layer.out_channels, -1).T.numpy()
    expected = np.linalg.lstsq(F_, Y, rcond=None)[0].T
    np.testing.assert_allclose(
        refitted.get_submodule(first).pointwise.weight.detach().numpy()[:, :, 0, 0],
        expected,
        rtol=1e-6,
        atol=1e-9,
    )
    for name in names:  # depthwise kernels, biases, structure: unchanged
        before, after = converted.get_submodule(name), refitted.get_submodule(name)
        assert torch.equal(before.depthwise.weight, after.depthwise.weight)
        assert torch.equal(before.kernel_channels, after.kernel_channels)
        if before.bias is not None:
            assert torch.equal(before.bias, after.bias)
    assert refitted is not converted


def test_refit_of_an_exact_conversion_keeps_the_dense_outputs():
    dense = small_resnet()
    converted, _ = convert(dense, input_size=INPUT_SIZE, beta=0.0, only_if_cheaper=False)
    refitted = refit_pointwise(dense, converted, loader(32, 16), 32, ridge=0.0, progress=False)
    x = loader(8, 8)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(refitted(x), dense(x), rtol=1e-7, atol=1e-9)


def test_refit_on_adversarial_inputs_and_in_place():
    dense = small_resnet()
    converted, _ = convert(dense, input_size=INPUT_SIZE, target_mac_reduction=1.6)
    calls = []

    def factory(model):
        assert model is not dense

        def attack(images, labels):
            calls.append(len(images))
            return (images + 0.05).clamp(0, 1)

        return attack

    same = refit_pointwise(dense, converted, loader(), N_SAMPLES, attack=factory, inplace=True)
    assert same is converted and calls == [BATCH] * (N_SAMPLES // BATCH)


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("no_gdws", "no GDWSConv2d"),
        ("wrong_dense", "no conv"),
        ("zero", "n_samples"),
        ("unlabelled", "needs \\(images, labels\\)"),
        ("short", "ran out after 24"),
    ],
)
def test_refit_bad_input(case, match):
    dense = small_resnet()
    converted, _ = convert(dense, input_size=INPUT_SIZE, target_mac_reduction=1.6)
    kwargs = {"n_samples": N_SAMPLES, "progress": False}
    batches = loader()
    if case == "no_gdws":
        converted = dense
    elif case == "wrong_dense":
        dense = NoEligible().double()
    elif case == "zero":
        kwargs["n_samples"] = 0
    elif case == "unlabelled":
        batches, kwargs["attack"] = loader(labels=False), lambda m: lambda x, y: x
    else:
        kwargs["n_samples"] = N_SAMPLES + 1
    with pytest.raises(ValueError, match=match):
        refit_pointwise(dense, converted, batches, **kwargs)
