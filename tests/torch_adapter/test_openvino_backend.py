"""The ``openvino`` backend of :mod:`gdws_torch.cost.throughput`: same outputs as torch, timed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gdws_torch import GDWSConv2d, convert
from gdws_torch.cost.throughput import available_backends, make_runner, measure_throughput

pytest.importorskip("openvino")

SHAPE = (3, 16, 16)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread avoids stalls on a busy machine (see test_training_and_fps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(12, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 5),
    ).eval()


@pytest.fixture(scope="module")
def gdws_model():
    torch.set_num_threads(1)
    converted, _ = convert(small_cnn(), target_mac_reduction=2.0, input_size=SHAPE)
    layers = [m for m in converted.modules() if isinstance(m, GDWSConv2d)]
    assert layers and any(m.n_kernels % 4 for m in layers)  # the export pads them
    return converted.eval()


def test_available_backends_lists_openvino_on_the_cpu_only():
    assert "openvino" in available_backends()
    assert "openvino" in available_backends("cpu")
    assert "openvino" not in available_backends("cuda")
    with pytest.raises(ValueError, match="CPU only"):
        make_runner(small_cnn(), "openvino", SHAPE, device="cuda")


@pytest.mark.parametrize("which", ["dense", "gdws"])
def test_openvino_runner_gives_the_torch_output(which, gdws_model):
    model = small_cnn() if which == "dense" else gdws_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    runner = make_runner(model, "openvino", SHAPE)
    for batch_size in (1, 3):
        # The runner draws its input from torch's generator after compiling: same seed,
        # same input.
        torch.manual_seed(batch_size)
        run = runner(batch_size)
        torch.manual_seed(batch_size)
        x = torch.rand((batch_size, *SHAPE))
        out = run()[0]
        with torch.no_grad():
            expected = model(x).numpy()
        assert out.shape == expected.shape and out.dtype == np.float32
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(run()[0], out)  # the same input on every call
    # the model is not modified (the padding happens on a copy)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_measure_throughput_on_openvino(gdws_model):
    models = {"dense": small_cnn(), "gdws": gdws_model}
    rows = measure_throughput(models, SHAPE, backends=("openvino",), batch_sizes=(1,), rounds=2)
    assert {(r["model"], r["backend"], r["batch_size"]) for r in rows} == {
        ("dense", "openvino", 1),
        ("gdws", "openvino", 1),
    }
    for row in rows:
        assert row["fps"] > 0 and row["fps_q1"] <= row["fps"] <= row["fps_q3"]
        assert row["threads"] == 1 and row["device"] == "cpu"
