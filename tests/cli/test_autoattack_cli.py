"""``--attack apgd|autoattack|autoattack-fast`` in gdws eval, sweep and demo: labels,
results files, the gradient-masking checks, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from gdws_torch import APGD, AutoAttack
from gdws_torch.cli import main
from gdws_torch.experiments import demo
from gdws_torch.io.datasets import load_dataset
from gdws_torch.nn.normalization import normalized
from gdws_torch.robustness.evaluate import evaluate_dataset


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("aa") / "digits.pth"
    torch.save({"state_dict": demo.demo_network().state_dict()}, path)
    return path


def gdws(*args) -> int:
    return main([str(a) for a in args])


def digits(checkpoint) -> list:
    return ["--model", "digits_cnn", "--dataset", "digits", "--checkpoint", checkpoint]


def test_eval_autoattack_fast_equals_the_library_and_runs_the_checks(checkpoint, tmp_path, capsys):
    out = tmp_path / "aa.json"
    flags = ["--attack", "autoattack-fast", "--epsilon", "40", "--n-samples", "12"]
    assert gdws("eval", *digits(checkpoint), *flags, "--no-progress", "--json", out) == 0
    printed = capsys.readouterr().out
    label = "Linf AutoAttack-fast (eps 40/255)"
    assert f"{label} acc. %" in printed and f"{label}: natural" in printed
    assert "gradient-masking checks (12 samples):" in printed and "[FLAG]" not in printed
    result = json.loads(out.read_text())
    (entry,) = result["attacks"]
    assert entry["attack"] == "autoattack-fast" and entry["label"] == label
    assert entry["version"] == "fast" and entry["attacks"] == ["APGD-CE", "APGD-T"]
    model = normalized(demo.demo_network(), "digits")
    data = load_dataset("digits", split="test", size=16)
    attack = AutoAttack(model, norm="Linf", eps=40 / 255, version="fast", seed=0)
    expected = evaluate_dataset(model, data, {"a": attack}, n_samples=12, progress=False)
    assert 0 < result["robust_accuracy"] < result["natural_accuracy"]  # a telling radius
    assert result["robust_accuracy"] == pytest.approx(expected["attacks"]["a"])
    assert entry["accuracy_by_attack"] == pytest.approx(expected["by_attack"]["a"])
    assert result["natural_accuracy"] == pytest.approx(expected["natural"])
    masking = result["masking_checks"]
    assert masking["n_samples"] == 12 and masking["flagged"] is False
    assert [c["name"] for c in masking["checks"]] == [
        "black_box",
        "zero_gradients",
        "probabilities",
        "nondeterminism",
    ]
    assert masking["checks"][0]["flagged"] is None  # no Square in the fast version


def test_eval_apgd_union_over_norms(checkpoint, tmp_path, capsys):
    out = tmp_path / "apgd.json"
    flags = ["--attack", "apgd", "--attack-iters", "5", "--norm", "Linf", "L2"]
    flags += ["--epsilon", "32", "255", "--n-samples", "20", "--no-progress"]
    assert gdws("eval", *digits(checkpoint), *flags, "--json", out) == 0
    result = json.loads(out.read_text())
    labels = [a["label"] for a in result["attacks"]]
    assert labels == ["Linf APGD-CE-5 (eps 32/255)", "L2 APGD-CE-5 (eps 255/255)"]
    assert all(a["steps"] == 5 and a["loss"] == "ce" for a in result["attacks"])
    model = normalized(demo.demo_network(), "digits")
    data = load_dataset("digits", split="test", size=16)
    attacks = {
        "inf": APGD(model, norm="Linf", eps=32 / 255, steps=5, seed=0),
        "two": APGD(model, norm="L2", eps=1.0, steps=5, seed=0),
    }
    expected = evaluate_dataset(model, data, attacks, n_samples=20, progress=False)
    assert [a["accuracy"] for a in result["attacks"]] == pytest.approx(
        list(expected["attacks"].values())
    )
    assert result["union_accuracy"] == pytest.approx(expected["union"])
    assert "union acc. %" in capsys.readouterr().out


def test_sweep_labels_the_attack_and_stores_the_checks(tmp_path, capsys):
    args = ["--attack", "apgd", "--attack-iters", "2", "--targets", "2", "--n-test", "20"]
    args += ["--strategies", "unit", "--recalibrate-bn", "0", "--fps-backend", "none"]
    assert gdws("sweep", *args, "--no-progress", "--out-dir", tmp_path) == 0
    printed = capsys.readouterr().out
    label = "Linf APGD-CE-2 (eps 24/255)"
    assert f"robust ({label})" in printed and "gradient-masking checks" in printed
    results = json.loads((tmp_path / "sweep.json").read_text())
    assert results["attack"]["attack"] == "apgd" and results["attack"]["label"] == label
    assert results["attack"]["norm"] == "Linf" and results["attack"]["steps"] == 2
    assert results["masking_checks"]["n_samples"] == 20


def test_demo_attack_helpers():
    assert demo.attack_label("pgd") == "Linf PGD-20 (eps 24/255)"
    assert demo.attack_label("apgd", 50) == "Linf APGD-CE-50 (eps 24/255)"
    assert demo.attack_label("autoattack") == "Linf AutoAttack (eps 24/255)"
    model = demo.demo_network()
    attack = demo.evaluation_attack(model, "autoattack-fast")
    assert isinstance(attack, AutoAttack) and attack.version == "fast"
    assert attack.eps == demo.DEMO_ATTACK["eps"]
    with pytest.raises(ValueError, match="attack must be one of"):
        demo.evaluation_attack(model, "bim")
    with pytest.raises(ValueError, match="attack must be one of"):
        demo.run_demo(attack="bim")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "--attack", "bim"], "argument --attack: invalid choice: 'bim'"),
        (["eval", "--attack", "autoattack", "--epsilon", "0"], "--epsilon must be a positive"),
        (["eval", "--attack", "autoattack", "--norm", "l_3"], "argument --norm: invalid choice"),
        (["eval", "--attack", "apgd", "--attack-iters", "0"], "--attack-iters must be positive"),
        (["train", "--attack", "autoattack"], "argument --attack: invalid choice"),
        (["sweep", "--attack", "none"], "argument --attack: invalid choice"),
        (["demo", "--attack", "bim"], "argument --attack: invalid choice"),
    ],
)
def test_bad_attack_flags_are_one_line_errors(checkpoint, capsys, args, message):
    command, *rest = args
    model = digits(checkpoint) if command in ("eval", "train") else []
    assert gdws(command, *model, *rest) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err, err
