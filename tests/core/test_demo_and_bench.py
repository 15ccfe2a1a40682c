"""The demo command and the benchmark's reference implementations."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from gdws_approx import GDWSApproximator
from gdws_approx.demo import main, synthetic_weight

ROOT = Path(__file__).resolve().parents[2]


def _load_bench(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_on_a_user_weight_writes_table_and_json(tmp_path, capsys):
    weight = tmp_path / "layer.npy"
    np.save(weight, synthetic_weight(n_out=32, n_in=8, seed=3))
    out = tmp_path / "results" / "demo.json"
    assert main(["--weight", str(weight), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "lego" in printed and "mego" in printed
    rows = json.loads(out.read_text())["rows"]
    lego = [r for r in rows if r["solver"] == "lego"]
    assert lego[0]["relative_error"] == 0.0 and lego[0]["G"] == 8 * 9
    assert [r["G"] for r in lego] == sorted((r["G"] for r in lego), reverse=True)
    for row in rows:
        assert row["mac_reduction"] == pytest.approx(
            row["dense_macs_per_pixel"] / row["gdws_macs_per_pixel"]
        )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--weight", "missing.npy"], "no file at missing.npy"),
        (["--weight", "vector.npy"], "must hold a 4-D array"),
        (["--weight", "pickled.npy"], "not a plain .npy array"),
        (["--weight", "vector4d.npy", "--out", "vector4d.npy"], "would overwrite the input"),
    ],
)
def test_demo_errors_are_one_line_with_exit_code_2(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    np.save("vector.npy", np.ones(3))
    np.save("vector4d.npy", np.ones((2, 2, 3, 3)))
    np.save("pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert np.load("vector4d.npy").shape == (2, 2, 3, 3)


def test_synthetic_weight_has_decaying_spectra():
    W = synthetic_weight(n_out=16, n_in=4, decay=0.5, seed=1).astype(np.float64)
    s = np.linalg.svd(W[:, 0].reshape(16, 9), compute_uv=False)
    np.testing.assert_allclose(s[1:] / s[:-1], 0.5, rtol=1e-4)


@pytest.mark.parametrize("solver", ["lego", "mego"])
def test_bench_references_agree_with_the_estimator(solver):
    bench = _load_bench("fit_speed")
    rng = np.random.default_rng(0)
    for shape in [(16, 8, 3, 3), (40, 5, 3, 3)]:
        W = rng.standard_normal(shape).astype(np.float32)
        budget = bench.layer_budgets(W)[solver]
        ours = GDWSApproximator(solver=solver, **budget).fit(W)
        numpy_ref = bench.reference_fit(W, solver, **budget)
        np.testing.assert_array_equal(numpy_ref["multipliers"], ours.multipliers_)
        assert numpy_ref["error"] == pytest.approx(ours.error_, rel=1e-5)
        for c in range(shape[1]):
            mask = ours.kernel_channels_ == c
            ref_c = numpy_ref["pointwise"][:, mask] @ numpy_ref["depthwise"][mask].reshape(
                int(mask.sum()), -1
            )
            ours_c = ours.inverse_transform(ours.pointwise_weights_)[:, c].reshape(shape[0], -1)
            np.testing.assert_allclose(ref_c, ours_c, atol=1e-4)
        torch_ref = bench.original_fit_torch(W, solver, **budget)
        np.testing.assert_array_equal(torch_ref["multipliers"].numpy(), ours.multipliers_)


def test_json_writer_leaves_nothing_behind_on_failure(tmp_path):
    from gdws_approx.files import write_json_atomic

    target = tmp_path / "out.json"
    write_json_atomic(target, {"ok": 1})
    with pytest.raises(TypeError):
        write_json_atomic(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"ok": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_alpha_bench_quick_run_agrees_and_prints_its_result(tmp_path, capsys):
    bench = _load_bench("alpha_speed")
    out = tmp_path / "alpha.json"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("RESULT alpha_speed: ")
    assert lines[-1].endswith("x (batched vs per-sample loop)")
    result = json.loads(out.read_text())
    assert max(result["max_relative_difference"].values()) < 1e-4
    assert set(result["forms"].values()) == {"gram", "materialize"}


def test_fps_bench_quick_run_prints_its_result(tmp_path, capsys):
    bench = _load_bench("fps")
    out = tmp_path / "fps.json"
    assert bench.main(["--quick", "--backends", "eager", "onnxruntime", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("RESULT fps: ") and "PreActResNet-18, batch 1" in lines[-1]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["model"], r["backend"], r["batch_size"]) for r in rows} == {
        (m, b, n)
        for m in ("PreActResNet-18", "digits CNN (demo)")
        for b in ("eager", "onnxruntime")
        for n in (1, 2)
    }
    resnet = [r for r in rows if r["model"] == "PreActResNet-18"]
    assert all(r["mac_reduction"] >= 3.0 for r in resnet)  # the "at least 3x"
    for r in rows:
        assert r["fps_ratio"] == pytest.approx(r["gdws_fps"] / r["dense_fps"])


def test_eval_scaling_bench_quick_run_agrees_and_prints_its_result(tmp_path, capsys):
    bench = _load_bench("eval_scaling")
    out = tmp_path / "scaling.json"
    args = ["--repeats", "1", "--steps", "1", "--threads", "2", "--n-samples", "100"]
    args += ["--out", str(out)]
    assert bench.main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("RESULT eval_scaling: ")
    assert lines[-1].endswith(
        "x (2 processes x 1 threads vs 1 process x 2 threads, evaluation throughput)"
    )
    result = json.loads(out.read_text())
    assert set(result["summary"]) == {"1x2", "2x1", "1x1"}
    assert result["speedup"] == pytest.approx(
        result["summary"]["2x1"]["samples_per_s"] / result["summary"]["1x2"]["samples_per_s"]
    )
    assert "identical" in "\n".join(lines)


def test_latency_target_bench_quick_run_prints_its_result(tmp_path, capsys):
    bench = _load_bench("latency_target")
    out = tmp_path / "lt.json"
    assert bench.main(["--quick", "--backend", "eager", "--out", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("RESULT latency_target: ")
    (row,) = json.loads(out.read_text())["rows"]
    assert row["model"] == "PreActResNet-18" and row["target"] == 1.5
    if "out_of_reach" not in row:
        record = row["conversion_record"]
        assert record["backend"] == "eager" and record["attempts"]
        assert row["realised_speedup"] > 0 and len(row["mac_curve"]) == 2
