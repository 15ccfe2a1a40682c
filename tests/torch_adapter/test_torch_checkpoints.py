"""Checkpoint, noise-gain and converted-model files: safe loading, formats, atomic writes."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import torch
from _torch_models import INPUT_SIZE, SMALL_RESNET_ELIGIBLE, SmallResNet, small_resnet
from torch import nn

from gdws_torch import (
    GDWSConv2d,
    convert,
    eligible_convs,
    load_channel_weights,
    load_checkpoint,
    load_converted,
    load_state_dict_file,
    save_channel_weights,
    save_converted,
)
from gdws_torch.conversion.options import ErrorWeights


def fresh() -> SmallResNet:
    return small_resnet(seed=99).float()


def trained() -> SmallResNet:
    return small_resnet(seed=0).float()


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("layout", ["state_dict", "bare", "module_prefix", "module_in_wrapper"])
def test_checkpoint_layouts_load(tmp_path, layout):
    source = trained()
    state = source.state_dict()
    if layout == "state_dict":
        data = {"state_dict": state, "epoch": 3, "best_acc": 51.2}
    elif layout == "bare":
        data = state
    else:
        data = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
    path = tmp_path / "model_best.pth"
    torch.save(data, path)
    target = fresh()
    if layout == "module_in_wrapper":
        wrapper = nn.DataParallel(target)
        assert load_checkpoint(wrapper, path) is wrapper
    else:
        assert load_checkpoint(target, path) is target
    assert same_weights(target, source)


def test_a_file_needing_unpickling_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": trained().state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(ValueError, match="arbitrary unpickling"):
        load_state_dict_file(path)
    torch.save(trained(), tmp_path / "whole_model.pth")  # a pickled module
    with pytest.raises(ValueError, match="arbitrary unpickling"):
        load_checkpoint(fresh(), tmp_path / "whole_model.pth")


def test_missing_corrupt_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_state_dict_file(tmp_path / "absent.pth")
    (tmp_path / "corrupt.pth").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        load_state_dict_file(tmp_path / "corrupt.pth")
    torch.save({"epoch": 3}, tmp_path / "no_state.pth")
    with pytest.raises(ValueError, match="holds no state dict"):
        load_state_dict_file(tmp_path / "no_state.pth")


def test_incompatible_keys_leave_the_model_untouched(tmp_path):
    state = trained().state_dict()
    del state["head.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["reflect.weight"] = torch.zeros(32, 24, 5, 5)
    torch.save(state, tmp_path / "other.pth")
    target = fresh()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=r"1 missing.*1 unexpected.*1 of another shape"):
        load_checkpoint(target, tmp_path / "other.pth")
    assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items())


def test_alpha_files_in_the_original_format(tmp_path):
    model = trained()
    gains = {
        f"module.{name}.weight": torch.rand(conv.in_channels)
        for name, conv in eligible_convs(model)
    }
    original = {
        "noise_gains": gains,
        "attack": "pgd",
        "attack-iters": 10,
        "epsilon": 8,
        "sample_size": 1000,
    }
    torch.save(original, tmp_path / "alphas.pth")
    loaded = load_channel_weights(tmp_path / "alphas.pth")
    assert loaded.keys() == gains.keys()
    _, report = convert(
        model,
        input_size=INPUT_SIZE,
        beta=0.3,
        only_if_cheaper=False,
        error_weights=ErrorWeights(channel_weights=loaded),
    )
    _, direct = convert(
        model,
        input_size=INPUT_SIZE,
        beta=0.3,
        only_if_cheaper=False,
        error_weights=ErrorWeights(channel_weights=gains),
    )
    assert [la.n_kernels for la in report.layers] == [la.n_kernels for la in direct.layers]

    save_channel_weights(tmp_path / "ours.pth", loaded, attack="none", sample_size=10)
    ours = torch.load(tmp_path / "ours.pth", weights_only=True)
    assert ours["attack"] == "none" and ours["sample_size"] == 10
    assert all(torch.equal(ours["noise_gains"][k], v) for k, v in gains.items())
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def test_bad_alpha_files(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "a.pth")
    with pytest.raises(ValueError, match="not a noise-gain file"):
        load_channel_weights(tmp_path / "a.pth")
    torch.save({"noise_gains": {"x.weight": torch.ones(2, 2)}}, tmp_path / "b.pth")
    with pytest.raises(ValueError, match="1-D"):
        load_channel_weights(tmp_path / "b.pth")
    torch.save({"noise_gains": {"x.weight": -torch.ones(2)}}, tmp_path / "c.pth")
    with pytest.raises(ValueError, match=">= 0"):
        load_channel_weights(tmp_path / "c.pth")


def test_converted_model_round_trips_without_refitting(tmp_path):
    model = trained()
    converted, report = convert(model, input_size=INPUT_SIZE, beta=0.5, only_if_cheaper=False)
    path = tmp_path / "converted.pth"
    save_converted(path, converted, report, beta=0.5)
    shell = fresh()
    loaded, info = load_converted(path, shell)
    assert loaded is not shell and all(
        type(shell.get_submodule(n)) is nn.Conv2d for n in SMALL_RESNET_ELIGIBLE
    )
    assert all(isinstance(loaded.get_submodule(n), GDWSConv2d) for n in SMALL_RESNET_ELIGIBLE)
    x = torch.rand(2, *INPUT_SIZE)
    assert torch.equal(loaded(x), converted(x))
    assert info["report"]["macs"] == report.macs and info["metadata"] == {"beta": 0.5}
    in_place, _ = load_converted(path, shell, inplace=True)
    assert in_place is shell and torch.equal(shell(x), converted(x))
    assert [p.name for p in tmp_path.iterdir()] == ["converted.pth"]


def test_converted_model_into_the_wrong_architecture(tmp_path):
    converted, _ = convert(trained(), input_size=INPUT_SIZE, beta=0.5, only_if_cheaper=False)
    save_converted(tmp_path / "c.pth", converted)
    other = nn.Sequential(nn.Conv2d(3, 8, 3))
    with pytest.raises(ValueError, match=r"not a groups=1 nn\.Conv2d"):
        load_converted(tmp_path / "c.pth", other)
    torch.save(trained().state_dict(), tmp_path / "plain.pth")
    with pytest.raises(ValueError, match="not a converted model"):
        load_converted(tmp_path / "plain.pth", fresh())


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def broken_save(obj, f):
        if isinstance(f, (str, os.PathLike)):
            Path(f).write_bytes(b"half")
        else:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_channel_weights(tmp_path / "alphas.pth", {"a.weight": torch.ones(3)})
    assert os.listdir(tmp_path) == []
