"""Training-free recovery: BatchNorm statistics re-estimated after the approximation, and
the GDWS factors refitted by (alternating) least squares."""

from __future__ import annotations

import copy
import itertools
import warnings

import numpy as np
import pytest
import torch
from _torch_models import INPUT_SIZE, NoEligible, small_resnet
from torch import nn

from gdws_torch import (
    BatchNormStatistics,
    GDWSConv2d,
    Recovery,
    Refit,
    convert,
    recalibrate_batchnorm,
    recover,
    refit_pointwise,
)
from gdws_torch.nn.planned import compressed_layers
from gdws_torch.recovery import (
    batchnorm_layers,
    depthwise_step,
    pointwise_step,
    refit_gdws,
    refit_layer_factors,
)

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
    ("kwargs", "batches", "error", "match"),
    [
        ({"n_samples": 0}, None, ValueError, "n_samples must be an integer >= 1; got 0"),
        ({"n_samples": True}, None, TypeError, r"n_samples must be .* got True \(bool\)"),
        ({"n_samples": N_SAMPLES + 1}, None, ValueError, "ran out after 24"),
        ({"natural": False}, None, ValueError, "nothing to recalibrate on"),
        ({}, loader(shape=(5, 16, 16)), ValueError, "rejects the loader's inputs of shape"),
        (
            {"attack": lambda m: lambda x, y: x},
            loader(labels=False),
            ValueError,
            "must yield \\(images, labels\\)",
        ),
    ],
)
def test_bad_input_is_refused_and_an_inplace_model_left_untouched(kwargs, batches, error, match):
    model, _ = convert(small_resnet(), input_size=INPUT_SIZE, beta=0.5, only_if_cheaper=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kwargs = {"n_samples": N_SAMPLES, **kwargs}
    with warnings.catch_warnings(), pytest.raises(error, match=match):
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
        ("zero", "n_samples must be an integer >= 1; got 0"),
        ("unlabelled", "must yield \\(images, labels\\)"),
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


# -- joint refit: depthwise kernels too, by alternating least squares -----------------------


def tiny_layer(seed: int = 0, n_points: int = 60, m: int = 4, k2: int = 4):
    """Patches ``X`` (3 channels x K2 rows), a weight, and a GDWS factorisation of it
    (G = 5 kernels on channels 0, 0, 1, 2, 2) as numpy float64."""
    rng = np.random.default_rng(seed)
    c = 3
    x = rng.standard_normal((c * k2, n_points)) * rng.uniform(0.3, 2.0, (c * k2, 1))
    weight = rng.standard_normal((m, c * k2))
    channels = np.array([0, 0, 1, 2, 2])
    pointwise = rng.standard_normal((m, len(channels)))
    kernels = rng.standard_normal((len(channels), k2))
    return x, weight, channels, pointwise, kernels


def scatter(kernels, channels, c):
    """``D`` (G x C*K2) from kernels and their channels, by a loop."""
    g, k2 = kernels.shape
    d = np.zeros((g, c * k2))
    for row, (channel, kernel) in enumerate(zip(channels, kernels, strict=True)):
        d[row, channel * k2 : (channel + 1) * k2] = kernel
    return d


def as_torch(*arrays):
    return [torch.as_tensor(a) for a in arrays]


@pytest.mark.parametrize("max_direct", [10**6, 0])  # direct solve, conjugate gradients
def test_depthwise_step_is_the_least_squares_solution(max_direct):
    x, weight, channels, pointwise, kernels = tiny_layer()
    y = weight @ x + 0.1 * np.random.default_rng(1).standard_normal((weight.shape[0], x.shape[1]))
    gram, cross = x @ x.T, y @ x.T
    # Brute force: y[m, t] = sum_g P[m, g] sum_i k[g, i] X[(c(g), i), t], linear in vec(k).
    k2 = kernels.shape[1]
    columns = [channel * k2 + i for channel in channels for i in range(k2)]
    owner = np.repeat(np.arange(len(channels)), k2)
    design = np.concatenate([x[columns].T * pointwise[m, owner] for m in range(len(y))])
    expected = np.linalg.lstsq(design, y.reshape(-1), rcond=None)[0].reshape(kernels.shape)
    got = depthwise_step(
        *as_torch(gram, cross, channels, pointwise, kernels), ridge=0.0, max_direct=max_direct
    )
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-8, atol=1e-10)


