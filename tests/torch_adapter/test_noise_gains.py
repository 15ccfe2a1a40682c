"""Noise gains: the batched computation against the direct loop and independent Jacobians."""

from __future__ import annotations

import pytest
import torch
from _torch_models import INPUT_SIZE, SMALL_RESNET_ELIGIBLE, NoEligible, small_resnet
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gdws_torch import convert
from gdws_torch.common import conv_patches
from gdws_torch.conversion.noise_gains import (
    choose_form,
    noise_gains,
    plan_noise_gain_forms,
    reference_noise_gains,
)
from gdws_torch.conversion.options import ErrorWeights

N_SAMPLES = 10


def data(dtype=torch.float64, n: int = N_SAMPLES, batch: int = 4):
    """Batches of 4 (the chunk sizes below re-cut them), random images and labels."""
    generator = torch.Generator().manual_seed(5)
    images = torch.rand(n, *INPUT_SIZE, generator=generator).to(dtype)
    labels = torch.randint(0, 5, (n,), generator=generator)
    return [(images[i : i + batch], labels[i : i + batch]) for i in range(0, n, batch)]


def max_relative(got: dict, expected: dict) -> float:
    """Largest elementwise relative difference; exact zeros (dead channels) relative to the
    layer's largest gain."""
    assert list(got) == list(expected)
    worst = 0.0
    for key, value in expected.items():
        scale = torch.where(value != 0, value.abs(), value.abs().max())
        worst = max(worst, float(((got[key] - value).abs() / scale).max()))
    return worst


@pytest.fixture(scope="module")
def model():
    return small_resnet()


@pytest.fixture(scope="module")
def reference(model):
    return reference_noise_gains(model, data(), N_SAMPLES)


@pytest.mark.parametrize("method", ["auto", "gram", "materialize"])
@pytest.mark.parametrize("chunk_size", [3, 32])
def test_batched_equals_the_per_sample_loop(model, reference, method, chunk_size):
    got = noise_gains(
        model, data(), N_SAMPLES, method=method, chunk_size=chunk_size, progress=False
    )
    assert list(got) == [f"{name}.weight" for name in SMALL_RESNET_ELIGIBLE]
    assert all(v.dtype == torch.float64 and v.shape == reference[k].shape for k, v in got.items())
    assert all(bool((v > 0).any()) for v in got.values())
    assert max_relative(got, reference) < 1e-10


def test_float32_within_1e4_of_the_float64_loop(reference):
    model32 = small_resnet().float()  # the same weights, rounded
    for method in ("gram", "materialize"):
        got = noise_gains(model32, data(torch.float32), N_SAMPLES, method=method, progress=False)
        assert all(v.dtype == torch.float32 for v in got.values())
        assert max_relative({k: v.double() for k, v in got.items()}, reference) < 1e-4


def sign_attack(model: nn.Module, epsilon: float = 0.05):
    """A deterministic one-step Linf attack, torchattacks style (leaves no .grad)."""

    def attack(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        model.train()  # attacks may switch modes; noise gains must run in eval mode
        x = images.detach().requires_grad_(True)
        loss = nn.functional.cross_entropy(model.eval()(x), labels)
        (grad,) = torch.autograd.grad(loss, x)
        return (images + epsilon * grad.sign()).clamp(0, 1).detach()

    return attack


def test_with_an_attack_equals_the_loop_on_the_same_attacked_inputs(model, reference):
    attack = sign_attack(model)
    got = noise_gains(model, data(), N_SAMPLES, attack=attack, chunk_size=4, progress=False)
    expected = reference_noise_gains(model, data(), N_SAMPLES, attack=attack)
    assert max_relative(got, expected) < 1e-10
    assert max_relative(got, reference) > 1e-3  # the attack did change the inputs
    assert not model.training


def test_with_a_multi_step_pgd_attack_equals_the_loop(model):
    # PGD runs the model several times per chunk: the layer hooks must not record those.
    from gdws_torch.robustness.attacks import PGD

    attack = PGD(model, eps=0.05, alpha=0.02, steps=3, random_start=False)
    got = noise_gains(model, data(), N_SAMPLES, attack=attack, chunk_size=4, progress=False)
    expected = reference_noise_gains(model, data(), N_SAMPLES, attack=attack)
    assert max_relative(got, expected) < 1e-8


class ConvThenLinear(nn.Module):
    """Logits linear in the conv weight, ``z = L(flatten(conv(x)))``: easy to differentiate."""

    def __init__(self, conv: nn.Conv2d, n_features: int, n_classes: int) -> None:
        super().__init__()
        self.conv = conv
        self.linear = nn.Linear(n_features, n_classes, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.conv(x).flatten(1))


def jacobian_gains(model: ConvThenLinear, images: torch.Tensor) -> torch.Tensor:
    """The formula evaluated with ``torch.func.jacrev`` of the logits in the weight."""
    conv = model.conv
    weight = conv.weight.detach()
    m, c, kh, kw = weight.shape
    expected = torch.zeros(c, dtype=torch.float64)
    for x in images:

        def logits(w, x=x):
            return torch.func.functional_call(model, {"conv.weight": w}, (x[None],))[0]

        z = logits(weight).detach()
        jacobian = torch.func.jacrev(logits)(weight).detach()  # (K, M, C, Kh, Kw)
        t = int(z.argmax())
        for j in range(z.shape[0]):
            if j != t:
                d = jacobian[t] - jacobian[j]
                expected += d.square().sum((0, 2, 3)) / (2 * (z[t] - z[j]) ** 2 * m * kh * kw)
    return expected / len(images)


def test_hand_check_on_a_conv_followed_by_a_linear_layer():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, (3, 2), padding=1, stride=2, dtype=torch.float64)
    model = ConvThenLinear(conv, 3 * 3 * 4, 4).eval()
    images = torch.randn(5, 2, 5, 6, dtype=torch.float64)
    loader = [(images, torch.zeros(5, dtype=torch.long))]
    for method in ("gram", "materialize"):
        got = noise_gains(model, loader, 5, skip_first=False, method=method, progress=False)
        torch.testing.assert_close(
            got["conv.weight"], jacobian_gains(model, images), rtol=1e-10, atol=0
        )


