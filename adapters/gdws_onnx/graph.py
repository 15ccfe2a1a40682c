"""What the rewrite needs to know about an ONNX graph: its Conv nodes, shapes and names.

Over 400 lines because ONNX leaves much to check by hand: shape inference with dynamic
dimensions, initializers vs constant nodes, subgraphs, name clashes. Each check is small;
splitting them would scatter one reading of the graph.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

__all__ = ["ConvNode", "conv_nodes"]

# Weight types the rewrite handles; the factors are written back in the same type.
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16)

Shape = tuple  # of int or None (unknown / symbolic dimension)


@dataclass(frozen=True)
class ConvNode:
    """One ``Conv`` node of a graph's top level, as :func:`conv_nodes` sees it.

    Attributes
    ----------
    name : str
        The name used in reports, ``exclude``, ``channel_weights`` and ``n_kernels``: the
        node's name, or ``"Conv:<weight initializer name>"`` for an unnamed node (``#2``,
        ``#3``, ... appended when names repeat).
    index : int
        Position in ``graph.node``.
    node_name : str
        The node's own name (may be empty).
    weight, bias : str
        Names of the weight and bias inputs (``bias`` empty when the conv has none).
    weight_shape : tuple or None
        ``(M, C / group, *kernel)`` when known.
    group : int
    output_pixels : int or None
        Output positions per sample (product of the output's spatial dims), when known.
    macs : int or None
        MACs per sample, ``M * (C / group) * prod(kernel) * output_pixels``, when known.
    eligible : bool
        Whether the rewrite plans it.
    reason : str
        Why it is left alone (empty when eligible).
    """

    name: str
    index: int
    node_name: str
    weight: str
    bias: str
    weight_shape: Shape | None
    group: int
    output_pixels: int | None
    macs: int | None
    eligible: bool
    reason: str


def conv_nodes(
    model: onnx.ModelProto,
    *,
    input_shape: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
    skip_first: bool = True,
    exclude: Iterable[str] = (),
) -> list[ConvNode]:
    """Every ``Conv`` node of the model's main graph, eligible or not, in graph order.

    Eligible: a 2-D ``Conv`` with ``group=1``, a kernel larger than ``1 x 1``, a weight
    (and bias, if any) stored as a constant initializer of type float16, float32 or
    float64; not the network's first convolution when ``skip_first`` (the first ``Conv``
    in topological order whose data input depends on a graph input); not in ``exclude``.

    Parameters
    ----------
    model : onnx.ModelProto
        Not modified.
    input_shape : sequence of int or mapping of str to sequence of int, optional
        One sample's shape (no batch dimension) of the graph input, or of each input by
        name; fixes dynamic dimensions for shape inference. The batch dimension is 1.
    skip_first : bool, default=True
    exclude : iterable of str, default=()
        Conv names (:attr:`ConvNode.name`, the node name or the weight initializer name).

    Returns
    -------
    list of ConvNode
    """
    if not isinstance(model, onnx.ModelProto):
        raise TypeError(f"model must be an onnx.ModelProto; got {type(model).__name__}.")
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    input_names = {vi.name for vi in graph.input}
    constants = {name for name in initializers if name not in input_names}
    shapes = value_shapes(model, input_shape)
    first = first_conv_index(model) if skip_first else None

    found = [(i, node) for i, node in enumerate(graph.node) if is_conv(node)]
    unknown = [n.output[0] for _, n in found if not _spatial_known(shapes.get(n.output[0]))]
    if unknown:  # shape inference gave up somewhere: measure them in onnxruntime
        shapes.update(runtime_shapes(model, input_shape, unknown))
    names = _report_names([node for _, node in found])
    excluded = _check_exclude(exclude, found, names)
    convs = []
    for (index, node), name in zip(found, names, strict=True):
        weight = node.input[1] if len(node.input) > 1 else ""
        bias = node.input[2] if len(node.input) > 2 else ""
        group = _int_attribute(node, "group", 1)
        weight_shape = shapes.get(weight)
        out_shape = shapes.get(node.output[0])
        pixels = None
        if out_shape is not None and len(out_shape) > 2 and None not in out_shape[2:]:
            pixels = math.prod(out_shape[2:])
        macs = None
        if pixels is not None and weight_shape is not None and None not in weight_shape:
            macs = math.prod(weight_shape) * pixels
        reason = _ineligibility(node, weight, bias, weight_shape, group, initializers, constants)
        if not reason and index == first:
            reason = "the network's first convolution (skip_first)"
        if not reason and name in excluded:
            reason = "excluded"
        convs.append(
            ConvNode(
                name=name,
                index=index,
                node_name=node.name,
                weight=weight,
                bias=bias,
                weight_shape=weight_shape,
                group=group,
                output_pixels=pixels,
                macs=macs,
                eligible=not reason,
                reason=reason,
            )
        )
    return convs


def is_conv(node: onnx.NodeProto) -> bool:
    return node.op_type == "Conv" and node.domain in ("", "ai.onnx")


def _int_attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    for attribute in node.attribute:
        if attribute.name == name:
            return int(onnx.helper.get_attribute_value(attribute))
    return default


def _ineligibility(node, weight, bias, weight_shape, group, initializers, constants) -> str:
    if weight in initializers and weight not in constants:
        return (
            "weight is an initializer listed in graph.input (a caller may override it), "
            "not a constant"
        )
    if weight not in constants:
        return "weight is not a constant initializer"
    if weight_shape is None or len(weight_shape) != 4:
        rank = "?" if weight_shape is None else len(weight_shape) - 2
        return f"{rank}-D convolution (only 2-D ones are rewritten)"
    if group != 1:
        return f"grouped convolution (group={group})"
    if tuple(weight_shape[2:]) == (1, 1):
        return "1x1 kernel"
    if bias and bias not in constants:
        return "bias is not a constant initializer"
    data_type = initializers[weight].data_type
    if data_type not in FLOAT_TYPES:
        type_name = TensorProto.DataType.Name(data_type)
        return f"weight type {type_name} (float16, float32 and float64 are rewritten)"
    if bias and initializers[bias].data_type != data_type:
        return "bias and weight types differ"
    return ""


def _report_names(nodes: list[onnx.NodeProto]) -> list[str]:
    """Stable, distinct names: the node's name, or one made from its weight's name."""
    names: list[str] = []
    taken: set[str] = set()
    for node in nodes:
        base = node.name or f"Conv:{node.input[1] if len(node.input) > 1 else ''}"
        name, k = base, 1
        while name in taken:
            k += 1
            name = f"{base}#{k}"
        taken.add(name)
        names.append(name)
    return names


def _check_exclude(exclude: Iterable[str], found, names: list[str]) -> set[str]:
    """The report names of the convs that ``exclude`` names (node or weight name too)."""
    if isinstance(exclude, str):
        raise TypeError(f"exclude must be an iterable of conv names, not a string: {exclude!r}.")
    wanted = set(exclude)
    chosen, matched = set(), set()
    for (_, node), name in zip(found, names, strict=True):
        weight = node.input[1] if len(node.input) > 1 else ""
        hits = wanted & ({name, node.name, weight} - {""})
        if hits:
            chosen.add(name)
            matched |= hits
    unknown = sorted(wanted - matched)
    if unknown:
        raise ValueError(
            f"exclude: no Conv named {unknown} in the model; its convs are "
            f"{names[:8]}{' ...' if len(names) > 8 else ''}."
        )
    return chosen


def first_conv_index(model: onnx.ModelProto) -> int | None:
    """Index of the first ``Conv`` whose data input depends on a graph input, or ``None``."""
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    live = {vi.name for vi in graph.input if vi.name not in initializers}
    for index, node in enumerate(graph.node):
        if not any(name in live for name in node.input if name):
            continue
        if is_conv(node) and node.input[0] in live:
            return index
        live.update(name for name in node.output if name)
    return None


# -- shapes -------------------------------------------------------------------------------


def data_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs that are not initializers (what a caller feeds)."""
    initializers = {t.name for t in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in initializers]


