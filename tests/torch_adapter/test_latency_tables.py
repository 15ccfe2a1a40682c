"""Latency tables trusted only as far as checked, written safely; speed targets that say
what was measured (no timing claims: the timers are stand-ins where timings do not
matter, :mod:`_fake_timing`)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _fake_timing import fake_measure_layer, fake_timing
from torch import nn

from gdws_approx import LayerLatency
from gdws_torch import SpeedTargetMissed, convert
from gdws_torch.conversion.options import Latency
from gdws_torch.cost import latency_store, latency_tables
from gdws_torch.cost.latency_tables import LatencyTable, default_cache
from gdws_torch.experiments import demo

SHAPE = (16, 8, 8)


def conv(c=16, m=32) -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(c, m, 3, padding=1)


def timed_table(path, **kwargs) -> LatencyTable:
    """A table of one layer (stand-in timings), saved at ``path``."""
    table = LatencyTable("eager", 1, "cpu", path, **kwargs)
    table.add(conv(), SHAPE, fake_measure_layer(conv(), SHAPE))
    table.save()
    return table


def rewrite(path: Path, edit) -> None:
    """Edit the file's JSON by hand (the checksum is left as it was)."""
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# -- checks on reading -------------------------------------------------------------------


def test_a_table_edited_by_hand_is_refused_naming_its_checksum(tmp_path):
    path = tmp_path / "t.json"
    timed_table(path)

    def faster(data):  # every GDWS time divided by 10
        for entry in data["tables"][0]["layers"].values():
            entry["forms"]["gdws"]["ms"] = [t / 10 for t in entry["forms"]["gdws"]["ms"]]

    rewrite(path, faster)
    with pytest.raises(ValueError, match="does not match its checksum"):
        LatencyTable("eager", 1, "cpu", path)
    with pytest.raises(ValueError, match="does not match its checksum"):  # nor extended
        LatencyTable("eager", 1, "cpu", path).save()


def test_a_table_made_with_other_threads_is_refused_naming_what_differs(tmp_path):
    path = tmp_path / "t.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        timed_table(path)
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match=rf"threads: {threads + 1} there, {threads} here"):
        LatencyTable("eager", 1, "cpu", path)
    # Building a table for these conditions in the same file keeps the other one.
    timed_table(path, add_key=True)
    assert len(json.loads(path.read_text())["tables"]) == 2
    assert len(LatencyTable("eager", 1, "cpu", path)) == 1


def test_an_older_table_is_refused_with_the_advice_to_rebuild_it(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(
        json.dumps({"format": "gdws-approx/latency-table", "version": 3, "entries": {}})
    )
    with pytest.raises(ValueError, match=r"version 3, not 4 .* time it again"):
        LatencyTable("eager", 1, "cpu", path)


@pytest.mark.parametrize("counts", [(1, 2), (16, 20, 2000)], ids=["too-few", "too-many"])
def test_kernel_counts_a_layer_cannot_have_are_refused(tmp_path, counts):
    """``[1, 2]`` for a 16-channel layer would plan ``G = 2`` and drop 14 input channels."""
    latency = LayerLatency(1.0, counts, [0.1] * len(counts), (1,), (0.2,))
    table = LatencyTable("eager", 1, "cpu")
    with pytest.raises(ValueError, match=r"outside 16\.\.144"):
        table.add(conv(), SHAPE, latency)
    # Written with a valid checksum by someone who knows the format: refused on reading.
    path = tmp_path / "t.json"
    layer = latency_tables.layer_description(conv(), SHAPE)
    forms = {
        "dense": {"ms": 1.0},
        "gdws": {"kernel_counts": list(counts), "ms": [0.1] * len(counts)},
        "grouped": {"multipliers": [1], "ms": [0.2]},
    }
    entry = {latency_store.entry_id(layer): {"layer": layer, "forms": forms}}
    latency_store.write_section(path, table.key, entry, {})
    with pytest.raises(ValueError, match=r"outside 16\.\.144"):
        LatencyTable("eager", 1, "cpu", path)


# -- writing -------------------------------------------------------------------------------

WRITER = r"""
import os, sys, time
from torch import nn
from gdws_approx import LayerLatency
from gdws_torch.cost.latency_tables import LatencyTable
path, go, first = sys.argv[1], sys.argv[2], int(sys.argv[3])
conv = nn.Conv2d(4, 8, 3)
latency = LayerLatency(1.0, (4, 8), (0.3, 0.5), (1, 2), (0.2, 0.4))
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.001)
for size in range(first, first + 40):
    table = LatencyTable("eager", 1, "cpu", path)
    table.add(conv, (4, size, size), latency)
    table.save()
"""


def test_two_processes_saving_one_table_lose_no_entry(tmp_path):
    path, go = tmp_path / "shared.json", tmp_path / "go"
    # The table's key holds the thread count: the writers' and this reader's alike.
    environment = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(go), str(first)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environment,
        )
        for first in (3, 43)
    ]
    try:
        for writer in writers:
            assert writer.stdout.readline().strip() == "ready", writer.stderr.read()
        go.touch()
        outs = [writer.communicate(timeout=300) for writer in writers]
    finally:
        for writer in writers:
            if writer.poll() is None:
                writer.kill()
                writer.communicate()
    assert [w.returncode for w in writers] == [0, 0], outs
    assert len(LatencyTable("eager", 1, "cpu", path)) == 80


