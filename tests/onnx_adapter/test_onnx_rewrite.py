"""The ONNX adapter: GDWS rewrite of any ONNX graph, runtime checks, torch export, CLI."""

from __future__ import annotations

import io
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from _torch_models import INPUT_SIZE, small_resnet  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import gdws_onnx  # noqa: E402
from gdws_approx import GDWSApproximator  # noqa: E402
from gdws_torch import ErrorWeights, GDWSConv2d, convert  # noqa: E402
from gdws_torch.cli import main  # noqa: E402

X_SHAPE = (4, 12, 12)  # one sample of the option model's input

# Per sample, by hand. Output sizes: stem 12x12; pads (s 2x1, pads t1 l2 b0 r1) 6x13;
# dilated (3x2 kernel, dilations 2x1, pads t2 l0 b2 r1) 6x13; SAME_UPPER s2: 3x7.
OPTION_MACS = {
    "stem": 8 * 4 * 9 * 144,
    "pads": 12 * 8 * 9 * 78,
    "dilated": 10 * 12 * 6 * 78,
    "Conv:same.w": 16 * 10 * 9 * 21,
    "grouped": 16 * 4 * 9 * 21,
    "pointwise": 6 * 16 * 1 * 21,
}
OPTION_ELIGIBLE = ["pads", "dilated", "Conv:same.w"]
FLOAT_TYPES = {
    np.float16: TensorProto.FLOAT16,
    np.float32: TensorProto.FLOAT,
    np.float64: TensorProto.DOUBLE,
}


def option_model(dtype=np.float32, seed=0, dynamic=False) -> onnx.ModelProto:
    """Every Conv option: explicit asymmetric pads and strides, dilations with a
    non-square kernel, auto_pad SAME_UPPER (unnamed node), with and without bias, then
    a grouped and a 1x1 conv that stay as they are."""
    rng = np.random.default_rng(seed)

    def weight(name, *shape):
        return numpy_helper.from_array((0.3 * rng.standard_normal(shape)).astype(dtype), name)

    initializers = [
        weight("stem.w", 8, 4, 3, 3),
        weight("stem.b", 8),
        weight("pads.w", 12, 8, 3, 3),
        weight("dil.w", 10, 12, 3, 2),
        weight("dil.b", 10),
        weight("same.w", 16, 10, 3, 3),
        weight("same.b", 16),
        weight("group.w", 16, 4, 3, 3),
        weight("pw.w", 6, 16, 1, 1),
        weight("pw.b", 6),
    ]
    node = helper.make_node
    nodes = [
        node("Conv", ["x", "stem.w", "stem.b"], ["s"], name="stem", pads=[1, 1, 1, 1]),
        node("Relu", ["s"], ["s_relu"], name="relu0"),
        node("Conv", ["s_relu", "pads.w"], ["p"], name="pads", pads=[1, 2, 0, 1], strides=[2, 1]),
        node("Relu", ["p"], ["p_relu"], name="relu1"),
        node(
            "Conv",
            ["p_relu", "dil.w", "dil.b"],
            ["d"],
            name="dilated",
            dilations=[2, 1],
            pads=[2, 0, 2, 1],
            kernel_shape=[3, 2],
        ),
        node("Conv", ["d", "same.w", "same.b"], ["sm"], auto_pad="SAME_UPPER", strides=[2, 2]),
        node("Conv", ["sm", "group.w"], ["g"], name="grouped", group=4, pads=[1, 1, 1, 1]),
        node("Conv", ["g", "pw.w", "pw.b"], ["y"], name="pointwise"),
    ]
    elem = FLOAT_TYPES[dtype]
    x_dims = ["batch", 4, "height", "width"] if dynamic else ["batch", *X_SHAPE]
    graph = helper.make_graph(
        nodes,
        "options",
        [helper.make_tensor_value_info("x", elem, x_dims)],
        [helper.make_tensor_value_info("y", elem, ["batch", 6, "out_h", "out_w"])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def sequence_model(seed=0) -> onnx.ModelProto:
    """Three 3x3 convs with Relus; the last two share one weight, the last is unnamed."""
    rng = np.random.default_rng(seed)
    initializers = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w_a"),
        numpy_helper.from_array(rng.standard_normal((8, 8, 3, 3)).astype(np.float32), "w_s"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w_a"], ["a"], name="a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["a_relu"], name="relu_a"),
        helper.make_node("Conv", ["a_relu", "w_s"], ["b"], name="b", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["b"], ["b_relu"], name="relu_b"),
        helper.make_node("Conv", ["b_relu", "w_s"], ["y"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "sequence",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 10, 10])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def exported_small_resnet():
    """SmallResNet (float32) and its ONNX export with BatchNorm kept apart, so the Conv
    weights are the torch weights (initializers named like the parameters)."""
    model = small_resnet().float()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, *INPUT_SIZE),),
            buffer,
            dynamo=False,
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
            do_constant_folding=False,
        )
    return model, onnx.load_model_from_string(buffer.getvalue())


