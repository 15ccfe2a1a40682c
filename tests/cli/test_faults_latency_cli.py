"""Fault injection for the commands' speed targets and latency tables: the table is an
input and an output of every command that takes it, a table is trusted only as far as it
is checked, and a speed target is reached only by a model that is faster.

Where the timings themselves do not matter the timers are stand-ins (:mod:`_fake_timing`),
so each case takes about a second; the doctored-table case times for real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _fake_timing import fake_measure_layer, fake_timing
from test_faults_cli import DIGITS, QUICK, assert_refused, copy_checkpoint, one_line, snapshot
from test_faults_cli import gdws as run_gdws

from gdws_approx import LayerLatency
from gdws_torch.cost import latency_tables
from gdws_torch.cost.latency import layer_input_shapes
from gdws_torch.cost.latency_tables import LatencyTable
from gdws_torch.models import DigitsCNN

# No --threads: the tables made here are keyed by this process's thread count.
QUIET = ["--no-progress"]


def gdws(*args) -> int:
    return run_gdws(*args)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "model_best.pth"
    torch.save({"state_dict": DigitsCNN().state_dict()}, path)
    return path


def stand_in_table(path: Path, scale_gdws: float = 1.0) -> None:
    """A complete table of the bare digits CNN (stand-in layer timings, the network's time
    as measured here), GDWS times multiplied by ``scale_gdws``; saved with its checksum."""
    network = DigitsCNN().eval()
    convs = {n: m for n, m in network.named_modules() if isinstance(m, torch.nn.Conv2d)}
    shapes = layer_input_shapes(network, list(convs), (1, 16, 16))
    table = LatencyTable("eager", 1, "cpu", path)
    network_ms = table.network(network, (1, 16, 16), rounds=5)  # timed, and in the table
    for name, conv in convs.items():
        honest = fake_measure_layer(conv, shapes[name])
        # The convs take 80 % of the network's time, GDWS as slow as dense (eager, batch 1).
        dense = 0.8 * network_ms / len(convs)
        table.add(
            conv,
            shapes[name],
            LayerLatency(
                dense,
                honest.kernel_counts,
                [dense * scale_gdws] * len(honest.kernel_counts),
                honest.multipliers,
                [dense] * len(honest.multipliers),
            ),
        )
    table.save()


# -- 1. eval converts with a recipe -------------------------------------------------------


def test_eval_applies_a_recipe_with_several_norms(tmp_path, weights, capsys):
    checkpoint = copy_checkpoint(weights, tmp_path)
    out = tmp_path / "e.json"
    args = ["eval", *DIGITS, "--checkpoint", checkpoint, *QUICK, "--json", out]
    args += ["--apply-gdws", "--recipe", "unit", "--target-mac-reduction", "1.5"]
    assert gdws(*args, "--norm", "l_2", "l_inf", "--epsilon", "128", "8") == 0, (
        capsys.readouterr().err
    )
    attack = json.loads(out.read_text())["gdws"]["recipe"]["calibration_attack"]
    assert attack["norm"] == "Linf" and attack["eps"] == pytest.approx(8 / 255)


# -- 2. the table is an input and an output ---------------------------------------------


def test_fps_never_replaces_the_table_by_its_json(tmp_path, capsys):
    shared = tmp_path / "shared.json"
    stand_in_table(shared)
    before = snapshot(tmp_path)
    args = ["fps", "--target-speedup", "1.05", "--latency-table", shared, "--json", shared]
    rc = gdws(*args, "--overwrite", *QUIET)
    assert_refused(rc, 2, capsys, tmp_path, before, "--json", "--latency-table", "an input")


@pytest.mark.parametrize("exists", [False, True])
def test_convert_refuses_a_table_where_its_report_goes(tmp_path, weights, capsys, exists):
    checkpoint = copy_checkpoint(weights, tmp_path)
    (tmp_path / "X").mkdir()
    if exists:
        stand_in_table(tmp_path / "X" / "p5.json")
    before = snapshot(tmp_path)
    args = ["convert", *DIGITS, "--checkpoint", checkpoint, "--target-speedup", "1.05"]
    args += ["--latency-table", tmp_path / "X" / "p5.json", "--out", tmp_path / "X" / "p5.pth"]
    assert_refused(gdws(*args, *QUIET), 2, capsys, tmp_path, before, "--latency-table")


def test_eval_refuses_a_table_named_like_its_json_and_leaves_no_partial(tmp_path, weights, capsys):
    checkpoint = copy_checkpoint(weights, tmp_path)
    before = snapshot(tmp_path)
    args = ["eval", *DIGITS, "--checkpoint", checkpoint, *QUICK, "--apply-gdws"]
    args += ["--target-speedup", "1.05", "--latency-table", tmp_path / "e.json"]
    line = assert_refused(
        gdws(*args, "--json", tmp_path / "e.json"), 2, capsys, tmp_path, before, "e.json"
    )
    assert "resumes" not in line


def test_sweep_refuses_a_table_where_its_results_go_before_the_work(tmp_path, capsys):
    before = snapshot(tmp_path)
    args = ["sweep", "--target-speedup", "1.05", "--latency-table", tmp_path / "sw8" / "sweep.json"]
    rc = gdws(*args, "--out-dir", tmp_path / "sw8", "--no-progress")
    assert_refused(rc, 2, capsys, tmp_path, before, "sweep.json")


@pytest.mark.parametrize("command", ["convert", "latency-table"])
def test_a_table_that_is_a_folder_or_a_persons_file_is_refused(tmp_path, weights, capsys, command):
    checkpoint = copy_checkpoint(weights, tmp_path)
    (tmp_path / "notes.json").write_text('{"mine": true}\n')
    (tmp_path / "folder").mkdir()
    before = snapshot(tmp_path)
    if command == "convert":
        args = ["convert", *DIGITS, "--checkpoint", checkpoint, "--target-speedup", "1.05"]
        args += ["--out", tmp_path / "m.pth", "--latency-table"]
    else:
        args = ["latency-table", "--out"]
    for table, says in (("notes.json", "not a gdws latency table"), ("folder", "is a folder")):
        rc = gdws(*args, tmp_path / table, *QUIET)
        assert_refused(rc, 2, capsys, tmp_path, before, says)


def test_a_table_or_a_flag_without_a_speed_target_is_refused(tmp_path, weights, capsys):
    checkpoint = copy_checkpoint(weights, tmp_path)
    before = snapshot(tmp_path)
    args = ["convert", *DIGITS, "--checkpoint", checkpoint, "--beta", "0"]
    rc = gdws(*args, "--latency-table", tmp_path / "t.json", *QUIET)
    assert_refused(rc, 2, capsys, tmp_path, before, "only apply with --target-speedup")


# -- 3. the cache --------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["file", "under-file"])
def test_an_unwritable_cache_is_said_in_one_line_and_the_work_goes_on(
    tmp_path, weights, capsys, monkeypatch, where
):
    checkpoint = copy_checkpoint(weights, tmp_path)
    (tmp_path / "afile").write_text("a person's file\n")
    cache = tmp_path / "afile" if where == "file" else tmp_path / "afile" / "cache"
    monkeypatch.setenv("GDWS_CACHE_DIR", str(cache))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out" / "m.pth"
    args = ["convert", *DIGITS, "--checkpoint", checkpoint, "--target-speedup", "1.3"]
    with fake_timing(speedup=1.3):
        rc = gdws(*args, "--out", out, "--recipe", "unit", *QUIET)
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    (note,) = [line for line in printed.out.splitlines() if "cannot be written" in line]
    assert "not cached" in note and "afile" in note
    assert (tmp_path / "afile").read_text() == "a person's file\n"
    assert sorted(os.listdir(tmp_path)) == ["afile", "model_best.pth", "out"]


def test_the_cache_folder_may_start_with_the_home_folder(tmp_path, monkeypatch, capsys):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GDWS_CACHE_DIR", "~/tables")
    monkeypatch.chdir(work)
    with fake_timing():
        assert gdws("latency-table", "--rounds", "1", *QUIET) == 0, capsys.readouterr().err
    assert len(LatencyTable("eager", 1, "cpu", home / "tables" / "latency-tables.json")) == 4
    assert os.listdir(work) == []  # no literal ./~


def test_ctrl_c_during_latency_table_keeps_the_layers_timed(tmp_path, monkeypatch, capsys):
    calls = []

    def interrupted_at_the_third(conv, input_shape, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return fake_measure_layer(conv, input_shape, **kwargs)

    monkeypatch.setattr(latency_tables, "measure_layer", interrupted_at_the_third)
    table = tmp_path / "t.json"
    assert gdws("latency-table", "--out", table, *QUIET) == 130
    line = one_line(capsys.readouterr().err)
    assert line.startswith("gdws: interrupted") and f"2 layer(s) timed are saved in {table}" in line
    assert len(LatencyTable("eager", 1, "cpu", table)) == 2


# -- 4. a doctored table, and what is reached -------------------------------------------


def test_a_doctored_table_is_refused_or_its_plan_caught_by_the_measurement(
    tmp_path, weights, capsys
):
    checkpoint = copy_checkpoint(weights, tmp_path)
    table = tmp_path / "t.json"
    stand_in_table(table)
    # Edited by hand: GDWS ten times faster. The checksum catches it before the work.
    data = json.loads(table.read_text())
    for entry in data["tables"][0]["layers"].values():
        entry["forms"]["gdws"]["ms"] = [t / 10 for t in entry["forms"]["gdws"]["ms"]]
    table.write_text(json.dumps(data))
    before = snapshot(tmp_path)
    # The bare network (--no-norm) is what the table's network time was measured on:
    # planned with GDWS ten times faster in the four layers that change, 2.4x is predicted.
    args = ["convert", *DIGITS, "--checkpoint", checkpoint, "--recipe", "unit", "--no-norm"]
    args += ["--target-speedup", "2", "--latency-table", table, "--out", tmp_path / "m.pth"]
    assert_refused(gdws(*args, *QUIET), 2, capsys, tmp_path, before, "checksum", str(table))
    # Made with the same lie and a valid checksum: the measurement catches it.
    table.unlink()
    stand_in_table(table, scale_gdws=0.1)
    assert gdws(*args, *QUIET) == 1
    line = one_line(capsys.readouterr().err)
    assert "not reached" in line and "below the" in line and "rebuild it" in line, line
    assert "--allow-miss" in line
    assert not (tmp_path / "m.pth").exists() and not (tmp_path / "m.json").exists()
    assert gdws(*args, *QUIET, "--allow-miss") == 0
    printed = capsys.readouterr().out
    assert "warning: the measured speed-up" in printed and "rebuild it" in printed
    assert "kept the closest model (--allow-miss)" in printed
    report = json.loads((tmp_path / "m.json").read_text())["latency"]
    assert report["reached"] is False and "table_warning" in report


def test_a_model_no_faster_than_dense_does_not_reach_a_target(tmp_path, weights, capsys):
    checkpoint = copy_checkpoint(weights, tmp_path)
    args = ["convert", *DIGITS, "--checkpoint", checkpoint, "--recipe", "unit"]
    args += ["--target-speedup", "1.05", "--backend", "eager", "--out", tmp_path / "m.pth"]
    args += ["--latency-table", tmp_path / "t.json"]  # stand-in timings stay out of the cache
    with fake_timing(speedup=0.999, spread=0.0):
        assert gdws(*args, *QUIET) == 1
        line = one_line(capsys.readouterr().err)
        assert "not faster than dense" in line and "--allow-miss" in line
        assert not (tmp_path / "m.pth").exists()
        assert gdws(*args, *QUIET, "--allow-miss") == 0
    assert json.loads((tmp_path / "m.json").read_text())["latency"]["reached"] is False


# -- 5. the sweep's speed rows and targets -------------------------------------------------

SWEEP = ["sweep", "--strategies", "unit", "--recalibrate-bn", "0", "--n-test", "20"]
SWEEP += ["--attack-iters", "1", "--fps-backend", "none", "--no-progress"]


def test_a_sweep_target_out_of_reach_is_refused_before_the_work(tmp_path, capsys):
    before = snapshot(tmp_path)
    rc = gdws(*SWEEP, "--targets", "1e9", "--out-dir", tmp_path / "s")
    assert_refused(rc, 2, capsys, tmp_path, before, "out of reach", "at most")


def test_a_sweep_whose_every_row_is_skipped_says_so(tmp_path, capsys):
    out = tmp_path / "s"
    rc = gdws(*SWEEP, "--methods", "gdws", "dws", "--targets", "1e9", "--out-dir", out)
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "no model: every target was out of reach" in printed.out
    assert json.loads((out / "sweep.json").read_text())["rows"] == []


def test_sweep_speed_rows_say_what_was_measured_and_a_miss_exits_1(tmp_path, capsys):
    table, out = tmp_path / "t.json", tmp_path / "s"
    args = [*SWEEP, "--targets", "2", "--target-speedup", "1.3", "--latency-table", table]
    with fake_timing(speedup=1.1, spread=0.5):
        rc = gdws(*args, "--out-dir", out)
    printed = capsys.readouterr()
    assert rc == 1
    assert "speed target(s) not reached: unit 1.3x (measured 1.1x)" in one_line(printed.err)
    assert "1.10 MISSED" in printed.out  # the table's column
    (row,) = [r for r in json.loads((out / "sweep.json").read_text())["rows"] if r["target"] == 1.3]
    assert row["measured_speedup"] == 1.1 and row["reached"] is False and row["spread"] == 0.5
    assert (out / "sweep.png").stat().st_size > 0
    with fake_timing(speedup=1.1, spread=0.5):
        assert gdws(*args, "--out-dir", out, "--allow-miss") == 0


def test_sweep_speed_targets_without_gdws_are_refused(tmp_path, capsys):
    before = snapshot(tmp_path)
    rc = gdws(*SWEEP, "--methods", "dws", "--target-speedup", "1.05", "--out-dir", tmp_path / "s")
    assert_refused(rc, 2, capsys, tmp_path, before, "--target-speedup", "--methods dws")


# -- 6. minor cases -------------------------------------------------------------------------

MINOR = {
    "latency-table-bogus-device": (["latency-table", "--device", "bogus"], "--device"),
    "latency-table-cuda": (["latency-table", "--device", "cuda"], "--device cuda"),
    "fps-bogus-device": (["fps", "--device", "bogus"], "--device"),
    "demo-empty-out-dir": (["demo", "--quick", "--out-dir", ""], "--out-dir is empty"),
    "empty-table-path": (["latency-table", "--out", ""], "--out is empty"),
}


@pytest.mark.parametrize("case", list(MINOR))
def test_minor_bad_input_is_one_line_with_exit_code_2(tmp_path, capsys, monkeypatch, case):
    if case == "latency-table-cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    args, fragment = MINOR[case]
    assert_refused(gdws(*args, "--no-progress"), 2, capsys, tmp_path, before, fragment)


def test_latency_table_on_eager_imports_no_other_runtime(tmp_path):
    """ONNX Runtime and OpenVINO write telemetry under the home folder when imported."""
    table = tmp_path / "t.json"
    with fake_timing():
        assert gdws("latency-table", "--out", table, *QUIET) == 0  # complete: nothing to time
    code = (
        "import sys; from gdws_torch.cli import main; "
        f"rc = main(['latency-table', '--out', {str(table)!r}, '--no-progress']); "
        "print(rc, sorted(m for m in sys.modules if m.split('.')[0] in "
        "('onnxruntime', 'openvino')))"
    )
    threads = str(torch.get_num_threads())  # the table's key: nothing to time
    environment = {**os.environ, "OMP_NUM_THREADS": threads, "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=300
    )
    assert done.stdout.strip().splitlines()[-1] == "0 []", done.stdout + done.stderr