def test_pointwise_step_is_the_least_squares_solution():
    x, weight, channels, _pointwise, kernels = tiny_layer(2)
    features = scatter(kernels, channels, 3) @ x
    expected = np.linalg.lstsq(features.T, (weight @ x).T, rcond=None)[0].T
    gram = x @ x.T
    got = pointwise_step(*as_torch(gram, weight @ gram, channels, kernels), ridge=0.0)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("ridge", [0.0, 1e-4, 1e-1])
@pytest.mark.parametrize("max_direct", [10**6, 0])
def test_alternating_steps_never_increase_the_error_and_report_it(ridge, max_direct):
    x, weight, channels, pointwise, kernels = tiny_layer(3, m=6)
    y = weight @ x
    gram, cross, energy = x @ x.T, y @ x.T, float((y**2).sum())
    p, k, errors = refit_layer_factors(
        *as_torch(gram, cross, channels, pointwise, kernels),
        energy=energy,
        iterations=6,
        ridge=ridge,
        max_direct=max_direct,
        tolerance=0.0,
    )
    assert len(errors) == 2 * 6 + 2
    assert all(b <= a * (1 + 1e-9) for a, b in itertools.pairwise(errors))
    assert errors[-1] < errors[1]  # the depthwise steps do help here
    residual = y - p.numpy() @ scatter(k.numpy(), channels, 3) @ x
    assert errors[-1] == pytest.approx(float((residual**2).sum()), rel=1e-8)
    first = y - pointwise @ scatter(kernels, channels, 3) @ x
    assert errors[0] == pytest.approx(float((first**2).sum()), rel=1e-8)
    np.testing.assert_allclose(torch.linalg.vector_norm(k, dim=1).numpy(), 1.0, rtol=1e-12)
    zero = refit_layer_factors(*as_torch(gram, cross, channels, pointwise, kernels), iterations=0)
    assert len(zero[2]) == 2 and torch.equal(zero[1], torch.as_tensor(kernels))


@pytest.mark.parametrize("tolerance", [1e-3, 0.05])
def test_the_alternation_stops_when_the_error_stops_falling(tolerance):
    x, weight, channels, pointwise, kernels = tiny_layer(3, m=6)
    y = weight @ x
    gram, cross, energy = x @ x.T, y @ x.T, float((y**2).sum())
    arguments = as_torch(gram, cross, channels, pointwise, kernels)
    _, _, full = refit_layer_factors(*arguments, energy=energy, iterations=40, tolerance=0.0)
    *_, errors = refit_layer_factors(*arguments, energy=energy, iterations=40, tolerance=tolerance)
    assert len(errors) < len(full)  # stopped early ...
    assert errors == full[: len(errors)]  # ... on the same path
    rounds = [errors[i] - errors[i + 2] for i in range(1, len(errors) - 2, 2)]
    ends = errors[3::2]
    assert rounds[-1] <= tolerance * ends[-1]  # the last round no longer paid
    assert all(r > tolerance * e for r, e in zip(rounds[:-1], ends[:-1], strict=True))


def test_an_exact_factorisation_is_kept():
    x, weight, channels, pointwise, kernels = tiny_layer(4)
    weight = pointwise @ scatter(kernels, channels, 3)  # representable exactly
    gram = x @ x.T
    cross, energy = weight @ gram, float(((weight @ x) ** 2).sum())
    p, k, errors = refit_layer_factors(
        *as_torch(gram, cross, channels, pointwise, kernels), energy=energy, ridge=0.0
    )
    assert max(errors) <= 1e-9 * energy
    np.testing.assert_allclose(p.numpy() @ scatter(k.numpy(), channels, 3), weight, atol=1e-9)


