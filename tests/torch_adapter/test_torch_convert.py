"""convert() and count_macs() on a small real residual network."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from _torch_models import (
    INPUT_SIZE,
    SMALL_RESNET_ELIGIBLE,
    SMALL_RESNET_MACS,
    NoEligible,
    small_resnet,
)
from torch import nn

from gdws_approx import GDWSApproximator
from gdws_torch import GDWSConv2d, convert, count_macs, eligible_convs, set_fused
from gdws_torch.conversion.options import ErrorWeights, Latency, Recovery


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def state_equal(a: nn.Module, b: dict) -> bool:
    state = a.state_dict()
    return state.keys() == b.keys() and all(torch.equal(state[k], b[k]) for k in b)


def snapshot(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def model():
    return small_resnet()


@pytest.fixture
def images():
    return torch.rand(
        4, *INPUT_SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )


def test_mac_counter_matches_hand_computed_figures(model):
    counted = count_macs(model, INPUT_SIZE)
    assert {la.name: la.macs for la in counted.layers if la.kind == "conv"} == SMALL_RESNET_MACS
    assert counted["head"].macs == 32 * 5
    assert counted.conv_macs == sum(SMALL_RESNET_MACS.values())
    assert counted.total == counted.conv_macs + 32 * 5
    assert counted["reflect"].output_shape == (32, 8, 8)


def test_mac_counter_counts_gdws_layers_as_depthwise_plus_pointwise(model):
    converted, _ = convert(model, input_size=INPUT_SIZE, beta=0.0, only_if_cheaper=False)
    counted = count_macs(converted, INPUT_SIZE)
    layer = converted.dilated
    assert counted["dilated"].kind == "gdws"
    assert counted["dilated"].macs == layer.n_kernels * (9 + 24) * 64
    # The depthwise and pointwise convs inside are not counted a second time.
    assert not any(la.name.startswith("dilated.") for la in counted.layers)
    set_fused(converted, True)
    assert count_macs(converted, INPUT_SIZE)["dilated"].macs == counted["dilated"].macs


def test_default_eligibility_skips_first_1x1_and_grouped(model):
    assert [name for name, _ in eligible_convs(model)] == SMALL_RESNET_ELIGIBLE
    assert next(n for n, _ in eligible_convs(model, skip_first=False)) == "stem"
    chosen = eligible_convs(model, layers=lambda name, m: m.out_channels == 24)
    assert [n for n, _ in chosen] == ["block.conv1", "block.conv2", "block.shortcut", "dilated"]
    assert [n for n, _ in eligible_convs(model, exclude=["dilated"])] == [
        "block.conv1",
        "block.conv2",
        "reflect",
    ]
    assert [n for n, _ in eligible_convs(model, layers=["reflect"])] == ["reflect"]


def test_beta_zero_reproduces_the_model_and_leaves_it_untouched(model, images):
    before = snapshot(model)
    expected = model(images)
    converted, report = convert(model, input_size=INPUT_SIZE, beta=0.0, only_if_cheaper=False)
    assert all(isinstance(converted.get_submodule(n), GDWSConv2d) for n in SMALL_RESNET_ELIGIBLE)
    assert relative(converted(images), expected) < 1e-9
    assert state_equal(model, before)
    assert all(type(model.get_submodule(n)) is nn.Conv2d for n in SMALL_RESNET_ELIGIBLE)
    assert report.error == pytest.approx(0.0, abs=1e-20)
    assert not converted.training and converted is not model


def test_fused_conversion_gives_the_same_outputs(model, images):
    explicit, _ = convert(model, input_size=INPUT_SIZE, beta=1.0, only_if_cheaper=False)
    fused, _ = convert(model, input_size=INPUT_SIZE, beta=1.0, only_if_cheaper=False, fused=True)
    assert all(m.fused for m in fused.modules() if isinstance(m, GDWSConv2d))
    assert relative(fused(images), explicit(images)) < 1e-12


def test_positive_beta_report_matches_the_mac_counter(model):
    converted, report = convert(model, input_size=INPUT_SIZE, beta=0.5)
    assert report.dense_macs == count_macs(model, INPUT_SIZE).conv_macs
    assert report.macs == count_macs(converted, INPUT_SIZE).conv_macs
    assert report.macs < report.dense_macs
    for layer in report.layers:
        module = converted.get_submodule(layer.name)
        assert isinstance(module, GDWSConv2d) == layer.replaced
        if layer.replaced:
            assert layer.n_kernels == module.n_kernels
            assert sum(layer.multiplier_histogram.values()) == layer.shape[1]
            g = sum(g * n for g, n in layer.multiplier_histogram.items())
            assert g == layer.n_kernels
            assert layer.error <= 0.5
        else:
            assert layer.reason.startswith("kept dense")
    table = report.format_table()
    assert "total" in table and "block.conv2" in table
    assert report.to_dict()["macs"] == report.macs


def test_layers_that_would_not_pay_stay_dense(model):
    _, report = convert(model, input_size=INPUT_SIZE, beta=0.0)
    assert not any(layer.replaced for layer in report.layers)
    assert report.macs == report.dense_macs
    _, forced = convert(model, input_size=INPUT_SIZE, beta=0.0, only_if_cheaper=False)
    assert all(layer.replaced for layer in forced.layers)
    assert forced.macs > forced.dense_macs  # full rank costs more than dense: reported as is


def test_alphas_weight_each_layers_error(model):
    generator = torch.Generator().manual_seed(3)
    alphas = {
        f"{name}.weight": torch.rand(conv.in_channels, generator=generator, dtype=torch.float64)
        for name, conv in eligible_convs(model)
    }
    converted, report = convert(
        model,
        input_size=INPUT_SIZE,
        beta=0.2,
        only_if_cheaper=False,
        error_weights=ErrorWeights(channel_weights=alphas),
    )
    for name, conv in eligible_convs(model):
        reference = GDWSApproximator(beta=0.2).fit(
            conv.weight.detach(), alpha=alphas[f"{name}.weight"]
        )
        assert report[name].n_kernels == reference.n_kernels_
        assert report[name].error == pytest.approx(reference.error_, rel=1e-12)
        torch.testing.assert_close(
            converted.get_submodule(name).dense_weight(),
            reference.inverse_transform(reference.pointwise_weights_),
        )
    # Module names and DataParallel-prefixed keys are accepted too.
    prefixed = {f"module.{k}": v for k, v in alphas.items()}
    _, again = convert(
        model,
        input_size=INPUT_SIZE,
        beta=0.2,
        only_if_cheaper=False,
        error_weights=ErrorWeights(channel_weights=prefixed),
    )
    assert [la.n_kernels for la in again.layers] == [la.n_kernels for la in report.layers]


def test_target_mac_reduction_is_met_with_the_smallest_beta(model):
    converted, report = convert(model, input_size=INPUT_SIZE, target_mac_reduction=1.5)
    assert report.mac_reduction >= 1.5
    assert count_macs(converted, INPUT_SIZE).conv_macs == report.macs
    # Any smaller common beta misses the target: the search found the least error.
    _, smaller = convert(model, input_size=INPUT_SIZE, beta=float(np.nextafter(report.beta, 0)))
    assert smaller.mac_reduction < 1.5
    assert smaller.error <= report.error
    with pytest.raises(ValueError, match="out of reach"):
        convert(model, input_size=INPUT_SIZE, target_mac_reduction=50.0)


def test_mego_budgets_per_layer(model):
    budgets = {"block.conv1": 10, "block.conv2": 20, "dilated": 30, "reflect": 40}
    converted, report = convert(
        model, input_size=INPUT_SIZE, n_kernels=budgets, only_if_cheaper=False
    )
    assert report.solver == "mego"
    for name, budget in budgets.items():
        assert converted.get_submodule(name).n_kernels == budget
    _, same = convert(model, input_size=INPUT_SIZE, n_kernels=12)
    assert {la.n_kernels for la in same.layers} == {12}


def test_inplace_modifies_the_given_model(model, images):
    expected = convert(model, input_size=INPUT_SIZE, beta=1.0)[0](images)
    converted, _ = convert(model, input_size=INPUT_SIZE, beta=1.0, inplace=True)
    assert converted is model
    assert torch.equal(model(images), expected)


def test_training_mode_is_kept(model):
    model.train()
    converted, _ = convert(model, input_size=INPUT_SIZE, beta=1.0)
    assert converted.training and model.training
    assert all(m.training for m in converted.modules())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"beta": 1e9}, ValueError, "keeps no kernel"),
        ({"beta": -1.0}, ValueError, "beta"),
        ({"beta": 1.0, "target_mac_reduction": 2.0}, ValueError, "one budget"),
        ({"target_mac_reduction": 0.5}, ValueError, "> 1"),
        (
            {"error_weights": ErrorWeights({"block.conv1.weight": torch.ones(8)})},
            ValueError,
            "no entry for layer",
        ),
        (
            {
                "error_weights": ErrorWeights(
                    {f"{n}.weight": torch.ones(3) for n in SMALL_RESNET_ELIGIBLE}
                )
            },
            ValueError,
            "C=",
        ),
        (
            {
                "error_weights": ErrorWeights({"dilated.weight": -torch.ones(24)}),
                "layers": ["dilated"],
            },
            ValueError,
            "non-negative",
        ),
        ({"layers": ["nope"]}, ValueError, "no module named"),
        ({"layers": ["grouped"]}, ValueError, "groups=4"),
        ({"n_kernels": {"dilated": 3}}, ValueError, "no budget for layer"),
        ({"input_size": (3, 7)}, ValueError, "input_size"),
        ({"error_weights": {"alphas": {}}}, TypeError, "error_weights must be an ErrorWeights"),
        ({"latency": Recovery()}, TypeError, "latency must be a Latency"),
        ({"beta": 0.5, "allocation": "global"}, ValueError, "allocation='global' shares"),
        ({"beta": 0.5, "allocation": "greedy"}, ValueError, "allocation must be one of"),
        ({"beta": 0.5, "recovery": Recovery()}, TypeError, "unexpected keyword"),
        ({"target_speedup": 1.5, "latency": Latency(keep_faster=True)}, ValueError, "excludes"),
        ({"beta": 0.5, "no_such_keyword": 1}, TypeError, "unexpected keyword"),
    ],
)
def test_bad_input_leaves_the_model_untouched(model, kwargs, error, match):
    before = snapshot(model)
    kwargs.setdefault("input_size", INPUT_SIZE)
    with pytest.raises(error, match=match):
        convert(model, **kwargs)
    assert state_equal(model, before)
    assert all(type(model.get_submodule(n)) is nn.Conv2d for n in SMALL_RESNET_ELIGIBLE)


def test_a_model_without_eligible_convs_is_refused():
    with pytest.raises(ValueError, match="no eligible convolution"):
        convert(NoEligible(), input_size=(3, 8, 8))
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        convert("resnet", input_size=(3, 8, 8))


def test_converted_model_exports_to_onnx_and_torch_export():
    ort = pytest.importorskip("onnxruntime")
    model = small_resnet().float()
    converted, _ = convert(model, input_size=INPUT_SIZE, beta=0.5, only_if_cheaper=False)
    x = torch.rand(2, *INPUT_SIZE)
    expected = converted(x).detach()
    exported = torch.export.export(converted, (x,))
    torch.testing.assert_close(exported.module()(x), expected)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation, reflect-pad folding
        torch.onnx.export(converted, (x,), buffer, dynamo=False, input_names=["x"])
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": x.numpy()})
    np.testing.assert_allclose(out, expected.numpy(), rtol=1e-4, atol=1e-5)


def test_latency_aware_keeps_dense_the_layers_measured_slower(model, images, monkeypatch):
    """The timing is faked (deterministic): GDWS measured slower on one layer only."""
    import gdws_torch.cost.latency as latency

    slow = "block.conv2"
    seen = {}

    def fake_measure(models, input_shape, **kwargs):
        gdws = models["gdws"]
        name = next(n for n, m in built.items() if m.n_kernels == gdws.n_kernels)
        seen[name] = (tuple(input_shape), kwargs["backends"], kwargs["batch_sizes"])
        ms = {"dense": 2.0, "gdws": 3.0 if name == slow else 1.0}
        return [{"model": k, "latency_ms": v} for k, v in ms.items()]

    budget = {"beta": 0.5, "only_if_cheaper": False}
    plain, _ = convert(model, input_size=INPUT_SIZE, **budget)
    built = {n: m for n, m in plain.named_modules() if isinstance(m, GDWSConv2d)}
    assert slow in built and len(built) == 4
    monkeypatch.setattr(latency, "measure_throughput", fake_measure)
    converted, report = convert(
        model, input_size=INPUT_SIZE, **budget, latency=Latency(keep_faster=True, batch_size=4)
    )
    assert set(seen) == set(built)
    assert all(v[1:] == (("eager",), (4,)) for v in seen.values())
    shapes = {}
    hooks = [
        model.get_submodule(n).register_forward_hook(
            lambda m, i, o, n=n: shapes.__setitem__(n, tuple(i[0].shape[1:]))
        )
        for n in built
    ]
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    assert {n: v[0] for n, v in seen.items()} == shapes
    layer = report[slow]
    assert not layer.replaced and layer.error == 0 and layer.macs == layer.dense_macs
    assert "measured 3 ms >= dense 2 ms" in layer.reason
    assert layer.timings_ms == {"dense": 2.0, "gdws": 3.0}
    assert type(converted.get_submodule(slow)) is nn.Conv2d
    for name in set(built) - {slow}:
        assert report[name].replaced and report[name].timings_ms == {"dense": 2.0, "gdws": 1.0}
        assert isinstance(converted.get_submodule(name), GDWSConv2d)
    assert report.macs == count_macs(converted, INPUT_SIZE).conv_macs
    assert "ms dense / planned" in report.format_table()
    with torch.no_grad():  # the dense layer put back is the original one
        torch.testing.assert_close(
            converted.get_submodule(slow).weight, model.get_submodule(slow).weight
        )


@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
def test_latency_aware_on_a_real_backend_is_consistent(model, backend):
    converted, report = convert(
        model.float(),
        input_size=INPUT_SIZE,
        beta=0.5,
        only_if_cheaper=False,
        latency=Latency(keep_faster=True, backend=backend),
    )
    assert all(layer.timings_ms for layer in report.layers)
    for layer in report.layers:
        module = converted.get_submodule(layer.name)
        assert isinstance(module, GDWSConv2d) == layer.replaced
        if layer.timings_ms is not None:
            faster = layer.timings_ms["gdws"] < layer.timings_ms["dense"]
            assert faster == layer.replaced
    assert report.macs == count_macs(converted, INPUT_SIZE).conv_macs
