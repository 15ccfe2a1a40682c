"""Files users already have, and ours: checkpoints, noise-gain files, converted models.

Everything is loaded with ``torch.load(..., weights_only=True)``: a file that needs
arbitrary unpickling (pickled classes or functions) is refused, never executed. Every
write goes through a temporary file in the destination folder and an atomic rename.
"""

from __future__ import annotations

import copy
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gdws_approx.files import atomic_output
from gdws_torch.nn.layers import GDWSConv2d
from gdws_torch.nn.lowrank import LowRankConv2d
from gdws_torch.nn.module_tree import replace_module
from gdws_torch.nn.planned import compressed_layers

__all__ = [
    "CONVERTED_FORMAT",
    "check_finite_state",
    "load_channel_weights",
    "load_checkpoint",
    "load_converted",
    "load_state_dict_file",
    "save_channel_weights",
    "save_checkpoint",
    "save_converted",
]

CONVERTED_FORMAT = "gdws-approx/converted-model"
CONVERTED_VERSION = 1


def _safe_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a directory, not a torch checkpoint file.")
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {str(path)!r}.")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise ValueError(f"{str(path)!r} cannot be read: {exc.strerror or exc}.") from None
    if not head:
        raise ValueError(f"{str(path)!r} is not a torch checkpoint (empty file).")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except MemoryError:
        raise
    except Exception as exc:  # junk makes torch.load raise almost anything
        raise _unreadable(path, head, exc) from None


def _unreadable(path: Path, head: bytes, exc: Exception) -> ValueError:
    """Why ``torch.load`` failed on ``path``, which starts with the bytes ``head``."""
    first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
    # torch writes zip archives, or (before 1.6) pickles: 0x80 then the protocol, 2 to 5.
    is_pickle = len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5
    if not (head.startswith(b"PK\x03\x04") or is_pickle):
        return ValueError(
            f"{str(path)!r} is not a torch checkpoint (not a zip or pickle file; it starts "
            f"with {head!r})."
        )
    if isinstance(exc, pickle.UnpicklingError):
        return ValueError(
            f"{str(path)!r} cannot be loaded safely: it needs arbitrary unpickling "
            f"({first_line}), which could run code from the file. Re-save it as a plain "
            "state dict: torch.save(model.state_dict(), path)."
        )
    return ValueError(
        f"{str(path)!r} is not a readable torch checkpoint (truncated or another format): "
        f"{first_line}"
    )


def _save_atomic(obj: Any, path: str | os.PathLike) -> None:
    with atomic_output(path) as temporary:
        torch.save(obj, temporary)


def _robustness_model(state: Mapping) -> Mapping:
    """The network's entries of a MadryLab ``robustness`` checkpoint's ``'model'`` dict.

    Its ``AttackerModel`` (under ``nn.DataParallel``) holds ``module.model.*`` (the
    network), ``module.normalizer.*`` (the input normalisation) and ``module.attacker.*``
    (a second reference to the network and normaliser). Anything else is left as it is.
    """
    if not state or not all(isinstance(k, str) for k in state):
        return state
    wrapped = all(k.startswith("module.") for k in state)
    inner = {k.removeprefix("module.") if wrapped else k: v for k, v in state.items()}
    tops = {k.split(".", 1)[0] for k in inner}
    if "model" not in tops or not tops <= {"model", "normalizer", "attacker"}:
        return state
    return {k.removeprefix("model."): v for k, v in inner.items() if k.startswith("model.")}


def load_state_dict_file(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """The state dict stored in ``path``.

    Accepted layouts: ``{'state_dict': {name: tensor}}``, a bare ``{name: tensor}``, and
    ``{'model': {name: tensor}, ...}``. In the last, a MadryLab ``robustness`` checkpoint's
    keys (``module.model.*`` for the network, ``module.normalizer.*`` and
    ``module.attacker.*`` beside it) are reduced to the network's, without the prefix:
    normalisation is applied by :func:`gdws_torch.normalized` instead.

    Parameters
    ----------
    path : path-like
    map_location : default="cpu"
        As :func:`torch.load`.

    Returns
    -------
    dict of str to torch.Tensor
    """
    data = _safe_load(path, map_location)
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    elif isinstance(data, Mapping) and isinstance(data.get("model"), Mapping):
        data = _robustness_model(data["model"])
    if (
        not isinstance(data, Mapping)
        or not data
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items())
    ):
        kind = type(data).__name__
        keys = sorted(data)[:5] if isinstance(data, Mapping) else []
        raise ValueError(
            f"{str(path)!r} holds no state dict: expected {{'state_dict': {{name: tensor}}}}, "
            f"{{'model': {{name: tensor}}}} or {{name: tensor}}; got a {kind} with keys {keys}."
        )
    check_finite_state(data, repr(str(path)))
    return dict(data)