def input_dims(
    model: onnx.ModelProto, input_shape: Sequence[int] | Mapping[str, Sequence[int]] | None
) -> dict[str, list[int | None] | None]:
    """Each data input's dimensions: static ones, ``input_shape`` for the others.

    The first dimension is the batch: its static size, else ``None``. ``None`` for any
    other dimension that is neither static nor given; ``None`` instead of a list when the
    rank is unknown and no shape is given.
    """
    inputs = data_inputs(model)
    given = _check_input_shape(input_shape, inputs)
    dims_by_name: dict[str, list[int | None] | None] = {}
    for vi in inputs:
        tensor = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
        has_shape = tensor is not None and tensor.HasField("shape")
        static = [_dim_value(d) for d in tensor.shape.dim] if has_shape else None
        shape = given.get(vi.name)
        if shape is None:
            dims_by_name[vi.name] = static
            continue
        if static is not None and len(static) != len(shape) + 1:
            raise ValueError(
                f"input_shape {tuple(shape)} does not fit input {vi.name!r}: it has "
                f"{len(static)} dimensions (batch first), so give {len(static) - 1} sizes "
                "without the batch."
            )
        if static is None:
            static = [None] * (len(shape) + 1)
        for i, size in enumerate(shape, start=1):
            if static[i] is not None and static[i] != size:
                declared = tuple("?" if d is None else d for d in static[1:])
                raise ValueError(
                    f"input_shape {tuple(shape)} contradicts input {vi.name!r}, whose shape "
                    f"is fixed by the model: {declared} (batch excluded)."
                )
            static[i] = size
        dims_by_name[vi.name] = static
    return dims_by_name


