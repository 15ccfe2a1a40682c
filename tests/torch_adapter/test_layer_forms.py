"""Every planned form as a torch layer: built from its plan, recovered by the refit, saved,
converted for a speed-up (functional: no timing claims)."""

from __future__ import annotations

import copy
import dataclasses
import itertools

import numpy as np
import pytest
import torch
from test_speed_target import planned_table, small_net
from torch import nn

from gdws_approx import LayerLatency, LayerSpec, ResponseErrors, plan_latency
from gdws_approx.latency_planning import FORMS
from gdws_torch import (
    ErrorWeights,
    GDWSConv2d,
    Latency,
    LowRankConv2d,
    Recovery,
    Refit,
    convert,
    count_macs,
    load_converted,
    recover,
    replace_module,
    save_converted,
)
from gdws_torch.conversion.weightings import input_patch_moments
from gdws_torch.cost.latency import layer_input_shapes
from gdws_torch.cost.latency_tables import (
    LatencyTable,
    gdws_lowrank_grid,
    kernel_grid,
    measure_layer,
    rank_grid,
)
from gdws_torch.nn.planned import build_layer, compressed_layers
from gdws_torch.recovery import refit_gdws

INPUT = (3, 8, 8)


def net64() -> nn.Module:
    torch.manual_seed(0)
    return (
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 12, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(12, 12, 3, stride=2, padding=1, padding_mode="reflect"),
            nn.ReLU(),
            nn.Conv2d(12, 10, (3, 2), padding=1, bias=False),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        .double()
        .eval()
    )


def gdws_lowrank_layer(conv: nn.Conv2d, n_kernels: int, rank: int) -> LowRankConv2d:
    weight = conv.weight.detach()
    from gdws_approx import GDWSApproximator

    est = GDWSApproximator(solver="mego", n_kernels=n_kernels).fit(weight)
    inner, outer = ResponseErrors(weight).gdws_lowrank_factors(n_kernels, rank)
    return LowRankConv2d.from_gdws_factors(
        conv, est.depthwise_kernels_, est.kernel_channels_, inner, outer
    )


def mixed(net: nn.Module) -> nn.Module:
    """``net`` with a low-rank, a GDWS-with-low-rank-pointwise and a GDWS layer."""
    model = copy.deepcopy(net)
    first, second = ResponseErrors(net[2].weight.detach()).lowrank_factors(4)
    replace_module(model, "2", LowRankConv2d.from_factors(net[2], first, second))
    replace_module(model, "4", gdws_lowrank_layer(net[4], 30, 5))
    from gdws_approx import GDWSApproximator

    est = GDWSApproximator(solver="mego", n_kernels=25).fit(net[6].weight.detach())
    replace_module(model, "6", GDWSConv2d.from_estimator(est, net[6]))
    return model


@pytest.mark.parametrize("kind", ["lowrank", "gdws_lowrank"])
def test_low_rank_layers_compute_their_dense_weight_and_round_trip(kind):
    conv = net64()[4]
    layer = (
        LowRankConv2d.from_factors(conv, *ResponseErrors(conv.weight.detach()).lowrank_factors(5))
        if kind == "lowrank"
        else gdws_lowrank_layer(conv, 30, 5)
    )
    x = torch.rand(2, 12, 7, 7, dtype=torch.float64)
    expected = nn.functional.conv2d(
        nn.functional.pad(x, (1, 1, 1, 1), mode="reflect"), layer.dense_weight(), conv.bias, 2
    )
    torch.testing.assert_close(layer(x), expected)
    rebuilt = LowRankConv2d(**layer.config(), dtype=torch.float64)
    rebuilt.load_state_dict(layer.state_dict())
    torch.testing.assert_close(rebuilt(x), layer(x))
    torch.testing.assert_close(torch.jit.script(layer)(x), layer(x))
    m, c, kh, kw = conv.weight.shape
    per_pixel = 5 * (c * kh * kw + m) if kind == "lowrank" else 30 * kh * kw + 30 * 5 + 5 * m
    assert layer.macs == per_pixel
    assert count_macs(nn.Sequential(layer), (12, 7, 7)).conv_macs == per_pixel * 16
    assert f"R=5, M={m}" in repr(layer)


