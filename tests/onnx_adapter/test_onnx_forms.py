"""Every planned layer form exports to ONNX in its own operators and matches torch in
onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import gdws_onnx  # noqa: E402
from gdws_approx import GDWSApproximator, ResponseErrors  # noqa: E402
from gdws_torch import GDWSConv2d, LowRankConv2d  # noqa: E402

SHAPE = (6, 9, 9)


def layer(form: str) -> nn.Module:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=1)
    weight = conv.weight.detach()
    if form == "lowrank":
        return LowRankConv2d.from_factors(conv, *ResponseErrors(weight).lowrank_factors(3))
    est = GDWSApproximator(solver="mego", n_kernels=13).fit(weight)
    if form == "gdws_lowrank":
        inner, outer = ResponseErrors(weight).gdws_lowrank_factors(13, 4)
        return LowRankConv2d.from_gdws_factors(
            conv, est.depthwise_kernels_, est.kernel_channels_, inner, outer
        )
    built = GDWSConv2d.from_estimator(est, conv)
    return built.uniform() if form == "grouped" else built


# The operators of each form: nothing else in the graph, no dense weight rebuilt.
OPERATORS = {
    "gdws": ["Gather", "Conv", "Conv"],
    "grouped": ["Conv", "Conv"],
    "lowrank": ["Conv", "Conv"],
    "gdws_lowrank": ["Gather", "Conv", "Conv", "Conv"],
}


@pytest.mark.parametrize("form", sorted(OPERATORS))
@pytest.mark.parametrize("multiple", [1, 4])
def test_every_form_exports_in_its_own_operators_and_matches_torch(form, multiple, tmp_path):
    module = layer(form).eval()
    path = tmp_path / f"{form}.onnx"
    result = gdws_onnx.export(module, path, SHAPE, kernel_multiple=multiple)
    assert result["max_rel_diff"] <= 1e-5
    graph = onnx.load_model(path).graph
    assert sorted(node.op_type for node in graph.node) == sorted(OPERATORS[form])
    sizes = sorted(int(np.prod(w.dims)) for w in graph.initializer if len(w.dims) == 4)
    dense = 10 * 6 * 9
    assert max(sizes) < dense  # each Conv holds its factor, not the dense weight
    x = np.random.default_rng(3).standard_normal((4, *SHAPE)).astype(np.float32)
    (out,) = gdws_onnx.runtime.run(onnx.load_model(path), {"input": x}).values()
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    assert np.abs(out - expected).max() <= 1e-5 * np.abs(expected).max()