def numpy_patches(conv: nn.Conv2d, x: np.ndarray) -> np.ndarray:
    """``(C*Kh*Kw, N*L)`` patches by explicit loops (numpy padding, every option used)."""
    (ph, pw), (kh, kw) = conv.padding, conv.kernel_size
    (sh, sw), (dh, dw) = conv.stride, conv.dilation
    mode = {"zeros": "constant", "reflect": "reflect"}[conv.padding_mode]
    x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), mode=mode)
    c, h, w = x.shape[1:]
    out_h, out_w = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    a, b = np.meshgrid(np.arange(out_h) * sh, np.arange(out_w) * sw, indexing="ij")
    rows = [
        x[:, channel, i * dh + a, j * dw + b].reshape(-1)  # samples, then positions
        for channel in range(c)
        for i in range(kh)
        for j in range(kw)
    ]
    return np.stack(rows)


def layer_input(model: nn.Module, name: str, images: torch.Tensor) -> np.ndarray:
    seen = {}
    module = model.get_submodule(name)
    handle = module.register_forward_pre_hook(lambda m, i: seen.__setitem__("x", i[0]))
    with torch.no_grad():
        model(images)
    handle.remove()
    return seen["x"].numpy()


def numpy_als(x, y, channels, kernels, iterations, ridge):
    """The alternating least squares by explicit design matrices in numpy: each step the
    ridge-regularised minimiser, kept only if the residual does not grow."""
    c, k2 = x.shape[0] // kernels.shape[1], kernels.shape[1]
    columns = [channel * k2 + i for channel in channels for i in range(k2)]
    owner = np.repeat(np.arange(len(channels)), k2)

    def error(p, k):
        return float(((y - p @ scatter(k, channels, c) @ x) ** 2).sum())

    def p_step(k):
        features = scatter(k, channels, c) @ x
        gram = features @ features.T
        gram += ridge * np.diag(gram).mean() * np.eye(len(gram))
        return np.linalg.solve(gram, features @ y.T).T

    def d_step(p):
        design = [x[columns].T * p[m, owner] for m in range(len(y))]
        h = sum(a.T @ a for a in design)
        b = sum(a.T @ y[m] for m, a in enumerate(design))
        h += ridge * np.diag(h).mean() * np.eye(len(h))
        return np.linalg.solve(h, b).reshape(kernels.shape)

    pointwise = np.zeros((len(y), len(channels)))
    best = np.inf
    steps = [("p", None)] + [("d", None), ("p", None)] * iterations
    for kind, _ in steps:
        if kind == "p":
            candidate = (p_step(kernels), kernels)
        else:
            new = d_step(pointwise)
            norms = np.linalg.norm(new, axis=1)
            norms[norms == 0] = 1.0  # a dead kernel (its channel is all zeros) stays zero
            candidate = (pointwise * norms, new / norms[:, None])
        value = error(*candidate)
        if value <= best * (1 + 1e-10):
            (pointwise, kernels), best = candidate, min(value, best)
    return pointwise, kernels


@pytest.mark.parametrize("iterations", [0, 2])
def test_refitted_model_matches_a_float64_numpy_reference(iterations):
    dense = small_resnet()
    converted, _ = convert(dense, input_size=INPUT_SIZE, target_mac_reduction=2.0)
    batches = loader(12, 6)
    images = torch.cat([x for x, _ in batches])
    refitted, errors = refit_gdws(
        dense, converted, batches, 12, depthwise=iterations > 0, iterations=iterations, ridge=1e-6,
        progress=False, return_errors=True,
    )  # fmt: skip
    reference = copy.deepcopy(converted)
    names = [n for n, m in converted.named_modules() if isinstance(m, GDWSConv2d)]
    assert list(errors) == names
    for name in names:  # in execution order, each on the inputs the reference feeds it
        layer, conv = reference.get_submodule(name), dense.get_submodule(name)
        x = numpy_patches(conv, layer_input(reference, name, images))
        y = conv.weight.detach().numpy().reshape(conv.out_channels, -1) @ x
        channels = layer.kernel_channels.numpy()
        kernels = layer.depthwise.weight.detach().numpy().reshape(layer.n_kernels, -1)
        p, k = numpy_als(x, y, channels, kernels, iterations, ridge=1e-6)
        with torch.no_grad():
            layer.pointwise.weight.copy_(torch.as_tensor(p).view_as(layer.pointwise.weight))
            layer.depthwise.weight.copy_(torch.as_tensor(k).view_as(layer.depthwise.weight))
        residual = y - p @ scatter(k, channels, conv.in_channels) @ x
        assert errors[name][-1] == pytest.approx(float((residual**2).sum()), rel=1e-6, abs=1e-9)
    for name in names:
        got, want = refitted.get_submodule(name), reference.get_submodule(name)
        for part in ("depthwise", "pointwise"):
            torch.testing.assert_close(
                getattr(got, part).weight, getattr(want, part).weight, rtol=1e-6, atol=1e-9
            )
        assert torch.equal(got.kernel_channels, want.kernel_channels)
    test_images = loader(8, 8)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(
            refitted(test_images), reference(test_images), rtol=1e-6, atol=1e-9
        )


