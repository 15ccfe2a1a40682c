"""The ``gdws`` command: eval/alphas/convert/train/demo on files in the standard formats."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _torch_models import with_batchnorm_statistics
from test_datasets import write_cifar10

from gdws_torch import load_channel_weights, load_converted, noise_gains
from gdws_torch.cli import main
from gdws_torch.models import WRN28_4, PreActResNet18
from gdws_torch.nn.normalization import Normalized

CIFAR10_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
CIFAR10_STD = torch.tensor([0.2471, 0.2435, 0.2616]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A CIFAR-10 directory in the python-batch format and a run folder holding a
    PreActResNet-18 checkpoint saved the way the original's DataParallel training did."""
    root = tmp_path_factory.mktemp("cli")
    write_cifar10(root / "data", n_per_batch=8)
    torch.manual_seed(0)
    network = with_batchnorm_statistics(PreActResNet18().eval())
    run = root / "run"
    run.mkdir()
    state = {f"module.{k}": v for k, v in network.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3}, run / "model_best.pth")
    return root, network


def gdws(*args: str) -> int:
    return main([str(a) for a in args])


def common_args(root: Path) -> list[str]:
    return ["--model", "preactresnet18", "--fname", root / "run", "--data-dir", root / "data"]


def test_eval_natural_matches_a_direct_evaluation_and_logs_like_the_original(run_folder, capsys):
    root, network = run_folder
    args = [*common_args(root), "--attack", "none", "--no-progress"]
    json_path = root / "nat.json"
    assert gdws("eval", *args, "--logfilename", "a_nat_base.txt", "--json", json_path) == 0
    again = ["--logfilename", "a_nat_base.txt", "--json", json_path, "--overwrite"]
    assert gdws("eval", *args, *again) == 0
    from gdws_torch.io.datasets import load_dataset

    images, labels = load_dataset("cifar10", root / "data", "test").tensors
    with torch.no_grad():
        predicted = network((images - CIFAR10_MEAN) / CIFAR10_STD).argmax(1)
    expected = 100.0 * float((predicted == labels).float().mean())
    result = json.loads(json_path.read_text())
    assert result["natural_accuracy"] == pytest.approx(expected)
    assert result["robust_accuracy"] is None and result["attacks"] == []
    assert result["n_samples"] == 8
    log = (root / "run" / "a_nat_base.txt").read_text().splitlines()
    assert log == ["epsilon\ttestacc", f"0.00000000\t{expected:.3f}", f"0.00000000\t{expected:.3f}"]
    assert "natural acc." in capsys.readouterr().out


def test_eval_pgd_equals_the_library_and_logs_epsilon(run_folder):
    from gdws_torch import PGD, evaluate
    from gdws_torch.io.datasets import load_dataset

    root, network = run_folder
    json_path = root / "rob.json"
    args = ["--attack-iters", "2", "--pgd-alpha", "2", "--epsilon", "8", "--no-progress"]
    assert (
        gdws("eval", *common_args(root), *args, "--logfilename", "rob.txt", "--json", json_path)
        == 0
    )
    result = json.loads(json_path.read_text())
    model = Normalized(network, CIFAR10_MEAN.flatten().tolist(), CIFAR10_STD.flatten().tolist())
    loader = torch.utils.data.DataLoader(load_dataset("cifar10", root / "data", "test"), 128)
    attack = PGD(model, eps=8 / 255, alpha=2 / 255, steps=2, seed=0)
    expected = evaluate(model, loader, {"a": attack}, progress=False)["attacks"]["a"]
    assert result["robust_accuracy"] == pytest.approx(expected)
    assert result["attacks"] == [
        {
            "attack": "pgd",
            "label": "Linf PGD-2 (eps 8/255)",
            "norm": "Linf",
            "eps": 8 / 255,
            "alpha": 2 / 255,
            "steps": 2,
            "n_restarts": 1,
            "accuracy": expected,
        }
    ]
    line = (root / "run" / "rob.txt").read_text().splitlines()[1]
    assert line == f"0.03137255\t{expected:.3f}"


