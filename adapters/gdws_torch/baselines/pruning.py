"""Structured channel pruning: whole output channels of a conv removed, with the matching
input channels of the conv that consumes them.

**Which convs.** A conv ``P`` can be pruned only when its output reaches exactly one conv
``Q`` (``groups=1``) through per-channel operations only: BatchNorm (pruned alike) and
element-wise activations or dropout, each used once (found by tracing the model with
``torch.fx``). In a residual network that is the first conv of each basic block
(``conv1 -> bn -> relu -> conv2``); a conv whose output is added to a shortcut, concatenated,
pooled into a linear layer or read twice is never pruned, and the model must be
traceable by ``torch.fx``. ``P`` must also be one of the eligible convolutions
(``layers``, ``exclude``, ``skip_first`` as for :func:`gdws_torch.convert`: the first conv
stays whole by default) and ``Q`` not excluded. The pruned convs and BatchNorms are
physically smaller, so :func:`gdws_torch.count_macs` counts what they cost.

**Which channels.** ``criterion="l1"`` (data-free; Li et al. 2017, "Pruning filters for
efficient ConvNets"): the filters of ``P`` of least L1 norm go first, the same fraction in
every prunable conv, the least fraction that meets the MAC target.
``criterion="reconstruction"``: channel ``j``'s error is its contribution to ``Q``'s output
energy on calibration inputs of the dense network, ``sum ||Q[:, j] * x_j||^2``; channels
are removed one at a time across all layers, least error per MAC saved first (a MAC saved
counts ``P``'s filter and ``Q``'s input slice), until the budget is met.

**Refit** (He et al. 2017, "Channel pruning for accelerating very deep neural networks"):
each consumer ``Q`` is re-solved by least squares so that, on the inputs the pruned network
feeds it, it reproduces the dense ``Q``'s responses to the dense network's inputs (its
remaining channels absorb what the removed ones carried). The target must be the dense
network's own responses here: the removed channels do not exist in the pruned network.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from gdws_torch.baselines.common import (
    BaselineLayer,
    OutOfReach,
    capture_inputs,
    quadratic_error,
    run_with_hooks,
    solve_ridge,
)
from gdws_torch.common import conv_patch_rows
from gdws_torch.nn.module_tree import replace_module

__all__ = [
    "PrunablePair",
    "channel_errors",
    "plan_pruning",
    "prunable_pairs",
    "prune_channels",
    "pruning_report",
    "refit_pruned",
]

# Operations that act on each channel alone (and keep the channel count).
_ELEMENTWISE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
)
_ELEMENTWISE_FUNCTIONS = {
    F.relu,
    F.relu_,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.gelu,
    F.silu,
    F.mish,
    F.hardswish,
    F.hardtanh,
    F.dropout,
    torch.relu,
    torch.relu_,
    torch.sigmoid,
    torch.tanh,
}
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone"}
_PATCH_CHUNK_BYTES = 64 * 2**20


@dataclass
class PrunablePair:
    """A conv whose outputs feed exactly one conv through per-channel operations.

    Attributes
    ----------
    producer : str
        The conv whose output channels can be removed.
    consumer : str
        The conv whose matching input channels go with them.
    batchnorms : list of str
        The BatchNorm layers in between (pruned alike).
    """

    producer: str
    consumer: str
    batchnorms: list[str] = field(default_factory=list)


def prunable_pairs(model: nn.Module) -> list[PrunablePair]:
    """Every :class:`PrunablePair` of ``model``, in the traced graph's order.

    Raises
    ------
    ValueError
        The model cannot be traced by ``torch.fx`` (data-dependent control flow).
    """
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # fx raises many kinds
        raise ValueError(
            f"channel pruning traces the model with torch.fx to find which convs feed which, "
            f"and {type(model).__name__} cannot be traced: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    modules = dict(model.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1:
            continue
        producer = modules[node.target]
        if not isinstance(producer, nn.Conv2d) or producer.groups != 1:
            continue
        pair = _follow(node, modules, calls, producer.out_channels)
        if pair is not None:
            consumer, batchnorms = pair
            pairs.append(PrunablePair(node.target, consumer, batchnorms))
    return pairs


def _follow(node, modules, calls, channels: int):
    """The consumer conv and BatchNorms reached from ``node`` through per-channel ops only."""
    batchnorms: list[str] = []
    current = node
    while True:
        if len(current.users) != 1:
            return None
        (user,) = current.users
        if not user.args or user.args[0] is not current:
            return None
        if any(arg is current for arg in (*user.args[1:], *user.kwargs.values())):
            return None
        if user.op == "call_module":
            module = modules[user.target]
            if calls[user.target] != 1:
                return None
            if isinstance(module, nn.Conv2d):
                if module.groups != 1 or module.in_channels != channels:
                    return None
                return user.target, batchnorms
            if isinstance(module, nn.BatchNorm2d) and module.num_features == channels:
                batchnorms.append(user.target)
            elif not isinstance(module, _ELEMENTWISE_MODULES):
                return None
        elif user.op == "call_function":
            if user.target not in _ELEMENTWISE_FUNCTIONS:
                return None
        elif user.op == "call_method":
            if user.target not in _ELEMENTWISE_METHODS:
                return None
        else:
            return None
        current = user


def prune_channels(model: nn.Module, keep: Mapping[str, Sequence[int]]) -> nn.Module:
    """A copy of ``model`` keeping only the given output channels of some convs.

    For each ``keep[name]``, the conv ``name`` keeps those output channels (in increasing
    order); the BatchNorms between it and the conv it feeds, and that conv's inputs, keep
    the same channels. ``model`` is not modified.

    Parameters
    ----------
    model : torch.nn.Module
    keep : mapping of str to sequence of int
        Conv name -> the output channels it keeps (at least one). Each name must be the
        producer of a :func:`prunable_pairs` pair.

    Returns
    -------
    torch.nn.Module
        With smaller ``nn.Conv2d`` and ``nn.BatchNorm2d`` modules in place of the pruned ones.

    Raises
    ------
    ValueError
        A name that is not a prunable conv, no channel kept, indices out of range or
        repeated.
    """
    pairs = {pair.producer: pair for pair in prunable_pairs(model)}
    modules = dict(model.named_modules())
    unknown = sorted(set(keep) - set(pairs))
    if unknown:
        raise ValueError(
            f"keep names convs that cannot be pruned: {unknown} (a prunable conv feeds "
            f"exactly one conv through BatchNorm and activations only; this model has "
            f"{sorted(pairs) or 'none'})."
        )
    out_keep, in_keep, bn_keep = {}, {}, {}
    for name, channels in keep.items():
        n = modules[name].out_channels
        index = torch.as_tensor(list(channels), dtype=torch.long)
        if index.ndim != 1 or index.numel() == 0:
            raise ValueError(f"keep[{name!r}] must list at least one channel.")
        if int(index.min()) < 0 or int(index.max()) >= n or index.unique().numel() != len(index):
            raise ValueError(
                f"keep[{name!r}] must hold distinct channels in [0, {n}); got "
                f"{index.tolist()[:12]}."
            )
        index = index.sort().values
        out_keep[name] = index
        in_keep[pairs[name].consumer] = index
        for bn in pairs[name].batchnorms:
            bn_keep[bn] = index
    pruned = copy.deepcopy(model)
    copies = dict(pruned.named_modules())
    for name in dict.fromkeys([*out_keep, *in_keep]):
        replace_module(
            pruned, name, _smaller_conv(copies[name], out_keep.get(name), in_keep.get(name))
        )
    for name, index in bn_keep.items():
        replace_module(pruned, name, _smaller_batchnorm(copies[name], index))
    return pruned


def _smaller_conv(conv: nn.Conv2d, outputs, inputs) -> nn.Conv2d:
    weight = conv.weight.detach()
    outputs = torch.arange(conv.out_channels) if outputs is None else outputs
    inputs = torch.arange(conv.in_channels) if inputs is None else inputs
    outputs, inputs = outputs.to(weight.device), inputs.to(weight.device)
    smaller = nn.Conv2d(
        len(inputs),
        len(outputs),
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        smaller.weight.copy_(weight[outputs][:, inputs])
        if conv.bias is not None:
            smaller.bias.copy_(conv.bias[outputs])
    smaller.train(conv.training)
    return smaller


def _smaller_batchnorm(bn: nn.BatchNorm2d, index: torch.Tensor) -> nn.BatchNorm2d:
    reference = next(iter(bn.buffers()), None) if bn.weight is None else bn.weight
    smaller = nn.BatchNorm2d(
        len(index),
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        device=None if reference is None else reference.device,
        dtype=None if reference is None else reference.dtype,
    )
    with torch.no_grad():
        for attribute in ("weight", "bias", "running_mean", "running_var"):
            source = getattr(bn, attribute)
            if source is not None:
                getattr(smaller, attribute).copy_(source[index.to(source.device)])
        if bn.num_batches_tracked is not None:
            smaller.num_batches_tracked.copy_(bn.num_batches_tracked)
    smaller.train(bn.training)
    return smaller


def channel_errors(
    model: nn.Module,
    pairs: Sequence[PrunablePair],
    criterion: str,
    batches: list[torch.Tensor] | None,
) -> dict[str, torch.Tensor]:
    """Per pair (keyed by producer), the error of removing each of its channels.

    ``"l1"``: the L1 norm of the producer's filter. ``"reconstruction"``: the energy
    ``sum ||Q[:, j] * x_j||^2`` channel ``j`` contributes to the consumer's output on
    ``batches`` (the consumer's inputs in the dense ``model``).
    """
    modules = dict(model.named_modules())
    if criterion == "l1":
        return {
            p.producer: modules[p.producer].weight.detach().abs().flatten(1).sum(1).double()
            for p in pairs
        }
    blocks: dict[str, torch.Tensor] = {}

    def hook(name: str, conv: nn.Conv2d):
        def record(_module, args):
            x = args[0].detach().to(torch.float64)
            k2 = conv.kernel_size[0] * conv.kernel_size[1]
            per_sample = conv_patch_rows(conv, x[:1]).numel() * 8
            chunk = max(1, _PATCH_CHUNK_BYTES // max(per_sample, 1))
            for start in range(0, len(x), chunk):
                rows = conv_patch_rows(conv, x[start : start + chunk])
                rows = rows.reshape(rows.shape[0], conv.in_channels, k2)
                block = torch.einsum("nck,ncl->ckl", rows, rows)
                blocks[name] = blocks.get(name, 0) + block

        return record

    consumers = {p.consumer: modules[p.consumer] for p in pairs}
    run_with_hooks(
        model, batches, {conv: hook(name, conv) for name, conv in consumers.items()}, pre=True
    )
    errors = {}
    for pair in pairs:
        conv = consumers[pair.consumer]
        weight = conv.weight.detach().to(torch.float64).flatten(2)  # (M, C, K2)
        block = blocks[pair.consumer]  # (C, K2, K2)
        errors[pair.producer] = torch.einsum("mck,ckl,mcl->c", weight, block, weight)
    return errors


def _conv_unit_macs(macs, modules: Mapping[str, nn.Module], names: Iterable[str]):
    """Per conv name: MACs per (output channel x input channel)."""
    units = {}
    for name in names:
        conv = modules[name]
        units[name] = macs[name].macs / (conv.out_channels * conv.in_channels)
    return units


def plan_pruning(
    model: nn.Module,
    pairs: Sequence[PrunablePair],
    errors: Mapping[str, torch.Tensor],
    criterion: str,
    macs,
    budget: float,
) -> dict[str, list[int]]:
    """The channels each producer keeps so that the pairs' convs cost ``<= budget`` MACs.

    Parameters
    ----------
    model : torch.nn.Module
    pairs : sequence of PrunablePair
    errors : mapping
        :func:`channel_errors`.
    criterion : {"l1", "reconstruction"}
    macs : MacCount
        The dense model's.
    budget : float
        MACs per sample the convs of the pairs may use in all.

    Returns
    -------
    dict of str to list of int
        Kept output channels per producer (every producer listed).
    """
    modules = dict(model.named_modules())
    convs = list(dict.fromkeys(n for p in pairs for n in (p.producer, p.consumer)))
    unit = _conv_unit_macs(macs, modules, convs)
    width = {p.producer: modules[p.producer].out_channels for p in pairs}
    producer_of_input = {p.consumer: p.producer for p in pairs}

    def total(kept: Mapping[str, int]) -> float:
        result = 0.0
        for name in convs:
            conv = modules[name]
            outputs = kept.get(name, conv.out_channels)
            inputs = (
                kept[producer_of_input[name]] if name in producer_of_input else conv.in_channels
            )
            result += unit[name] * outputs * inputs
        return result

    least = total(dict.fromkeys(width, 1))
    if least > budget:
        raise OutOfReach(least)
    order = {name: torch.argsort(errors[name], stable=True).tolist() for name in width}
    if criterion == "l1":
        counts = _uniform_fraction(width, total, budget)
    else:
        counts = _greedy(pairs, modules, unit, width, errors, order, total, budget)
    return {name: sorted(order[name][width[name] - counts[name] :]) for name in width}


def _uniform_fraction(width, total, budget) -> dict[str, int]:
    """The least common pruned fraction whose MACs meet the budget (bisection)."""

    def counts(fraction: float) -> dict[str, int]:
        return {n: max(1, math.ceil((1 - fraction) * w - 1e-9)) for n, w in width.items()}

    if total(counts(0.0)) <= budget:
        return counts(0.0)
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        if total(counts(middle)) <= budget:
            high = middle
        else:
            low = middle
    return counts(high)


def _greedy(pairs, modules, unit, width, errors, order, total, budget) -> dict[str, int]:
    """Remove channels one at a time, least error per MAC saved first."""
    kept = dict(width)
    producer_of_input = {p.consumer: p.producer for p in pairs}
    consumer_of = {p.producer: p.consumer for p in pairs}
    values = {name: errors[name].tolist() for name in width}
    current = total(kept)
    while current > budget:
        best, best_ratio = None, math.inf
        for name in width:
            if kept[name] <= 1:
                continue
            conv = modules[name]
            inputs = (
                kept[producer_of_input[name]] if name in producer_of_input else conv.in_channels
            )
            consumer = consumer_of[name]
            outputs = kept.get(consumer, modules[consumer].out_channels)
            saved = unit[name] * inputs + unit[consumer] * outputs
            error = values[name][order[name][width[name] - kept[name]]]
            ratio = error / saved if saved > 0 else math.inf
            if ratio < best_ratio:
                best, best_ratio = name, ratio
        if best is None:  # cannot happen: the least total was checked
            raise OutOfReach(current)
        kept[best] -= 1
        current = total(kept)
    return kept


def refit_pruned(
    dense: nn.Module,
    pruned: nn.Module,
    pairs: Sequence[PrunablePair],
    keep: Mapping[str, Sequence[int]],
    batches: list[torch.Tensor],
    ridge: float,
) -> dict[str, tuple[float, float]]:
    """Re-solve every consumer of ``pruned`` by least squares (in place), in order.

    For consumer ``Q'`` (dense ``Q``): ``Q' = argmin sum ||Q x - Q' x'||^2`` over output
    pixels, ``x`` the dense network's input to ``Q``, ``x'`` the pruned network's (earlier
    consumers already refitted) on the same calibration batch, restricted to the outputs
    ``Q'`` keeps; the bias stays, and the solution is kept only if it lowers the error.
    Returns each consumer's error before and after.
    """
    dense_modules = dict(dense.named_modules())
    pruned_modules = dict(pruned.named_modules())
    errors = {}
    for pair in pairs:
        name = pair.consumer
        conv, smaller = dense_modules[name], pruned_modules[name]
        outputs = (
            torch.as_tensor(list(keep[name]), dtype=torch.long)
            if name in keep
            else torch.arange(conv.out_channels)
        )
        weight = conv.weight.detach().to(torch.float64)[outputs.to(conv.weight.device)]
        m = weight.shape[0]
        n = smaller.weight[0].numel()
        device = weight.device
        gram = torch.zeros(n, n, dtype=torch.float64, device=device)
        cross = torch.zeros(m, n, dtype=torch.float64, device=device)
        energy = 0.0
        pairs_of_inputs = zip(
            capture_inputs(dense, conv, batches),
            capture_inputs(pruned, smaller, batches),
            strict=True,
        )
        for x, x_pruned in pairs_of_inputs:
            y = conv._conv_forward(x.to(torch.float64), weight, None)
            y = y.permute(0, 2, 3, 1).reshape(-1, m)
            rows = conv_patch_rows(smaller, x_pruned.to(torch.float64))
            gram += rows.T @ rows
            cross += y.T @ rows
            energy += float((y * y).sum())
        before = smaller.weight.detach().to(torch.float64).flatten(1)
        after = solve_ridge(gram, cross, ridge)
        error_before = quadratic_error(before, gram, cross, energy)
        error_after = quadratic_error(after, gram, cross, energy)
        if error_after > error_before:  # the ridge can cost more than the refit gains
            after, error_after = before, error_before
        errors[name] = (error_before, error_after)
        with torch.no_grad():
            smaller.weight.copy_(after.reshape(smaller.weight.shape))
    return errors


def pruning_report(
    model: nn.Module,
    pairs: Sequence[PrunablePair],
    keep: Mapping[str, Sequence[int]],
    errors: Mapping[str, torch.Tensor],
    dense_macs,
    macs,
) -> list[BaselineLayer]:
    """One :class:`BaselineLayer` per conv of a pair, in the model's order."""
    modules = dict(model.named_modules())
    out_of = {p.producer: p for p in pairs}
    in_of = {p.consumer: p for p in pairs}
    layers = []
    for name in modules:
        if name not in out_of and name not in in_of:
            continue
        conv = modules[name]
        parts, error = [], 0.0
        if name in in_of:
            parts.append(f"inputs {len(keep[in_of[name].producer])}/{conv.in_channels}")
        if name in out_of:
            parts.append(f"outputs {len(keep[name])}/{conv.out_channels}")
            dropped = sorted(set(range(conv.out_channels)) - set(keep[name]))
            error = float(errors[name][dropped].sum()) if dropped else 0.0
        layers.append(
            BaselineLayer(
                name,
                tuple(conv.weight.shape),
                ", ".join(parts),
                dense_macs[name].macs,
                macs[name].macs,
                error,
            )
        )
    return layers