def initializers(model) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def measured_conv_macs(model, x_shape) -> int:
    """Conv MACs per sample of ``model``, from the shapes onnxruntime actually produces
    (every Conv output exposed as a graph output) and the weight initializers."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    convs = [n for n in probe.graph.node if n.op_type == "Conv"]
    for n in convs:
        probe.graph.output.append(helper.make_empty_tensor_value_info(n.output[0]))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [n.output[0] for n in convs]
    outputs = session.run(names, {"x": np.zeros((1, *x_shape), np.float32)})
    weights = initializers(model)
    return sum(
        weights[n.input[1]].size * math.prod(out.shape[2:])
        for n, out in zip(convs, outputs, strict=True)
    )


def gdws_factors(model, layer_name: str):
    """``(kernel_channels, depthwise (G, Kh, Kw), pointwise (M, G))`` of one rewritten conv."""
    nodes = {n.name: n for n in model.graph.node}
    weights = initializers(model)
    gather = nodes[f"{layer_name}/gdws/Gather"]
    depthwise = nodes[f"{layer_name}/gdws/depthwise"]
    pointwise = nodes[f"{layer_name}/gdws/pointwise"]
    assert depthwise.input[0] == gather.output[0] and pointwise.input[0] == depthwise.output[0]
    channels = weights[gather.input[1]]
    d = weights[depthwise.input[1]]
    p = weights[pointwise.input[1]]
    return channels, d[:, 0], p[:, :, 0, 0]


def dense_from_factors(channels, d, p, n_in):
    """``What[:, c] = sum_{j: c_j = c} P[:, j] D_j`` (docs/algorithms.md)."""
    m, (kh, kw) = p.shape[0], d.shape[1:]
    W = np.zeros((m, n_in, kh, kw), dtype=np.float64)
    for j, c in enumerate(channels):
        W[:, c] += np.multiply.outer(p[:, j].astype(np.float64), d[j].astype(np.float64))
    return W


# -- rewrite ------------------------------------------------------------------------------


@pytest.mark.parametrize("skip_first", [True, False])
def test_exact_rewrite_keeps_the_outputs(skip_first):
    model = option_model()
    before = model.SerializeToString()
    rewritten, plan = gdws_onnx.rewrite(
        model, beta=0.0, only_if_cheaper=False, skip_first=skip_first
    )
    assert model.SerializeToString() == before  # the input is not modified
    expected = OPTION_ELIGIBLE if skip_first else ["stem", *OPTION_ELIGIBLE]
    assert [layer.name for layer in plan.layers] == expected
    assert all(layer.replaced for layer in plan.layers)
    result = gdws_onnx.check(model, rewritten, n_inputs=3)
    assert result["inputs"] == {"x": [3, *X_SHAPE]}
    assert result["max_rel_diff"] <= 1e-5, result
    ops = [n.op_type for n in rewritten.graph.node]
    assert ops.count("Gather") == len(expected)
    assert ops.count("Conv") == 6 + len(expected)
    # The grouped and the 1x1 conv are left exactly as they were.
    for name in ("grouped", "pointwise"):
        (old,) = [n for n in model.graph.node if n.name == name]
        (new,) = [n for n in rewritten.graph.node if n.name == name]
        assert new == old
    # Same opset and I/O; unique node and value names; replaced weights dropped.
    assert rewritten.opset_import == model.opset_import
    assert rewritten.graph.input == model.graph.input
    assert rewritten.graph.output == model.graph.output
    names = [n.name for n in rewritten.graph.node]
    outputs = [o for n in rewritten.graph.node for o in n.output]
    assert len(set(names)) == len(names) and len(set(outputs)) == len(outputs)
    weights = initializers(rewritten)
    assert "pads.w" not in weights and "dil.b" in weights and "group.w" in weights
    assert ("stem.w" in weights) == skip_first
    summary = json.loads({p.key: p.value for p in rewritten.metadata_props}["gdws_approx"])
    assert summary["replaced"] == expected


def test_rewritten_weights_are_the_estimators_factors():
    """A float64 graph: the subgraph holds exactly the factors of a GDWSApproximator fitted
    on the same weight, and reconstructs its inverse_transform."""
    model = option_model(dtype=np.float64)
    weights = initializers(model)
    beta = 0.5
    rewritten, plan = gdws_onnx.rewrite(model, beta=beta, only_if_cheaper=False, kernel_multiple=1)
    assert [layer.name for layer in plan.layers] == OPTION_ELIGIBLE
    for layer, base, weight_name in zip(
        plan.layers, ["pads", "dilated", "same.w"], ["pads.w", "dil.w", "same.w"], strict=True
    ):
        W = weights[weight_name]
        estimator = GDWSApproximator(beta=beta).fit(W)
        channels, d, p = gdws_factors(rewritten, base)
        assert channels.dtype == np.int64 and d.dtype == np.float64 and p.dtype == np.float64
        assert layer.n_kernels == estimator.n_kernels_ and layer.error == estimator.error_
        np.testing.assert_array_equal(channels, estimator.kernel_channels_)
        np.testing.assert_array_equal(d, estimator.depthwise_kernels_)
        np.testing.assert_array_equal(p, estimator.pointwise_weights_)
        expected = estimator.inverse_transform(estimator.pointwise_weights_)
        got = dense_from_factors(channels, d, p, W.shape[1])
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12 * np.abs(W).max())
        assert 0 < layer.error  # beta > 0 really approximates


def test_mac_target_is_met_and_the_report_counts_the_graph():
    model = option_model()
    assert measured_conv_macs(model, X_SHAPE) == sum(OPTION_MACS.values())
    rewritten, plan = gdws_onnx.rewrite(model, target_mac_reduction=1.4, kernel_multiple=1)
    assert plan.dense_macs == sum(OPTION_MACS.values())
    assert plan.other_macs == sum(v for k, v in OPTION_MACS.items() if k not in OPTION_ELIGIBLE)
    assert {layer.name: layer.dense_macs for layer in plan.layers} == {
        k: OPTION_MACS[k] for k in OPTION_ELIGIBLE
    }
    assert plan.mac_reduction >= 1.4
    assert measured_conv_macs(rewritten, X_SHAPE) == plan.macs
    for layer in plan.layers:
        if layer.replaced:
            (m, _, kh, kw) = layer.shape
            assert layer.macs == layer.n_kernels * (kh * kw + m) * layer.output_pixels
    # A rewrite with the found beta is the same plan.
    again, plan_again = gdws_onnx.rewrite(model, beta=plan.beta, kernel_multiple=1)
    assert plan_again.macs == plan.macs
    assert again.SerializeToString() == rewritten.SerializeToString()


@pytest.mark.parametrize("multiple", [4, 8])
def test_padded_kernels_keep_outputs_and_add_only_the_padding_macs(multiple):
    model = option_model()
    plain, plan = gdws_onnx.rewrite(model, beta=0.5, only_if_cheaper=False, kernel_multiple=1)
    padded, plan_padded = gdws_onnx.rewrite(
        model, beta=0.5, only_if_cheaper=False, kernel_multiple=multiple
    )
    assert plan_padded.macs == plan.macs  # the plan is the same; only the graph differs
    extra = 0
    for layer in plan.layers:
        (m, _, kh, kw) = layer.shape
        extra += (-layer.n_kernels % multiple) * (kh * kw + m) * layer.output_pixels
    assert measured_conv_macs(padded, X_SHAPE) == measured_conv_macs(plain, X_SHAPE) + extra
    groups = [
        a.i
        for n in padded.graph.node
        if "/gdws/depthwise" in n.name
        for a in n.attribute
        if a.name == "group"
    ]
    assert len(groups) == len(plan.layers) and all(g % multiple == 0 for g in groups)
    x = {"x": np.random.default_rng(0).standard_normal((2, *X_SHAPE)).astype(np.float32)}
    (a,) = gdws_onnx.runtime.run(plain, x).values()
    (b,) = gdws_onnx.runtime.run(padded, x).values()
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * np.abs(a).max())
    with pytest.raises(ValueError, match="kernel_multiple"):
        gdws_onnx.rewrite(model, kernel_multiple=0)


def test_float16_weights_stay_float16():
    model = option_model(dtype=np.float16)
    rewritten, plan = gdws_onnx.rewrite(model, beta=0.0, only_if_cheaper=False)
    new = [t for t in rewritten.graph.initializer if ".gdws." in t.name]
    assert len(new) == 3 * len(plan.layers)
    assert {t.data_type for t in new} == {TensorProto.INT64, TensorProto.FLOAT16}
    assert gdws_onnx.check(model, rewritten)["max_rel_diff"] < 1e-2


def test_the_same_plan_as_gdws_torch_convert_gives_the_same_outputs():
    network, model = exported_small_resnet()
    alphas = {
        name: torch.rand(conv.in_channels, generator=torch.Generator().manual_seed(i))
        for i, (name, conv) in enumerate(
            (n + ".weight", m) for n, m in network.named_modules() if isinstance(m, torch.nn.Conv2d)
        )
    }
    budget = {"beta": 0.3, "only_if_cheaper": False, "svd_solver": "full"}
    rewritten, plan = gdws_onnx.rewrite(model, **budget, channel_weights=alphas)
    weights = ErrorWeights(channel_weights=alphas)
    converted, report = convert(network, input_size=INPUT_SIZE, **budget, error_weights=weights)
    assert len(plan.layers) == len(report.layers) == 4
    for ours, theirs in zip(plan.layers, report.layers, strict=True):
        assert (ours.shape, ours.n_kernels, ours.multiplier_histogram, ours.macs) == (
            theirs.shape,
            theirs.n_kernels,
            theirs.multiplier_histogram,
            theirs.macs,
        )
    assert (plan.dense_macs, plan.macs) == (report.dense_macs, report.macs)

    x = np.random.default_rng(1).standard_normal((3, *INPUT_SIZE)).astype(np.float32)
    (out,) = gdws_onnx.runtime.run(rewritten, {"x": x}).values()
    with torch.no_grad():
        expected = converted(torch.from_numpy(x)).numpy()
        dense = network(torch.from_numpy(x)).numpy()
    scale = np.abs(expected).max()
    assert np.abs(out - expected).max() <= 1e-5 * scale
    assert np.abs(dense - expected).max() > 1e-3 * scale  # an approximation, not a copy

    # The MAC target finds the same beta on both sides.
    target = {"target_mac_reduction": 1.05, "svd_solver": "full"}
    _, plan = gdws_onnx.rewrite(model, **target)
    _, report = convert(network, input_size=INPUT_SIZE, **target)
    # (torch's and NumPy's SVDs may differ in the last bit of a breakpoint)
    assert plan.beta == pytest.approx(report.beta, rel=1e-12) and plan.macs == report.macs


def test_conv_names_exclude_and_shared_weights():
    model = sequence_model()
    names = [(c.name, c.eligible, c.reason) for c in gdws_onnx.conv_nodes(model)]
    assert names == [
        ("a", False, "the network's first convolution (skip_first)"),
        ("b", True, ""),
        ("Conv:w_s", True, ""),
    ]
    both, plan = gdws_onnx.rewrite(model, beta=0.0, only_if_cheaper=False)
    assert [layer.name for layer in plan.layers] == ["b", "Conv:w_s"]
    assert "w_s" not in initializers(both)  # both readers replaced
    assert gdws_onnx.check(model, both)["max_rel_diff"] <= 1e-5
    one, plan = gdws_onnx.rewrite(model, beta=0.0, only_if_cheaper=False, exclude=["b"])
    assert [layer.name for layer in plan.layers] == ["Conv:w_s"]
    assert "w_s" in initializers(one)  # still read by "b"
    assert "w_s/gdws/Gather" in [n.name for n in one.graph.node]
    assert gdws_onnx.check(model, one)["max_rel_diff"] <= 1e-5
    with pytest.raises(ValueError, match="no eligible convolution"):
        gdws_onnx.rewrite(model, exclude=["w_s"])  # a weight name excludes its readers
    with pytest.raises(ValueError, match=r"exclude: no Conv named \['c'\]"):
        gdws_onnx.rewrite(model, exclude=["c"])
    with pytest.raises(TypeError, match="not a string"):
        gdws_onnx.rewrite(model, exclude="b")


def test_generated_names_never_collide():
    model = option_model()
    # An existing value with the name the rewrite would give its gather output.
    for node in model.graph.node:
        node.output[:] = ["pads/gdws/gather_output_0" if o == "p_relu" else o for o in node.output]
        node.input[:] = ["pads/gdws/gather_output_0" if i == "p_relu" else i for i in node.input]
    rewritten, _ = gdws_onnx.rewrite(model, beta=0.0, only_if_cheaper=False)
    outputs = [o for n in rewritten.graph.node for o in n.output]
    assert len(set(outputs)) == len(outputs)
    assert gdws_onnx.check(model, rewritten)["max_rel_diff"] <= 1e-5


def test_convs_that_are_not_rewritable_are_left_alone():
    rng = np.random.default_rng(0)
    w_a = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w_a")
    w_c = numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), "w_c")
    w_d = numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "w_d")
    constant = helper.make_tensor(
        "w_b_value", TensorProto.FLOAT, [4, 4, 3, 3], rng.standard_normal(144).tolist()
    )
    nodes = [
        helper.make_node("Conv", ["x", "w_a"], ["a"], name="a", pads=[1, 1, 1, 1]),
        helper.make_node("Constant", [], ["w_b"], name="const", value=constant),
        helper.make_node("Conv", ["a", "w_b"], ["b"], name="b", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["b", "w_c"], ["c"], name="c"),
        helper.make_node("Conv", ["c", "w_d"], ["y"], name="d", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "left_alone",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6]),
            helper.make_tensor_value_info("w_d", TensorProto.FLOAT, [4, 4, 3, 3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        [w_a, w_c, w_d],  # w_d: an initializer listed as an input (overridable)
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    reasons = {c.name: c.reason for c in gdws_onnx.conv_nodes(model)}
    assert reasons == {
        "a": "the network's first convolution (skip_first)",
        "b": "weight is not a constant initializer",
        "c": "1x1 kernel",
        "d": "weight is an initializer listed in graph.input (a caller may override it), "
        "not a constant",
    }
    with pytest.raises(ValueError, match=r"no eligible convolution.*b: weight is not a const"):
        gdws_onnx.rewrite(model)
    rewritten, plan = gdws_onnx.rewrite(model, skip_first=False, only_if_cheaper=False)
    assert [layer.name for layer in plan.layers] == ["a"]
    assert gdws_onnx.check(model, rewritten)["max_rel_diff"] <= 1e-5
    assert plan.other_macs == (4 * 4 * 9 + 4 * 4 + 4 * 4 * 9) * 36


def test_dynamic_shapes_need_input_shape():
    model = option_model(dynamic=True)
    with pytest.raises(ValueError, match="give input_shape"):
        gdws_onnx.rewrite(model, beta=0.0)
    rewritten, plan = gdws_onnx.rewrite(model, beta=0.0, input_shape=X_SHAPE)
    assert plan.dense_macs == sum(OPTION_MACS.values())
    with pytest.raises(ValueError, match="give input_shape"):
        gdws_onnx.check(model, rewritten)
    assert gdws_onnx.check(model, rewritten, input_shape=X_SHAPE)["max_rel_diff"] <= 1e-5
    with pytest.raises(ValueError, match="give 3 sizes"):
        gdws_onnx.rewrite(model, beta=0.0, input_shape=(12, 12))
    with pytest.raises(ValueError, match="contradicts"):
        gdws_onnx.rewrite(option_model(), beta=0.0, input_shape=(4, 10, 10))
    with pytest.raises(ValueError, match="positive integers"):
        gdws_onnx.rewrite(model, beta=0.0, input_shape=(4, 0, 12))
    with pytest.raises(TypeError, match=r"positive integers .* got \(4, 12\.0, 12\)"):
        gdws_onnx.rewrite(model, beta=0.0, input_shape=(4, 12.0, 12))
    with pytest.raises(ValueError, match="n_inputs must be an integer >= 1; got 0"):
        gdws_onnx.check(model, rewritten, n_inputs=0, input_shape=X_SHAPE)
    with pytest.raises(TypeError, match=r"n_inputs must be an integer >= 1; got True \(bool\)"):
        gdws_onnx.check(model, rewritten, n_inputs=True, input_shape=X_SHAPE)


def test_bad_budgets_and_models_are_refused_and_the_input_is_unchanged():
    model = option_model()
    before = model.SerializeToString()
    with pytest.raises(ValueError, match="out of reach"):
        gdws_onnx.rewrite(model, target_mac_reduction=100.0)
    with pytest.raises(ValueError, match="give one budget"):
        gdws_onnx.rewrite(model, beta=0.1, target_mac_reduction=2.0)
    with pytest.raises(ValueError, match="channel_weights has no entry for layer 'pads'"):
        gdws_onnx.rewrite(model, channel_weights={"dil.w": np.ones(12)})
    with pytest.raises(ValueError, match="layer 'pads'"):
        alphas = {"pads": np.ones(3), "dil.w": np.ones(12), "Conv:same.w": np.ones(10)}
        gdws_onnx.rewrite(model, channel_weights=alphas)
    assert model.SerializeToString() == before
    with pytest.raises(TypeError, match=r"onnx\.ModelProto"):
        gdws_onnx.rewrite(b"not a model")
    with pytest.raises(ValueError, match="no node"):
        gdws_onnx.rewrite(onnx.ModelProto())


def test_rewrite_file_writes_atomically_and_never_over_its_input(tmp_path):
    source = tmp_path / "model.onnx"
    onnx.save_model(option_model(), source)
    before = source.read_bytes()
    plan = gdws_onnx.rewrite_file(source, tmp_path / "out" / "gdws.onnx", beta=0.0)
    assert (tmp_path / "out" / "gdws.onnx").is_file() and plan.layers
    with pytest.raises(ValueError, match="not overwriting"):
        gdws_onnx.rewrite_file(source, source, beta=0.0)
    with pytest.raises(ValueError, match="not overwriting"):
        gdws_onnx.rewrite_file(source, tmp_path / "." / "model.onnx", beta=0.0)
    with pytest.raises(ValueError, match="out of reach"):
        gdws_onnx.rewrite_file(source, tmp_path / "never.onnx", target_mac_reduction=100.0)
    assert source.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "out"]
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    with pytest.raises(ValueError, match="is not an ONNX model"):
        gdws_onnx.load_model(text)
    with pytest.raises(FileNotFoundError):
        gdws_onnx.load_model(tmp_path / "missing.onnx")


# -- torch export -------------------------------------------------------------------------


def test_export_of_a_converted_model_agrees_with_torch(tmp_path, monkeypatch):
    network = small_resnet().float().train()
    converted, _ = convert(network, beta=0.5, input_size=INPUT_SIZE, only_if_cheaper=False)
    converted.train()
    path = tmp_path / "converted.onnx"
    result = gdws_onnx.export(converted, path, INPUT_SIZE)
    assert converted.training  # mode restored
    assert result["max_rel_diff"] <= 1e-4 and result["inputs"] == {"input": [2, *INPUT_SIZE]}
    model = onnx.load_model(path)
    assert [n.op_type for n in model.graph.node].count("Gather") == 4
    groups = [
        a.i
        for n in model.graph.node
        if "depthwise" in n.name
        for a in n.attribute
        if a.name == "group"
    ]
    assert len(groups) == 4 and all(g % 4 == 0 for g in groups)  # padded for onnxruntime
    kernels = [m.n_kernels for m in converted.modules() if isinstance(m, GDWSConv2d)]
    assert any(g % 4 for g in kernels)  # ... while the torch model is left as it was
    x = np.random.default_rng(2).standard_normal((5, *INPUT_SIZE)).astype(np.float32)
    (out,) = gdws_onnx.runtime.run(model, {"input": x}).values()  # dynamic batch
    converted.eval()
    with torch.no_grad():
        expected = converted(torch.from_numpy(x)).numpy()
    assert np.abs(out - expected).max() <= 1e-4 * np.abs(expected).max()

    # A failed check writes nothing.
    monkeypatch.setattr(gdws_onnx.torch_export, "EXPORT_TOLERANCE", -1.0)
    with pytest.raises(ValueError, match="disagrees with torch"):
        gdws_onnx.export(converted, tmp_path / "refused.onnx", INPUT_SIZE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted.onnx"]


# -- CLI ----------------------------------------------------------------------------------


@pytest.fixture
def model_file(tmp_path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save_model(option_model(), path)
    return path


def gdws(*args) -> int:
    return main(["onnx-convert", *(str(a) for a in args)])


def test_cli_writes_the_model_and_its_report(model_file, capsys):
    before = model_file.read_bytes()
    out = model_file.parent / "gdws.onnx"
    assert gdws(model_file, out, "--beta", "0", "--replace-all") == 0
    printed = capsys.readouterr().out
    assert "3/3 replaced" in printed
    assert "left as it is: grouped (grouped convolution (group=4))" in printed
    assert "onnxruntime check on 2 random inputs" in printed
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["command"] == "onnx-convert" and report["n_replaced"] == 3
    assert report["check"]["max_rel_diff"] <= 1e-5
    assert report["dense_macs"] == sum(OPTION_MACS.values())
    assert gdws_onnx.check(model_file, out)["max_rel_diff"] <= 1e-5
    assert model_file.read_bytes() == before

    json_path = model_file.parent / "reports" / "r.json"
    args = ["--target-mac-reduction", "1.2", "--include-first", "--exclude", "dilated"]
    assert gdws(model_file, out, *args, "--json", json_path, "--no-check") == 2  # out exists
    assert gdws(model_file, out, *args, "--json", json_path, "--no-check", "--overwrite") == 0
    report = json.loads(json_path.read_text())
    assert [layer["name"] for layer in report["layers"]] == ["stem", "pads", "Conv:same.w"]
    assert report["check"] is None and report["mac_reduction"] >= 1.2
    assert model_file.read_bytes() == before


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no file at"),
        ("same", "OUT '{model}' is IN '{model}', an input of this command; not overwriting"),
        ("json_is_input", "--json '{model}' is IN '{model}', an input of this command"),
        ("no_budget", "one of the arguments --beta --target-mac-reduction --n-kernels"),
        ("not_onnx", "is not an ONNX model"),
        ("no_eligible", "no eligible convolution"),
        ("unreachable", "out of reach"),
        ("bad_exclude", "exclude: no Conv named"),
        ("bad_shape", "contradicts"),
    ],
)
def test_cli_errors_are_one_line_with_exit_code_2(case, message, model_file, capsys):
    out = model_file.parent / "out.onnx"
    budget = ["--beta", "0"]
    args = {
        "missing": [model_file.parent / "nope.onnx", out, *budget],
        "same": [model_file, model_file, *budget],
        "json_is_input": [model_file, out, *budget, "--json", model_file],
        "no_budget": [model_file, out],
        "not_onnx": [model_file.parent / "notes.txt", out, *budget],
        "no_eligible": [model_file, out, *budget, "--exclude", "pads", "dilated", "Conv:same.w"],
        "unreachable": [model_file, out, "--target-mac-reduction", "100"],
        "bad_exclude": [model_file, out, *budget, "--exclude", "nothing"],
        "bad_shape": [model_file, out, *budget, "--input-shape", "4", "10", "10"],
    }[case]
    (model_file.parent / "notes.txt").write_text("not a model\n")
    before = model_file.read_bytes()
    assert gdws(*args) == 2
    captured = capsys.readouterr()
    assert message.format(model=model_file) in captured.err
    assert len(captured.err.strip().splitlines()) == 1, captured.err
    assert captured.err.startswith("gdws")
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert model_file.read_bytes() == before


def test_one_kernel_per_channel_in_order_needs_no_gather(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, padding=1)
    ).eval()
    with torch.no_grad():  # rank one per input channel: MEGO keeps one kernel in each
        u, v = torch.randn(8, 16), torch.randn(8, 9)
        model[2].weight.copy_(torch.einsum("cm,ck->mck", u, v).reshape(16, 8, 3, 3))
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.rand(1, 3, 6, 6),), path, dynamo=False)
    onnx_model = gdws_onnx.load_model(path)
    rewritten, report = gdws_onnx.rewrite(onnx_model, n_kernels=8, kernel_multiple=1)
    assert report.layers[0].multiplier_histogram == {1: 8}
    ops = [node.op_type for node in rewritten.graph.node]
    assert "Gather" not in ops and ops.count("Conv") == 3
    assert gdws_onnx.check(onnx_model, rewritten)["max_rel_diff"] <= 1e-5
    gathered, _ = gdws_onnx.rewrite(onnx_model, n_kernels=7, kernel_multiple=1)
    assert "Gather" in [node.op_type for node in gathered.graph.node]  # a channel dropped
    assert gdws_onnx.check(onnx_model, gathered)["n_inputs"] == 2