def test_every_planned_form_is_built_as_planned():
    net = net64()
    names = ["2", "4", "6"]
    shapes = layer_input_shapes(net, names, INPUT)
    macs = {la.name: la for la in count_macs(net, INPUT).layers}
    specs = [
        LayerSpec(n, net.get_submodule(n).weight.detach(), macs[n].output_pixels) for n in names
    ]
    built_forms = set()
    for form in FORMS:  # one form offered at a time, a target only it can reach
        latencies = {
            n: LayerLatency(
                1.0,
                (4,),
                (5.0,) if form != "gdws" else (0.1,),
                multipliers=(1,),
                grouped_ms=(5.0,) if form != "grouped" else (0.1,),
                ranks=(1, 4),
                lowrank_ms=(0.1, 0.1) if form == "lowrank" else (5.0, 5.0),
                gdws_lowrank_points=((10, 2),),
                gdws_lowrank_ms=(0.1,) if form == "gdws_lowrank" else (5.0,),
            )
            for n in names
        }
        plan = plan_latency(specs, latencies, target_speedup=2.9, network_dense_ms=3.0, forms=FORMS)
        for layer, spec in zip(plan.layers, specs, strict=True):
            assert layer.form == form
            built = build_layer(layer, net.get_submodule(layer.name))
            assert isinstance(built, LowRankConv2d if "lowrank" in form else GDWSConv2d)
            # The built layer's weight has the plan's error (Sigma = I: the weight error).
            W, W_hat = spec.weight.numpy(), built.dense_weight().detach().numpy()
            assert float(np.sum((W - W_hat) ** 2)) == pytest.approx(layer.error)
            counted = count_macs(nn.Sequential(built), shapes[layer.name]).conv_macs
            assert counted == (layer.padded_macs if form == "grouped" else layer.macs)
            built_forms.add(form)
        assert plan.latency.forms_offered == FORMS
    assert built_forms == set(FORMS)
    with pytest.raises(ValueError, match="planned dense"):
        build_layer(dataclasses.replace(plan.layers[0], replaced=False), net[2])


def _explicit_gram(model, name, batches, conv):
    """``sum patch patch^T`` of the inputs ``model`` feeds ``name``, by unfold."""
    captured = []
    handle = model.get_submodule(name).register_forward_pre_hook(
        lambda m, args: captured.append(args[0].detach())
    )
    with torch.no_grad():
        for batch in batches:
            model(batch)
    handle.remove()
    gram = 0
    for x in captured:
        if conv.padding_mode != "zeros":
            x = nn.functional.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
            padding = 0
        else:
            padding = conv.padding
        patches = nn.functional.unfold(x, conv.kernel_size, conv.dilation, padding, conv.stride)
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1]).numpy()
        gram = gram + rows.T @ rows
    return gram


def test_the_refit_recovers_a_mixed_model_layer_by_layer():
    net = net64()
    model = mixed(net)
    batches = [torch.rand(6, *INPUT, dtype=torch.float64) for _ in range(2)]
    out, errors = refit_gdws(net, model, batches, 12, return_errors=True, progress=False)
    assert list(errors) == ["2", "4", "6"]
    for values in errors.values():  # every step lowers the error (or keeps it)
        assert all(b <= a * (1 + 1e-9) + 1e-12 for a, b in itertools.pairwise(values))
        assert values[-1] < values[0]
    # The low-rank layer is at the exact optimum for the inputs it is fed (NumPy).
    gram = _explicit_gram(out, "2", batches, net[2])
    W = net[2].weight.detach().numpy().reshape(12, -1)
    values = np.linalg.eigvalsh(W @ gram @ W.T)[::-1]
    assert errors["2"][1] == pytest.approx(float(values[4:].sum()), rel=1e-8)
    diff = W - out[2].dense_weight().detach().numpy().reshape(12, -1)
    assert float(np.trace(diff @ gram @ diff.T)) == pytest.approx(errors["2"][1], rel=1e-8)
    # The GDWS-LR layer keeps its rank, its kernels' channels and its MACs.
    assert isinstance(out[4], LowRankConv2d) and out[4].rank == 5
    assert torch.linalg.matrix_rank(out[4].dense_weight().flatten(1)) <= 5
    assert torch.equal(out[4].first.kernel_channels, model[4].first.kernel_channels)
    gram = _explicit_gram(out, "4", batches, net[4])
    W = net[4].weight.detach().numpy().reshape(12, -1)
    diff = W - out[4].dense_weight().detach().numpy().reshape(12, -1)
    assert float(np.trace(diff @ gram @ diff.T)) == pytest.approx(errors["4"][-1], rel=1e-6)
    assert count_macs(out, INPUT).conv_macs == count_macs(model, INPUT).conv_macs
    assert not any(m.fused for m in out.modules() if isinstance(m, GDWSConv2d))


