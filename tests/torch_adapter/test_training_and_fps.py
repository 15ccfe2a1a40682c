"""Normalisation inside the model, training (augmentation, SGD loop, accuracy), FPS timing."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gdws_torch import load_checkpoint
from gdws_torch.cost.throughput import measure_fps
from gdws_torch.nn.normalization import DATASET_NORMALIZATION, Normalized, normalized
from gdws_torch.robustness.training import accuracy, random_crop_flip, train

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # the original's datasets.py
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: with several threads, a busy machine makes each step ~50x
    slower (threads waiting on each other), without one it changes nothing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_cnn(seed: int = 0, channels: int = 3) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 2),
    )


# -- normalisation ------------------------------------------------------------------------


def test_normalized_output_is_the_module_on_standardised_pixels():
    net = small_cnn().eval()
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = torch.empty_like(x)
    for c in range(3):  # per channel, by hand
        expected[:, c] = (x[:, c] - mean[c]) / std[c]
    wrapper = Normalized(net, mean, std)
    assert wrapper.module is net
    torch.testing.assert_close(wrapper(x), net(expected))
    assert "mean=(0.1, 0.5, 0.9)" in repr(wrapper)

    # gradients reach the pixels (what an attack needs)
    x.requires_grad_(True)
    wrapper(x).sum().backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)


def test_normalized_accepts_float64_inputs():
    net = small_cnn().double().eval()
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    mean = torch.tensor(CIFAR10_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, dtype=torch.float64).view(1, 3, 1, 1)
    out = Normalized(net, CIFAR10_MEAN, CIFAR10_STD)(x)
    assert out.dtype == torch.float64
    # the statistics are stored in float32: equal to float32 rounding only
    torch.testing.assert_close(out, net((x - mean) / std), rtol=1e-6, atol=1e-6)


def test_normalized_state_dict_is_the_wrapped_modules_with_the_module_prefix():
    net = small_cnn()
    wrapper = Normalized(net, CIFAR10_MEAN, CIFAR10_STD)
    keys = set(wrapper.state_dict())
    assert keys == {f"module.{k}" for k in net.state_dict()}
    assert {"mean", "std"} <= {name for name, _ in wrapper.named_buffers()}  # non-persistent
    # and it loads into a fresh wrapper strictly
    fresh = Normalized(small_cnn(seed=5), CIFAR10_MEAN, CIFAR10_STD)
    fresh.load_state_dict(wrapper.state_dict())


@pytest.mark.parametrize("prefixed", [False, True])
def test_load_checkpoint_into_a_normalized_wrapper(tmp_path, prefixed):
    source = small_cnn(seed=0)
    state = source.state_dict()
    if prefixed:  # saved from a DataParallel (or Normalized) model
        state = {f"module.{k}": v for k, v in state.items()}
    path = tmp_path / "model_best.pth"
    torch.save({"state_dict": state}, path)
    target = small_cnn(seed=1)
    wrapper = Normalized(target, CIFAR10_MEAN, CIFAR10_STD)
    assert load_checkpoint(wrapper, path) is wrapper
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k


def test_normalized_by_dataset_name():
    net = small_cnn()
    assert normalized(net, "digits") is net
    wrapped = normalized(net, "cifar10")
    assert isinstance(wrapped, Normalized) and wrapped.module is net
    assert torch.equal(wrapped.mean.flatten(), torch.tensor(CIFAR10_MEAN))
    assert torch.equal(wrapped.std.flatten(), torch.tensor(CIFAR10_STD))
    assert DATASET_NORMALIZATION["cifar10"] == (CIFAR10_MEAN, CIFAR10_STD)
    assert DATASET_NORMALIZATION["svhn"] == ((0.5,) * 3, (0.5,) * 3)
    assert DATASET_NORMALIZATION["digits"] is None
    mean, std = DATASET_NORMALIZATION["cifar100"]
    assert len(mean) == len(std) == 3


def test_normalized_bad_arguments():
    net = small_cnn()
    for std in [(0.2, 0.0, 0.2), (0.2, -0.1, 0.2)]:
        with pytest.raises(ValueError, match="std"):
            Normalized(net, CIFAR10_MEAN, std)
    with pytest.raises(ValueError, match="mean and std"):
        Normalized(net, (0.5, 0.5), (0.2, 0.2, 0.2))
    with pytest.raises(ValueError, match=r"dataset.*'tinyimagenet'"):
        normalized(net, "tinyimagenet")


# -- random crop and flip -----------------------------------------------------------------


def crops_of(image: torch.Tensor, padding: int) -> list[torch.Tensor]:
    """Every crop of the zero-padded image, at every offset."""
    _, h, w = image.shape
    padded = F.pad(image, (padding,) * 4)
    return [
        padded[:, dy : dy + h, dx : dx + w]
        for dy in range(2 * padding + 1)
        for dx in range(2 * padding + 1)
    ]


@pytest.mark.parametrize("flip", [False, True])
def test_random_crop_flip_gives_a_crop_of_the_padded_image(flip):
    images = torch.rand(64, 2, 6, 5, generator=torch.Generator().manual_seed(0))
    before = images.clone()
    out = random_crop_flip(images, padding=2, flip=flip, generator=torch.Generator().manual_seed(3))
    assert torch.equal(images, before)  # not mutated
    assert out.shape == images.shape and out.dtype == images.dtype
    offsets, mirrored = set(), 0
    for n in range(len(images)):
        crops = crops_of(images[n], 2)
        plain = [i for i, c in enumerate(crops) if torch.equal(out[n], c)]
        flipped = [i for i, c in enumerate(crops) if torch.equal(out[n], c.flip(-1))]
        if flip:
            assert len(plain) + len(flipped) == 1, n
        else:
            assert len(plain) == 1 and not flipped, n
        offsets.update(plain + flipped)
        mirrored += bool(flipped)
    assert len(offsets) > 10  # the offsets vary (25 possible)
    if flip:
        assert 10 < mirrored < 54  # about half mirrored


def test_random_crop_flip_is_reproducible_with_a_generator():
    images = torch.rand(16, 3, 8, 8)

    def run(seed):
        return random_crop_flip(images, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))
    assert torch.equal(random_crop_flip(images, padding=0, flip=False), images)


# -- training -----------------------------------------------------------------------------


def separable_batches(seed: int, n_batches: int, batch_size: int = 32):
    """1x8x8 images, one half brightened: the label says whether it is the left half."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        images = 0.6 * torch.rand(batch_size, 1, 8, 8, generator=g)
        left = torch.rand(batch_size, generator=g) < 0.5
        images[left, :, :, :4] += 0.4
        images[~left, :, :, 4:] += 0.4
        labels = (images[..., :4].mean((1, 2, 3)) > images[..., 4:].mean((1, 2, 3))).long()
        assert torch.equal(labels, left.long())
        out.append((images, labels))
    return out


