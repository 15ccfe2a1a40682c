"""Noise gains: the batched computation against the direct per-sample, per-class loop."""

from __future__ import annotations

import pytest
import torch
from _torch_models import INPUT_SIZE, SMALL_RESNET_ELIGIBLE, NoEligible, small_resnet
from torch import nn

from gdws_torch import convert, eligible_convs
from gdws_torch.noise_gains import choose_form, noise_gains, reference_noise_gains

N_SAMPLES = 20


def data(dtype=torch.float64, n: int = N_SAMPLES, batch: int = 7):
    generator = torch.Generator().manual_seed(5)
    images = torch.rand(n, *INPUT_SIZE, generator=generator).to(dtype)
    labels = torch.randint(0, 5, (n,), generator=generator)
    return [(images[i : i + batch], labels[i : i + batch]) for i in range(0, n, batch)]


def max_relative(got: dict, expected: dict) -> float:
    assert got.keys() == expected.keys()
    return max(float(((got[k] - expected[k]).abs() / expected[k].abs()).max()) for k in expected)


@pytest.fixture(scope="module")
def model():
    return small_resnet()


@pytest.fixture(scope="module")
def reference(model):
    return reference_noise_gains(model, data(), N_SAMPLES)


@pytest.mark.parametrize("method", ["auto", "gram", "materialize"])
@pytest.mark.parametrize("chunk_size", [6, 32])
def test_batched_equals_the_per_sample_loop(model, reference, method, chunk_size):
    got = noise_gains(
        model, data(), N_SAMPLES, method=method, chunk_size=chunk_size, progress=False
    )
    assert list(got) == [f"{name}.weight" for name in SMALL_RESNET_ELIGIBLE]
    assert max_relative(got, reference) < 1e-10
    assert all(v.dtype == torch.float64 and v.shape == (reference[k].shape) for k, v in got.items())


def test_float32_within_1e4_of_the_float64_loop(model, reference):
    got = noise_gains(model.float(), data(torch.float32), N_SAMPLES, progress=False)
    model.double()
    assert all(v.dtype == torch.float32 for v in got.values())
    assert max_relative({k: v.double() for k, v in got.items()}, reference) < 1e-4


class ConvThenLinear(nn.Module):
    """Logits linear in the conv weight: z = L(flatten(conv(x))), easy to differentiate."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, (3, 2), padding=1, stride=2, bias=True, dtype=torch.float64)
        self.linear = nn.Linear(3 * 3 * 4, 4, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.conv(x).flatten(1))


def test_against_an_independent_jacobian_of_the_formula():
    torch.manual_seed(0)
    model = ConvThenLinear()
    images = torch.randn(5, 2, 5, 6, dtype=torch.float64)
    loader = [(images, torch.zeros(5, dtype=torch.long))]
    got = noise_gains(model, loader, 5, skip_first=False, progress=False)["conv.weight"]

    weight = model.conv.weight.detach()
    m, c, kh, kw = weight.shape
    expected = torch.zeros(c, dtype=torch.float64)
    for x in images:

        def logits(w, x=x):
            out = torch.nn.functional.conv2d(x[None], w, model.conv.bias, stride=2, padding=1)
            return model.linear(out.flatten(1))[0]

        z = logits(weight)
        jacobian = torch.func.jacrev(logits)(weight)  # (K, M, C, Kh, Kw)
        t = int(z.argmax())
        for j in range(z.shape[0]):
            if j != t:
                d = jacobian[t] - jacobian[j]
                expected += d.square().sum((0, 2, 3)) / (2 * (z[t] - z[j]) ** 2 * m * kh * kw)
    torch.testing.assert_close(got, expected.detach() / 5, rtol=1e-10, atol=0)


def sign_attack(model: nn.Module, epsilon: float = 0.03):
    """A deterministic one-step l_inf attack, torchattacks style."""

    def attack(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        model.train()  # attacks may switch modes; noise_gains must restore eval
        x = images.detach().requires_grad_(True)
        loss = nn.functional.cross_entropy(model.eval()(x), labels)
        (grad,) = torch.autograd.grad(loss, x)
        return (images + epsilon * grad.sign()).clamp(0, 1).detach()

    return attack


def test_with_an_attack_equals_the_loop_on_the_same_attacked_inputs(model, reference):
    attack = sign_attack(model)
    got = noise_gains(model, data(), N_SAMPLES, attack=attack, chunk_size=8, progress=False)
    expected = reference_noise_gains(model, data(), N_SAMPLES, attack=attack)
    assert max_relative(got, expected) < 1e-10
    assert max_relative(got, reference) > 1e-3  # the attack changed the inputs


def test_the_model_is_left_as_it_was():
    model = small_resnet().train()
    model.reflect.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    noise_gains(model, data(), 8, progress=False)
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert not model.reflect.weight.requires_grad and model.dilated.weight.requires_grad
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_gains_plug_into_convert(model):
    gains = noise_gains(model, data(), 8, progress=False)
    _, report = convert(
        model, input_size=INPUT_SIZE, beta=1e-6, alphas=gains, only_if_cheaper=False
    )
    assert [layer.name for layer in report.layers] == SMALL_RESNET_ELIGIBLE


def test_choose_form_prefers_gram_for_small_outputs():
    assert choose_form(512, 512, 9, 16, 10) == "gram"
    assert choose_form(256, 256, 9, 64, 10) == "gram"
    assert choose_form(128, 128, 9, 256, 10) == "materialize"
    assert choose_form(64, 64, 9, 1024, 10) == "materialize"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n_samples": 0}, ValueError, "n_samples"),
        ({"n_samples": -1}, ValueError, "n_samples"),
        ({"n_samples": 1.5}, ValueError, "n_samples"),
        ({"n_samples": 100}, ValueError, "ran out after 20 samples"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"method": "fast"}, ValueError, "method"),
        ({"attack": "pgd"}, TypeError, "attack"),
    ],
)
def test_bad_input(model, kwargs, error, match):
    kwargs = {"n_samples": 4, "progress": False, **kwargs}
    with pytest.raises(error, match=match):
        noise_gains(model, data(), **kwargs)
    assert not model.training


def test_bad_loaders_and_models(model):
    with pytest.raises(ValueError, match=r"\(images, labels\)"):
        noise_gains(model, [torch.zeros(2, *INPUT_SIZE)], 2, progress=False)
    with pytest.raises(ValueError, match="no eligible convolution"):
        noise_gains(NoEligible(), [(torch.zeros(2, 3, 8, 8), torch.zeros(2))], 2)
    assert eligible_convs(model)  # untouched