def check_finite_state(state: Mapping[str, Any], source: str) -> None:
    """Refuse a state dict whose floating-point tensors hold NaN or inf.

    Such weights (a diverged training run, a corrupted file) give meaningless outputs
    without any error: a network evaluated with them scores chance accuracy.

    Parameters
    ----------
    state : mapping of str to torch.Tensor
        Entries that are not floating-point (or complex) tensors are not checked.
    source : str
        Where the state comes from (e.g. the file's name), for the message.

    Raises
    ------
    ValueError
        Naming ``source``, how many tensors are not finite and the first of their keys.
    """
    bad = [
        str(key)
        for key, value in state.items()
        if isinstance(value, torch.Tensor)
        and (value.is_floating_point() or value.is_complex())
        and not value.is_meta
        and not bool(torch.isfinite(value).all())
    ]
    if bad:
        raise ValueError(
            f"{source} holds NaN or inf values in {len(bad)} tensor(s), e.g. {bad[:3]}: these "
            "weights are not usable (did the training diverge?)."
        )


def _match_prefix(state: dict, expected: Mapping) -> dict:
    """Add or strip the ``module.`` prefix of DataParallel so the keys match the model's."""
    if set(state) == set(expected):
        return state
    model_wrapped = all(k.startswith("module.") for k in expected)
    file_wrapped = all(k.startswith("module.") for k in state)
    if file_wrapped and not model_wrapped:
        return {k.removeprefix("module."): v for k, v in state.items()}
    if model_wrapped and not file_wrapped:
        return {f"module.{k}": v for k, v in state.items()}
    return state


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> dict:
    """``state`` with keys matched to ``model``'s; a clear error when they cannot match.

    Checks keys and shapes before anything is copied, so a failed load leaves the model
    untouched (``nn.Module.load_state_dict`` copies the matching tensors before raising).
    Tensors holding NaN or inf are refused (:func:`check_finite_state`).
    """
    expected = model.state_dict()
    state = _match_prefix(dict(state), expected)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if mismatched:
            parts.append(f"{len(mismatched)} of another shape (e.g. {mismatched[:2]})")
        raise ValueError(
            f"{source} does not fit {type(model).__name__}: keys {'; '.join(parts)}. Is it a "
            "checkpoint of this architecture (and number of classes)?"
        )
    check_finite_state(state, source)
    return state


def load_checkpoint(
    model: nn.Module, path: str | os.PathLike, map_location: Any = "cpu"
) -> nn.Module:
    """Load a checkpoint file into ``model`` (in place) and return it.

    Accepts ``{'state_dict': ...}`` or a bare state dict, with or without the
    ``module.`` prefix of ``nn.DataParallel``. Loaded with ``weights_only=True``.

    Raises
    ------
    ValueError
        The file is empty or not a torch file, needs unpickling, holds no state dict,
        holds NaN or inf weights, or its keys or shapes do not fit the model (the message
        lists them); the model is untouched then.
    """
    state = check_state_dict(model, load_state_dict_file(path, map_location), repr(str(path)))
    model.load_state_dict(state)
    return model


def save_checkpoint(path: str | os.PathLike, model: nn.Module, **metadata: Any) -> None:
    """Save ``{'state_dict': ..., **metadata}`` atomically (the original's checkpoint layout).

    ``metadata`` holds plain Python values only, so :func:`load_checkpoint` reads the file
    with ``weights_only=True``.
    """
    if "state_dict" in metadata:
        raise ValueError("metadata cannot use the key 'state_dict'.")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    _save_atomic({"state_dict": state, **metadata}, path)


def load_channel_weights(
    path: str | os.PathLike, map_location: Any = "cpu"
) -> dict[str, torch.Tensor]:
    """Channel weights from a file of the original's alphas format
    (``{'noise_gains': {name: tensor}}``).

    Returns
    -------
    dict of str to torch.Tensor
        ``{parameter name: tensor(C)}``: the ``channel_weights`` of
        :class:`gdws_torch.ErrorWeights` (the paper's alpha).
    """
    data = _safe_load(path, map_location)
    gains = data.get("noise_gains") if isinstance(data, Mapping) else None
    if not isinstance(gains, Mapping) or not gains:
        keys = sorted(data)[:5] if isinstance(data, Mapping) else type(data).__name__
        raise ValueError(
            f"{str(path)!r} is not a noise-gain file: expected {{'noise_gains': {{parameter "
            f"name: tensor(C)}}, ...}}; found {keys}."
        )
    out = {}
    for name, value in gains.items():
        if not isinstance(value, torch.Tensor) or value.ndim != 1:
            raise ValueError(
                f"{str(path)!r}: noise_gains[{name!r}] must be a 1-D tensor (one value per "
                f"input channel); got {type(value).__name__} "
                f"{tuple(getattr(value, 'shape', ()))}."
            )
        if value.is_complex() or value.dtype == torch.bool:
            raise ValueError(
                f"{str(path)!r}: noise_gains[{name!r}] must hold real numbers; got dtype "
                f"{value.dtype}."
            )
        if not bool(torch.isfinite(value).all()) or bool((value < 0).any()):
            raise ValueError(f"{str(path)!r}: noise_gains[{name!r}] must be finite and >= 0.")
        out[str(name)] = value
    return out


