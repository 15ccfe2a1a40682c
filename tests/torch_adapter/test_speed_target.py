"""Latency tables and conversion for a measured speed-up (functional: no timing claims)."""

from __future__ import annotations

import copy
import io
import json
import warnings

import onnx
import pytest
import torch
from torch import nn

from gdws_approx import LayerLatency
from gdws_torch import GDWSConv2d, convert, replace_module
from gdws_torch.cli import main
from gdws_torch.conversion.options import Latency
from gdws_torch.cost.latency import layer_input_shapes
from gdws_torch.cost.latency_tables import LatencyTable, kernel_grid, measure_layer, multiplier_grid


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    ).eval()


def test_a_layer_with_one_kernel_per_channel_skips_the_gather_and_exports_without_it():
    conv = nn.Conv2d(8, 12, 3, padding=1)
    layer = GDWSConv2d.from_factors(conv, torch.randn(8, 3, 3), torch.arange(8), torch.randn(12, 8))
    assert not layer.gathers
    x = torch.randn(2, 8, 6, 6)
    expected = nn.functional.conv2d(x, layer.dense_weight(), conv.bias, padding=1)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    shuffled = GDWSConv2d.from_factors(
        conv, torch.randn(8, 3, 3), torch.tensor([1, 0, 2, 3, 4, 5, 6, 7]), torch.randn(12, 8)
    )
    assert shuffled.gathers
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(layer.eval(), (x,), buffer, dynamo=False)
    ops = {node.op_type for node in onnx.load_from_string(buffer.getvalue()).graph.node}
    assert "Gather" not in ops and "Conv" in ops
    reloaded = GDWSConv2d(8, 12, 3, torch.tensor([1, 0, 2, 3, 4, 5, 6, 7]), padding=1)
    reloaded.load_state_dict(layer.state_dict())
    assert not reloaded.gathers  # recomputed from the loaded buffer


def test_kernel_grid_runs_from_one_kernel_per_channel_to_break_even_on_the_multiple():
    conv = nn.Conv2d(64, 64, 3)
    grid = kernel_grid(conv, multiple=4)
    assert grid[0] == 64 and all(g % 4 == 0 for g in grid)
    assert grid == sorted(set(grid)) and grid[-1] <= 64 * 64 * 9 // (9 + 64) + 3


def test_a_table_times_each_layer_once_and_keys_by_machine_and_layer(tmp_path):
    path = tmp_path / "table.json"
    conv = nn.Conv2d(8, 16, 3, padding=1)
    table = LatencyTable("eager", 1, "cpu", path)
    first = table.layers({"a": conv}, {"a": (8, 8, 8)}, rounds=2)["a"]
    assert isinstance(first, LayerLatency) and table.measured == 1 and path.exists()
    again = LatencyTable("eager", 1, "cpu", path)
    assert again.get(conv, (8, 8, 8)) == first  # from the file: nothing timed
    assert again.layers({"a": conv}, {"a": (8, 8, 8)})["a"] == first and again.measured == 0
    assert again.get(conv, (8, 9, 9)) is None  # another input size
    # Another batch size: the file's table is not for it; refused unless a table may be added.
    with pytest.raises(ValueError, match="batch_size: 1 there, 4 here"):
        LatencyTable("eager", 4, "cpu", path)
    assert LatencyTable("eager", 4, "cpu", path, add_key=True).get(conv, (8, 8, 8)) is None
    other = nn.Conv2d(8, 16, 3, padding=1, bias=False)
    assert again.get(other, (8, 8, 8)) is None
    (section,) = json.loads(path.read_text())["tables"]
    entry = next(iter(section["layers"].values()))
    assert section["key"]["backend"] == "eager" and entry["layer"]["weight"] == [16, 8, 3, 3]
    assert set(entry["forms"]) == {"dense", "gdws", "grouped", "lowrank"}  # one per form
    path.write_text('{"something": "else"}')
    with pytest.raises(ValueError, match="not a gdws latency table"):
        LatencyTable("eager", 1, "cpu", path)


