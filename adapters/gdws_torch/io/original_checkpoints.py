"""The checkpoint layouts of the original work's networks, and which one a file holds.

The original's evaluation (``eval_robustness.py``) read five layouts, chosen by words in
its run folder's name (``--fname``):

- ``original``: ``RUN/model_best.pth``, ``{'state_dict': {name: tensor}}`` (names with or
  without ``module.``). A bare state dict, and a MadryLab ``{'model': ...}`` file, are
  accepted too (:func:`gdws_torch.io.checkpoints.load_state_dict_file`).
- ``hydra`` (folder name holds ``hydra``): ``RUN/model_best_dense.pth``,
  ``{'state_dict': {name: tensor}}`` with names without ``module.``.
- ``admm`` (``admm``): ``RUN/pretrained.pt``, else ``RUN/retrained_bn.pt``: a bare state
  dict whose names carry a ``basic_model`` component (``module.basic_model.conv1.weight``),
  dropped when loading.
- ``msd`` (``msd``): ``RUN/MSD_V0.pt``, a bare state dict without ``module.``.
- ``robnet`` (``nas``): ``RUN/RobNet_free_cifar10.pth.tar``, ``{'state_dict': ...}``,
  loaded non-strictly: entries of the model the file lacks keep their initial values and
  are reported.

Everything is read with ``torch.load(..., weights_only=True)`` and checked before any
tensor is copied (keys, shapes, finite values): a file of another layout is refused with
a message naming the layout expected. The ``module.`` prefix of ``nn.DataParallel`` is
added or stripped to match the model in every layout.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gdws_torch.io.checkpoints import (
    _match_prefix,
    _robustness_model,
    _safe_load,
    check_finite_state,
    check_state_dict,
)

__all__ = [
    "CHECKPOINT_FORMATS",
    "LoadedCheckpoint",
    "checkpoint_layout",
    "find_checkpoint",
    "load_checked_state",
    "load_original_checkpoint",
    "read_checkpoint",
]

CHECKPOINT_FORMATS = ("auto", "original", "hydra", "admm", "msd", "robnet")


@dataclasses.dataclass(frozen=True)
class _Layout:
    label: str
    files: tuple[str, ...]  # in the run folder, the first one present is read
    folder_word: str | None  # the original's run-folder naming convention
    container: str  # "wrapped": {'state_dict': ...}; "bare": {name: tensor}; "any"
    strict: bool
    description: str


_LAYOUTS = {
    "original": _Layout(
        "original",
        ("model_best.pth",),
        None,
        "any",
        True,
        "{'state_dict': {name: tensor}} or a bare state dict (RUN/model_best.pth)",
    ),
    "hydra": _Layout(
        "HYDRA",
        ("model_best_dense.pth",),
        "hydra",
        "wrapped",
        True,
        "HYDRA's {'state_dict': {name: tensor}} (RUN/model_best_dense.pth)",
    ),
    "admm": _Layout(
        "ADMM",
        ("pretrained.pt", "retrained_bn.pt"),
        "admm",
        "bare",
        True,
        "ADMM's bare state dict {name: tensor}, names with a 'basic_model.' component "
        "(RUN/pretrained.pt or RUN/retrained_bn.pt)",
    ),
    "msd": _Layout(
        "MSD",
        ("MSD_V0.pt",),
        "msd",
        "bare",
        True,
        "MSD's bare state dict {name: tensor} (RUN/MSD_V0.pt)",
    ),
    "robnet": _Layout(
        "RobNet",
        ("RobNet_free_cifar10.pth.tar",),
        "nas",
        "wrapped",
        False,
        "RobNets' {'state_dict': {name: tensor}}, loaded non-strictly "
        "(RUN/RobNet_free_cifar10.pth.tar)",
    ),
}
# The original tested the words in this order.
_FOLDER_WORDS = ("hydra", "admm", "msd", "robnet")
_ROBNET_KEY = re.compile(r"^(module\.)?cells\.\d+\.(_ops|preprocess[01])\.")


def checkpoint_layout(checkpoint_format: str) -> str:
    """What a file of ``checkpoint_format`` (not ``"auto"``) holds, and its file name."""
    return _layout(checkpoint_format).description


def _layout(checkpoint_format: str) -> _Layout:
    if checkpoint_format not in _LAYOUTS:
        raise ValueError(
            f"checkpoint_format must be one of {list(CHECKPOINT_FORMATS)}; got "
            f"{checkpoint_format!r}."
        )
    return _LAYOUTS[checkpoint_format]


def _check_format(checkpoint_format: str) -> None:
    if checkpoint_format != "auto":
        _layout(checkpoint_format)


def _folder_format(folder: str | os.PathLike | None) -> str | None:
    """The layout the original's convention gives the run folder ``folder``: a word in
    its name. (The original searched its whole ``--fname``; the folder's own name is
    enough for its runs, and a parent folder's name decides nothing here.)"""
    text = "" if folder is None else Path(folder).name
    for fmt in _FOLDER_WORDS:
        if _LAYOUTS[fmt].folder_word in text:
            return fmt
    return None


def find_checkpoint(
    run_folder: str | os.PathLike, checkpoint_format: str = "auto"
) -> tuple[Path, str, str]:
    """The checkpoint file of a run folder, as the original's evaluation chose it.

    Parameters
    ----------
    run_folder : path-like
        The original's ``--fname``.
    checkpoint_format : {"auto", "original", "hydra", "admm", "msd", "robnet"}
        ``"auto"``: the layout the folder's name gives by the original's convention (it
        holds ``hydra``, ``admm``, ``msd`` or ``nas``) when that file is there; else
        ``model_best.pth``; else the one checkpoint of the other layouts present.

    Returns
    -------
    path : pathlib.Path
    checkpoint_format : str
        The layout the file name stands for.
    reason : str
        Why that file, for a message.

    Raises
    ------
    FileNotFoundError
        No file of the layout (of any layout, with ``"auto"``), naming the files expected.
    ValueError
        ``"auto"`` and several layouts' files without ``model_best.pth`` or a folder name
        to choose among them; or an unknown ``checkpoint_format``.
    """
    _check_format(checkpoint_format)
    folder = Path(run_folder)

    def present(fmt: str) -> Path | None:
        return next((folder / f for f in _LAYOUTS[fmt].files if (folder / f).is_file()), None)

    if checkpoint_format != "auto":
        path = present(checkpoint_format)
        if path is None:
            files = " or ".join(repr(str(folder / f)) for f in _LAYOUTS[checkpoint_format].files)
            raise FileNotFoundError(
                f"no checkpoint at {files} (the {_LAYOUTS[checkpoint_format].label} layout's file)."
            )
        return path, checkpoint_format, "--checkpoint-format"
    word = _folder_format(run_folder)
    if word is not None and present(word) is not None:
        reason = (
            f"the run folder's name holds {_LAYOUTS[word].folder_word!r}, the original's convention"
        )
        return present(word), word, reason
    if present("original") is not None:
        return present("original"), "original", "the file name model_best.pth"
    found = [fmt for fmt in _LAYOUTS if fmt != "original" and present(fmt) is not None]
    if len(found) == 1:
        path = present(found[0])
        return path, found[0], f"the file name {path.name}, the only checkpoint in the folder"
    if found:
        names = ", ".join(present(fmt).name for fmt in found)
        raise ValueError(
            f"{str(folder)!r} holds checkpoints of several layouts ({names}): choose one with "
            f"--checkpoint-format ({', '.join(found)})."
        )
    others = [f for fmt in _LAYOUTS if fmt != "original" for f in _LAYOUTS[fmt].files]
    raise FileNotFoundError(
        f"no checkpoint at {str(folder / 'model_best.pth')!r} (nor the original's "
        f"{', '.join(others)})."
    )


def _by_file_name(path: Path) -> str | None:
    for fmt, layout in _LAYOUTS.items():
        if path.name in layout.files:
            return fmt
    return None


def _tensor_dict(data: Any) -> bool:
    return (
        isinstance(data, Mapping)
        and bool(data)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items())
    )