def test_joint_refit_keeps_structure_and_macs_and_lowers_every_layer_error():
    from gdws_torch import count_macs

    dense = small_resnet()
    converted, _ = convert(dense, input_size=INPUT_SIZE, target_mac_reduction=1.6)
    batches = loader(24, 12)
    pointwise, pw_errors = refit_gdws(
        dense, converted, batches, 24, depthwise=False, progress=False, return_errors=True
    )
    joint, errors = refit_gdws(dense, converted, batches, 24, progress=False, return_errors=True)
    assert count_macs(joint, INPUT_SIZE).conv_macs == count_macs(converted, INPUT_SIZE).conv_macs
    first = next(iter(errors))  # same inputs for both: the joint refit can only do better
    assert errors[first][-1] <= pw_errors[first][-1] * (1 + 1e-9)
    for name, layer in joint.named_modules():
        if isinstance(layer, GDWSConv2d):
            before = converted.get_submodule(name)
            assert torch.equal(before.kernel_channels, layer.kernel_channels)
            assert not torch.equal(before.depthwise.weight, layer.depthwise.weight)
            assert torch.equal(
                pointwise.get_submodule(name).depthwise.weight, before.depthwise.weight
            )
            if before.bias is not None:
                assert torch.equal(before.bias, layer.bias)
            assert all(
                b <= a * (1 + 1e-9) for a, b in zip(errors[name], errors[name][1:], strict=False)
            )
    # refit_pointwise is the pointwise-only refit.
    old = refit_pointwise(dense, converted, batches, 24, progress=False)
    x = loader(8, 8)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(old(x), pointwise(x), rtol=0, atol=0)


def test_conjugate_gradients_give_the_direct_solution_on_a_model():
    dense = small_resnet()
    converted, _ = convert(dense, input_size=INPUT_SIZE, target_mac_reduction=1.6)
    batches = loader(24, 12)
    options = {"iterations": 2, "progress": False, "return_errors": True}
    direct, exact = refit_gdws(dense, converted, batches, 24, **options)
    iterative, _ = refit_gdws(
        dense, converted, batches, 24, max_direct=0, solve_tolerance=0.0, **options
    )
    x = loader(8, 8)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(iterative(x), direct(x), rtol=1e-6, atol=1e-8)
    # Inexact steps (the default): each layer's error within the solve tolerance's reach.
    _, inexact = refit_gdws(dense, converted, batches, 24, max_direct=0, **options)
    for name, errors in exact.items():
        assert inexact[name][-1] <= errors[-1] * (1 + 1e-3)


def test_joint_refit_of_an_exact_conversion_keeps_the_dense_outputs():
    dense = small_resnet()
    converted, _ = convert(
        dense,
        input_size=INPUT_SIZE,
        beta=0.0,
        only_if_cheaper=False,
        exclude=["reflect", "dilated"],
    )  # G > M: singular normal equations, solved by pseudo-inverses (slow for large G)
    refitted = refit_gdws(dense, converted, loader(32, 16), 32, ridge=0.0, progress=False)
    x = loader(8, 8)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(refitted(x), dense(x), rtol=1e-7, atol=1e-9)


