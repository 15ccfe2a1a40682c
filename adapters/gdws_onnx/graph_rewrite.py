"""Rewrite the eligible ``Conv`` nodes of any ONNX model as GDWS subgraphs."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

import gdws_approx
from gdws_approx import LayerPlan, LayerSpec, NetworkPlan, plan_network
from gdws_approx.cost import check_kernel_multiple
from gdws_approx.files import same_file
from gdws_approx.layer_names import find_entry
from gdws_onnx._files import check_model, load_model, save_model
from gdws_onnx.graph import ConvNode, all_names, conv_nodes, used_names
from gdws_onnx.memory import check_memory

__all__ = ["METADATA_KEY", "rewrite", "rewrite_file"]

# metadata_props key of the rewritten model: a JSON summary of the plan.
METADATA_KEY = "gdws_approx"


def rewrite(
    model: onnx.ModelProto,
    *,
    beta: float | None = None,
    n_kernels: int | Mapping[str, int] | None = None,
    target_mac_reduction: float | None = None,
    channel_weights: Mapping[str, Any] | None = None,
    input_shape: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
    skip_first: bool = True,
    only_if_cheaper: bool = True,
    exclude: Iterable[str] = (),
    svd_solver: str = "auto",
    kernel_multiple: int = 4,
) -> tuple[onnx.ModelProto, NetworkPlan]:
    """Replace the eligible convolutions of an ONNX model by optimal GDWS subgraphs.

    Each replaced ``Conv`` (weight ``(M, C, Kh, Kw)``) becomes three nodes::

        Gather(axis=1, indices=kernel_channels)         # (N, C, H, W) -> (N, G, H, W)
        Conv(group=G, W=(G, 1, Kh, Kw))                  # depthwise: the original strides,
                                                         # pads, dilations, auto_pad
        Conv(W=(M, G, 1, 1), B=the original bias)        # pointwise; the original output name

    (without the ``Gather`` where every channel keeps exactly one kernel, in order).

    planned by the core (:func:`gdws_approx.plan_network`) on the float64 weights, written
    back in the weight's type (float32, float16 or float64).

    Parameters
    ----------
    model : onnx.ModelProto
        From any exporter; not modified (the rewrite works on a copy).
    beta : float, optional
        LEGO: the same weighted squared error budget in every layer.
    n_kernels : int or mapping of str to int, optional
        MEGO: depthwise kernels per layer (one for all, or one per conv name).
    target_mac_reduction : float, optional
        LEGO with the smallest common ``beta`` for which the model's ``Conv`` MACs
        (every Conv, rewritten or not) are that many times fewer, ``> 1``.
        With no budget: ``beta=0``, an exact rewrite.
    channel_weights : mapping of str to array of shape (C,), optional
        Per-layer channel weights of the error (the paper's alpha; e.g. noise gains),
        keyed by conv name (see below), node name or weight initializer name, each with or
        without a ``"module."`` prefix (:func:`gdws_approx.layer_names.find_entry`); every
        planned layer needs one. Unit weights if ``None``.
    input_shape : sequence of int or mapping of str to sequence of int, optional
        One sample's shape without the batch dimension (``(3, 32, 32)``), or one per graph
        input by name. Needed when the model's spatial dimensions are dynamic: MACs are
        counted per sample at this shape, from ONNX shape inference (batch size 1). A
        shape whose run would need more memory than is available is refused first.
    skip_first : bool, default=True
        Leave the network's first convolution as it is (the first ``Conv`` in topological
        order whose data input depends on a graph input), as the original work did.
    only_if_cheaper : bool, default=True
        Keep a conv as it is where its GDWS form would not need fewer MACs.
    exclude : iterable of str, default=()
        Convs to leave alone.
    svd_solver : {"auto", "full", "covariance_eigh"}, default="auto"
    kernel_multiple : int, default=4
        Pad each layer's ``G`` up to a multiple of this with zero kernels (the outputs do
        not change). ONNX Runtime's CPU convolutions were measured 2.2 to 2.4 times slower
        when the depthwise conv's channel count is not a multiple of 4; padding adds at
        most ``(kernel_multiple - 1) * (Kh * Kw + M)`` MACs per output pixel of a layer.
        The plan (its ``G`` and ``macs``) is the same for any value; the report records
        ``kernel_multiple`` and the padded counts (``padded_n_kernels``,
        ``padded_macs``). From 1 (no padding) to 64.

    Returns
    -------
    rewritten : onnx.ModelProto
        Same opset, inputs and outputs; checked by ``onnx.checker``. Its
        ``metadata_props`` hold a JSON summary under ``"gdws_approx"``.
    report : gdws_approx.NetworkPlan
        Per planned conv: name, shape, ``G``, multiplier histogram, error, MACs before and
        after; totals over every ``Conv`` of the graph.

    Notes
    -----
    Conv names: the node's name, or ``"Conv:<weight initializer name>"`` for an unnamed
    node; :func:`gdws_onnx.conv_nodes` lists them with the reason a conv is left alone.

    Raises
    ------
    ValueError
        Not a valid model; no eligible conv; an unknown ``exclude`` name; a missing
        channel weight; shapes that inference cannot determine (give ``input_shape``); an
        ``input_shape`` needing more memory than is available; a budget that keeps no
        kernel in a layer; an unreachable ``target_mac_reduction``; ``kernel_multiple``
        outside 1..64.
    """
    kernel_multiple = check_kernel_multiple(kernel_multiple)
    check_model(model)
    if input_shape is not None:
        check_memory(model, input_shape, what="run it in onnxruntime")
    work = onnx.ModelProto()
    work.CopyFrom(model)
    convs = conv_nodes(work, input_shape=input_shape, skip_first=skip_first, exclude=exclude)
    chosen = [c for c in convs if c.eligible]
    if not chosen:
        left = "; ".join(f"{c.name}: {c.reason}" for c in convs[:6]) or "the graph has no Conv"
        raise ValueError(
            "the model has no eligible convolution (a 2-D Conv with group=1, a kernel larger "
            f"than 1x1 and constant initializer weights, other than the first conv): {left}."
        )
    unknown = [c.name for c in convs if c.macs is None]
    if unknown:
        raise ValueError(
            f"neither ONNX shape inference nor a run in onnxruntime tells the output size of "
            f"Conv {unknown[:4]}, so its MACs are unknown: give input_shape (one sample's "
            "shape without the batch dimension, for example (3, 32, 32)) when the input's "
            "dimensions are dynamic."
        )
    other = sum(c.macs or 0 for c in convs if not c.eligible)
    initializers = {t.name: t for t in work.graph.initializer}
    specs = [
        LayerSpec(
            c.name,
            numpy_helper.to_array(initializers[c.weight]).astype(np.float64),
            c.output_pixels,
            _channel_weights(channel_weights, c),
        )
        for c in chosen
    ]
    plan = plan_network(
        specs,
        beta=beta,
        n_kernels=n_kernels,
        target_mac_reduction=target_mac_reduction,
        other_macs=other,
        only_if_cheaper=only_if_cheaper,
        svd_solver=svd_solver,
        kernel_multiple=kernel_multiple,
    )
    _apply(work, plan, {c.name: c for c in chosen}, kernel_multiple)
    onnx.checker.check_model(work)  # a failure here is a bug of the rewrite
    return work, plan


def rewrite_file(
    in_path: str | os.PathLike, out_path: str | os.PathLike, **kwargs: Any
) -> NetworkPlan:
    """Rewrite the model in ``in_path`` and write the result to ``out_path`` atomically.

    ``kwargs`` are those of :func:`rewrite`. ``out_path`` must not be ``in_path`` (nor a
    link to it); nothing is written when the rewrite fails. Returns the report.
    """
    if same_file(in_path, out_path):
        raise ValueError(
            f"out_path {str(out_path)!r} is the input file; not overwriting it. Give another path."
        )
    model = load_model(in_path)
    rewritten, plan = rewrite(model, **kwargs)
    save_model(rewritten, out_path)
    return plan


def _channel_weights(weights: Mapping[str, Any] | None, conv: ConvNode) -> np.ndarray | None:
    """The channel weights of ``conv`` in ``weights`` (by its names), as float64."""
    found = find_entry(
        weights, (conv.name, conv.node_name, conv.weight), what="channel_weights", required=True
    )
    if found is None:
        return None
    key, value = found
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu().numpy()
    value = np.asarray(value)
    if value.dtype.kind not in "fiu":
        raise TypeError(
            f"channel_weights[{key!r}] must hold real numbers; got dtype {value.dtype}."
        )
    return value.astype(np.float64)


def _apply(
    model: onnx.ModelProto, plan: NetworkPlan, convs: dict[str, ConvNode], kernel_multiple: int
) -> None:
    """Replace the planned convs of ``model`` (in place) by their GDWS subgraphs."""
    graph = model.graph
    taken = all_names(graph)

    def fresh(base: str) -> str:
        name, k = base, 1
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        return name

    initializers = {t.name: t for t in graph.initializer}
    replaced = {convs[layer.name].index: layer for layer in plan.layers if layer.replaced}
    nodes: list[onnx.NodeProto] = []
    new_initializers: list[onnx.TensorProto] = []
    for index, node in enumerate(graph.node):
        layer = replaced.get(index)
        if layer is None:
            nodes.append(node)
            continue
        conv = convs[layer.name]
        dtype = helper.tensor_dtype_to_np_dtype(initializers[conv.weight].data_type)
        subgraph, tensors = _gdws_nodes(node, conv, layer, dtype, fresh, kernel_multiple)
        nodes.extend(subgraph)
        new_initializers.extend(tensors)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_initializers)

    # The replaced weights go when nothing else reads them (biases feed the pointwise convs).
    still_used = used_names(graph)
    dropped = {convs[layer.name].weight for layer in plan.layers if layer.replaced} - still_used
    kept = [t for t in graph.initializer if t.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(kept)

    summary = {
        "version": gdws_approx.__version__,
        "solver": plan.solver,
        "beta": plan.beta,
        "replaced": [layer.name for layer in plan.layers if layer.replaced],
        "dense_macs": plan.dense_macs,
        "macs": plan.macs,
        "kernel_multiple": kernel_multiple,
        "padded_macs": plan.padded_macs,
    }
    props = {p.key: p.value for p in model.metadata_props}
    props[METADATA_KEY] = json.dumps(summary)
    helper.set_model_props(model, props)


def padded_factors(
    kernel_channels: np.ndarray,
    depthwise: np.ndarray,
    pointwise: np.ndarray,
    kernel_multiple: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The factors with ``G`` rounded up to a multiple: zero kernels, zero pointwise columns.

    The extra kernels read the last kernel's channel, so sorted channels stay sorted.
    """
    g = len(kernel_channels)
    extra = -g % kernel_multiple
    if extra == 0:
        return kernel_channels, depthwise, pointwise
    channels = np.concatenate([kernel_channels, np.repeat(kernel_channels[-1:], extra)])
    depthwise = np.concatenate(
        [depthwise, np.zeros((extra, *depthwise.shape[1:]), depthwise.dtype)]
    )
    pointwise = np.concatenate(
        [pointwise, np.zeros((pointwise.shape[0], extra), pointwise.dtype)], 1
    )
    return channels, depthwise, pointwise