def _dim_value(dim: Any) -> int | None:
    return int(dim.dim_value) if dim.HasField("dim_value") and dim.dim_value > 0 else None


def _check_input_shape(input_shape: Any, inputs: list[onnx.ValueInfoProto]) -> dict:
    if input_shape is None:
        return {}
    names = [vi.name for vi in inputs]
    if isinstance(input_shape, Mapping):
        unknown = sorted(set(input_shape) - set(names))
        if unknown:
            raise ValueError(f"input_shape names no graph input {unknown}; inputs: {names}.")
        given = dict(input_shape)
    else:
        if len(names) != 1:
            raise ValueError(
                f"the model has {len(names)} inputs {names}: give input_shape as a mapping "
                "{input name: shape}."
            )
        given = {names[0]: input_shape}
    checked = {}
    for name, shape in given.items():
        if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
            raise TypeError(
                f"input_shape must be one sample's shape, a sequence of int such as "
                f"(3, 32, 32); got {shape!r} for input {name!r}."
            )
        wrong_type = any(isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in shape)
        if wrong_type or any(s < 1 for s in shape):
            raise (TypeError if wrong_type else ValueError)(
                f"input_shape must hold positive integers (one sample's shape, no batch "
                f"dimension); got {tuple(shape)!r} for input {name!r}."
            )
        checked[name] = tuple(int(s) for s in shape)
    return checked


def _spatial_known(shape: Shape | None) -> bool:
    return shape is not None and len(shape) > 2 and None not in shape[2:]