def test_recover_runs_the_joint_refit_by_default_and_the_pointwise_one_when_asked():
    dense = small_resnet()
    batches = loader(24, 12)
    plain, _ = convert(dense, input_size=INPUT_SIZE, target_mac_reduction=1.6)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    expected = refit_gdws(dense, plain, batches, 24, iterations=2, progress=False)
    joint = Recovery(refit=Refit(24, adversarial=False, iterations=2))
    got, report = recover(plain, dense, joint, calibration=batches)
    pointwise = refit_gdws(dense, plain, batches, 24, depthwise=False, progress=False)
    only = Recovery(refit=Refit(24, adversarial=False, depthwise=False))
    said, _ = recover(plain, dense, only, calibration=batches)
    x = loader(8, 8)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(got(x), expected(x), rtol=0, atol=0)
        torch.testing.assert_close(said(x), pointwise(x), rtol=0, atol=0)
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())  # a copy
    assert list(report.seconds) == ["refit"] and not report.skipped
    assert set(report.refit_errors) == {name for name, _ in compressed_layers(got)}
    assert all(errors[-1] <= errors[0] for errors in report.refit_errors.values())
    assert "refitted on 24 natural inputs" in report.summary()
    with pytest.raises(ValueError, match="iterations must be an integer >= 0; got -1"):
        Refit(24, iterations=-1)
    with pytest.raises(ValueError, match=r"recovery\.refit needs calibration inputs"):
        recover(plain, dense, joint)
    with pytest.raises(ValueError, match=r"holds 24 inputs; recovery\.refit\.samples=30"):
        recover(plain, dense, Recovery(refit=Refit(30)), calibration=batches)


def test_recover_skips_what_the_model_does_not_have_and_says_so():
    dense = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).double()
    batches = [(torch.rand(4, 3, 9, 9, dtype=torch.float64), torch.zeros(4)) for _ in range(2)]
    steps = Recovery(refit=Refit(8, adversarial=False), batchnorm=BatchNormStatistics(8))
    same, report = recover(dense, dense, steps, calibration=batches, data=batches)
    assert report.skipped == {"refit": "no compressed layer", "batchnorm": "no BatchNorm layer"}
    assert report.seconds == {} and "refit skipped: no compressed layer" in report.summary()
    assert same is not dense and all(
        torch.equal(a, b) for a, b in zip(same.parameters(), dense.parameters(), strict=True)
    )
    with pytest.raises(ValueError, match=r"recovery\.batchnorm needs training data"):
        recover(dense, dense, Recovery(batchnorm=BatchNormStatistics(8)))
    with pytest.raises(ValueError, match="adversarial needs the attack"):
        recover(dense, dense, Recovery(batchnorm=BatchNormStatistics(8, True)), data=batches)
    with pytest.raises(TypeError, match="recovery must be a Recovery"):
        recover(dense, dense, Refit())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"iterations": -1}, ValueError, "iterations must be an integer >= 0; got -1"),
        ({"iterations": 1.5}, TypeError, r"iterations must be an integer >= 0; got 1\.5 \(float\)"),
        ({"iterations": True}, TypeError, r"iterations must be an integer >= 0; got True \(bool\)"),
        ({"ridge": -1.0}, ValueError, "ridge must be a finite real number >= 0; got -1.0"),
        (
            {"ridge": "0.1"},
            TypeError,
            "ridge must be a finite real number >= 0; got '0.1' \\(str\\)",
        ),
        ({"max_direct": -5}, ValueError, "max_direct must be an integer >= 0; got -5"),
    ],
)
def test_joint_refit_bad_options(kwargs, error, match):
    dense = small_resnet()
    converted, _ = convert(dense, input_size=INPUT_SIZE, target_mac_reduction=1.6)
    before = {k: v.clone() for k, v in converted.state_dict().items()}
    with pytest.raises(error, match=match):
        refit_gdws(dense, converted, loader(), N_SAMPLES, inplace=True, progress=False, **kwargs)
    assert all(torch.equal(v, before[k]) for k, v in converted.state_dict().items())


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"gram": np.zeros((12, 11))}, "gram must be square"),
        ({"gram": np.zeros((10, 10))}, "gram's size 10 must be C \\* K2"),
        ({"cross": np.zeros((3, 12))}, "cross must have shape \\(M, C\\*K2\\) = \\(4, 12\\)"),
        ({"kernels": np.zeros((4, 4))}, "must have G=5 rows"),
        (
            {"kernel_channels": np.array([0, 0, 1, 2, 3])},
            "kernel_channels must be .* \\[0, C=3\\); got values from 0 to 3",
        ),
        ({"pointwise": np.zeros(4)}, "pointwise must be a 2-D torch tensor"),
    ],
)
def test_layer_factors_bad_input(change, match):
    x, weight, channels, pointwise, kernels = tiny_layer()
    arguments = {
        "gram": x @ x.T,
        "cross": weight @ x @ x.T,
        "kernel_channels": channels,
        "pointwise": pointwise,
        "kernels": kernels,
    }
    arguments.update(change)
    with pytest.raises(ValueError, match=match):
        refit_layer_factors(**{k: torch.as_tensor(v) for k, v in arguments.items()})