def _gdws_nodes(
    node: onnx.NodeProto,
    conv: ConvNode,
    layer: LayerPlan,
    dtype: np.dtype,
    fresh,
    kernel_multiple: int = 1,
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """``Gather -> depthwise Conv -> pointwise Conv`` for one planned conv (no ``Gather``
    when every channel has one kernel, in order)."""
    estimator = layer.estimator
    m, _, kh, kw = layer.shape
    kernel_channels, depthwise_kernels, pointwise_weights = padded_factors(
        np.asarray(estimator.kernel_channels_, dtype=np.int64),
        np.asarray(estimator.depthwise_kernels_),
        np.asarray(estimator.pointwise_weights_),
        kernel_multiple,
    )
    g = len(kernel_channels)
    base = node.name or conv.weight
    channels = numpy_helper.from_array(kernel_channels, fresh(f"{base}.gdws.kernel_channels"))
    depthwise_weight = numpy_helper.from_array(
        depthwise_kernels.reshape(g, 1, kh, kw).astype(dtype),
        fresh(f"{base}.gdws.depthwise.weight"),
    )
    pointwise_weight = numpy_helper.from_array(
        pointwise_weights.reshape(m, g, 1, 1).astype(dtype),
        fresh(f"{base}.gdws.pointwise.weight"),
    )
    filtered = fresh(f"{base}/gdws/depthwise_output_0")
    nodes, initializers = [], [depthwise_weight, pointwise_weight]
    if np.array_equal(kernel_channels, np.arange(layer.shape[1])):
        gathered = node.input[0]  # one kernel per channel in order: no gather needed
    else:
        gathered = fresh(f"{base}/gdws/gather_output_0")
        nodes.append(
            helper.make_node(
                "Gather",
                [node.input[0], channels.name],
                [gathered],
                name=fresh(f"{base}/gdws/Gather"),
                axis=1,
            )
        )
        initializers.insert(0, channels)
    depthwise = helper.make_node(
        "Conv", [gathered, depthwise_weight.name], [filtered], name=fresh(f"{base}/gdws/depthwise")
    )
    # Every option of the original (strides, pads, dilations, auto_pad, kernel_shape).
    depthwise.attribute.extend(a for a in node.attribute if a.name != "group")
    depthwise.attribute.append(helper.make_attribute("group", g))
    inputs = [filtered, pointwise_weight.name] + ([conv.bias] if conv.bias else [])
    pointwise = helper.make_node(
        "Conv", inputs, [node.output[0]], name=fresh(f"{base}/gdws/pointwise"), kernel_shape=[1, 1]
    )
    return [*nodes, depthwise, pointwise], initializers