def test_hand_check_with_one_output_position_and_two_classes():
    # z = L conv(x) with a 1x1 output: dz_k/dW[m, c] = L[k, m] x_c (a patch), so
    # alpha_c = sum_n ||L_t - L_j||^2 ||x_nc||^2 / (2 (z_t - z_j)^2 M K2 N) by hand.
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 2, 2, bias=False, dtype=torch.float64)
    model = ConvThenLinear(conv, 2, 2).eval()
    images = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    got = noise_gains(model, [(images, torch.zeros(4))], 4, skip_first=False, progress=False)
    with torch.no_grad():
        z = model(images)
        diff = model.linear.weight[0] - model.linear.weight[1]
        margin = z[:, 0] - z[:, 1]
        patch_norms = images.square().sum((2, 3))  # (N, C)
        expected = (diff.square().sum() * patch_norms / (2 * margin[:, None] ** 2 * 2 * 4)).mean(0)
    torch.testing.assert_close(got["conv.weight"], expected, rtol=1e-10, atol=0)


conv_configs = st.fixed_dictionaries(
    {
        "kernel_size": st.tuples(st.integers(1, 3), st.integers(1, 3)),
        "stride": st.tuples(st.integers(1, 2), st.integers(1, 2)),
        "dilation": st.tuples(st.integers(1, 2), st.integers(1, 2)),
        "padding": st.one_of(st.tuples(st.integers(0, 2), st.integers(0, 2)), st.just("same")),
        "padding_mode": st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
        "bias": st.booleans(),
    }
)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@settings(max_examples=25)
@given(config=conv_configs, seed=st.integers(0, 2**16))
def test_any_conv_geometry_matches_the_jacobian(config, seed):
    if config["padding"] == "same":
        config = {**config, "stride": (1, 1)}  # torch allows "same" with stride 1 only
    torch.manual_seed(seed)
    conv = nn.Conv2d(2, 3, dtype=torch.float64, **config)
    images = torch.randn(3, 2, 6, 7, dtype=torch.float64)
    out = conv(images)
    model = ConvThenLinear(conv, out[0].numel(), 3).eval()
    # The patches are exactly what F.unfold gives on the padded input.
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    padded = nn.functional.pad(images, conv._reversed_padding_repeated_twice, mode=mode)
    unfold = nn.functional.unfold(padded, conv.kernel_size, conv.dilation, 0, conv.stride)
    assert torch.equal(conv_patches(conv, images), unfold)
    expected = jacobian_gains(model, images)
    for method in ("gram", "materialize"):
        got = noise_gains(
            model, [(images, torch.zeros(3))], 3, layers=["conv"], method=method, progress=False
        )
        torch.testing.assert_close(got["conv.weight"], expected, rtol=1e-9, atol=1e-300)


def test_in_place_activations_after_a_conv_do_not_change_the_gains():
    # A plain VGG block: the ReLU overwrites the conv's output in place.
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(6, 6, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(6 * 8 * 8, 4),
    ).double()
    loader = [(torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.zeros(6))]
    expected = reference_noise_gains(model, loader, 6, skip_first=False)
    for method in ("gram", "materialize"):
        got = noise_gains(model, loader, 6, skip_first=False, method=method, progress=False)
        assert max_relative(got, expected) < 1e-10