def runtime_shapes(
    model: onnx.ModelProto,
    input_shape: Sequence[int] | Mapping[str, Sequence[int]] | None,
    names: Sequence[str],
) -> dict[str, Shape]:
    """Shapes of the values ``names``, measured by running ``model`` in onnxruntime.

    One sample of zeros (a dynamic batch dimension is 1). Best effort: an empty dict when
    onnxruntime is not installed, an input dimension is unknown, or the run fails.
    """
    try:
        import onnxruntime
    except ImportError:
        return {}
    dims_by_name = input_dims(model, input_shape)
    feeds = {}
    for vi in data_inputs(model):
        dims = dims_by_name.get(vi.name)
        if not vi.type.HasField("tensor_type") or dims is None or None in dims[1:]:
            return {}
        shape = [1 if d is None else d for d in dims]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        feeds[vi.name] = np.zeros(shape, dtype=dtype)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {vi.name for vi in probe.graph.output}
    for name in names:
        if name not in outputs:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 4
    try:
        session = onnxruntime.InferenceSession(
            probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        values = session.run(list(names), feeds)
    except Exception:  # onnxruntime's own error types: the shapes stay unknown
        return {}
    return {
        name: tuple(int(d) for d in value.shape) for name, value in zip(names, values, strict=True)
    }


def value_shapes(
    model: onnx.ModelProto, input_shape: Sequence[int] | Mapping[str, Sequence[int]] | None
) -> dict[str, Shape]:
    """Shapes of the graph's values after ONNX shape inference, batch size 1.

    Dynamic input dimensions are fixed from ``input_shape`` (a dynamic batch dimension to
    1) on a copy; ``model`` is not modified. Unknown dimensions are ``None``.
    """
    graph = inferred_graph(model, input_shape)
    shapes: dict[str, Shape] = {}
    for vi in (*graph.input, *graph.value_info, *graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            shapes[vi.name] = tuple(_dim_value(d) for d in vi.type.tensor_type.shape.dim)
    for tensor in graph.initializer:
        shapes[tensor.name] = tuple(int(d) for d in tensor.dims)
    return shapes


def inferred_graph(
    model: onnx.ModelProto, input_shape: Sequence[int] | Mapping[str, Sequence[int]] | None
) -> onnx.GraphProto:
    """The main graph of a copy of ``model`` after ONNX shape inference, batch size 1.

    Dynamic input dimensions are fixed as :func:`value_shapes` does.

    Raises
    ------
    ValueError
        Shape inference fails on the model.
    """
    dims_by_name = input_dims(model, input_shape)
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for vi in data_inputs(fixed):
        dims = dims_by_name.get(vi.name)
        if dims is None or not vi.type.HasField("tensor_type"):
            continue
        shape = vi.type.tensor_type.shape
        while len(shape.dim) < len(dims):
            shape.dim.add()
        for i, size in enumerate(dims):
            if i == 0 and size is None:
                size = 1
            if size is not None:
                shape.dim[i].Clear()
                shape.dim[i].dim_value = size
    try:
        inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        message = " ".join(str(exc).split())
        raise ValueError(f"ONNX shape inference failed on this model: {message}") from None
    return inferred.graph


# -- names --------------------------------------------------------------------------------


def all_names(graph: onnx.GraphProto, names: set[str] | None = None) -> set[str]:
    """Every node and value name of ``graph`` and its subgraphs."""
    names = set() if names is None else names
    for vi in (*graph.input, *graph.output, *graph.value_info):
        names.add(vi.name)
    names.update(t.name for t in graph.initializer)
    names.update(t.values.name for t in graph.sparse_initializer)
    for node in graph.node:
        names.add(node.name)
        names.update(node.input)
        names.update(node.output)
        for subgraph in _subgraphs(node):
            all_names(subgraph, names)
    names.discard("")
    return names


def used_names(graph: onnx.GraphProto, names: set[str] | None = None) -> set[str]:
    """Names read by a node of ``graph`` or its subgraphs, or output by ``graph``."""
    names = set() if names is None else names
    names.update(vi.name for vi in graph.output)
    for node in graph.node:
        names.update(node.input)
        for subgraph in _subgraphs(node):
            used_names(subgraph, names)
    return names


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    graphs = []
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            graphs.append(attribute.g)
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            graphs.extend(attribute.graphs)
    return graphs
