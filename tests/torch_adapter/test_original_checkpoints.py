"""The original's checkpoint layouts (HYDRA, ADMM, MSD, RobNet-free): files written exactly
as those releases wrote them load into the right model, safely; other layouts are refused."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from torch import nn

from gdws_torch import load_original_checkpoint
from gdws_torch.io.original_checkpoints import (
    CHECKPOINT_FORMATS,
    checkpoint_layout,
    find_checkpoint,
    read_checkpoint,
)
from gdws_torch.models import (
    VGG16_BN,
    PreActResNet18,
    PreActResNet18_ADMM,
    RobNetFree,
    WRN28_4_WithoutSubBlock,
)


def trained(build, seed=0) -> nn.Module:
    """``build()`` with random weights and non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = build()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d) and module.running_mean is not None:
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.num_batches_tracked.fill_(7)
    return model.eval()


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def save(obj, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


# -- each layout, written as the original's sources wrote it --------------------------------


def hydra_file(folder: Path, build=VGG16_BN) -> tuple[nn.Module, Path]:
    source = trained(build)
    return source, save({"state_dict": source.state_dict()}, folder / "model_best_dense.pth")


def admm_file(folder: Path, name="pretrained.pt", prefix="module.basic_model."):
    source = trained(PreActResNet18_ADMM)
    state = {f"{prefix}{k}": v for k, v in source.state_dict().items()}
    return source, save(state, folder / name)


def msd_file(folder: Path) -> tuple[nn.Module, Path]:
    source = trained(PreActResNet18)
    return source, save(dict(source.state_dict()), folder / "MSD_V0.pt")


def robnet_file(folder: Path, drop=("num_batches_tracked",), **extra):
    source = trained(RobNetFree)
    state = {k: v for k, v in source.state_dict().items() if not k.endswith(drop)}
    return source, save({"state_dict": state, **extra}, folder / "RobNet_free_cifar10.pth.tar")


@pytest.mark.parametrize("build", [VGG16_BN, WRN28_4_WithoutSubBlock])
def test_hydra_checkpoints_load_from_their_run_folder(tmp_path, build):
    source, path = hydra_file(tmp_path / "outdir" / "hydra_net", build)
    target = build()
    loaded = load_original_checkpoint(target, tmp_path / "outdir" / "hydra_net")
    assert loaded.model is target and loaded.path == path
    assert loaded.checkpoint_format == "hydra" and loaded.missing == []
    assert "the run folder's name holds 'hydra'" in loaded.reason
    assert same_weights(target, source)
    assert "HYDRA layout" in loaded.summary()


@pytest.mark.parametrize("prefix", ["module.basic_model.", "basic_model."])
def test_admm_checkpoints_drop_basic_model(tmp_path, prefix):
    source, path = admm_file(tmp_path / "admm_r18", prefix=prefix)
    assert all("basic_model" in k for k in torch.load(path, weights_only=True))
    target = PreActResNet18_ADMM()
    loaded = load_original_checkpoint(target, path)
    assert (loaded.checkpoint_format, loaded.reason) == (
        "admm",
        "auto: the file name pretrained.pt",
    )
    assert same_weights(target, source)
    wrapped = nn.DataParallel(PreActResNet18_ADMM())  # names with module. again
    load_original_checkpoint(wrapped, path, "admm")
    assert same_weights(wrapped.module, source)


def test_admm_reads_pretrained_else_retrained_bn(tmp_path):
    run = tmp_path / "run_admm"
    retrained, _ = admm_file(run, "retrained_bn.pt")
    assert find_checkpoint(run)[:2] == (run / "retrained_bn.pt", "admm")
    target = PreActResNet18_ADMM()
    assert load_original_checkpoint(target, run).path == run / "retrained_bn.pt"
    assert same_weights(target, retrained)
    pretrained = trained(PreActResNet18_ADMM, seed=1)
    save({f"basic_model.{k}": v for k, v in pretrained.state_dict().items()}, run / "pretrained.pt")
    assert find_checkpoint(run, "admm")[0] == run / "pretrained.pt"
    assert load_original_checkpoint(target, run).path == run / "pretrained.pt"
    assert same_weights(target, pretrained)


def test_msd_checkpoints_are_bare_state_dicts(tmp_path):
    source, path = msd_file(tmp_path / "outdir" / "msd_preact")
    target = PreActResNet18()
    loaded = load_original_checkpoint(target, path.parent)
    assert loaded.checkpoint_format == "msd" and loaded.path == path
    assert same_weights(target, source)


def test_robnet_loads_non_strictly_and_reports_what_is_missing(tmp_path):
    source, path = robnet_file(tmp_path / "nas", epoch=10, best_acc=52.1)
    target = RobNetFree()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    loaded = load_original_checkpoint(target, path)
    assert loaded.checkpoint_format == "robnet"
    counters = [k for k in target.state_dict() if k.endswith("num_batches_tracked")]
    assert len(counters) > 100 and sorted(loaded.missing) == sorted(counters)
    weights = source.state_dict()
    for key, value in target.state_dict().items():
        assert torch.equal(value, before[key] if key in counters else weights[key]), key
    line = loaded.summary()
    assert f"{len(counters)} entries of the model are missing" in line and "\n" not in line
    assert counters[0] in line
    complete, path = robnet_file(tmp_path / "full", drop=())
    assert load_original_checkpoint(target, path).missing == []
    assert same_weights(target, complete)


# -- auto: file name, key patterns, the folder-name convention -------------------------------


def test_auto_recognises_the_layout_by_the_names_inside(tmp_path):
    source, path = admm_file(tmp_path / "somewhere", name="weights.pt")
    state, fmt, reason = read_checkpoint(path)
    assert (fmt, reason) == ("admm", "auto: its names carry 'basic_model.'")
    assert set(state) == {f"module.{k}" for k in source.state_dict()}
    _, path = robnet_file(tmp_path / "elsewhere")
    path = path.rename(path.with_name("best.pth"))
    assert read_checkpoint(path)[1] == "robnet"


def test_auto_honours_the_original_folder_names(tmp_path):
    source, path = msd_file(tmp_path / "outdir" / "msd_run")
    renamed = path.rename(path.with_name("weights.pt"))
    _, fmt, reason = read_checkpoint(renamed)
    assert fmt == "msd" and "'msd'" in reason and "convention" in reason
    # The folder word is the run folder's (the original's --fname), when given.
    assert read_checkpoint(renamed, folder_name="outdir/plain")[1] == "original"
    # ... and only when the file has that layout's structure (MSD's is a bare dict).
    save({"state_dict": source.state_dict()}, renamed)
    assert read_checkpoint(renamed)[1] == "original"
    _, hydra = hydra_file(tmp_path / "hydra_x")
    hydra = hydra.rename(hydra.with_name("w.pth"))
    assert read_checkpoint(hydra)[1] == "hydra"


def test_find_checkpoint_follows_the_original(tmp_path):
    run = tmp_path / "hydra_vgg16"
    _, dense = hydra_file(run)
    save({"state_dict": {}}, run / "model_best.pth")
    # The folder's name says HYDRA: its file, as the original read it.
    assert find_checkpoint(run)[:2] == (dense, "hydra")
    assert find_checkpoint(run, "original")[:2] == (run / "model_best.pth", "original")
    plain = tmp_path / "plain"
    hydra_file(plain)
    assert find_checkpoint(plain)[:2] == (plain / "model_best_dense.pth", "hydra")
    msd_file(plain)
    with pytest.raises(ValueError, match=r"several layouts .* --checkpoint-format"):
        find_checkpoint(plain)
    save({"state_dict": {}}, plain / "model_best.pth")
    assert find_checkpoint(plain)[1] == "original"
    with pytest.raises(
        FileNotFoundError, match=r"no checkpoint at '.*empty/model_best\.pth' \(nor .*MSD_V0\.pt"
    ):
        find_checkpoint(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"'.*robnet_run/RobNet_free_cifar10\.pth\.tar'"):
        find_checkpoint(tmp_path / "robnet_run", "robnet")
    with pytest.raises(ValueError, match="checkpoint_format must be one of"):
        find_checkpoint(run, "hydra2")


# -- refusals --------------------------------------------------------------------------------


def _wrong(tmp_path: Path, kind: str) -> Path:
    if kind == "admm":
        return admm_file(tmp_path)[1]
    if kind == "msd":
        return msd_file(tmp_path)[1]
    if kind == "hydra":
        return hydra_file(tmp_path)[1]
    return robnet_file(tmp_path)[1]


@pytest.mark.parametrize(
    ("kind", "fmt", "build", "message"),
    [
        (
            "msd",
            "hydra",
            PreActResNet18,
            r"not in the HYDRA layout: expected HYDRA's \{'state_dict",
        ),
        ("hydra", "msd", VGG16_BN, r"not in the MSD layout: expected MSD's bare state dict"),
        ("hydra", "admm", VGG16_BN, r"not in the ADMM layout: .*'basic_model\.'"),
        ("admm", "msd", PreActResNet18_ADMM, r"MSD layout.*found names with a 'basic_model\.'"),
        ("admm", "original", PreActResNet18_ADMM, r"original layout.*'basic_model\.'"),
        ("msd", "robnet", RobNetFree, r"not in the RobNet layout: .*RobNet_free_cifar10"),
        ("hydra", "robnet", RobNetFree, r"unexpected.*Read as the RobNet layout"),
        ("robnet", "hydra", VGG16_BN, r"does not fit VGG.*Read as the HYDRA layout"),
        ("msd", "admm", PreActResNet18_ADMM, r"5 unexpected.*Read as the ADMM layout"),
    ],
)
def test_a_wrong_layout_is_refused_naming_the_expected_one(tmp_path, kind, fmt, build, message):
    path = _wrong(tmp_path, kind)
    target = trained(build, seed=5)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=message) as error:
        load_original_checkpoint(target, path, fmt)
    assert "\n" not in str(error.value)
    assert checkpoint_layout(fmt) in str(error.value)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_robnet_refuses_other_shapes_and_unsafe_files(tmp_path):
    source, path = robnet_file(tmp_path)
    state = torch.load(path, weights_only=True)["state_dict"]
    state["classifier.weight"] = torch.zeros(100, 576)
    save({"state_dict": state}, path)
    with pytest.raises(ValueError, match=r"another shape .*classifier\.weight"):
        load_original_checkpoint(RobNetFree(), path)
    state["classifier.weight"] = torch.full((10, 576), float("nan"))
    save({"state_dict": state}, path)
    with pytest.raises(ValueError, match="NaN or inf"):
        load_original_checkpoint(RobNetFree(), path)
    # RobNets' training saved its scheduler object too: that needs unpickling, refused.
    save({"state_dict": source.state_dict(), "scheduler": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(ValueError, match="arbitrary unpickling"):
        load_original_checkpoint(RobNetFree(), path)


def test_the_formats_and_their_layouts():
    assert CHECKPOINT_FORMATS == ("auto", "original", "hydra", "admm", "msd", "robnet")
    assert "model_best_dense.pth" in checkpoint_layout("hydra")
    assert "retrained_bn.pt" in checkpoint_layout("admm")
    with pytest.raises(ValueError, match="must be one of"):
        checkpoint_layout("auto")