def test_the_model_is_left_as_it_was():
    model = small_resnet().train()
    model.reflect.weight.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    noise_gains(model, data(), 4, attack=sign_attack(model), progress=False)
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert flags == {name: p.requires_grad for name, p in model.named_parameters()}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())


def test_modes_and_hooks_are_restored_on_error(model):
    def failing_attack(images, labels):
        raise RuntimeError("attack failed")

    model.train()
    with pytest.raises(RuntimeError, match="attack failed"):
        noise_gains(model, data(), 4, attack=failing_attack, progress=False)
    assert all(m.training for m in model.modules())
    assert not any(m._forward_hooks for m in model.modules())
    model.eval()


def test_runs_under_no_grad_and_inference_mode(model, reference):
    with torch.no_grad():
        got = noise_gains(model, data(), N_SAMPLES, progress=False)
    assert max_relative(got, reference) < 1e-10
    with torch.inference_mode():
        got = noise_gains(model, data(), N_SAMPLES, progress=False)
    assert max_relative(got, reference) < 1e-10


def test_gains_plug_into_convert(model):
    gains = noise_gains(model, data(), 4, progress=False)
    _, report = convert(
        model,
        input_size=INPUT_SIZE,
        beta=1e-6,
        only_if_cheaper=False,
        error_weights=ErrorWeights(channel_weights=gains),
    )
    assert [layer.name for layer in report.layers] == SMALL_RESNET_ELIGIBLE


def test_plan_names_the_form_of_every_layer(model):
    assert plan_noise_gain_forms(model, INPUT_SIZE, method="materialize") == dict.fromkeys(
        SMALL_RESNET_ELIGIBLE, "materialize"
    )
    plan = plan_noise_gain_forms(model, INPUT_SIZE)
    assert list(plan) == SMALL_RESNET_ELIGIBLE
    assert plan["dilated"] == choose_form(24, 24, 9, 64, 5)
    assert not model.training and not any(m._forward_hooks for m in model.modules())


def test_choose_form_gram_for_small_outputs_materialize_for_large():
    # PreActResNet-18 at 32x32: the 32x32 stage materialises, the later stages use Gram.
    assert choose_form(64, 64, 9, 1024, 10) == "materialize"
    assert choose_form(128, 64, 9, 256, 10) == "gram"
    assert choose_form(128, 128, 9, 256, 10) == "gram"
    assert choose_form(512, 512, 9, 16, 10) == "gram"
    # The P x P matrices of the gram form are kept under GRAM_BYTES.
    assert choose_form(8, 8, 9, 64 * 64, 1000) == "materialize"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n_samples": 0}, ValueError, "n_samples must be an integer >= 1; got 0"),
        ({"n_samples": -1}, ValueError, "n_samples must be an integer >= 1; got -1"),
        ({"n_samples": 1.5}, TypeError, r"n_samples must be an integer >= 1; got 1\.5 \(float\)"),
        ({"n_samples": True}, TypeError, r"n_samples must be an integer >= 1; got True \(bool\)"),
        ({"n_samples": 100}, ValueError, f"ran out after {N_SAMPLES} samples"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be an integer >= 1; got 0"),
        ({"chunk_size": "8"}, TypeError, "chunk_size must be an integer >= 1; got '8' \\(str\\)"),
        ({"method": "fast"}, ValueError, "method"),
        ({"attack": "pgd"}, TypeError, "attack"),
    ],
)
def test_bad_input(model, kwargs, error, match):
    kwargs = {"n_samples": 4, "progress": False, **kwargs}
    with pytest.raises(error, match=match):
        noise_gains(model, data(), **kwargs)
    assert not model.training


class NonFiniteLogits(nn.Module):
    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x) * float("inf")


def test_bad_loaders_and_models(model):
    with pytest.raises(ValueError, match=r"\(images, labels\)"):
        noise_gains(model, [torch.zeros(2, *INPUT_SIZE)], 2, progress=False)
    with pytest.raises(ValueError, match="no eligible convolution"):
        noise_gains(NoEligible(), [(torch.zeros(2, 3, 8, 8), torch.zeros(2))], 2)
    with pytest.raises(ValueError, match="non-finite logits"):  # from finite inputs
        noise_gains(NonFiniteLogits(model), data(), 2, progress=False)
    with pytest.raises(ValueError, match=r"^noise gains: the loader's batch 1, sample 1 .* nan"):
        bad = [(torch.full((2, *INPUT_SIZE), float("nan"), dtype=torch.float64), torch.zeros(2))]
        noise_gains(model, bad, 2, progress=False)
    with pytest.raises(ValueError, match="n_samples"):
        reference_noise_gains(model, data(), 0)