def _wrapped(data: Any) -> bool:
    return isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping)


def _fits(data: Any, layout: _Layout) -> bool:
    if layout.container == "wrapped":
        return _wrapped(data)
    if layout.container == "bare":
        return _tensor_dict(data)
    return True


def _has_component(key: str, component: str) -> bool:
    return component in key.split(".")


def _detect(path: Path, data: Any, folder_name: str | os.PathLike | None) -> tuple[str, str]:
    """``(format, reason)`` for ``auto``: the file's name, its keys, the folder's name."""
    fmt = _by_file_name(path)
    if fmt is not None:
        return fmt, f"auto: the file name {path.name}"
    state = data["state_dict"] if _wrapped(data) else data
    keys = [k for k in state if isinstance(k, str)] if isinstance(state, Mapping) else []
    if _tensor_dict(data) and any(_has_component(k, "basic_model") for k in keys):
        return "admm", "auto: its names carry 'basic_model.'"
    if _wrapped(data) and any(_ROBNET_KEY.match(k) for k in keys):
        return "robnet", "auto: its names are RobNet cells' (cells.N._ops...)"
    word = _folder_format(path.parent if folder_name is None else folder_name)
    if word is not None and _fits(data, _LAYOUTS[word]):
        reason = (
            f"auto: the run folder's name holds {_LAYOUTS[word].folder_word!r}, the "
            "original's convention"
        )
        return word, reason
    return "original", "auto: the default layout"