def test_a_mixed_model_saves_and_reloads(tmp_path):
    net = net64()
    model = mixed(net)
    path = tmp_path / "m.pth"
    save_converted(path, model)
    loaded, _ = load_converted(path, net64())
    assert [n for n, _ in compressed_layers(loaded)] == ["2", "4", "6"]
    x = torch.rand(3, *INPUT, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_input_patch_moments_are_the_per_sample_patch_gram():
    net = net64()
    batches = [torch.rand(5, *INPUT, dtype=torch.float64), torch.rand(3, *INPUT).double()]
    moments = input_patch_moments(net, batches, 8, layers=["2", "4"])
    for name in ("2", "4"):
        expected = _explicit_gram(net, name, batches, net.get_submodule(name)) / 8
        np.testing.assert_allclose(moments[name].numpy(), expected, rtol=1e-10, atol=1e-12)


def test_convert_for_a_speedup_chooses_low_rank_and_gdws_only_excludes_it(tmp_path):
    net = small_net()
    table_path = tmp_path / "t.json"
    table = planned_table(table_path, net, (3, 16, 16), gdws_from=1.05, grouped=(1.2, 1.3))
    convs = {n: m for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    shapes = layer_input_shapes(net, list(convs), (3, 16, 16))
    for name, conv in convs.items():  # low-rank made fast: every plan uses it
        old = table.get(conv, shapes[name])
        ranks = tuple(rank_grid(conv))
        fast = tuple(0.05 * old.dense_ms for _ in ranks)
        table.add(conv, shapes[name], LayerLatency(*_fields(old), ranks=ranks, lowrank_ms=fast))
    table.save()
    batches = [torch.rand(4, 3, 16, 16) for _ in range(2)]
    moments = input_patch_moments(net, batches, 8)
    converted, report = convert(
        net,
        target_speedup=1.1,
        input_size=(3, 16, 16),
        latency=Latency(table=table_path),
        error_weights=ErrorWeights(input_moments=moments),
        require_target=False,  # made-up latencies: reached or not, the model is built
    )
    refit = Recovery(refit=Refit(8, adversarial=False))
    converted, _ = recover(converted, net, refit, calibration=batches)
    forms = report.latency.forms
    assert any(form.startswith("lowrank") for form in forms.values())
    for layer in report.layers:
        module = converted.get_submodule(layer.name)
        assert isinstance(module, LowRankConv2d) == (layer.form == "lowrank")
        assert layer.to_dict()["form"] == layer.form
    assert "lowrank R=" in report.format_table()
    with pytest.raises(ValueError, match="out of reach"):
        convert(
            net,
            target_speedup=1.1,
            input_size=(3, 16, 16),
            latency=Latency(table=table_path, forms=("gdws", "grouped")),
        )
    with pytest.raises(ValueError, match="does not time that form"):
        convert(
            net,
            target_speedup=1.1,
            input_size=(3, 16, 16),
            latency=Latency(table=LatencyTable("eager"), forms=("gdws_lowrank",)),
        )


def _fields(latency: LayerLatency) -> tuple:
    return (
        latency.dense_ms,
        latency.kernel_counts,
        latency.gdws_ms,
        latency.multipliers,
        latency.grouped_ms,
    )


@pytest.mark.parametrize(
    ("forms", "error", "match"),
    [
        (("gdws", "pruned"), ValueError, "forms must name at least one of"),
        ((), ValueError, "forms must name at least one of"),
        ("lowrank", TypeError, "forms must be a tuple"),
    ],
)
def test_latency_forms_are_validated(forms, error, match):
    with pytest.raises(error, match=match):
        Latency(forms=forms)
    assert Latency(forms=["lowrank", "lowrank"]).forms == ("lowrank",)


def test_tables_time_low_rank_ranks_and_gdws_lowrank_points_when_asked(tmp_path):
    conv = nn.Conv2d(8, 16, 3, padding=1)
    assert rank_grid(conv) == sorted(set(rank_grid(conv)))
    top = rank_grid(conv)[-1]
    assert top * (8 * 9 + 16) < 16 * 8 * 9 <= (top + 1) * (8 * 9 + 16)
    points = gdws_lowrank_grid(conv, kernel_grid(conv))
    assert points and all(r < g for g, r in points)
    latency = measure_layer(
        conv, (8, 6, 6), kernel_counts=[8], multipliers=[1], gdws_lowrank_points=points, rounds=1
    )
    assert latency.ranks == tuple(rank_grid(conv)) and all(t > 0 for t in latency.lowrank_ms)
    assert latency.gdws_lowrank_points == tuple(points)
    path = tmp_path / "t.json"
    plain = LatencyTable("eager", 1, "cpu", path)
    plain.add(conv, (8, 6, 6), latency)
    plain.save()
    assert LatencyTable("eager", 1, "cpu", path).get(conv, (8, 6, 6)) == latency
    assert LatencyTable("eager", 1, "cpu", path, gdws_lowrank=True).get(conv, (8, 6, 6)) is None


def test_the_forms_bench_times_each_form_at_equal_macs(tmp_path, capsys):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "lowrank_forms.py"
    spec = importlib.util.spec_from_file_location("lowrank_forms", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for c, m, _ in bench.LAYERS:
        for divisor in bench.BUDGETS:
            budget = m * c * 9 // divisor
            models = bench.forms(c, m, divisor)
            for name in ("gdws", "lowrank", "gdws_lowrank"):
                macs = bench.macs_of(models[name], c, m)
                step = {"gdws": 9 + m, "lowrank": c * 9 + m, "gdws_lowrank": 9 + m // 4}[name]
                assert budget - step < macs <= budget  # the largest size within the budget
    out = tmp_path / "forms.json"
    assert bench.main(["--quick", "--rounds", "1", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("RESULT gdws_lowrank: ")
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4 and all(set(r["ms"]) == {*bench.FORMS_TIMED} for r in rows)


def test_input_moments_are_checked_before_any_layer_is_timed(tmp_path, monkeypatch):
    import gdws_torch.cost.latency_tables as tables

    def no_timing(*args, **kwargs):
        raise AssertionError("a layer was timed")

    monkeypatch.setattr(tables, "measure_layer", no_timing)
    net = small_net()
    names = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)][1:]
    good = {n: torch.eye(net.get_submodule(n).weight[0].numel()) for n in names}
    run = dict(target_speedup=1.5, input_size=(3, 16, 16), latency=Latency(table=tmp_path / "t"))
    with pytest.raises(ValueError, match=r"input_moments\['2'\] must have shape"):
        convert(net, error_weights=ErrorWeights(input_moments={**good, "2": torch.eye(3)}), **run)
    with pytest.raises(ValueError, match="input_moments has no entry for layer '4'"):
        convert(net, error_weights=ErrorWeights(input_moments={"2": good["2"]}), **run)
    with pytest.raises(TypeError, match="input_moments must be a mapping"):
        ErrorWeights(input_moments=torch.eye(3))
