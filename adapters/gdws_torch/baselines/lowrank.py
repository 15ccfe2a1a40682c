"""Low-rank: a conv as two convs, ``Kh x Kw`` to ``R`` channels, then ``1 x 1`` to ``M``.

The output ``y = W p`` of a conv (``p`` an input patch, ``W`` of shape ``(M, C Kh Kw)``)
is approximated by ``U U^T y``, ``U`` the ``(M, R)`` top eigenvectors of a second moment
of the responses: the first conv has the weight ``U^T W`` (``R`` filters of the conv's
geometry, no bias), the second is ``U`` with the conv's bias
(:class:`gdws_torch.LowRankConv2d`, the layer form the latency planner also chooses).

- ``criterion="weights"`` (data-free): the moment ``W W^T``, so ``U`` holds the top left
  singular vectors of ``W``: the truncated SVD of the reshaped weight, the least weight
  error ``||W - U U^T W||_F^2`` (the sum of the dropped squared singular values).
- ``criterion="responses"``: the moment ``sum y y^T`` of the dense layer's responses on
  calibration inputs, the channel decomposition of Zhang et al. 2015 ("Accelerating very
  deep convolutional networks for classification and detection", TPAMI; the linear,
  uncentred form: the PCA of the responses), which keeps the directions the data uses.
  Its error is the sum of the dropped eigenvalues: the response energy lost.

A rank ``R`` costs ``R (C Kh Kw + M)`` MACs per output pixel; the ranks of all layers are
chosen together, the least total error within the MAC budget (a layer may also stay
dense), by :func:`gdws_approx.choose_options`. The least-squares refit then re-solves the
``1 x 1`` conv on the inputs the compressed network feeds the layer (Zhang et al.'s
asymmetric reconstruction, with the dense layer applied to those same inputs as the
target, as the GDWS refit does).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gdws_approx import choose_options
from gdws_torch.baselines.common import (
    BaselineLayer,
    LayerSite,
    OutOfReach,
    capture_inputs,
    quadratic_error,
    run_with_hooks,
    solve_ridge,
)
from gdws_torch.nn.lowrank import LowRankConv2d
from gdws_torch.nn.module_tree import replace_module

__all__ = [
    "LowRankConv2d",
    "build_lowrank",
    "lowrank_basis",
    "lowrank_report",
    "plan_lowrank",
    "refit_lowrank",
    "response_moments",
]


def lowrank_basis(
    weight: torch.Tensor, moment: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The directions and values the ranks are taken from, in float64, largest first.

    Parameters
    ----------
    weight : torch.Tensor of shape (M, C, Kh, Kw)
    moment : torch.Tensor of shape (M, M), optional
        ``sum y y^T`` over the dense layer's responses (without bias); ``None``: ``W W^T``
        (computed as the SVD of ``W``).

    Returns
    -------
    basis : torch.Tensor of shape (M, Rmax)
        Orthonormal columns ``U``; ``Rmax = min(M, C*Kh*Kw)``.
    values : torch.Tensor of shape (Rmax,)
        The eigenvalues of the moment (squared singular values of ``W``): the error of
        rank ``R`` is the sum of ``values[R:]``.
    """
    W2 = weight.detach().to(torch.float64).flatten(1)
    top = min(W2.shape)
    if moment is None:
        basis, singular, _ = torch.linalg.svd(W2, full_matrices=False)
        return basis[:, :top], (singular[:top] ** 2)
    moment = moment.to(torch.float64)
    values, vectors = torch.linalg.eigh((moment + moment.T) / 2)
    values, vectors = values.flip(0)[:top].clamp_min(0), vectors.flip(1)[:, :top]
    return vectors, values


def response_moments(
    model: nn.Module, sites: Sequence[LayerSite], batches: list[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``sum y y^T`` of every site's responses (bias removed), one pass of ``model``."""
    moments: dict[str, torch.Tensor] = {}

    def hook(name: str, conv: nn.Conv2d):
        def record(_module, _inputs, output):
            y = output.detach().to(torch.float64)
            if conv.bias is not None:
                y = y - conv.bias.detach().to(torch.float64).view(1, -1, 1, 1)
            rows = y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])
            moments[name] = moments.get(name, 0) + rows.T @ rows

        return record

    run_with_hooks(model, batches, {s.conv: hook(s.name, s.conv) for s in sites}, pre=False)
    return moments


