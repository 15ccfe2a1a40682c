"""DWS: the classic depthwise-separable form, one depthwise kernel per input channel.

A layer becomes a :class:`~gdws_torch.GDWSConv2d` with every ``g_c = 1`` (Sifre 2014,
Howard et al. 2017's MobileNet form, fitted to a pre-trained conv): channel ``c``'s kernel
is the top right singular vector of its slice ``W[:, c] (M, Kh*Kw)`` and the pointwise
weights are the projection of ``W`` on the kernels, the least weight error of that form
(the core's GDWS solver with ``max_multiplier=1`` and ``n_kernels=C`` gives the same
layer). A layer costs ``C (Kh Kw + M)`` MACs per output pixel, whatever its error, so the
MAC target is met by choosing *which* layers become DWS: the set of least total weight
error within the budget (:func:`gdws_approx.choose_options`, a multiple-choice knapsack).
"""

from __future__ import annotations

import torch
from torch import nn

from gdws_approx import channel_spectra, choose_options, cost, kernel_layout, project
from gdws_approx import pad_kernels as padded_layout
from gdws_torch.baselines.common import BaselineLayer, LayerSite, OutOfReach
from gdws_torch.nn.layers import GDWSConv2d
from gdws_torch.nn.module_tree import replace_module

__all__ = ["build_dws", "dws_factors", "dws_layer", "dws_report", "plan_dws"]


def dws_factors(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best depthwise-separable factors of a conv weight, in float64.

    Parameters
    ----------
    weight : torch.Tensor of shape (M, C, Kh, Kw)

    Returns
    -------
    kernels : torch.Tensor of shape (C, Kh, Kw)
        Channel ``c``'s top right singular vector (unit norm).
    pointwise : torch.Tensor of shape (M, C)
        ``P[:, c] = W[:, c] k_c``.
    error : float
        ``||W - What||_F^2``: every channel's squared singular values but the largest.
    """
    m, c, kh, kw = weight.shape
    W3 = weight.detach().to(torch.float64).reshape(m, c, kh * kw)
    spectra = channel_spectra(W3, method="full")
    kernels = spectra.right_singular_vectors[:, 0, :]  # (C, K2)
    layout = kernel_layout(torch.ones(c, dtype=torch.long, device=W3.device))
    pointwise = project(W3, padded_layout(kernels, layout, c), layout)
    total = float((W3 * W3).sum())
    error = max(total - float(spectra.squared_singular_values[:, 0].sum()), 0.0)
    return kernels.reshape(c, kh, kw), pointwise.contiguous(), error


def dws_layer(conv: nn.Conv2d) -> GDWSConv2d:
    """``conv`` as a depthwise-separable :class:`~gdws_torch.GDWSConv2d` (one kernel per
    channel, no gather), in ``conv``'s dtype and device, with its bias and options."""
    kernels, pointwise, _ = dws_factors(conv.weight)
    return GDWSConv2d.from_factors(conv, kernels, torch.arange(conv.in_channels), pointwise)


def plan_dws(sites: list[LayerSite], budget: float) -> tuple[dict[str, bool], dict[str, float]]:
    """Which layers become DWS: least total weight error with their MACs ``<= budget``.

    Parameters
    ----------
    sites : list of LayerSite
    budget : float
        MACs per sample the chosen layers may use in all.

    Returns
    -------
    replaced : dict of str to bool
    errors : dict of str to float
        Each layer's DWS weight error.

    Raises
    ------
    ValueError
        Even with every layer DWS (where that is cheaper) the budget is exceeded.
    """
    costs, errors, layer_errors = [], [], {}
    for site in sites:
        m, c, kh, kw = site.conv.weight.shape
        _, _, layer_errors[site.name] = dws_factors(site.conv.weight)
        dws = cost.gdws_macs(c, kh * kw, m) * site.output_pixels
        options_cost, options_error = [site.macs], [0.0]
        if dws < site.macs:
            options_cost.append(dws)
            options_error.append(layer_errors[site.name])
        costs.append(options_cost)
        errors.append(options_error)
    least = sum(min(option) for option in costs)
    chosen = choose_options(costs, errors, budget) if least <= budget else None
    if chosen is None:
        raise OutOfReach(least)
    replaced = {site.name: k == 1 for site, k in zip(sites, chosen, strict=True)}
    return replaced, layer_errors


def build_dws(model: nn.Module, sites: list[LayerSite], replaced: dict[str, bool]) -> None:
    """Replace the planned layers of ``model`` (a copy: changed in place)."""
    modules = dict(model.named_modules())
    for site in sites:
        if replaced[site.name]:
            replace_module(model, site.name, dws_layer(modules[site.name]))


def dws_report(
    sites: list[LayerSite], replaced: dict[str, bool], errors: dict[str, float], macs
) -> list[BaselineLayer]:
    """One :class:`BaselineLayer` per site (``macs``: the compressed model's count)."""
    return [
        BaselineLayer(
            site.name,
            tuple(site.conv.weight.shape),
            "dws" if replaced[site.name] else "dense",
            site.macs,
            macs[site.name].macs,
            errors[site.name] if replaced[site.name] else 0.0,
        )
        for site in sites
    ]
