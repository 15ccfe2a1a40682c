"""``gdws sweep --methods``: GDWS and the training-free baselines in one table, JSON, plot."""

from __future__ import annotations

import json

from gdws_torch.cli import build_parser, main


def test_sweep_compares_gdws_with_the_baselines_on_the_demo_model(tmp_path, capsys):
    args = [
        "sweep", "--methods", "gdws", "dws", "lowrank", "prune", "--strategies", "unit",
        "--targets", "2", "--n-test", "40", "--weighting-samples", "64",
        "--recalibrate-bn", "64", "--refit", "64", "--attack-iters", "2",
        "--fps-backend", "eager", "--no-progress", "--out-dir", tmp_path,
    ]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    table = capsys.readouterr().out
    header = [line for line in table.splitlines() if line.startswith("method ")]
    assert len(header) == 1 and "robust %" in header[0] and "FPS" in header[0]
    results = json.loads((tmp_path / "sweep.json").read_text())
    assert results["methods"] == ["gdws", "dws", "lowrank", "prune"]
    rows, dense = results["rows"], results["dense"]
    assert {(r["method"], r["recovery"]) for r in rows} == {
        (m, r) for m in ("gdws", "dws", "lowrank", "prune") for r in ("none", "BN", "refit+BN")
    }
    for row in rows:
        assert row["conv_macs"] * 2 <= dense["conv_macs"], row
        assert row["mac_reduction"] == dense["conv_macs"] / row["conv_macs"] or (
            row["method"] == "gdws"
        )
        assert row["fps"] > 0 and 0 <= row["robust"] <= row["natural"] + 100
        twins = [r for r in rows if r["method"] == row["method"]]
        assert {r["conv_macs"] for r in twins} == {row["conv_macs"]}  # recovery keeps MACs
        table_line = [line for line in table.splitlines() if line.startswith(row["method"])]
        assert len(table_line) == 3
    strategies = {r["method"]: r["strategy"] for r in rows}
    assert strategies == {
        "gdws": "unit",
        "dws": "weights",
        "lowrank": "responses",
        "prune": "reconstruction",
    }
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "sweep.png").shape[1] > 1000  # two panels


def test_sweep_compares_gdws_alone_by_default():
    parser = build_parser()
    assert parser.parse_args(["sweep"]).methods == ["gdws"]
    assert parser.parse_args(["sweep", "--methods", "prune"]).methods == ["prune"]
