"""GDWSConv2d: equals the dense conv with its reconstructed weight, for every conv option."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError
from torch import nn

from gdws_approx import GDWSApproximator
from gdws_torch import GDWSConv2d

CONV_OPTIONS = [
    {"kernel_size": 3, "padding": 1},
    {"kernel_size": 3, "stride": 2, "padding": 1, "bias": False},
    {"kernel_size": (3, 1), "padding": (1, 0)},
    {"kernel_size": (1, 5), "stride": (1, 2), "padding": (0, 2), "bias": False},
    {"kernel_size": 3, "dilation": 2, "padding": 2},
    {"kernel_size": 3, "padding": "same", "dilation": (2, 1)},
    {"kernel_size": 3, "padding": "valid"},
    {"kernel_size": 3, "padding": 1, "padding_mode": "reflect"},
    {"kernel_size": (2, 3), "padding": (1, 2), "padding_mode": "circular", "stride": 2},
    {"kernel_size": 3, "padding": 1, "padding_mode": "replicate", "bias": False},
]


def make_conv(options: dict, seed: int = 0, dtype=torch.float64) -> nn.Conv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(6, 10, dtype=dtype, **options)
    if conv.bias is not None:
        nn.init.uniform_(conv.bias, -1, 1)
    return conv


def gdws_of(conv: nn.Conv2d, fraction: float = 0.3, **kwargs) -> GDWSConv2d:
    energy = float((conv.weight.detach().double() ** 2).sum())
    estimator = GDWSApproximator(beta=fraction * energy).fit(conv.weight.detach())
    return GDWSConv2d.from_estimator(estimator, conv, **kwargs)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("options", CONV_OPTIONS, ids=lambda o: str(o))
def test_output_equals_dense_conv_with_reconstructed_weight(options):
    conv = make_conv(options)
    layer = gdws_of(conv)
    assert layer.n_kernels < 6 * conv.weight[0, 0].numel()  # a real approximation
    x = torch.randn(3, 6, 13, 11, dtype=torch.float64)
    reference = conv._conv_forward(x, layer.dense_weight().detach(), conv.bias)
    assert relative(layer(x), reference) < 1e-10
    layer.fused = True
    assert relative(layer(x), reference) < 1e-10


def test_dense_weight_is_the_estimators_reconstruction():
    conv = make_conv({"kernel_size": (3, 2)})
    estimator = GDWSApproximator(beta=2.0).fit(conv.weight.detach())
    layer = GDWSConv2d.from_estimator(estimator, conv)
    expected = estimator.inverse_transform(estimator.pointwise_weights_)
    torch.testing.assert_close(layer.dense_weight(), expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(layer.multipliers, estimator.multipliers_)


@pytest.mark.parametrize("options", CONV_OPTIONS[:3], ids=lambda o: str(o))
def test_exact_representation_reproduces_the_conv(options):
    conv = make_conv(options)
    layer = GDWSConv2d.from_estimator(GDWSApproximator(beta=0.0).fit(conv.weight.detach()), conv)
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    assert relative(layer(x), conv(x)) < 1e-12


def test_factors_from_numpy_and_float32_keep_the_conv_dtype_and_device():
    conv = make_conv({"kernel_size": 3, "padding": 1}, dtype=torch.float32)
    estimator = GDWSApproximator(beta=1.0).fit(conv.weight.detach().numpy())
    layer = GDWSConv2d.from_estimator(estimator, conv)
    assert layer.depthwise.weight.dtype == torch.float32
    assert layer.kernel_channels.dtype == torch.long
    assert torch.equal(layer.pointwise.bias, conv.bias)
    np.testing.assert_allclose(
        layer.dense_weight().detach().numpy(),
        estimator.inverse_transform(estimator.pointwise_weights_),
        rtol=1e-5,
        atol=1e-6,
    )


def test_conv_is_not_modified_and_bias_is_copied():
    conv = make_conv({"kernel_size": 3, "padding": 1})
    before = {k: v.clone() for k, v in conv.state_dict().items()}
    layer = gdws_of(conv)
    with torch.no_grad():
        layer.pointwise.bias.add_(1.0)
    for key, value in conv.state_dict().items():
        assert torch.equal(value, before[key])


def test_extra_repr_shows_channels_kernels_and_mac_ratio():
    conv = make_conv({"kernel_size": 3, "padding": 1, "padding_mode": "reflect"})
    layer = gdws_of(conv)
    text = repr(layer)
    ratio = layer.dense_macs / layer.gdws_macs
    assert f"C=6, G={layer.n_kernels}, M=10" in text
    assert f"mac_reduction={ratio:.2f}x" in text
    assert "padding_mode='reflect'" in text
    assert layer.gdws_macs == layer.n_kernels * (9 + 10)


def test_state_dict_round_trips_into_a_layer_built_from_config():
    conv = make_conv({"kernel_size": (3, 1), "stride": 2, "padding": (1, 0)})
    layer = gdws_of(conv)
    twin = GDWSConv2d(**layer.config(), dtype=torch.float64)
    twin.load_state_dict(layer.state_dict())
    assert set(layer.state_dict()) == {
        "depthwise.weight",
        "pointwise.weight",
        "pointwise.bias",
        "kernel_channels",
    }
    x = torch.randn(2, 6, 8, 8, dtype=torch.float64)
    assert torch.equal(twin(x), layer(x))


def test_to_conv2d_gives_the_dense_equivalent():
    conv = make_conv({"kernel_size": 3, "padding": 1, "padding_mode": "circular"})
    layer = gdws_of(conv)
    dense = layer.to_conv2d()
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    assert relative(dense(x), layer(x)) < 1e-12


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
@pytest.mark.parametrize("fused", [False, True])
def test_torchscript_and_torch_export(fused):
    layer = gdws_of(make_conv({"kernel_size": 3, "padding": 1, "padding_mode": "reflect"}))
    layer.fused = fused
    x = torch.randn(2, 6, 8, 8, dtype=torch.float64)
    expected = layer(x)
    scripted = torch.jit.script(layer)
    torch.testing.assert_close(scripted(x), expected)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.jit.load(buffer)(x), expected)
    exported = torch.export.export(layer, (x,))
    torch.testing.assert_close(exported.module()(x), expected)


def test_onnx_export_matches_onnxruntime():
    ort = pytest.importorskip("onnxruntime")
    conv = make_conv({"kernel_size": 3, "stride": 2, "padding": 1}, dtype=torch.float32)
    layer = gdws_of(conv).eval()
    x = torch.randn(2, 6, 12, 12)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(layer, (x,), buffer, dynamo=False, input_names=["x"])
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": x.numpy()})
    np.testing.assert_allclose(out, layer(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_bad_input():
    conv = make_conv({"kernel_size": 3, "padding": 1})
    with pytest.raises(NotFittedError):
        GDWSConv2d.from_estimator(GDWSApproximator(), conv)
    with pytest.raises(TypeError, match="GDWSApproximator"):
        GDWSConv2d.from_estimator(object(), conv)
    other = GDWSApproximator().fit(torch.randn(10, 6, 5, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        GDWSConv2d.from_estimator(other, conv)
    grouped = nn.Conv2d(6, 10, 3, groups=2)
    with pytest.raises(ValueError, match="groups=2"):
        GDWSConv2d.from_factors(grouped, torch.zeros(1, 3, 3), [0], torch.zeros(10, 1))
    with pytest.raises(TypeError, match="Conv2d"):
        GDWSConv2d.from_factors(nn.Linear(3, 3), torch.zeros(1, 3, 3), [0], torch.zeros(3, 1))
    with pytest.raises(ValueError, match="at least one depthwise kernel"):
        GDWSConv2d(6, 10, 3, kernel_channels=[])
    with pytest.raises(ValueError, match=r"\[0, in_channels=6\)"):
        GDWSConv2d(6, 10, 3, kernel_channels=[0, 6])
    with pytest.raises(ValueError, match="pointwise_weights"):
        GDWSConv2d.from_factors(conv, torch.zeros(2, 3, 3), [0, 1], torch.zeros(10, 3))
    keeps_nothing = GDWSApproximator(beta=1e9).fit(conv.weight.detach())
    with pytest.raises(ValueError, match="at least one depthwise kernel"):
        GDWSConv2d.from_estimator(keeps_nothing, conv)


@pytest.mark.parametrize("options", CONV_OPTIONS[:4], ids=lambda o: str(o))
@pytest.mark.parametrize("multiple", [1, 4, 16])
def test_padded_layer_gives_the_same_output_with_g_a_multiple(options, multiple):
    layer = gdws_of(make_conv(options)).train(False)
    assert layer.n_kernels % 4 != 0 or layer.n_kernels % 16 != 0
    padded = layer.padded(multiple)
    assert padded.n_kernels % multiple == 0
    assert padded.n_kernels - layer.n_kernels < multiple
    assert (padded is layer) == (layer.n_kernels % multiple == 0)
    assert torch.equal(
        padded.multipliers[: layer.in_channels].sum(), torch.tensor(padded.n_kernels)
    )
    x = torch.randn(2, layer.in_channels, 9, 11, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(padded(x), layer(x), rtol=0, atol=1e-12)
        padded.fused = layer.fused = True
        torch.testing.assert_close(padded(x), layer(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(padded.dense_weight(), layer.dense_weight(), rtol=0, atol=0)
    assert not padded.training
    sorted_channels = padded.kernel_channels
    assert bool((sorted_channels[1:] >= sorted_channels[:-1]).all())


def test_pad_kernels_pads_every_gdws_layer_in_place():
    from gdws_torch import pad_kernels

    first = make_conv(CONV_OPTIONS[0])
    second = nn.Conv2d(10, 10, 3, padding=1, dtype=torch.float64)
    model = nn.Sequential(gdws_of(first), nn.ReLU(), gdws_of(second, 0.5))
    x = torch.randn(2, model[0].in_channels, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
        assert pad_kernels(model, 8) is model
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-12)
    assert all(m.n_kernels % 8 == 0 for m in model if isinstance(m, GDWSConv2d))
    with pytest.raises(ValueError, match="multiple"):
        model[0].padded(0)


@pytest.mark.parametrize("options", CONV_OPTIONS, ids=lambda o: str(o))
def test_channels_last_input_takes_the_nhwc_path_with_the_same_output(options):
    layer = gdws_of(make_conv(options)).to(memory_format=torch.channels_last)
    x = torch.randn(3, 6, 13, 11, dtype=torch.float64)
    nhwc = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = layer(x)
        got = layer(nhwc)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert got.is_contiguous(memory_format=torch.channels_last)  # no copy back to NCHW


@pytest.mark.parametrize("options", CONV_OPTIONS, ids=lambda o: str(o))
def test_uniform_layer_runs_grouped_without_gather_and_equals_the_dense_conv(options):
    conv = make_conv(options, seed=3)
    kh, kw = conv.kernel_size
    # Unequal multipliers, kernels out of channel order: uniform() must sort and pad them.
    channels = torch.tensor([5, 0, 3, 0, 2, 3, 3, 1, 4, 0, 5])
    shuffled = GDWSConv2d.from_factors(
        conv, torch.randn(11, kh, kw, dtype=torch.float64), channels, torch.randn(10, 11)
    ).train(False)
    assert shuffled.gathers and len(set(shuffled.multipliers.tolist())) > 1
    uniform = shuffled.uniform()
    m = int(shuffled.multipliers.max())
    assert uniform.grouped and not uniform.gathers and uniform.multiplier == m
    assert uniform.n_kernels == 6 * m
    assert torch.equal(uniform.kernel_channels, torch.arange(6).repeat_interleave(m))
    x = torch.randn(2, 6, 13, 11, dtype=torch.float64)
    reference = conv._conv_forward(x, shuffled.dense_weight().detach(), conv.bias)
    with torch.no_grad():
        assert relative(uniform(x), reference) < 1e-10
        torch.testing.assert_close(uniform.dense_weight(), shuffled.dense_weight())
    assert uniform.uniform() is uniform and uniform.padded(4) is uniform
    assert "grouped=True" in repr(uniform)


def test_grouped_layer_round_trips_and_exports_to_onnx_without_gather():
    ort = pytest.importorskip("onnxruntime")
    import onnx

    conv = make_conv({"kernel_size": 3, "padding": 1}, dtype=torch.float32)
    layer = gdws_of(conv).uniform().eval()
    rebuilt = GDWSConv2d(**layer.config())
    rebuilt.load_state_dict(layer.state_dict())
    assert rebuilt.grouped and not rebuilt.gathers
    x = torch.randn(2, 6, 12, 12)
    torch.testing.assert_close(rebuilt(x), layer(x))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(layer, (x,), buffer, dynamo=False, input_names=["x"])
    graph = onnx.load_from_string(buffer.getvalue()).graph
    assert "Gather" not in {n.op_type for n in graph.node}
    groups = [a.i for n in graph.node for a in n.attribute if a.name == "group"]
    assert groups[0] == 6 and set(groups[1:]) <= {1}
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": x.numpy()})
    np.testing.assert_allclose(out, layer(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    scripted = torch.jit.script(layer)
    torch.testing.assert_close(scripted(x), layer(x))


def test_grouped_needs_uniform_kernel_channels():
    with pytest.raises(ValueError, match="grouped=True"):
        GDWSConv2d(3, 4, 3, kernel_channels=[0, 0, 1, 2], grouped=True)
    layer = GDWSConv2d(3, 4, 3, kernel_channels=[0, 0, 1, 1, 2, 2], grouped=True)
    assert layer.multiplier == 2 and not layer.gathers
    # Two kernels per channel without `grouped` still gather (often the faster form).
    assert GDWSConv2d(3, 4, 3, kernel_channels=[0, 0, 1, 1, 2, 2]).gathers
    assert not GDWSConv2d(3, 4, 3, kernel_channels=[0, 1, 2]).gathers


def test_eval_mode_restores_every_modules_own_mode_even_on_error():
    from gdws_torch.nn.module_tree import eval_mode

    model = nn.Sequential(nn.Conv2d(2, 2, 3), nn.BatchNorm2d(2), nn.Dropout())
    model.train()
    model[1].eval()  # a frozen submodule inside a training model
    with eval_mode(model) as inside:
        assert inside is model and not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == [True, True, False, True]
    with pytest.raises(RuntimeError, match="boom"), eval_mode(model):
        raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == [True, True, False, True]
