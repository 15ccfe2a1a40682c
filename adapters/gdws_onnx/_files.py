"""Reading and writing ONNX files: clear errors in, atomic writes out."""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from gdws_approx.files import atomic_output

__all__ = ["load_model", "save_model"]


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """The ONNX model in ``path`` (external data loaded), checked by ``onnx.checker``.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    ValueError
        The file is not a valid ONNX model (the message says what is wrong).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX file at {str(path)!r}.")
    try:
        model = onnx.load_model(path)
    except OSError:
        raise
    except Exception as exc:  # DecodeError, a text-format parse error, ...
        raise ValueError(
            f"{str(path)!r} is not an ONNX model (it does not parse as an onnx.ModelProto: "
            f"{_first_line(exc)})."
        ) from None
    check_model(model, what=repr(str(path)))
    return model


def check_model(model: onnx.ModelProto, what: str = "the model") -> None:
    """``onnx.checker.check_model``, its failure as a one-line ``ValueError``."""
    if not isinstance(model, onnx.ModelProto):
        raise TypeError(f"model must be an onnx.ModelProto; got {type(model).__name__}.")
    if not model.graph.node:
        raise ValueError(f"{what} is not an ONNX model with a graph: it has no node.")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ValueError(f"{what} is not a valid ONNX model: {_first_line(exc)}") from None


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write ``model`` to ``path`` through a temporary file in the same folder and a rename.

    The format follows the extension, as ``onnx.save_model`` (binary protobuf for
    ``.onnx`` and unknown extensions). A reader never sees a half-written file; on an
    error nothing is left behind.
    """
    path = Path(path)
    with atomic_output(path) as temporary:
        onnx.save_model(model, temporary)
    return path


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
