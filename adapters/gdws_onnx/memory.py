"""How much memory a run of a model needs, checked before the run starts."""

from __future__ import annotations

import heapq
import math
import os
from collections.abc import Mapping, Sequence

import onnx
from onnx import helper

from gdws_onnx.graph import data_inputs, inferred_graph, input_dims

__all__ = ["available_memory", "check_memory", "memory_needed"]

GIB = 2**30


def _itemsize(elem_type: int) -> int | None:
    try:
        return helper.tensor_dtype_to_np_dtype(elem_type).itemsize
    except (KeyError, TypeError, ValueError):
        return None


def _value_bytes(vi: onnx.ValueInfoProto) -> int | None:
    """Bytes of a value at batch size 1, ``None`` when its type or a dimension is unknown."""
    if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return None
    dims = vi.type.tensor_type.shape.dim
    if not all(d.HasField("dim_value") and d.dim_value >= 0 for d in dims):
        return None
    itemsize = _itemsize(vi.type.tensor_type.elem_type)
    return None if itemsize is None else itemsize * math.prod(d.dim_value for d in dims)


def memory_needed(
    model: onnx.ModelProto,
    input_shape: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
    batch_size: int = 1,
) -> int:
    """A lower bound on the bytes one run of ``model`` needs.

    The weights, plus ``batch_size`` times the data inputs and the two largest other
    values of the graph (an operator's input and output exist together), their shapes
    from ONNX shape inference at ``input_shape``. Values of unknown shape count nothing;
    when shape inference fails, only the weights and inputs count.

    Parameters
    ----------
    model : onnx.ModelProto
    input_shape : sequence of int or mapping of str to sequence of int, optional
        One sample's shape (no batch dimension), or one per input by name.
    batch_size : int, default=1

    Returns
    -------
    int
        Bytes.
    """
    weights = sum(
        (_itemsize(t.data_type) or 0) * math.prod(t.dims) for t in model.graph.initializer
    )
    inputs = 0
    dims_by_name = input_dims(model, input_shape)
    for vi in data_inputs(model):
        dims = dims_by_name.get(vi.name)
        itemsize = _itemsize(vi.type.tensor_type.elem_type)
        if dims is not None and None not in dims[1:] and itemsize is not None:
            inputs += itemsize * math.prod(dims[1:])
    try:
        graph = inferred_graph(model, input_shape)
    except ValueError:
        return weights + batch_size * inputs
    names = {vi.name for vi in data_inputs(model)}
    sizes = [_value_bytes(vi) for vi in (*graph.value_info, *graph.output) if vi.name not in names]
    largest = heapq.nlargest(2, (size for size in sizes if size is not None))
    return weights + batch_size * (inputs + sum(largest))


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation, ``None`` when unknown.

    ``MemAvailable`` of ``/proc/meminfo`` (Linux), else the free physical pages that
    ``os.sysconf`` reports.
    """
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def check_memory(
    model: onnx.ModelProto,
    input_shape: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
    batch_size: int = 1,
    what: str = "run the model",
) -> None:
    """Refuse a run that needs more memory than is available, before it starts.

    Parameters
    ----------
    model : onnx.ModelProto
    input_shape : sequence of int or mapping of str to sequence of int, optional
    batch_size : int, default=1
    what : str
        What the run is for, in the message.

    Raises
    ------
    ValueError
        :func:`memory_needed` exceeds :func:`available_memory`; the message gives both.
    """
    needed = memory_needed(model, input_shape, batch_size)
    available = available_memory()
    if available is not None and needed > available:
        shape = "the model's input shape" if input_shape is None else f"input_shape {input_shape}"
        raise ValueError(
            f"{shape} needs about {needed / GIB:.3g} GiB of memory to {what} (batch "
            f"{batch_size}), more than the {available / GIB:.3g} GiB available; give a "
            "smaller input_shape."
        )