def test_extending_a_table_keeps_its_mode_and_writes_through_a_link(tmp_path):
    real, link = tmp_path / "real.json", tmp_path / "link.json"
    timed_table(real)
    real.chmod(0o644)
    link.symlink_to(real.name)
    previous = os.umask(0o077)
    try:
        table = LatencyTable("eager", 1, "cpu", link)
        table.add(conv(), (16, 4, 4), fake_measure_layer(conv(), (16, 4, 4)))
        table.save()
        new = tmp_path / "new.json"
        timed_table(new)  # a new table: the umask's permissions
    finally:
        os.umask(previous)
    assert link.is_symlink() and os.readlink(link) == real.name
    assert stat.S_IMODE(real.stat().st_mode) == 0o644
    assert len(LatencyTable("eager", 1, "cpu", real)) == 2
    assert stat.S_IMODE(new.stat().st_mode) == 0o600


def test_a_table_that_cannot_be_written_is_refused_before_any_timing(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access

    def access(path, mode, *args, **kwargs):  # root passes os.access: say "read-only"
        if Path(path) == locked and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    def no_timing(*args, **kwargs):
        raise AssertionError("timed although the table cannot be written")

    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(latency_tables, "measure_layer", no_timing)
    table = LatencyTable("eager", 1, "cpu", locked / "t.json")
    with pytest.raises(ValueError, match="cannot write in"):
        table.layers({"a": conv()}, {"a": SHAPE})


@pytest.mark.parametrize("where", ["a file", "read-only"])
def test_an_unwritable_cache_is_said_and_the_layers_are_timed_without_it(
    tmp_path, monkeypatch, where
):
    cache = tmp_path / "cache"
    if where == "a file":
        cache.write_text("not a folder\n")
    else:
        cache.mkdir()
        real_access = os.access
        monkeypatch.setattr(
            os,
            "access",
            lambda p, mode, *a, **k: False if Path(p) == cache else real_access(p, mode, *a, **k),
        )
    monkeypatch.setenv("GDWS_CACHE_DIR", str(cache))
    monkeypatch.setattr(latency_tables, "measure_layer", fake_measure_layer)
    with pytest.warns(UserWarning, match="cannot be written"):
        table = LatencyTable.default("eager")
    assert "GDWS_CACHE_DIR" in table.not_cached
    assert table.layers({"a": conv()}, {"a": SHAPE})["a"].dense_ms == 1.0
    assert cache.is_file() or os.listdir(cache) == []


def test_the_cache_folder_expands_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("GDWS_CACHE_DIR", "~/tables")
    assert default_cache() == tmp_path / "tables" / "latency-tables.json"


def test_an_interruption_keeps_the_layers_already_timed(tmp_path, monkeypatch):
    calls = []

    def interrupted_at_the_third(layer, input_shape, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return fake_measure_layer(layer, input_shape, **kwargs)

    monkeypatch.setattr(latency_tables, "measure_layer", interrupted_at_the_third)
    path = tmp_path / "t.json"
    table = LatencyTable("eager", 1, "cpu", path)
    convs = {f"l{i}": conv() for i in range(4)}
    shapes = {f"l{i}": (16, 4 + i, 4 + i) for i in range(4)}
    with pytest.raises(KeyboardInterrupt):
        table.layers(convs, shapes)
    assert len(LatencyTable("eager", 1, "cpu", path)) == 2 and table.saved == 2


# -- speed targets -------------------------------------------------------------------------


def convert_demo(table, target=1.5, **kwargs):
    return convert(
        demo.demo_network(),
        target_speedup=target,
        input_size=demo.INPUT_SHAPE,
        latency=Latency(table=table),
        **kwargs,
    )


def test_a_model_that_is_not_faster_never_reaches_a_target(tmp_path):
    table = tmp_path / "t.json"
    with fake_timing(speedup=0.999, spread=0.0):  # within 5 % of 1.05, but slower
        with pytest.raises(SpeedTargetMissed, match="not faster than dense") as missed:
            convert_demo(table, 1.05)
        assert missed.value.report.speed.reached is False
        _, report = convert_demo(table, 1.05, require_target=False)
    assert report.speed.reached is False and report.speed.realised_speedup == 0.999
    assert "NOT reached" in report.format_table()
    with fake_timing(speedup=1.02, spread=0.0):  # within the tolerance and faster: reached
        _, report = convert_demo(table, 1.05)
    assert report.speed.reached is True


@pytest.mark.parametrize(("spread", "attempts"), [(0.5, 1), (0.01, 3)])
def test_a_miss_within_the_timing_spread_is_not_planned_again(tmp_path, spread, attempts):
    calls = []
    with fake_timing(speedup=1.3, spread=spread, calls=calls):
        _, report = convert_demo(tmp_path / "t.json", 1.5, require_target=False)
    assert len(calls) == len(report.speed.attempts) == attempts
    assert report.speed.spread == spread


def test_the_same_call_on_the_same_table_gives_the_same_plan(tmp_path):
    table = tmp_path / "t.json"
    forms = []
    for _ in range(3):  # the dense network is timed for real, once
        with fake_timing(speedup=1.45, spread=0.08, network=False):
            _, report = convert_demo(table, 1.5)
        forms.append((report.latency.forms, [layer.n_kernels for layer in report.layers]))
    assert forms[0] == forms[1] == forms[2]
    # The whole network's latency, the plan's starting point, is in the table.
    (section,) = json.loads(table.read_text())["tables"]
    assert len(section["networks"]) == 1


def test_a_measurement_far_below_the_prediction_says_to_rebuild_the_table(tmp_path):
    with fake_timing(speedup=1.1, spread=0.5):
        _, report = convert_demo(tmp_path / "t.json", 1.5, require_target=False)
    predicted = report.latency.predicted_speedup
    assert report.speed.realised_speedup < 0.9 * predicted
    assert "rebuild it here" in report.speed.table_warning
    assert "warning: " in report.format_table()
    with fake_timing(speedup=1.49, spread=0.01):
        _, report = convert_demo(tmp_path / "t.json", 1.5)
    assert report.speed.table_warning is None


def test_require_target_must_be_a_bool():
    with pytest.raises(TypeError, match="require_target must be a bool"):
        convert(demo.demo_network(), beta=0.0, input_size=demo.INPUT_SHAPE, require_target=1)


def test_timings_of_the_forms_are_recorded_under_their_own_names(tmp_path):
    """The file's per-layer entry is a dict of forms, which a later form extends."""
    path = tmp_path / "t.json"
    timed_table(path)
    (section,) = json.loads(path.read_text())["tables"]
    (entry,) = section["layers"].values()
    assert entry["forms"]["gdws"]["kernel_counts"][0] == 16
    assert set(entry["forms"]["dense"]) == {"ms"}


def test_saving_waits_for_the_lock(tmp_path):
    """A writer holding the lock delays another's save; nothing is lost."""
    path = tmp_path / "t.json"
    timed_table(path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; sys.path.insert(0, sys.argv[1]);"
            "from gdws_approx.files import locked\n"
            "with locked(sys.argv[2]):\n print('held', flush=True); time.sleep(1.0)",
            str(Path(latency_store.__file__).parents[3]),
            str(path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    start = time.monotonic()
    table = LatencyTable("eager", 1, "cpu", path)
    table.add(conv(), (16, 5, 5), fake_measure_layer(conv(), (16, 5, 5)))
    table.save()
    waited = time.monotonic() - start
    holder.communicate(timeout=30)
    assert waited > 0.3 and len(LatencyTable("eager", 1, "cpu", path)) == 2
