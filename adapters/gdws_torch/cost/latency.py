"""Hardware-aware conversion: keep a layer dense where its GDWS form is not measured faster."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gdws_approx import NetworkPlan
from gdws_torch.cost.macs import example_input
from gdws_torch.cost.throughput import BACKENDS, measure_throughput
from gdws_torch.nn.layers import GDWSConv2d
from gdws_torch.nn.module_tree import eval_mode

__all__ = ["layer_input_shapes", "time_layers"]


def layer_input_shapes(
    model: nn.Module, names: Sequence[str], input_size: Sequence[int]
) -> dict[str, tuple[int, ...]]:
    """The input shape (one sample, no batch dimension) of each named module."""
    modules = dict(model.named_modules())
    shapes: dict[str, tuple[int, ...]] = {}

    def recorder(name: str):
        def record(module: nn.Module, inputs: tuple, output: Any) -> None:
            shapes.setdefault(name, tuple(inputs[0].shape[1:]))

        return record

    handles = [modules[name].register_forward_hook(recorder(name)) for name in names]
    try:
        with eval_mode(model), torch.no_grad():
            model(example_input(model, input_size))
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def time_layers(
    plan: NetworkPlan,
    dense_layers: Mapping[str, nn.Module],
    gdws_layers: Mapping[str, nn.Module],
    input_shapes: Mapping[str, Sequence[int]],
    *,
    backend: str = "eager",
    batch_size: int = 1,
    rounds: int = 9,
    device: Any = "cpu",
) -> tuple[NetworkPlan, list[str]]:
    """Time every replaced layer dense vs GDWS; the plan with the slower ones kept dense.

    Each replaced layer of ``plan`` is timed alone, its dense convolution
    (``dense_layers[name]``) against its GDWS form (``gdws_layers[name]``) on inputs of
    ``input_shapes[name]`` (one sample) at ``batch_size``, the two interleaved
    (:func:`gdws_torch.cost.throughput.measure_throughput`, medians of ``rounds``), on copies.

    Returns
    -------
    plan : gdws_approx.NetworkPlan
        A copy with ``timings_ms`` on every timed layer and, for each layer whose GDWS
        form was not faster, ``replaced=False``, its error 0, its MACs dense, and a reason
        quoting the times.
    names : list of str
        The layers to put back to dense.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}.")
    layers, slower = [], []
    for layer in plan.layers:
        if not layer.replaced:
            layers.append(layer)
            continue
        gdws = gdws_layers[layer.name]
        if not isinstance(gdws, GDWSConv2d):  # pragma: no cover - convert built it
            raise TypeError(f"layer {layer.name!r} of the converted model is not a GDWSConv2d.")
        # float32 copies: what is deployed (ONNX Runtime's CPU conv has no float64).
        rows = measure_throughput(
            {
                "dense": copy.deepcopy(dense_layers[layer.name]).float(),
                "gdws": copy.deepcopy(gdws).float(),
            },
            input_shapes[layer.name],
            backends=(backend,),
            batch_sizes=(batch_size,),
            rounds=rounds,
            device=device,
        )
        ms = {row["model"]: row["latency_ms"] for row in rows}
        timings = {"dense": ms["dense"], "gdws": ms["gdws"]}
        if ms["gdws"] < ms["dense"]:
            layers.append(dataclasses.replace(layer, timings_ms=timings))
            continue
        slower.append(layer.name)
        reason = (
            f"kept dense: GDWS measured {ms['gdws']:.3g} ms >= dense {ms['dense']:.3g} ms "
            f"({backend}, batch {batch_size})"
        )
        layers.append(
            dataclasses.replace(
                layer,
                replaced=False,
                reason=reason,
                error=0.0,
                macs=layer.dense_macs,
                timings_ms=timings,
            )
        )
    new_plan = NetworkPlan(
        layers=layers,
        solver=plan.solver,
        beta=plan.beta,
        target_mac_reduction=plan.target_mac_reduction,
        other_macs=plan.other_macs,
        kernel_multiple=plan.kernel_multiple,
    )
    return new_plan, slower
