"""``gdws`` on the original work's other networks and checkpoint layouts (HYDRA, ADMM, MSD,
RobNet-free), in run folders named as the original named them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_datasets import write_cifar10
from torch import nn

from gdws_torch import load_channel_weights, load_converted, noise_gains
from gdws_torch.cli import build_parser, main
from gdws_torch.io.datasets import load_dataset
from gdws_torch.models import ARCHITECTURES
from gdws_torch.nn.normalization import normalized

# run folder (the original's naming) -> (--model, file, how the file's names are written)
RUNS = {
    "hydra_vgg16": ("vgg16_hydra", "model_best_dense.pth", "hydra"),
    "hydra_wrn_28_4": ("wideresnet_28_4", "model_best_dense.pth", "hydra"),
    "admm_preactresnet18": ("preactresnet18_admm", "pretrained.pt", "admm"),
    "msd_preactresnet18": ("preactresnet18", "MSD_V0.pt", "msd"),
    "nas_robnetfree": ("robnetfree", "RobNet_free_cifar10.pth.tar", "robnet"),
}
LABELS = {"hydra": "HYDRA", "admm": "ADMM", "msd": "MSD", "robnet": "RobNet"}
ALIASES = {"vgg16_hydra": "vgg16_bn"}


def network_predicting(name: str, label: int, seed: int) -> nn.Module:
    """``--model name`` with random weights whose last linear layer always says ``label``."""
    torch.manual_seed(seed)
    model = ARCHITECTURES[ALIASES.get(name, name)]().eval()
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
        last.bias[label] = 1.0
    return model


def write_run(folder: Path, network: nn.Module, file: str, layout: str) -> Path:
    state = network.state_dict()
    if layout == "hydra":
        data = {"state_dict": dict(state)}
    elif layout == "admm":  # the ADMM code's DataParallel wrapper around basic_model
        data = {f"module.basic_model.{k}": v for k, v in state.items()}
    elif layout == "msd":
        data = dict(state)
    else:  # RobNets saved no num_batches_tracked here: the load reports them missing
        kept = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
        data = {"state_dict": kept, "epoch": 3}
    folder.mkdir(parents=True)
    torch.save(data, folder / file)
    return folder / file


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("original_runs")
    write_cifar10(root / "data", n_per_batch=4)
    labels = load_dataset("cifar10", root / "data", "test").tensors[1]
    networks = {}
    for i, (run, (model, file, layout)) in enumerate(RUNS.items()):
        label = int(labels[i % len(labels)])
        networks[run] = network_predicting(model, label, seed=i)
        write_run(root / "outdir" / run, networks[run], file, layout)
    return root, labels, networks


def gdws(*args) -> int:
    return main([str(a) for a in args])


def quiet(root: Path) -> list:
    return ["--data-dir", root / "data", "--no-progress", "--attack", "none"]


@pytest.mark.parametrize("run", sorted(RUNS))
def test_eval_reads_each_original_run_folder(runs, run, capsys, monkeypatch):
    root, labels, networks = runs
    monkeypatch.chdir(root)
    model, file, layout = RUNS[run]
    out = root / f"{run}.json"
    fname = f"outdir/{run}"  # relative, as the original's commands gave it
    assert gdws("eval", "--model", model, "--fname", fname, *quiet(root), "--json", out) == 0
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if x.startswith("checkpoint "))
    assert line.startswith(f"checkpoint '{fname}/{file}': the {LABELS[layout]} layout")
    assert ("caution" in line) == (layout == "robnet")
    result = json.loads(out.read_text())
    # The network always predicts the label it was built for: the weights were loaded.
    last = [m for m in networks[run].modules() if isinstance(m, nn.Linear)][-1]
    expected = 100.0 * float((labels == int(last.bias.argmax())).float().mean())
    assert result["natural_accuracy"] == pytest.approx(expected)
    assert 0 < expected < 100  # neither 0 nor 100: only these weights score it


def test_alphas_with_an_explicit_format_equal_the_library(runs, tmp_path):
    root, _, _ = runs
    torch.manual_seed(0)
    network = ARCHITECTURES["preactresnet18"]().eval()
    run = tmp_path / "outdir" / "msd_preactresnet18"
    write_run(run, network, "MSD_V0.pt", "msd")
    flags = ["--sample-size", "2", "--chunk-size", "2", "--checkpoint-format", "msd"]
    args = ["--model", "preactresnet18", "--fname", run, *quiet(root), *flags]
    assert gdws("alphas", *args, "--out", "alphas.pth") == 0
    gains = load_channel_weights(run / "alphas.pth")
    data = load_dataset("cifar10", root / "data", "train")
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    expected = noise_gains(normalized(network, "cifar10"), loader, 2, progress=False)
    assert expected and set(gains) == set(expected)
    assert any(bool((value > 0).any()) for value in expected.values())
    for name, value in expected.items():
        torch.testing.assert_close(gains[name], value, rtol=1e-5, atol=0)


def test_convert_keeps_the_admm_weights(runs, tmp_path):
    root, _, networks = runs
    path = root / "outdir" / "admm_preactresnet18" / "pretrained.pt"
    out = tmp_path / "converted.pth"
    args = ["--model", "preactresnet18_admm", "--checkpoint", path, "--checkpoint-format", "admm"]
    assert gdws("convert", *args, "--beta", "0", "--recipe", "unit", "--out", out) == 0
    converted, _ = load_converted(out, ARCHITECTURES["preactresnet18_admm"]())
    source, dense = networks["admm_preactresnet18"].state_dict(), converted.state_dict()
    shared = [k for k in source if k in dense]
    assert "linear.bias" in shared and "conv1.weight" in shared
    assert all(torch.equal(source[k], dense[k]) for k in shared)


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (
            ["--model", "vgg16", "--fname", "outdir/hydra_vgg16"],
            ["does not fit CifarVGG", "Read as the HYDRA layout", "--model vgg16_bn (alias"],
        ),
        (
            [
                "--model",
                "vgg16_hydra",
                "--fname",
                "outdir/hydra_vgg16",
                "--checkpoint-format",
                "msd",
            ],
            ["no checkpoint at 'outdir/hydra_vgg16/MSD_V0.pt' (the MSD layout's file)"],
        ),
        (
            [
                "--model",
                "preactresnet18",
                "--checkpoint",
                "outdir/msd_preactresnet18/MSD_V0.pt",
                "--checkpoint-format",
                "hydra",
            ],
            [
                "not in the HYDRA layout",
                "expected HYDRA's {'state_dict'",
                "found a bare state dict",
            ],
        ),
        (
            [
                "--model",
                "preactresnet18",
                "--checkpoint",
                "outdir/admm_preactresnet18/pretrained.pt",
                "--checkpoint-format",
                "msd",
            ],
            ["not in the MSD layout", "'basic_model.'"],
        ),
        (
            ["--model", "robnetfree", "--fname", "outdir/admm_preactresnet18"],
            ["does not fit RobNet", "Read as the ADMM layout", "--model preactresnet18_admm"],
        ),
        (
            ["--model", "vgg16", "--fname", "outdir/nowhere"],
            ["no checkpoint at 'outdir/nowhere/model_best.pth' (nor the original's"],
        ),
        (
            ["--model", "vgg16", "--fname", "outdir/hydra_vgg16", "--checkpoint-format", "tf"],
            ["--checkpoint-format: invalid choice"],
        ),
    ],
)
def test_a_wrong_layout_is_one_line_and_exit_code_2(runs, args, fragments, capsys, monkeypatch):
    root, _, _ = runs
    monkeypatch.chdir(root)
    code = gdws("eval", *args, *quiet(root), "--json", "refused.json")
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err
    assert not (root / "refused.json").exists()


def test_wideresnet_28_4_refuses_the_unused_block_and_names_wrn_28_4(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"state_dict": ARCHITECTURES["wrn_28_4"]().state_dict()}, run / "model_best.pth")
    write_cifar10(tmp_path / "data", n_per_batch=2)
    args = ["--fname", run, *quiet(tmp_path), "--json", tmp_path / "r.json"]
    assert gdws("eval", "--model", "wideresnet_28_4", *args) == 2
    assert "use --model wrn_28_4" in capsys.readouterr().err
    assert gdws("eval", "--model", "wrn_28_4", *args) == 0


@pytest.mark.parametrize("command", ["eval", "alphas", "convert", "fps", "sweep", "latency-table"])
def test_every_command_reading_checkpoints_takes_the_format(command):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    option = next(a for a in sub._actions if "--checkpoint-format" in a.option_strings)
    assert option.default == "auto"
    assert list(option.choices) == ["auto", "original", "hydra", "admm", "msd", "robnet"]