def test_measure_layer_gives_positive_latencies_at_the_grid():
    latency = measure_layer(
        nn.Conv2d(8, 8, 3), (8, 6, 6), kernel_counts=[8, 16], multipliers=[1, 3], rounds=2
    )
    assert latency.kernel_counts == (8, 16) and latency.dense_ms > 0
    assert latency.multipliers == (1, 3) and all(t > 0 for t in latency.grouped_ms)
    assert all(t > 0 for t in latency.gdws_ms)


def test_multiplier_grid_stops_at_the_rank_and_break_even():
    # Break-even G * (9 + M) < M * C * 9, per channel: 7.9 for M = 64, 5.8 for M = 16.
    assert multiplier_grid(nn.Conv2d(64, 64, 3)) == [1, 2, 3, 4, 6]
    assert multiplier_grid(nn.Conv2d(4, 16, 3)) == [1, 2, 3, 4]
    assert multiplier_grid(nn.Conv2d(8, 2, 3)) == [1]  # rank 2, break-even 1.6
    assert multiplier_grid(nn.Conv2d(8, 64, (1, 2))) == [1]  # break-even 1.9


def planned_table(
    path,
    model,
    input_size,
    backend="eager",
    batch_size=1,
    gdws_from=0.25,
    grouped=(0.2, 0.22),
):
    """A table with made-up latencies where the convs take 80 % of the network's time
    (timed here, and kept in the table for the plans of ``model``), GDWS is 4x faster
    than dense at one kernel per channel (``gdws_from`` of dense) and grouped at
    ``m = 1, 2`` takes ``grouped`` of dense, so that a plan exists whatever this
    machine's speed (the plan is tested against brute force elsewhere; here the
    conversion around it)."""
    table = LatencyTable(backend, batch_size, "cpu", path)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    shapes = layer_input_shapes(model, list(convs), input_size)
    dense_ms = 0.8 * table.network(model, input_size, rounds=3) / len(convs)
    for name, conv in convs.items():
        grid = kernel_grid(conv)
        ms = [dense_ms * gdws_from * g / grid[0] for g in grid]
        forms = {"multipliers": (1, 2), "grouped_ms": tuple(dense_ms * t for t in grouped)}
        table.add(conv, shapes[name], LayerLatency(dense_ms, grid, ms, **forms))
    table.save()
    return table


def test_convert_for_a_speedup_records_the_plan_and_the_measurement(tmp_path):
    net = small_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    table = tmp_path / "t.json"
    # GDWS slower than dense, grouped fast: every plan has a grouped layer.
    planned_table(table, net, (3, 16, 16), gdws_from=1.05, grouped=(0.05, 0.06))
    converted, report = convert(
        net,
        target_speedup=1.1,
        input_size=(3, 16, 16),
        latency=Latency(table=table),
        require_target=False,  # made-up latencies: reached or not, the model is built
    )
    record = report.to_dict()["latency"]  # the plan's prediction and the measurement
    assert report.latency.target_speedup == report.speed.target_speedup == 1.1
    assert report.solver == "latency" and record["backend"] == "eager"
    assert record["spread"] >= 0 and isinstance(record["reached"], bool)
    assert record["target_speedup"] == 1.1 and record["predicted_speedup"] >= 1.1 - 1e-9
    assert record["realised_speedup"] > 0 and len(record["attempts"]) >= 1
    assert set(record["forms"]) == {layer.name for layer in report.layers}
    assert record["layers_timed"] == 0  # the table answered: nothing timed
    assert record["network_dense_ms"] > 0 and record["measured_dense_ms"] > 0
    for layer in report.layers:
        assert layer.timings_ms["dense"] > 0
        module = dict(converted.named_modules())[layer.name]
        assert isinstance(module, GDWSConv2d) == layer.replaced
        if record["forms"][layer.name].startswith("grouped"):
            assert not module.gathers and module.multiplier == layer.grouped_multiplier
    assert any(form.startswith("grouped") for form in record["forms"].values())
    reference = copy.deepcopy(converted)  # every GDWS layer as its dense equivalent
    for name, module in list(reference.named_modules()):
        if isinstance(module, GDWSConv2d):
            replace_module(reference, name, module.to_conv2d())
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), reference(x), atol=1e-4, rtol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert "latency plan" in report.format_table() and "measured" in report.format_table()
    json.dumps(report.to_dict())


