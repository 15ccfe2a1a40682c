"""Error weightings for the approximation: which parts of a weight's error matter.

Each strategy gives inputs of :meth:`gdws_approx.GDWSApproximator.fit` per layer, and
MEGO/LEGO stay exact under the weighted error
``sum_c alpha_c ||A (W_c - What_c) B_c||_F^2`` (``alpha``: the channel weights):

- ``"unit"``: all ones (the paper's unweighted error);
- ``"noise_gains"``: channel weights from :func:`gdws_torch.noise_gains` (the original
  work's alphas);
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
form of a layer by (``ErrorWeights(input_moments=...)``). Both are accumulated by
:func:`gdws_torch.recovery.statistics.collect_patch_moments`, the refit's mechanism.

:class:`gdws_torch.Weighting` names a strategy; :meth:`gdws_torch.Weighting.compute`
runs it (:func:`strategy_weights`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from gdws_approx.checks import check_integer
from gdws_torch.conversion.eligibility import eligible_convs
from gdws_torch.cost.macs import example_input
from gdws_torch.nn.module_tree import eval_mode
from gdws_torch.recovery.statistics import collect_patch_moments

__all__ = [
    "DATA_STRATEGIES",
    "STRATEGIES",
    "batchnorm_output_weights",
    "input_patch_moments",
    "input_patch_transforms",
    "strategy_weights",
]

STRATEGIES = ("unit", "noise_gains", "output", "data", "output+data")
#: The strategies that read training inputs.
DATA_STRATEGIES = ("noise_gains", "data", "output+data")


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
    moments = collect_patch_moments(
        model, loader, n_samples, chosen, blocks=True, stage="data weighting"
    )
    return {
        name: _matrix_sqrt(moments[name].result() / moments[name].patches, ridge)
        for name in sorted(chosen)
    }


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
    check_integer(n_samples, "n_samples", minimum=1)
    chosen = dict(eligible_convs(model))
    if layers is not None:
        chosen = {name: dict(model.named_modules())[name] for name in layers}
    moments = collect_patch_moments(model, loader, n_samples, chosen)
    return {name: moments[name].result() / moments[name].samples for name in sorted(chosen)}


def strategy_weights(
    strategy: str,
    model: nn.Module,
    input_size: Sequence[int],
    *,
    data: Iterable | None = None,
    n_samples: int = 256,
    attack: Any = None,
    progress: bool = False,
) -> dict[str, Any]:
    """The weights of a strategy of :data:`STRATEGIES` as keywords of
    :class:`gdws_torch.conversion.options.ErrorWeights` (``channel_weights``,
    ``output_weights``, ``input_transforms``: the ones it sets only).

    :meth:`gdws_torch.Weighting.compute` runs this; see it for the parameters
    (``attack``: the noise gains' inputs).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}; got {strategy!r}.")
    if strategy in DATA_STRATEGIES and data is None:
        raise ValueError(f"strategy {strategy!r} needs training data.")
    weights: dict[str, Any] = {}
    if strategy == "noise_gains":
        from gdws_torch.conversion.noise_gains import noise_gains

        weights["channel_weights"] = noise_gains(
            model, data, n_samples, attack=attack, progress=progress
        )
    if strategy in ("output", "output+data"):
        weights["output_weights"] = batchnorm_output_weights(model, input_size)
    if strategy in ("data", "output+data"):
        weights["input_transforms"] = input_patch_transforms(model, data, n_samples)
    return weights