def test_eval_union_of_three_norms_equals_the_library(run_folder):
    from gdws_torch import PGD, PGDL1, PGDL2, evaluate
    from gdws_torch.io.datasets import load_dataset

    root, network = run_folder
    json_path = root / "union.json"
    # The original's spellings of --norm are accepted; the results say Linf, L2, L1.
    norms = ["--norm", "l_inf", "L2", "l_1", "--epsilon", "8", "64", "2550"]
    steps = ["--pgd-alpha", "2", "16", "255", "--attack-iters", "2", "--logfilename", "u.txt"]
    assert gdws("eval", *common_args(root), *norms, *steps, "--json", json_path) == 0
    result = json.loads(json_path.read_text())
    model = Normalized(network, CIFAR10_MEAN.flatten().tolist(), CIFAR10_STD.flatten().tolist())
    loader = torch.utils.data.DataLoader(load_dataset("cifar10", root / "data", "test"), 128)
    attacks = {
        "Linf": PGD(model, eps=8 / 255, alpha=2 / 255, steps=2, seed=0),
        "L2": PGDL2(model, eps=64 / 255, alpha=16 / 255, steps=2, seed=0),
        "L1": PGDL1(model, eps=10.0, alpha=1.0, steps=2, seed=0, sparsity=0.99),
    }
    expected = evaluate(model, loader, attacks, progress=False)
    assert [a["accuracy"] for a in result["attacks"]] == pytest.approx(
        list(expected["attacks"].values())
    )
    assert result["robust_accuracy"] == result["union_accuracy"] == pytest.approx(expected["union"])
    assert [a["norm"] for a in result["attacks"]] == ["Linf", "L2", "L1"]
    assert [a["label"].split()[0] for a in result["attacks"]] == ["Linf", "L2", "L1"]
    log = (root / "run" / "u.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in log] == [
        "epsilon",
        "0.03137255",
        "0.25098039",
        "10.00000000",
    ]


def test_eval_apply_gdws_beta_zero_keeps_the_accuracy(run_folder):
    root, _ = run_folder
    dense, exact = root / "dense.json", root / "exact.json"
    base = [*common_args(root), "--attack", "none", "--no-progress"]
    assert gdws("eval", *base, "--json", dense) == 0
    flags = ["--apply-gdws", "--beta", "0", "--replace-all"]
    assert gdws("eval", *base, *flags, "--json", exact) == 0
    dense, exact = json.loads(dense.read_text()), json.loads(exact.read_text())
    assert exact["natural_accuracy"] == dense["natural_accuracy"]
    assert exact["gdws"]["n_replaced"] == 16  # every 3x3 conv but the first
    assert exact["conv_macs"] > dense["conv_macs"]  # exact GDWS costs more than dense


def test_alphas_in_the_original_format_drive_a_mac_target(run_folder):
    root, network = run_folder
    args = [*common_args(root), "--attack", "none", "--no-progress", "--sample-size", "6"]
    assert gdws("alphas", *args, "--chunk-size", "4") == 0
    saved = torch.load(root / "run" / "alphas.pth", weights_only=True)
    assert saved["sample_size"] == 6 and saved["attack"] == "none"
    gains = load_channel_weights(root / "run" / "alphas.pth")
    assert all(k.startswith("module.") for k in gains)  # as the original's DataParallel files
    from gdws_torch.io.datasets import load_dataset

    model = Normalized(network, CIFAR10_MEAN.flatten().tolist(), CIFAR10_STD.flatten().tolist())
    loader = torch.utils.data.DataLoader(load_dataset("cifar10", root / "data", "train"), 128)
    expected = noise_gains(model, loader, 6, progress=False)
    for name, value in expected.items():
        torch.testing.assert_close(gains[name], value, rtol=1e-5, atol=0)

    out = root / "target.json"
    flags = ["--apply-gdws", "--alphas-filename", "alphas.pth", "--target-mac-reduction", "2"]
    assert gdws("eval", *common_args(root), "--attack", "none", *flags, "--json", out) == 0
    result = json.loads(out.read_text())
    assert result["gdws"]["mac_reduction"] >= 2.0
    assert result["gdws"]["macs"] == result["conv_macs"]