def plan_lowrank(
    sites: Sequence[LayerSite], budget: float, moments: dict[str, torch.Tensor] | None
) -> tuple[dict[str, int], dict[str, float], dict[str, torch.Tensor]]:
    """The rank of every layer (``0``: dense): least total error with MACs ``<= budget``.

    Returns
    -------
    ranks : dict of str to int
    errors : dict of str to float
        The error of each layer at its rank.
    bases : dict of str to torch.Tensor
        Each layer's basis (:func:`lowrank_basis`).
    """
    costs, errors, bases, tails = [], [], {}, {}
    for site in sites:
        m, c, kh, kw = site.conv.weight.shape
        basis, values = lowrank_basis(
            site.conv.weight, None if moments is None else moments[site.name]
        )
        bases[site.name] = basis
        # tail[R] = sum(values[R:]), the error of rank R.
        tail = torch.cat([values.flip(0).cumsum(0).flip(0), values.new_zeros(1)]).tolist()
        tails[site.name] = tail
        per_rank = (c * kh * kw + m) * site.output_pixels
        ranks = [r for r in range(1, basis.shape[1] + 1) if r * per_rank < site.macs]
        costs.append([site.macs] + [r * per_rank for r in ranks])
        errors.append([0.0] + [max(tail[r], 0.0) for r in ranks])
    least = sum(min(option) for option in costs)
    chosen = choose_options(costs, errors, budget) if least <= budget else None
    if chosen is None:
        raise OutOfReach(least)
    ranks, layer_errors = {}, {}
    for site, k, option_errors in zip(sites, chosen, errors, strict=True):
        ranks[site.name] = k  # option k >= 1 is rank k (ranks start at 1, in order)
        layer_errors[site.name] = option_errors[k]
    return ranks, layer_errors, bases


def build_lowrank(
    model: nn.Module,
    sites: Sequence[LayerSite],
    ranks: dict[str, int],
    bases: dict[str, torch.Tensor],
) -> None:
    """Replace the planned layers of ``model`` (a copy: changed in place)."""
    modules = dict(model.named_modules())
    for site in sites:
        rank = ranks[site.name]
        if rank:
            conv = modules[site.name]
            basis = bases[site.name][:, :rank]
            first = basis.T @ conv.weight.detach().to(torch.float64).flatten(1)
            replace_module(model, site.name, LowRankConv2d.from_factors(conv, first, basis))


def refit_lowrank(
    compressed: nn.Module,
    sites: Sequence[LayerSite],
    batches: list[torch.Tensor],
    ridge: float,
) -> dict[str, tuple[float, float]]:
    """Re-solve every :class:`LowRankConv2d`'s ``1 x 1`` weight by least squares, in
    execution order (``compressed`` changed in place; ``sites`` hold the dense convs).

    For each layer, over the inputs ``x`` ``compressed`` feeds it (earlier layers already
    refitted): ``second = argmin sum ||W x - second (first x)||^2`` (per output pixel,
    ``W`` the dense conv), the ridge relative to the mean diagonal of the Gram matrix; the
    solution is kept only if it lowers the layer's error (the ridge can cost more than
    the refit gains where the factors are already optimal for these inputs). Returns each
    layer's output error before and after.
    """
    modules = dict(compressed.named_modules())
    errors = {}
    for site in sites:
        layer = modules[site.name]
        if not isinstance(layer, LowRankConv2d):
            continue
        first = layer.first.weight.detach().to(torch.float64)
        dense = site.conv.weight.detach().to(torch.float64)
        r, m = layer.rank, dense.shape[0]
        gram = torch.zeros(r, r, dtype=torch.float64, device=first.device)
        cross = torch.zeros(m, r, dtype=torch.float64, device=first.device)
        energy = 0.0
        for x in capture_inputs(compressed, layer, batches):
            x = x.to(torch.float64)
            z = layer.first._conv_forward(x, first, None).permute(0, 2, 3, 1).reshape(-1, r)
            y = site.conv._conv_forward(x, dense, None).permute(0, 2, 3, 1).reshape(-1, m)
            gram += z.T @ z
            cross += y.T @ z
            energy += float((y * y).sum())
        before = layer.second.weight.detach().to(torch.float64).reshape(m, r)
        after = solve_ridge(gram, cross, ridge)
        error_before = quadratic_error(before, gram, cross, energy)
        error_after = quadratic_error(after, gram, cross, energy)
        if error_after > error_before:  # the ridge can cost more than the refit gains
            after, error_after = before, error_before
        errors[site.name] = (error_before, error_after)
        with torch.no_grad():
            layer.second.weight.copy_(after.reshape(m, r, 1, 1))
    return errors


def lowrank_report(
    sites: Sequence[LayerSite], ranks: dict[str, int], errors: dict[str, float], macs
) -> list[BaselineLayer]:
    """One :class:`BaselineLayer` per site (``macs``: the compressed model's count)."""
    layers = []
    for site in sites:
        rank = ranks[site.name]
        counted = sum(
            la.macs
            for la in macs.layers
            if la.name == site.name or la.name.startswith(site.name + ".")
        )
        layers.append(
            BaselineLayer(
                site.name,
                tuple(site.conv.weight.shape),
                f"low-rank R={rank}" if rank else "dense",
                site.macs,
                counted,
                errors[site.name],
            )
        )
    return layers
