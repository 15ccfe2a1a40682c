"""Training-free recovery: BatchNorm statistics re-estimated after the approximation."""

from __future__ import annotations

import warnings

import pytest
import torch
from _torch_models import INPUT_SIZE, NoEligible, small_resnet
from torch import nn

from gdws_torch import convert, recalibrate_batchnorm
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