def test_target_speedup_excludes_other_budgets_and_refuses_an_unreachable_target(tmp_path):
    net = small_net()
    with pytest.raises(ValueError, match="excludes target_mac_reduction"):
        convert(net, target_speedup=1.5, target_mac_reduction=2.0)
    with pytest.raises(ValueError, match="out of reach"):
        convert(
            net,
            target_speedup=1000.0,
            input_size=(3, 16, 16),
            latency=Latency(table=tmp_path / "t.json"),
        )


def test_cli_latency_table_and_convert_for_a_speedup(tmp_path, capsys):
    from gdws_torch.models import DigitsCNN

    run = tmp_path / "run"
    run.mkdir()
    torch.save({"state_dict": DigitsCNN().state_dict()}, run / "model_best.pth")
    table = tmp_path / "table.json"
    common = ["--model", "digits_cnn", "--dataset", "digits", "--no-progress"]
    timing = ["--random-weights", "--rounds", "2", "--out", table]
    assert main(["latency-table", *common, *timing]) == 0
    printed = capsys.readouterr().out
    assert "GDWS ms at G" in printed and "4 layer(s) timed" in printed
    assert main(["latency-table", *common, *timing]) == 0
    assert "0 layer(s) timed, 4 from the table" in capsys.readouterr().out
    planned = tmp_path / "planned.json"  # made-up latencies: a plan on any machine
    planned_table(planned, DigitsCNN().eval(), (1, 16, 16))
    out = tmp_path / "m.pth"
    # --no-norm: the network the table's network time was measured on.
    args = ["convert", *common, "--fname", run, "--target-speedup", "1.1", "--allow-miss"]
    args += ["--no-norm"]
    assert main([*args, "--latency-table", planned, "--out", out]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["solver"] == "latency" and report["latency"]["layers_timed"] == 0
    assert main([*args, "--latency-aware", "--out", tmp_path / "x.pth"]) == 2
    assert "drop --latency-aware" in capsys.readouterr().err


def test_sweep_adds_rows_converted_for_a_speedup(tmp_path, capsys):
    from gdws_torch.experiments import demo

    table = tmp_path / "planned.json"
    planned_table(table, demo.demo_network(), demo.INPUT_SHAPE)
    out = tmp_path / "sweep"
    args = ["sweep", "--strategies", "unit", "--targets", "2", "--target-speedup", "1.1"]
    args += ["--latency-table", table, "--recalibrate-bn", "0", "--n-test", "20"]
    args += ["--attack-iters", "1", "--fps-backend", "none", "--no-progress", "--out-dir", out]
    assert main([*args, "--allow-miss"]) == 0, capsys.readouterr().err
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert {(r["allocation"], r["target"]) for r in rows} == {
        ("common_beta", 2.0),
        ("latency", 1.1),
    }
    (latency,) = [r for r in rows if r["allocation"] == "latency"]
    assert latency["mac_reduction"] > 1 and 0 <= latency["robust"] <= 100
    # What the speed target gave, in the row and in the printed table.
    assert latency["measured_speedup"] > 0 and isinstance(latency["reached"], bool)
    assert "speed target: measured x" in capsys.readouterr().out
    assert (out / "sweep.png").stat().st_size > 0


def test_the_next_plan_interpolates_between_attempts_on_either_side_of_the_target():
    from gdws_torch.conversion.speed_target import _next_plan

    def attempt(planned, measured):
        return {"planned_target": planned, "measured_speedup": measured}

    # Only misses below: scale by how far off (1.5 planned gave 1.2: plan 1.5 * 1.5 / 1.2).
    assert _next_plan([attempt(1.5, 1.2)], 1.5) == pytest.approx(1.875)
    # One below, one above: the planned target where the line between them meets 1.5.
    history = [attempt(1.5, 1.36), attempt(1.65, 1.64)]
    assert _next_plan(history, 1.5) == pytest.approx(1.575)
    # The closest attempt on each side is used.
    history += [attempt(1.2, 1.1), attempt(2.0, 1.9)]
    assert _next_plan(history, 1.5) == pytest.approx(1.575)