def tiny_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 2))


def test_train_learns_a_separable_problem():
    model = tiny_net()
    loader, test_loader = separable_batches(0, 8), separable_batches(1, 4)
    lines = []
    history = train(
        model, loader, epochs=12, lr=0.1, test_loader=test_loader, progress=False, log=lines.append
    )
    assert [r["epoch"] for r in history] == list(range(1, 13))
    for record in history:
        assert set(record) == {"epoch", "loss", "train_accuracy", "test_accuracy"}
        assert math.isfinite(record["loss"]) and 0 <= record["train_accuracy"] <= 100
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["test_accuracy"] >= 90
    assert history[-1]["test_accuracy"] == accuracy(model, test_loader)  # after the last epoch
    assert len(lines) == 12 and "test acc" in lines[-1]
    assert not model.training and not any(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_train_without_test_loader_and_with_attack_and_augment():
    model = tiny_net()
    loader = separable_batches(2, 3, batch_size=8)
    calls = {"augment": 0, "attack": 0}

    def augment(images):
        calls["augment"] += 1
        return images * 0 + 0.5  # a marker the attack must see

    def attack(images, labels):
        calls["attack"] += 1
        assert torch.all(images == 0.5)  # applied after the augmentation
        assert labels.shape == (8,)
        return images

    history = train(model, loader, epochs=2, attack=attack, augment=augment, progress=False)
    assert calls == {"augment": 6, "attack": 6}  # every batch of every epoch
    assert [set(r) for r in history] == [{"epoch", "loss", "train_accuracy"}] * 2
    assert not model.training and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        ({"epochs": 0}, ValueError, "epochs must be an integer >= 1; got 0"),
        ({"epochs": -1}, ValueError, "epochs must be an integer >= 1; got -1"),
        ({"epochs": 1.5}, TypeError, r"epochs must be an integer >= 1; got 1\.5 \(float\)"),
        ({"epochs": True}, TypeError, r"epochs must be an integer >= 1; got True \(bool\)"),
        ({"epochs": 1, "lr": 0}, ValueError, "lr must be a finite real number > 0; got 0"),
        ({"epochs": 1, "lr": -0.1}, ValueError, "lr must be a finite real number > 0; got -0.1"),
        ({"epochs": 1, "lr": float("nan")}, ValueError, "lr must be a finite real number > 0"),
        ({"epochs": 1, "lr": "0.1"}, TypeError, r"lr must be a finite real number > 0; got '0\.1'"),
    ],
)
def test_train_bad_arguments(kwargs, error, name):
    model = tiny_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=name):
        train(model, separable_batches(0, 1), progress=False, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class LabelEcho(nn.Module):
    """Predicts the class written in pixel (0, 0, 0); records its mode during forward."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.modes: list[bool] = []

    def forward(self, x):
        self.modes.append(self.training)
        return F.one_hot(x[:, 0, 0, 0].long(), 3).float() * self.scale


def test_accuracy_counts_in_eval_mode_and_restores_the_mode():
    images = torch.zeros(10, 1, 2, 2)
    images[:, 0, 0, 0] = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0.0])
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 1, 2, 0, 0])  # 7 of 10 right
    model = LabelEcho().train()
    assert accuracy(model, [(images[:4], labels[:4]), (images[4:], labels[4:])]) == 70.0
    assert model.modes == [False, False] and model.training
    with pytest.raises(ValueError, match="no samples"):
        accuracy(model, [])


# -- throughput ---------------------------------------------------------------------------

# What every call saw: (name, input shape, training flag, inference mode). A module-level
# list, because measure_fps runs copies of the models (their own attributes stay behind).
CALLS: list[tuple] = []


class Sleeper(nn.Module):
    """Sleeps ``seconds`` per call and records the call in ``CALLS``."""

    def __init__(self, seconds: float = 0.0, name: str = "") -> None:
        super().__init__()
        self.seconds, self.name = seconds, name
        self.linear = nn.Linear(3, 2)

    def forward(self, x):
        CALLS.append((self.name, tuple(x.shape), self.training, torch.is_inference_mode_enabled()))
        if self.seconds:
            time.sleep(self.seconds)
        return x.flatten(1)[:, :3] @ self.linear.weight.T


@pytest.fixture
def calls():
    CALLS.clear()
    yield CALLS
    CALLS.clear()


def check_result(result: dict, names) -> None:
    assert set(result) == set(names)
    for stats in result.values():
        assert set(stats) == {"fps", "fps_q1", "fps_q3", "latency_ms"}
        assert 0 < stats["fps_q1"] <= stats["fps"] <= stats["fps_q3"]
        assert stats["latency_ms"] > 0


def test_fps_of_a_sleeping_model_is_bounded_by_its_sleep():
    model = Sleeper(0.002)
    result = measure_fps({"sleep": model}, (3, 4, 4), rounds=3, warmup=1)
    check_result(result, ["sleep"])
    stats = result["sleep"]
    assert stats["fps"] <= 500  # at least 2 ms per call
    assert stats["fps"] > 25  # and not wildly more (a loaded CI machine may oversleep)
    assert stats["latency_ms"] >= 2.0

    result = measure_fps({"sleep": model}, (3, 4, 4), batch_size=4, rounds=3, warmup=0)
    assert result["sleep"]["fps"] <= 4 * 500
    assert result["sleep"]["latency_ms"] >= 2.0  # per batch


@pytest.mark.parametrize("batch_size", [1, 3])
def test_fps_tells_a_slow_model_from_a_fast_one_and_keeps_their_names(batch_size):
    # Timed interleaved: each model's figure must be its own (6 ms vs 1 ms per batch, plus
    # whatever a loaded machine adds to both sleeps).
    models = {"fast": Sleeper(0.001), "slow": Sleeper(0.006)}
    result = measure_fps(models, (3, 2, 2), batch_size=batch_size, rounds=5, warmup=1)
    check_result(result, models)
    assert result["slow"]["latency_ms"] >= 6.0 and result["fast"]["latency_ms"] >= 1.0
    assert result["fast"]["fps"] / result["slow"]["fps"] > 1.8
    assert result["slow"]["fps"] <= batch_size / 0.006


def test_fps_runs_every_model_in_eval_and_inference_mode_and_leaves_them_alone(calls):
    models = {name: Sleeper(name=name) for name in "abc"}
    models["a"].train()
    models["b"].eval()
    before = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in models.items()}
    result = measure_fps(models, (3, 4, 4), batch_size=2, rounds=3, warmup=1)
    check_result(result, "abc")
    assert {name for name, *_ in calls} == set("abc")
    assert set(calls) == {(name, (2, 3, 4, 4), False, True) for name in "abc"}
    assert models["a"].training and not models["b"].training and models["c"].training
    for name, model in models.items():
        assert all(torch.equal(before[name][k], v) for k, v in model.state_dict().items())


def test_fps_propagates_a_models_error_and_leaves_the_models_alone():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 2)

        def forward(self, x):
            raise RuntimeError("boom")

    good, broken = Sleeper().train(), Broken().train()
    with pytest.raises(RuntimeError, match="boom"):
        measure_fps({"good": good, "broken": broken}, (3, 1, 1), rounds=1)
    assert good.training and broken.training


@pytest.mark.parametrize(
    "models, shape, kwargs, error, name",
    [
        ({}, (3, 4, 4), {}, ValueError, "models"),
        (None, (), {}, ValueError, "input_shape"),
        (None, (3, 0, 4), {}, ValueError, "input_shape"),
        (None, (-1,), {}, ValueError, "input_shape"),
        (None, 3, {}, ValueError, "input_shape"),
        (None, (3, 4, 4), {"batch_size": 0}, ValueError, "batch_size must be an integer >= 1"),
        (None, (3, 4, 4), {"batch_size": -2}, ValueError, "batch_size must be an integer >= 1"),
        (None, (3, 4, 4), {"batch_size": 1.5}, TypeError, r"batch_size .* got 1\.5 \(float\)"),
        (None, (3, 4, 4), {"batch_size": True}, TypeError, r"batch_size .* got True \(bool\)"),
        (None, (3, 4, 4), {"rounds": 0}, ValueError, "rounds must be an integer >= 1; got 0"),
        (None, (3, 4, 4), {"warmup": -1}, ValueError, "warmup must be an integer >= 0; got -1"),
        (None, (3, 4, 4), {"warmup": 1.0}, TypeError, r"warmup .* got 1\.0 \(float\)"),
    ],
)
def test_fps_bad_arguments(calls, models, shape, kwargs, error, name):
    with pytest.raises(error, match=name):
        measure_fps({"m": Sleeper()} if models is None else models, shape, **kwargs)
    assert calls == []  # checked before any call


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_measure_throughput_on_cuda_synchronises_and_reports_the_device():
    from gdws_torch.cost.throughput import measure_throughput

    model = small_cnn()
    rows = measure_throughput(
        {"m": model}, (3, 8, 8), backends=("eager", "channels_last"), rounds=3, device="cuda"
    )
    assert {r["device"] for r in rows} == {"cuda"} and all(r["fps"] > 0 for r in rows)
    assert next(model.parameters()).device.type == "cpu"  # the caller's model is not moved


def test_tensorrt_runs_only_where_a_gpu_and_its_provider_are():
    onnxruntime = pytest.importorskip("onnxruntime")
    from gdws_torch.cost.throughput import available_backends, make_runner, measure_throughput

    assert "tensorrt" not in available_backends("cpu")
    with pytest.raises(ValueError, match="tensorrt backend needs a CUDA device"):
        make_runner(small_cnn(), "tensorrt", (3, 8, 8), device="cpu")
    has_trt = "TensorrtExecutionProvider" in onnxruntime.get_available_providers()
    if not (torch.cuda.is_available() and has_trt):
        pytest.skip("no CUDA GPU with ONNX Runtime's TensorRT execution provider here")
    assert "tensorrt" in available_backends("cuda")
    rows = measure_throughput(
        {"cnn": small_cnn().cuda().eval()},
        (3, 8, 8),
        backends=("tensorrt",),
        batch_sizes=(1,),
        rounds=2,
        device="cuda",
    )
    assert rows[0]["fps"] > 0 and rows[0]["device"].startswith("cuda")
