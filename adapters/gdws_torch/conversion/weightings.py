"""Error weightings for the approximation: which parts of a weight's error matter.

Each strategy gives inputs of :meth:`gdws_approx.GDWSApproximator.fit` per layer, and
MEGO/LEGO stay exact under the weighted error
``sum_c alpha_c ||A (W_c - What_c) B_c||_F^2``:

- ``"unit"``: all ones (the paper's unweighted error);
- ``"noise_gains"``: ``alpha`` from :func:`gdws_torch.noise_gains` (the original work's);
- ``"output"``: ``A = diag(|gamma_m| / sqrt(var_m + eps))``, the scale the BatchNorm right
  after the conv applies to output channel ``m``: an error in a channel that BatchNorm
  amplifies counts more (layers not followed by a BatchNorm get ones);
- ``"data"``: ``B_c = (Sigma_c + ridge)^(1/2)``, the square root of the second-moment
  matrix of input channel ``c``'s ``Kh x Kw`` patches (on sample inputs): the weighted
  error is then the expected squared error of the conv's *output* contribution of each
  channel, ignoring correlations between channels;
- ``"output+data"``: both.

:func:`input_patch_moments` gives the full moment ``Sigma`` of each layer's input patches,
correlations between channels included: the measure the latency planner compares every
form of a layer by (``Weighting(input_moments=...)``).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gdws_approx.checks import check_integer
from gdws_torch.common import conv_patch_rows, conv_patches, take_samples
from gdws_torch.conversion.eligibility import eligible_convs
from gdws_torch.cost.macs import example_input
from gdws_torch.nn.module_tree import eval_mode

__all__ = [
    "STRATEGIES",
    "batchnorm_output_weights",
    "input_patch_moments",
    "input_patch_transforms",
    "strategy_weights",
    "weighting",
]

STRATEGIES = ("unit", "noise_gains", "output", "data", "output+data")


def _forward_with_hooks(model: nn.Module, x: torch.Tensor, hooks: list) -> None:
    try:
        with eval_mode(model), torch.no_grad():
            model(x)
    finally:
        for handle in hooks:
            handle.remove()


def batchnorm_output_weights(
    model: nn.Module, input_size: Sequence[int], layers: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """``{conv name: |gamma| / sqrt(running_var + eps)}`` for convs feeding a BatchNorm.

    A conv counts as followed by a BatchNorm when the BatchNorm's input *is* the conv's
    output tensor in a forward pass at ``input_size``; other convs get ones.
    """
    names = set(layers) if layers is not None else {n for n, _ in eligible_convs(model)}
    modules = dict(model.named_modules())
    outputs: dict[int, str] = {}
    weights: dict[str, torch.Tensor] = {}

    def conv_hook(name: str):
        def record(module, inputs, output) -> None:
            outputs[id(output)] = name

        return record

    def bn_hook(module: nn.BatchNorm2d, inputs) -> None:
        name = outputs.get(id(inputs[0]))
        if name is not None and module.track_running_stats and name not in weights:
            gamma = module.weight if module.affine else torch.ones_like(module.running_var)
            scale = gamma.detach().abs() / torch.sqrt(module.running_var + module.eps)
            # A zero gamma would make A singular: such a channel's error is irrelevant,
            # so give it a tiny positive weight instead.
            weights[name] = scale.clamp_min(1e-6 * float(scale.max().clamp_min(1e-30)))

    hooks = [modules[n].register_forward_hook(conv_hook(n)) for n in names]
    hooks += [
        m.register_forward_pre_hook(bn_hook)
        for m in model.modules()
        if isinstance(m, nn.BatchNorm2d)
    ]
    _forward_with_hooks(model, example_input(model, input_size), hooks)
    for name in names:
        if name not in weights:
            weights[name] = torch.ones(modules[name].out_channels)
    return {name: weights[name].to(torch.float64) for name in sorted(names)}


def _matrix_sqrt(covariance: torch.Tensor, ridge: float) -> torch.Tensor:
    """Symmetric square roots of ``(C, K2, K2)`` PSD matrices, regularised to be invertible."""
    k2 = covariance.shape[-1]
    scale = torch.diagonal(covariance, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
    regular = covariance + ridge * scale[:, None, None] * torch.eye(k2, dtype=covariance.dtype)
    values, vectors = torch.linalg.eigh(regular)
    return (vectors * values.clamp_min(0).sqrt()[:, None, :]) @ vectors.transpose(-1, -2)


def input_patch_transforms(
    model: nn.Module,
    loader: Iterable,
    n_samples: int = 256,
    *,
    layers: Iterable[str] | None = None,
    ridge: float = 1e-2,
) -> dict[str, torch.Tensor]:
    """``{conv name: (C, K2, K2)}``: the square root of each input channel's patch moments.

    ``Sigma_c = E[p p^T]`` over every ``Kh x Kw`` patch of input channel ``c`` (the conv's
    own padding, stride and dilation) on ``n_samples`` inputs of ``loader`` (eval mode);
    ``ridge`` times the mean diagonal is added so that ``B_c`` is invertible.
    """
    check_integer(n_samples, "n_samples", minimum=1)
    chosen = dict(eligible_convs(model))
    if layers is not None:
        chosen = {name: chosen[name] for name in layers}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str, conv: nn.Conv2d):
        def record(module, inputs) -> None:
            x = inputs[0].detach().to(torch.float64)
            patches = conv_patches(conv, x)  # (N, C * K2, P)
            n, _, p = patches.shape
            c, k2 = conv.in_channels, conv.kernel_size[0] * conv.kernel_size[1]
            by_channel = patches.reshape(n, c, k2, p).permute(1, 2, 0, 3).reshape(c, k2, n * p)
            moment = by_channel @ by_channel.transpose(1, 2)
            sums[name] = sums.get(name, 0) + moment
            counts[name] = counts.get(name, 0) + n * p

        return record

    device = next(iter(model.parameters())).device
    for images, *_ in take_samples(loader, n_samples, stage="data weighting", device=device):
        hooks = [chosen[n].register_forward_pre_hook(hook(n, chosen[n])) for n in chosen]
        _forward_with_hooks(model, images, hooks)
    missing = sorted(set(chosen) - set(sums))
    if missing:
        raise ValueError(f"layers {missing[:3]} never ran in a forward pass; exclude them.")
    return {name: _matrix_sqrt(sums[name] / counts[name], ridge) for name in sorted(chosen)}


def input_patch_moments(
    model: nn.Module,
    loader: Iterable,
    n_samples: int = 256,
    *,
    layers: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """``{conv name: (C*K2, C*K2)}``: each conv's input-patch second moment, per sample.

    ``Sigma = (1/N) sum_x sum_positions p p^T`` over the ``C Kh Kw`` patches the conv reads
    (its own padding, stride and dilation) on ``n_samples`` inputs of ``loader`` in eval
    mode, in float64: ``tr((W - What) Sigma (W - What)^T)`` is then the expected squared
    error of the layer's output map per input (:class:`gdws_approx.ResponseErrors`).

    Parameters
    ----------
    model : torch.nn.Module
        The dense network (not modified).
    loader : iterable of images or (images, labels)
    n_samples : int, default=256
    layers : iterable of str, optional
        Conv names; every eligible conv by default (:func:`gdws_torch.eligible_convs`).

    Returns
    -------
    dict of str to torch.Tensor
    """
    from gdws_torch.recovery.statistics import GramAccumulator

    check_integer(n_samples, "n_samples", minimum=1)
    chosen = dict(eligible_convs(model))
    if layers is not None:
        chosen = {name: dict(model.named_modules())[name] for name in layers}
    device = next(iter(model.parameters())).device
    sums = {name: GramAccumulator(conv.weight[0].numel(), device) for name, conv in chosen.items()}
    seen: set[str] = set()

    def hook(name: str, conv: nn.Conv2d):
        def record(module, inputs) -> None:
            seen.add(name)
            sums[name].add(conv_patch_rows(conv, inputs[0].detach().to(torch.float64)))

        return record

    count = 0
    for images, *_ in take_samples(loader, n_samples, stage="input patch moments", device=device):
        hooks = [chosen[n].register_forward_pre_hook(hook(n, chosen[n])) for n in chosen]
        _forward_with_hooks(model, images, hooks)
        count += len(images)
    missing = sorted(set(chosen) - seen)
    if missing:
        raise ValueError(f"layers {missing[:3]} never ran in a forward pass; exclude them.")
    return {name: sums[name].result() / count for name in sorted(chosen)}


def strategy_weights(
    strategy: str,
    model: nn.Module,
    input_size: Sequence[int],
    *,
    loader: Iterable | None = None,
    n_samples: int = 256,
    noise_gain_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The weights of a strategy of :data:`STRATEGIES`, as :class:`Weighting`'s fields
    (``alphas``, ``output_weights``, ``input_transforms``; the ones it sets only).

    Prefer :meth:`gdws_torch.conversion.options.Weighting.from_strategy`, which wraps this.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}; got {strategy!r}.")
    weights: dict[str, Any] = {}
    if strategy == "noise_gains":
        from gdws_torch.conversion.noise_gains import noise_gains

        if loader is None:
            raise ValueError("strategy 'noise_gains' needs a loader.")
        weights["alphas"] = noise_gains(model, loader, n_samples, **(noise_gain_kwargs or {}))
    if strategy in ("output", "output+data"):
        weights["output_weights"] = batchnorm_output_weights(model, input_size)
    if strategy in ("data", "output+data"):
        if loader is None:
            raise ValueError(f"strategy {strategy!r} needs a loader.")
        weights["input_transforms"] = input_patch_transforms(model, loader, n_samples)
    return weights


def weighting(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Deprecated: ``convert`` keywords for a strategy; use ``Weighting.from_strategy``.

    Takes :func:`strategy_weights`'s arguments and returns its result, the old keyword
    arguments of ``convert`` (``alphas``, ``output_weights``, ``input_transforms``), with a
    ``FutureWarning``; removed in the next release. ``convert(model,
    weighting=Weighting.from_strategy(strategy, model, input_size, loader=loader))`` does
    the same.
    """
    warnings.warn(
        "weighting() is deprecated and will be removed in the next release; use "
        "convert(..., weighting=Weighting.from_strategy(strategy, model, input_size, "
        "loader=...)).",
        FutureWarning,
        stacklevel=2,
    )
    return strategy_weights(*args, **kwargs)