def save_channel_weights(
    path: str | os.PathLike, noise_gains: Mapping[str, torch.Tensor], **metadata: Any
) -> None:
    """Save channel weights (e.g. noise gains) in the original's alphas format, atomically.

    Parameters
    ----------
    path : path-like
    noise_gains : mapping of str to torch.Tensor
        ``{parameter name: tensor(C)}``.
    **metadata
        Stored beside ``'noise_gains'`` (the original stored ``attack``,
        ``attack-iters``, ``epsilon``, ``sample_size``): plain Python values only.
    """
    if "noise_gains" in metadata:
        raise ValueError("metadata cannot use the key 'noise_gains'.")
    gains = {}
    for name, value in noise_gains.items():
        value = torch.as_tensor(value)
        if value.ndim != 1:
            raise ValueError(f"noise_gains[{name!r}] must be 1-D; got shape {tuple(value.shape)}.")
        gains[str(name)] = value.detach().cpu().clone()
    _save_atomic({"noise_gains": gains, **metadata}, path)


def save_converted(
    path: str | os.PathLike, model: nn.Module, report: Any = None, **metadata: Any
) -> None:
    """Save a converted model (which layers are GDWS or low-rank, their structure, all
    weights).

    Only tensors and plain Python values are stored, so :func:`load_converted` reads it
    with ``weights_only=True``; the architecture itself is not pickled: load it into a
    fresh instance of the model's class.

    Parameters
    ----------
    path : path-like
    model : torch.nn.Module
        A model converted by :func:`gdws_torch.convert` (or holding GDWSConv2d layers).
    report : gdws_approx.NetworkPlan, optional
        Stored as ``report.to_dict()``.
    **metadata
        Plain Python values stored under ``'metadata'``.
    """
    layers = compressed_layers(model)
    data = {
        "format": CONVERTED_FORMAT,
        "version": CONVERTED_VERSION,
        "architecture": type(model).__name__,
        "gdws_layers": {n: m.config() for n, m in layers if isinstance(m, GDWSConv2d)},
        "lowrank_layers": {n: m.config() for n, m in layers if isinstance(m, LowRankConv2d)},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "report": None if report is None else report.to_dict(),
        "metadata": metadata,
    }
    _save_atomic(data, path)


def load_converted(
    path: str | os.PathLike, model: nn.Module, map_location: Any = "cpu", inplace: bool = False
) -> tuple[nn.Module, dict]:
    """Rebuild a model saved by :func:`save_converted` without refitting.

    Parameters
    ----------
    path : path-like
    model : torch.nn.Module
        A fresh (dense) instance of the saved model's architecture. Copied unless
        ``inplace=True``; untouched when loading fails.
    map_location : default="cpu"
    inplace : bool, default=False

    Returns
    -------
    model : torch.nn.Module
        With the saved GDWS layers and weights.
    info : dict
        ``{'report': ..., 'metadata': ..., 'architecture': ...}`` as saved.
    """
    data = _safe_load(path, map_location)
    if not isinstance(data, Mapping) or data.get("format") != CONVERTED_FORMAT:
        raise ValueError(
            f"{str(path)!r} is not a converted model saved by gdws_torch.save_converted "
            "(no 'format' entry); for a plain checkpoint use load_checkpoint."
        )
    if data.get("version") != CONVERTED_VERSION:
        raise ValueError(
            f"{str(path)!r} has converted-model format version {data.get('version')!r}; this "
            f"gdws-approx reads version {CONVERTED_VERSION}."
        )
    # Build and check everything on a copy, so a failure leaves ``model`` untouched.
    target = copy.deepcopy(model)
    modules = dict(target.named_modules())
    built = {}
    configs = [(GDWSConv2d, name, c) for name, c in data["gdws_layers"].items()]
    configs += [(LowRankConv2d, name, c) for name, c in data.get("lowrank_layers", {}).items()]
    for cls, name, config in configs:
        conv = modules.get(name)
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
            raise ValueError(
                f"{str(path)!r} replaces layer {name!r}, which is not a groups=1 nn.Conv2d in "
                f"{type(model).__name__} (found {type(conv).__name__}); is this the "
                f"architecture it was saved from ({data.get('architecture')!r})?"
            )
        shape = (config["out_channels"], config["in_channels"], *config["kernel_size"])
        if tuple(conv.weight.shape) != shape:
            raise ValueError(
                f"{str(path)!r}: layer {name!r} was {shape} when saved, here "
                f"{tuple(conv.weight.shape)}."
            )
        config = {**config, "kernel_size": tuple(config["kernel_size"])}
        built[name] = cls(**config, device=conv.weight.device, dtype=conv.weight.dtype)
        built[name].train(conv.training)
        replace_module(target, name, built[name])
    state = check_state_dict(target, data["state_dict"], repr(str(path)))
    target.load_state_dict(state)
    if inplace:
        for name, layer in built.items():
            replace_module(model, name, layer)
        model.load_state_dict(state)
        target = model
    info = {k: data.get(k) for k in ("report", "metadata", "architecture")}
    return target, info