def test_convert_then_eval_converted_equals_apply_gdws(run_folder):
    root, _ = run_folder
    flags = ["--target-mac-reduction", "1.5"]
    args = [*common_args(root), *flags, "--recipe", "unit", "--out", "gdws.pth"]
    assert gdws("convert", *args) == 0
    report = json.loads((root / "run" / "gdws.json").read_text())
    _converted, info = load_converted(root / "run" / "gdws.pth", PreActResNet18())
    assert info["report"]["macs"] == report["macs"]
    a, b = root / "a.json", root / "b.json"
    base = [*common_args(root), "--attack", "none", "--no-progress"]
    assert gdws("eval", *base, "--converted", "gdws.pth", "--json", a) == 0
    assert gdws("eval", *base, "--apply-gdws", *flags, "--json", b) == 0
    a, b = json.loads(a.read_text()), json.loads(b.read_text())
    assert a["natural_accuracy"] == b["natural_accuracy"] and a["conv_macs"] == b["conv_macs"]


def test_train_then_eval_on_digits(tmp_path):
    out = tmp_path / "digits.pth"
    flags = ["--model", "digits_cnn", "--dataset", "digits", "--no-progress", "--seed", "1"]
    assert (
        gdws(
            "train", *flags, "--epochs", "3", "--batch-size", "64", "--attack", "none", "--out", out
        )
        == 0
    )
    history = json.loads(out.with_suffix(".json").read_text())["history"]
    assert len(history) == 3 and history[-1]["test_accuracy"] > 90
    result = tmp_path / "eval.json"
    args = ["--checkpoint", out, "--attack", "none", "--json", result]
    assert gdws("eval", *flags, *args) == 0
    assert json.loads(result.read_text())["natural_accuracy"] == pytest.approx(
        history[-1]["test_accuracy"]
    )
    assert gdws("train", *flags, "--epochs", "1", "--out", out) == 2  # exists: not replaced


def test_a_wrn_checkpoint_without_the_unused_block_loads(tmp_path, capsys):
    # The original's eval set model.sub_block1 = None: its WRN checkpoints may lack it.
    network = WRN28_4()
    network.sub_block1 = None
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"state_dict": network.state_dict()}, run / "model_best.pth")
    write_cifar10(tmp_path / "data", n_per_batch=2)
    args = ["--model", "wideresnet_28_4", "--fname", run, "--data-dir", tmp_path / "data"]
    assert gdws("eval", *args, "--attack", "none", "--json", tmp_path / "r.json") == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "--model", "preactresnet18", "--fname", "nowhere"], "no checkpoint at"),
        (["eval", "--model", "lenet", "--fname", "run"], "--model must be one of"),
        (["eval", "--model", "preactresnet18", "--fname", "run"], "root"),
        (["eval", "--model", "digits_cnn", "--fname", "run"], "does not fit --dataset"),
        (["eval", "--model", "preactresnet18", "--fname", "run", "--bogus"], "unrecognized"),
        (["eval", "--model", "preactresnet18", "--fname", "run", "--restarts", "0"], "positive"),
        (["eval", "--model", "preactresnet18", "--checkpoint", "run/pickled.pth"], "unpickl"),
        (
            ["eval", "--model", "preactresnet18", "--fname", "run", "--json", "run/model_best.pth"],
            "not overwriting",
        ),
        (
            [
                "eval",
                "--model",
                "preactresnet18",
                "--fname",
                "run",
                "--apply-gdws",
                "--alphas",
                "x.pth",
            ],
            "no file at",
        ),
        (["demo", "--targets", "0.5"], "must be > 1"),
        (["demo", "--speed-target", "1"], "must be > 1"),
        (["demo", "--speed-target", "0"], "must be > 1"),
        (["demo", "--recipes", "magic"], "--recipes: unknown"),
        (["eval", "--model", "preactresnet18", "--fname", "run", "--beta", "0.1"], "--apply-gdws"),
        (["eval", "--model", "preactresnet18", "--fname", "run", "--weighting", "data"], "--apply"),
        (["eval", "--model", "preactresnet18", "--fname", "run", "--device", "tpu"], "--device"),
        (
            ["alphas", "--model", "preactresnet18", "--fname", "run", "--out", "model_best.pth"],
            "not overwriting",
        ),
        (["alphas", "--model", "preactresnet18", "--fname", "run", "--out", "old.pth"], "exists"),
        (
            [
                "eval",
                "--model",
                "preactresnet18",
                "--fname",
                "run",
                "--norm",
                "Linf",
                "L2",
                "--epsilon",
                "8",
                "64",
                "1",
            ],
            "one value or one per --norm",
        ),
        (
            ["eval", "--model", "preactresnet18", "--fname", "run", "--norm", "linf"],
            "argument --norm: invalid choice: 'linf' (choose from 'Linf', 'L2', 'L1')",
        ),
    ],
)
def test_errors_are_one_line_with_exit_code_2(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    Path("run").mkdir()
    torch.save({"state_dict": PreActResNet18().state_dict()}, "run/model_best.pth")
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=0.1)}, "run/pickled.pth")
    Path("run/old.pth").write_bytes(b"earlier alphas")
    before = Path("run/model_best.pth").read_bytes()
    args = args + (["--data-dir", "no_such_dir"] if "eval" in args and "root" == message else [])
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err, err
    assert "\n" not in err and "Traceback" not in err
    assert Path("run/model_best.pth").read_bytes() == before
    assert Path("run/old.pth").read_bytes() == b"earlier alphas"