def _describe(data: Any) -> str:
    if _wrapped(data):
        return "{'state_dict': {...}}"
    if _tensor_dict(data):
        return f"a bare state dict (e.g. {sorted(data)[:2]})"
    if isinstance(data, Mapping):
        return f"a dict with keys {sorted(map(str, data))[:5]}"
    return f"a {type(data).__name__}"


def _refuse(path: Path, fmt: str, found: str) -> ValueError:
    layout = _LAYOUTS[fmt]
    return ValueError(
        f"{str(path)!r} is not in the {layout.label} layout: expected {layout.description}; "
        f"found {found}."
    )


def _drop_basic_model(state: Mapping[str, torch.Tensor], path: Path) -> dict:
    """The ADMM names without their ``basic_model`` component, as the original renamed them."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = ".".join(part for part in key.split(".") if part != "basic_model")
        if new in out:
            raise ValueError(
                f"{str(path)!r} holds both {key!r} and another entry named {new!r} once "
                "'basic_model.' is dropped: not an ADMM checkpoint."
            )
        out[new] = value
    return out


def read_checkpoint(
    path: str | os.PathLike,
    checkpoint_format: str = "auto",
    *,
    folder_name: str | os.PathLike | None = None,
    map_location: Any = "cpu",
) -> tuple[dict[str, torch.Tensor], str, str]:
    """The state dict of a checkpoint file in one of the original's layouts.

    Parameters
    ----------
    path : path-like
        The file.
    checkpoint_format : {"auto", "original", "hydra", "admm", "msd", "robnet"}
        ``"auto"`` recognises the layout by the file's name (``model_best_dense.pth``,
        ``pretrained.pt``, ...), then its names (``basic_model.``: ADMM; RobNet cells),
        then the run folder's name (the original's convention: ``hydra``, ``admm``,
        ``msd``, ``nas``), if the file's structure fits; else ``original``.
    folder_name : path-like, optional
        The run folder whose name the convention reads (the original's ``--fname``);
        default: the file's folder.
    map_location : default="cpu"
        As :func:`torch.load`.

    Returns
    -------
    state : dict of str to torch.Tensor
        With ADMM's ``basic_model`` component dropped; ``module.`` left as in the file.
    checkpoint_format : str
        The layout used.
    reason : str
        Why that layout, for a message.

    Raises
    ------
    ValueError
        The file is not a safely loadable torch file, or not of the layout (the message
        names the layout expected), or holds NaN or inf.
    """
    _check_format(checkpoint_format)
    path = Path(path)
    data = _safe_load(path, map_location)
    if checkpoint_format == "auto":
        fmt, reason = _detect(path, data, folder_name)
    else:
        fmt, reason = checkpoint_format, "--checkpoint-format"
    layout = _LAYOUTS[fmt]
    if not _fits(data, layout):
        raise _refuse(path, fmt, _describe(data))
    if layout.container == "wrapped" or (layout.container == "any" and _wrapped(data)):
        state = data["state_dict"]
    elif layout.container == "any" and isinstance(data, Mapping):
        wrapper = isinstance(data.get("model"), Mapping)  # MadryLab's robustness library
        state = _robustness_model(data["model"]) if wrapper else data
    else:
        state = data
    if not _tensor_dict(state):
        raise _refuse(path, fmt, f"no state dict ({_describe(state)})")
    if fmt == "admm":
        state = _drop_basic_model(state, path)
    elif any(_has_component(k, "basic_model") for k in state):
        raise _refuse(path, fmt, "names with a 'basic_model.' component, ADMM's layout")
    check_finite_state(state, repr(str(path)))
    return dict(state), fmt, reason


@dataclasses.dataclass
class LoadedCheckpoint:
    """What :func:`load_original_checkpoint` loaded.

    Attributes
    ----------
    model : torch.nn.Module
    path : pathlib.Path
        The file read.
    checkpoint_format : str
        Its layout.
    reason : str
        Why that layout (and file).
    missing : list of str
        Entries of the model the file lacked (``robnet`` only; they keep their values).
    """

    model: nn.Module
    path: Path
    checkpoint_format: str
    reason: str
    missing: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        """One line: the file, its layout and why; the missing entries, if any."""
        label = _LAYOUTS[self.checkpoint_format].label
        line = f"checkpoint {str(self.path)!r}: the {label} layout ({self.reason})"
        if self.missing:
            line += (
                f"; caution: {len(self.missing)} entries of the model are missing from it and "
                f"keep their initial values: {self.missing[:5]}"
                f"{' ...' if len(self.missing) > 5 else ''}"
            )
        return line


def load_checked_state(
    model: nn.Module, state: Mapping[str, torch.Tensor], checkpoint_format: str, source: str
) -> list[str]:
    """Copy ``state`` (read in ``checkpoint_format``) into ``model``, after checking it.

    Strict layouts need exactly the model's keys and shapes; ``robnet`` accepts missing
    entries (returned). Unexpected keys or other shapes are refused in every layout, with
    the layout expected in the message; the model is untouched then.
    """
    layout = _layout(checkpoint_format)
    expected = model.state_dict()
    try:
        if layout.strict:
            model.load_state_dict(check_state_dict(model, state, source))
            return []
        state = _match_prefix(dict(state), expected)
        unexpected = sorted(set(state) - set(expected))
        mismatched = [
            f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
            for k, v in state.items()
            if k in expected and v.shape != expected[k].shape
        ]
        if unexpected or mismatched:
            parts = []
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
            if mismatched:
                parts.append(f"{len(mismatched)} of another shape (e.g. {mismatched[:2]})")
            raise ValueError(
                f"{source} does not fit {type(model).__name__}: keys {'; '.join(parts)}."
            )
    except ValueError as exc:
        raise ValueError(
            f"{exc} Read as the {layout.label} layout: {layout.description}."
        ) from None
    missing = [k for k in expected if k not in state]
    model.load_state_dict(state, strict=False)
    return missing


def load_original_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    checkpoint_format: str = "auto",
    *,
    map_location: Any = "cpu",
) -> LoadedCheckpoint:
    """Load a checkpoint of one of the original work's layouts into ``model`` (in place).

    Parameters
    ----------
    model : torch.nn.Module
        The architecture (e.g. ``ARCHITECTURES["vgg16_bn"]()`` for HYDRA's VGG-16,
        ``PreActResNet18_ADMM()``, ``RobNetFree()``), with or without ``nn.DataParallel``.
    path : path-like
        The checkpoint file, or a run folder: then the file is found as the original
        found it (:func:`find_checkpoint`).
    checkpoint_format : {"auto", "original", "hydra", "admm", "msd", "robnet"}
        See :func:`read_checkpoint`.
    map_location : default="cpu"

    Returns
    -------
    LoadedCheckpoint
        The model, the file, the layout used and why, missing entries (``robnet``);
        ``.summary()`` says it in one line.

    Raises
    ------
    FileNotFoundError
        A run folder without the layout's file.
    ValueError
        The file is not of the layout, or does not fit ``model`` (the message names the
        layout expected); ``model`` is untouched then.
    """
    path = Path(path)
    folder_reason = None
    if path.is_dir():
        folder = path
        path, checkpoint_format, folder_reason = find_checkpoint(folder, checkpoint_format)
        state, fmt, reason = read_checkpoint(
            path, checkpoint_format, folder_name=folder, map_location=map_location
        )
        reason = f"auto: {folder_reason}" if folder_reason != "--checkpoint-format" else reason
    else:
        state, fmt, reason = read_checkpoint(path, checkpoint_format, map_location=map_location)
    missing = load_checked_state(model, state, fmt, repr(str(path)))
    return LoadedCheckpoint(model, path, fmt, reason, missing)
