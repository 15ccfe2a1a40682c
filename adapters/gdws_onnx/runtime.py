"""Run models in onnxruntime and compare their outputs."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper

from gdws_approx.checks import check_integer
from gdws_onnx._files import load_model
from gdws_onnx.graph import data_inputs, input_dims
from gdws_onnx.memory import check_memory

__all__ = ["check", "compare_outputs", "random_inputs", "run"]


def check(
    original: onnx.ModelProto | str | os.PathLike,
    rewritten: onnx.ModelProto | str | os.PathLike,
    n_inputs: int = 2,
    seed: int = 0,
    input_shape: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
) -> dict[str, Any]:
    """Run both models in onnxruntime (CPU) on the same random inputs; compare outputs.

    Parameters
    ----------
    original, rewritten : onnx.ModelProto or path
        Two models with the same inputs and outputs (names).
    n_inputs : int, default=2
        Random samples: the batch size fed where the batch dimension is dynamic.
    seed : int, default=0
        Seed of the inputs (standard normal for float inputs, 0/1 for integer ones).
    input_shape : sequence of int or mapping of str to sequence of int, optional
        One sample's shape (no batch dimension), or one per input by name; needed for
        dynamic dimensions other than the batch. A shape whose run would need more memory
        than is available is refused before anything runs.

    Returns
    -------
    dict
        ``{"n_inputs", "seed", "inputs": {name: shape}, "outputs": {name: {"shape",
        "max_abs_diff", "max_rel_diff"}}, "max_abs_diff", "max_rel_diff"}``. The relative
        difference of an output is its largest absolute difference divided by the largest
        absolute value of the original's output.
    """
    original = _as_model(original, "original")
    rewritten = _as_model(rewritten, "rewritten")
    check_integer(n_inputs, "n_inputs", minimum=1)
    for model in (original, rewritten):
        check_memory(model, input_shape, n_inputs, "compare the models in onnxruntime")
    feeds = random_inputs(original, n_inputs=n_inputs, seed=seed, input_shape=input_shape)
    expected = run(original, feeds, "the original model")
    got = run(rewritten, feeds, "the rewritten model")
    if list(expected) != list(got):
        raise ValueError(
            f"the models have different outputs: {list(expected)} and {list(got)}; "
            "compare a model with its own rewrite."
        )
    result = compare_outputs(expected, got)
    return {
        "n_inputs": n_inputs,
        "seed": seed,
        "inputs": {name: list(x.shape) for name, x in feeds.items()},
        **result,
    }


def compare_outputs(
    expected: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]
) -> dict[str, Any]:
    """Largest absolute and relative (to the largest expected value) differences."""
    outputs = {}
    for name, reference in expected.items():
        reference = np.asarray(reference, dtype=np.float64)
        value = np.asarray(got[name], dtype=np.float64)
        if reference.shape != value.shape:
            raise ValueError(
                f"output {name!r} has shape {value.shape}, expected {reference.shape}."
            )
        diff = float(np.max(np.abs(reference - value))) if reference.size else 0.0
        scale = float(np.max(np.abs(reference))) if reference.size else 0.0
        if scale > 0:
            relative = diff / scale
        else:
            relative = 0.0 if diff == 0 else math.inf
        outputs[name] = {
            "shape": list(reference.shape),
            "max_abs_diff": diff,
            "max_rel_diff": relative,
        }
    return {
        "outputs": outputs,
        "max_abs_diff": max((o["max_abs_diff"] for o in outputs.values()), default=0.0),
        "max_rel_diff": max((o["max_rel_diff"] for o in outputs.values()), default=0.0),
    }


def random_inputs(
    model: onnx.ModelProto,
    n_inputs: int = 2,
    seed: int = 0,
    input_shape: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
) -> dict[str, np.ndarray]:
    """Seeded random arrays for every graph input of ``model``."""
    check_integer(n_inputs, "n_inputs", minimum=1)
    rng = np.random.default_rng(seed)
    dims_by_name = input_dims(model, input_shape)
    feeds = {}
    for vi in data_inputs(model):
        dims = dims_by_name[vi.name]
        if not vi.type.HasField("tensor_type") or dims is None:
            raise ValueError(
                f"input {vi.name!r} has no known shape: give input_shape (one sample's shape)."
            )
        shape = [n_inputs if i == 0 and d is None else d for i, d in enumerate(dims)]
        if None in shape:
            raise ValueError(
                f"input {vi.name!r} has dynamic dimensions {_show(dims)} besides the batch: "
                "give input_shape (one sample's shape without the batch dimension)."
            )
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
        if np.issubdtype(dtype, np.floating):
            value = rng.standard_normal(shape).astype(dtype)
        elif np.issubdtype(dtype, np.integer):
            value = rng.integers(0, 2, size=shape).astype(dtype)
        elif dtype == np.bool_:
            value = rng.random(shape) < 0.5
        else:
            raise ValueError(f"input {vi.name!r} has type {dtype}: no random input for it.")
        feeds[vi.name] = value
    return feeds


def run(
    model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], what: str = "the model"
) -> dict[str, np.ndarray]:
    """``{output name: array}`` of ``model`` on ``feeds``, onnxruntime on the CPU.

    An onnxruntime failure (an operator or type it does not implement, ...) is a
    one-line ``ValueError`` naming ``what``.
    """
    ort = _onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    try:
        session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        names = [o.name for o in session.get_outputs()]
        values = session.run(names, dict(feeds))
    except Exception as exc:  # onnxruntime's error types (Fail, NotImplemented, ...)
        message = " ".join(str(exc).split())
        raise ValueError(f"onnxruntime cannot run {what}: {message}") from None
    return dict(zip(names, values, strict=True))


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ModuleNotFoundError(
            "comparing models needs onnxruntime: pip install onnxruntime (or gdws-approx[onnx])."
        ) from None
    return onnxruntime


def _as_model(model: Any, what: str) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (str, os.PathLike)):
        return load_model(model)
    raise TypeError(f"{what} must be an onnx.ModelProto or a path; got {type(model).__name__}.")


def _show(dims: list[int | None]) -> tuple:
    return tuple("?" if d is None else d for d in dims)