def test_the_console_script_reports_one_line(tmp_path):
    script = Path(sys.executable).with_name("gdws")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "gdws_torch.cli"]
    done = subprocess.run(
        [*command, "eval", "--model", "preactresnet18", "--fname", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "no checkpoint at" in done.stderr


def test_demo_quick_writes_tables_json_and_plot(tmp_path):
    # In a process of its own: the demo runs OpenVINO, whose threads do not survive the
    # forks of later tests' data-loader workers (docs/fps.md).
    command = [sys.executable, "-m", "gdws_torch.cli", "demo", "--quick", "--no-progress"]
    done = subprocess.run(
        [*command, "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    printed = done.stdout
    assert "dense" in printed and "GDWS 2x, data, global + joint refit + BN" in printed
    results = json.loads((tmp_path / "demo.json").read_text())
    dense, default = results["dense"], results["default"]
    assert dense["mac_reduction"] == 1.0 and dense["robust"] <= dense["natural"]
    assert default["target"] == 2.0 and default["conv_macs"] * 2 <= dense["conv_macs"]
    assert default["weighting"] == "data, global + joint refit + BN"
    assert {r["weighting"] for r in results["sweep"]} == {
        "unit",
        "noise gains",
        "data, global + joint refit + BN",
    }
    # The headline: built for 1.05x the dense speed on the backend whose plan reached it
    # at the least error; every model timed there.
    speed, choice = results["speed"], results["backend_choice"]
    assert (
        speed["target_speedup"] == 1.05 and speed["latency_plan"]["backend"] == results["backend"]
    )
    assert [c["backend"] for c in choice if c["chosen"]] == [results["backend"]]
    planned = [c for c in choice if "error" in c]
    reached = [c for c in planned if c["reached"]]
    if reached:
        assert min(c["error"] for c in reached) == next(c for c in choice if c["chosen"])["error"]
    assert speed["conv_macs"] < dense["conv_macs"] and speed["fps"] > 0
    # The plan: the fastest candidate within 1 point of dense on the validation digits.
    built = results["headline_candidates"]
    (chosen,) = [c for c in built if c["chosen"]]
    floor = results["dense_validation_robust"] - 1
    holding = [c for c in built if c["validation_robust"] >= floor]
    if holding:
        assert chosen["realised_speedup"] == max(c["realised_speedup"] for c in holding)
        assert results["headline_rule"].startswith("the fastest within 1 point")
    else:
        assert chosen["validation_robust"] == max(c["validation_robust"] for c in built)
        assert results["headline_rule"].endswith("the most robust there")
    assert f"Headline plan ({results['headline_rule']}" in printed
    assert f"Batch-1 FPS on {results['backend']}" in printed and "(chosen)" in printed
    for row in results["sweep"]:
        assert dense["conv_macs"] / row["conv_macs"] >= row["target"]
        assert row["fps"] > 0 and 0 <= row["robust"] <= row["natural"] <= 100
    import matplotlib.image

    picture = matplotlib.image.imread(tmp_path / "demo_sweep.png")
    assert picture.shape[0] > 300 and picture.shape[1] > 600
    assert np.ptp(picture) > 0


def test_fps_of_the_demo_model_on_every_backend(tmp_path, capsys):
    out = tmp_path / "fps.json"
    args = ["--rounds", "2", "--batch-sizes", "1", "3", "--no-progress", "--json", out]
    args += ["--backends", "eager", "channels_last", "onnxruntime"]
    assert gdws("fps", *args) == 0
    assert "FPS x vs dense" in capsys.readouterr().out
    result = json.loads(out.read_text())
    rows = result["rows"]
    backends = {"eager", "channels_last", "onnxruntime"}
    assert {(r["model"], r["backend"], r["batch_size"]) for r in rows} == {
        (m, b, n) for m in ("dense", "GDWS") for b in backends for n in (1, 3)
    }
    for row in rows:
        assert row["fps_q1"] <= row["fps"] <= row["fps_q3"] and row["fps"] > 0
        if row["model"] == "dense":
            assert row["speedup"] == 1.0 and row["mac_reduction"] == 1.0
        else:
            assert row["mac_reduction"] == result["dense_conv_macs"] / result["gdws_conv_macs"]
    assert result["dense_conv_macs"] >= 1.25 * result["gdws_conv_macs"]


def test_recalibrated_batchnorm_in_eval_and_convert_on_digits(tmp_path, capsys):
    from gdws_torch.experiments import demo

    checkpoint = tmp_path / "digits.pth"
    torch.save({"state_dict": demo.demo_network().state_dict()}, checkpoint)
    base = ["--model", "digits_cnn", "--dataset", "digits", "--checkpoint", checkpoint]
    flags = ["--apply-gdws", "--target-mac-reduction", "2", "--attack", "none", "--no-progress"]
    plain, recalibrated = tmp_path / "plain.json", tmp_path / "recal.json"
    assert gdws("eval", *base, *flags, "--json", plain) == 0
    assert gdws("eval", *base, *flags, "--recalibrate-bn", "600", "--json", recalibrated) == 0
    assert "re-estimated on 600 natural training inputs" in capsys.readouterr().out
    plain, recalibrated = json.loads(plain.read_text()), json.loads(recalibrated.read_text())
    assert plain["conv_macs"] == recalibrated["conv_macs"]
    assert recalibrated["natural_accuracy"] > plain["natural_accuracy"]  # 97.96 -> 99.4 here

    out = tmp_path / "gdws.pth"
    args = ["--target-mac-reduction", "2", "--recalibrate-bn", "100", "--recalibrate-attack"]
    assert gdws("convert", *base, *args, "--attack-iters", "2", "--out", out) == 0
    assert "natural and PGD training inputs" in capsys.readouterr().out
    assert gdws("eval", *base, "--recalibrate-bn", "10", "--attack", "none") == 2
    assert "--apply-gdws" in capsys.readouterr().err


def test_sweep_of_the_demo_model_writes_the_frontier(tmp_path, capsys):
    args = [
        "--targets", "2", "--n-test", "60", "--weighting-samples", "32",
        "--recalibrate-bn", "100", "--refit", "100", "--strategies", "unit", "data",
        "--fps-backend", "none", "--no-progress", "--out-dir", tmp_path,
    ]  # fmt: skip
    assert gdws("sweep", *args) == 0
    assert "robust %" in capsys.readouterr().out
    results = json.loads((tmp_path / "sweep.json").read_text())
    rows = results["rows"]
    assert {(r["strategy"], r["recovery"]) for r in rows} == {
        (s, r) for s in ("unit", "data") for r in ("none", "BN", "refit+BN")
    }
    dense = results["dense"]
    for row in rows:
        assert row["conv_macs"] * 2 <= dense["conv_macs"] and row["mac_reduction"] >= 2
        twins = [r for r in rows if r["strategy"] == row["strategy"]]
        assert {r["conv_macs"] for r in twins} == {row["conv_macs"]}  # recovery keeps MACs
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "sweep.png").shape[1] > 600
    assert gdws("sweep", "--targets", "0.5") == 2


def test_eval_with_the_data_weighting_and_global_allocation(tmp_path, capsys):
    from gdws_torch.experiments import demo

    checkpoint = tmp_path / "digits.pth"
    torch.save({"state_dict": demo.demo_network().state_dict()}, checkpoint)
    base = ["--model", "digits_cnn", "--dataset", "digits", "--checkpoint", checkpoint]
    flags = ["--apply-gdws", "--target-mac-reduction", "2", "--attack", "none", "--no-progress"]
    out = tmp_path / "data.json"
    extra = ["--weighting", "data", "--allocation", "global", "--json", out]
    assert gdws("eval", *base, *flags, *extra) == 0
    result = json.loads(out.read_text())
    assert result["gdws"]["solver"] == "mego" and result["gdws"]["mac_reduction"] >= 2
    assert gdws("eval", *base, "--apply-gdws", "--beta", "1", "--allocation", "global") == 2
    assert "needs --target-mac-reduction" in capsys.readouterr().err


def test_eval_with_the_pointwise_refit(tmp_path, capsys):
    from gdws_torch.experiments import demo

    checkpoint = tmp_path / "digits.pth"
    torch.save({"state_dict": demo.demo_network().state_dict()}, checkpoint)
    base = ["--model", "digits_cnn", "--dataset", "digits", "--checkpoint", checkpoint]
    flags = ["--apply-gdws", "--target-mac-reduction", "2", "--no-progress", "--attack-iters", "2"]
    plain, refitted = tmp_path / "plain.json", tmp_path / "refit.json"
    assert gdws("eval", *base, *flags, "--attack", "none", "--json", plain) == 0
    extra = ["--refit", "300", "--refit-attack", "--epsilon", "24", "--json", refitted]
    assert gdws("eval", *base, *flags, *extra) == 0
    assert "refitted on 300 PGD training inputs" in capsys.readouterr().out
    plain, refitted = json.loads(plain.read_text()), json.loads(refitted.read_text())
    assert plain["conv_macs"] == refitted["conv_macs"]
    assert refitted["natural_accuracy"] >= plain["natural_accuracy"]
    assert gdws("eval", *base, "--converted", "x.pth", "--refit", "10") == 2
    assert "--refit needs the dense model" in capsys.readouterr().err


def test_convert_runs_the_robust_recipe_by_default_and_says_so(tmp_path, capsys):
    from gdws_torch import compress
    from gdws_torch.conversion.recipes import RECIPES
    from gdws_torch.experiments import demo

    checkpoint = tmp_path / "digits.pth"
    torch.save({"state_dict": demo.demo_network().state_dict()}, checkpoint)
    base = ["--model", "digits_cnn", "--dataset", "digits", "--checkpoint", checkpoint]
    base += ["--target-mac-reduction", "2", "--no-progress", "--epsilon", "24"]
    base += ["--pgd-alpha", "6", "--attack-iters", "3"]
    out = tmp_path / "robust.pth"
    assert gdws("convert", *base, "--out", out) == 0
    printed = capsys.readouterr().out
    assert "recipe 'robust': data weighting on 256 inputs, global MAC allocation, joint" in printed
    assert "(the default with training data)" in printed
    report = json.loads(out.with_suffix(".json").read_text())
    recipe = report["recipe"]
    assert {k: recipe[k] for k in RECIPES["robust"].to_dict()} == RECIPES["robust"].to_dict()
    assert recipe["calibration_attack"]["eps"] == pytest.approx(24 / 255)
    assert recipe["calibration_attack"]["steps"] == 3
    assert all(not layer["name"].startswith("module.") for layer in report["layers"])
    assert report["mac_reduction"] >= 2
    from gdws_torch.models import DigitsCNN

    converted, info = load_converted(out, DigitsCNN())  # the unwrapped network's layers
    assert converted.eval()(torch.rand(2, 1, 16, 16)).shape == (2, 10)
    assert info["report"]["recipe"]["name"] == "robust"
    # The model is compress's with the same recipe, threat model and seed.
    expected, _ = compress(
        demo.demo_network(),
        digits_loader(),
        target_mac_reduction=2,
        recipe="robust",
        eps=24 / 255,
        attack_steps=3,
        attack_alpha=6 / 255,
        input_size=(1, 16, 16),
    )
    assert same_state(converted, expected)
    # Flags of one's own make a conversion of one's own; --recipe excludes them.
    plain = tmp_path / "plain.pth"
    assert gdws("convert", *base, "--weighting", "data", "--out", plain) == 0
    assert (
        "recipe 'custom': data weighting on 256 inputs, no recovery (your flags (--weighting))"
        in (capsys.readouterr().out)
    )
    assert gdws("convert", *base, "--recipe", "original", "--refit", "10", "--out", plain) == 2
    assert "--recipe runs a whole recipe; it excludes --refit" in capsys.readouterr().err


def digits_loader():
    """The digits training data as the command line reads them (in order, batches of 128)."""
    from gdws_torch.io.datasets import load_dataset

    return torch.utils.data.DataLoader(load_dataset("digits", split="train", size=16), 128)


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_convert_with_flags_of_ones_own_is_compress_with_their_recipe(tmp_path, capsys):
    """``gdws convert``'s weighting and recovery flags make a Recipe("custom", ...): the
    saved model is compress's with that recipe, the same threat model and seed."""
    from gdws_torch import (
        BatchNormStatistics,
        Recipe,
        Recovery,
        Refit,
        Weighting,
        compress,
    )
    from gdws_torch.experiments import demo
    from gdws_torch.models import DigitsCNN

    checkpoint = tmp_path / "digits.pth"
    torch.save({"state_dict": demo.demo_network().state_dict()}, checkpoint)
    base = ["--model", "digits_cnn", "--dataset", "digits", "--checkpoint", checkpoint]
    base += ["--target-mac-reduction", "2", "--no-progress", "--epsilon", "24", "--seed", "3"]
    flags = ["--weighting", "data", "--allocation", "global", "--refit", "200", "--refit-attack"]
    flags += ["--refit-iterations", "1", "--recalibrate-bn", "300", "--recalibrate-attack"]
    flags += ["--attack-iters", "2"]
    out = tmp_path / "custom.pth"
    assert gdws("convert", *base, *flags, "--out", out) == 0
    assert "recipe 'custom'" in capsys.readouterr().out
    converted, info = load_converted(out, DigitsCNN())
    recipe = Recipe(
        "custom",
        weighting=Weighting("data"),
        allocation="global",
        recovery=Recovery(
            refit=Refit(200, adversarial=True, iterations=1),
            batchnorm=BatchNormStatistics(300, adversarial=True),
        ),
        description="the command line's weighting and recovery flags",
    )
    assert info["report"]["recipe"] == {
        **recipe.to_dict(),
        "calibration_attack": info["report"]["recipe"]["calibration_attack"],
    }
    expected, _ = compress(
        demo.demo_network(),
        digits_loader(),
        target_mac_reduction=2,
        recipe=recipe,
        eps=24 / 255,
        attack_steps=2,
        attack_alpha=2 / 255,
        input_size=(1, 16, 16),
        seed=3,
    )
    assert same_state(converted, expected)


def test_convert_with_an_alphas_file_is_compress_with_its_channel_weights(tmp_path, capsys):
    from gdws_torch import ErrorWeights, compress, noise_gains, save_channel_weights
    from gdws_torch.experiments import demo
    from gdws_torch.models import DigitsCNN

    checkpoint = tmp_path / "digits.pth"
    torch.save({"state_dict": demo.demo_network().state_dict()}, checkpoint)
    gains = noise_gains(demo.demo_network(), digits_loader(), 64, progress=False)
    save_channel_weights(tmp_path / "alphas.pth", gains)
    base = ["--model", "digits_cnn", "--dataset", "digits", "--checkpoint", checkpoint]
    out = tmp_path / "given.pth"
    args = [
        "--alphas-filename",
        tmp_path / "alphas.pth",
        "--target-mac-reduction",
        "2",
        "--out",
        out,
    ]
    assert gdws("convert", *base, "--no-progress", *args) == 0
    assert f"channel weights from {tmp_path / 'alphas.pth'}" in capsys.readouterr().out
    converted, info = load_converted(out, DigitsCNN())
    assert info["metadata"]["alphas"] == str(tmp_path / "alphas.pth")
    expected, _ = compress(
        demo.demo_network(),
        target_mac_reduction=2,
        recipe="unit",
        error_weights=ErrorWeights(load_channel_weights(tmp_path / "alphas.pth")),
        input_size=(1, 16, 16),
    )
    assert same_state(converted, expected)
    plain, _ = compress(
        demo.demo_network(), target_mac_reduction=2, recipe="unit", input_size=(1, 16, 16)
    )
    assert not same_state(converted, plain)  # the file's weights made a difference


def test_convert_without_training_data_runs_the_unit_recipe(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"state_dict": PreActResNet18().state_dict()}, run / "model_best.pth")
    args = ["--model", "preactresnet18", "--fname", run, "--data-dir", tmp_path / "nothing"]
    assert gdws("convert", *args, "--target-mac-reduction", "2", "--no-progress") == 0
    printed = capsys.readouterr().out
    assert "recipe 'unit': unit weighting, no recovery (no training data" in printed
    report = json.loads((run / "gdws_model.json").read_text())
    assert report["recipe"]["name"] == "unit"