def test_sweep_rows_for_each_refit_variant():
    from gdws_torch.experiments.sweep import run_sweep

    results = run_sweep(
        small_resnet(),
        INPUT_SIZE,
        loader(16, 8),
        loader(),
        lambda model: lambda images, labels: images,
        strategies=("unit",),
        targets=(1.6,),
        recalibration_samples=N_SAMPLES,
        weighting_samples=8,
        refit_samples=N_SAMPLES,
        refit_variants=("pointwise", "joint"),
        refit_iterations=1,
        fps_backend=None,
        progress=False,
        log=lambda message: None,
    )
    rows = results["rows"]
    assert [r["recovery"] for r in rows] == ["none", "BN", "pointwise refit+BN", "refit+BN"]
    assert len({r["conv_macs"] for r in rows}) == 1
    assert results["refit"]["variants"] == ["pointwise", "joint"]
    refits = [r["recipe"]["recovery"]["refit"] for r in rows]
    assert [None if f is None else f["depthwise"] for f in refits] == [None, None, False, True]
    with pytest.raises(ValueError, match="refit_variants must be a non-empty sequence"):
        run_sweep(
            small_resnet(), INPUT_SIZE, loader(), loader(), lambda m: None,
            strategies=("unit",), refit_samples=8, refit_variants=("both",),
        )  # fmt: skip


def test_cli_refit_flags(tmp_path, capsys):
    from gdws_torch.cli import main
    from gdws_torch.experiments import demo

    checkpoint = tmp_path / "digits.pth"
    torch.save({"state_dict": demo.demo_network().state_dict()}, checkpoint)
    base = ["--model", "digits_cnn", "--dataset", "digits", "--checkpoint", str(checkpoint)]
    flags = ["--apply-gdws", "--target-mac-reduction", "2", "--no-progress", "--attack", "none"]
    out = tmp_path / "joint.json"
    extra = ["--refit", "100", "--refit-depthwise", "--refit-iterations", "1", "--json", str(out)]
    assert main(["eval", *base, *flags, *extra]) == 0
    printed = capsys.readouterr().out
    assert "pointwise and depthwise weights (1 alternation) refitted on 100 natural" in printed
    assert main(["eval", *base, *flags, "--refit", "10", "--refit-iterations", "-1"]) == 2
    assert "--refit-iterations must be >= 0; got -1" in capsys.readouterr().err
    assert main(["sweep", "--refit", "10", "--refit-variants", "both"]) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_joint_refit_on_a_gpu_matches_the_cpu():
    """The same code on a GPU: the statistics, the structured steps and the alternation."""
    dense = small_resnet()
    converted, _ = convert(dense, input_size=INPUT_SIZE, target_mac_reduction=1.6)
    batches = loader(24, 12)
    options = {"iterations": 2, "max_direct": 0, "progress": False, "return_errors": True}
    on_cpu, cpu_errors = refit_gdws(dense, converted, batches, 24, **options)
    on_gpu, gpu_errors = refit_gdws(
        copy.deepcopy(dense).cuda(), copy.deepcopy(converted).cuda(), batches, 24, **options
    )
    assert next(on_gpu.parameters()).is_cuda
    for name, errors in cpu_errors.items():
        assert gpu_errors[name][-1] == pytest.approx(errors[-1], rel=1e-6)
    x = loader(8, 8)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(on_gpu(x.cuda()).cpu(), on_cpu(x), rtol=1e-6, atol=1e-8)
