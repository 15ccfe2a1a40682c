"""Compressed layers refitted by least squares to match the dense network (training-free).

Layer after layer, in execution order, each compressed layer is re-solved so that its
output matches the dense convolution's on the inputs the converted network really feeds
it (natural or adversarial calibration inputs); its form and MACs stay as they are:

- a GDWS layer: its ``1 x 1`` weights and, jointly, its depthwise kernels, by alternating
  least squares (a GDWS layer with a low-rank pointwise: the same alternation, its
  pointwise step the exact rank-constrained one);
- a low-rank layer: both convs at once, at the exact least-squares optimum on those
  inputs (the response PCA: with ``S`` their patch Gram matrix, the top eigenvectors of
  ``W S W^T``, :meth:`gdws_approx.ResponseErrors.lowrank_factors`).

The steps themselves are in :mod:`.factor_steps`, the statistics they need are gathered
by :mod:`.statistics`; this module alternates the steps, layer after layer. Over 400
lines because its three documented entry points share one statistics pass, one
alternation and the dispatch over the layer forms.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from gdws_approx import ResponseErrors, reduced_rank_fit, response_error
from gdws_approx.checks import check_integer, check_real
from gdws_torch.nn.module_tree import eval_mode
from gdws_torch.recovery.calibration import calibration_inputs
from gdws_torch.recovery.factor_steps import (
    MAX_DIRECT_UNKNOWNS,
    KernelBlocks,
    _depthwise_step,
    _pointwise_step,
    _reduced_rank_step,
    check_factors,
    depthwise_step,
    pointwise_step,
    refit_error,
)
from gdws_torch.recovery.statistics import (
    DEFAULT_CACHE_BYTES,
    LayerInputs,
    check_products,
    layer_statistics,
)

__all__ = [
    "depthwise_step",
    "layer_statistics",
    "pointwise_step",
    "refit_error",
    "refit_gdws",
    "refit_layer_factors",
    "refit_pointwise",
]


# -- refit: pointwise and depthwise factors by (alternating) least squares -------------------

#: The default relative error decrease below which the alternation stops.
DEFAULT_TOLERANCE = 1e-3
#: The default relative error decrease below which a depthwise step's conjugate
#: gradients stop (a tenth of the alternation's).
DEFAULT_SOLVE_TOLERANCE = 1e-4


def refit_layer_factors(
    gram: torch.Tensor,
    cross: torch.Tensor,
    kernel_channels: torch.Tensor,
    pointwise: torch.Tensor,
    kernels: torch.Tensor,
    *,
    energy: float = 0.0,
    iterations: int = 3,
    ridge: float = 1e-4,
    max_direct: int = MAX_DIRECT_UNKNOWNS,
    tolerance: float = DEFAULT_TOLERANCE,
    solve_tolerance: float = DEFAULT_SOLVE_TOLERANCE,
    rank: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Alternating least squares for one GDWS layer from its patch statistics.

    Minimises ``sum ||y - P D patch||^2`` (:func:`refit_error`) over the pointwise weights
    ``P`` and the depthwise kernels ``D`` (same ``G``, same channels, hence same MACs): a
    :func:`pointwise_step`, then up to ``iterations`` times a :func:`depthwise_step` and a
    :func:`pointwise_step`, stopping early once an alternation lowers the error by less
    than ``tolerance`` times the error. A step is kept only if it does not raise the
    (unregularised) error, so the error never increases; each depthwise step rescales the
    kernels to unit norm (their pointwise columns compensate: the product is unchanged).
    The products go through the kernels' channels (:mod:`.factor_steps`).

    Parameters
    ----------
    gram : torch.Tensor of shape (C*K2, C*K2)
        ``S = sum patch patch^T`` over the calibration inputs and output positions.
    cross : torch.Tensor of shape (M, C*K2)
        ``R = sum y patch^T``: ``W S`` to match the dense weight ``W`` on these inputs.
    kernel_channels : torch.LongTensor of shape (G,)
    pointwise : torch.Tensor of shape (M, G)
        The starting factors (e.g. the SVD's); not modified.
    kernels : torch.Tensor of shape (G, K2)
    energy : float, default=0.0
        ``sum ||y||^2``: the reported errors are then the residual sums of squares
        (``tr(W S W^T)`` for ``y = W patch``); ``0`` reports them up to that constant.
    iterations : int, default=3
        Depthwise steps; ``0`` refits the pointwise weights only.
    ridge : float, default=1e-4
        Relative Tikhonov regularisation of every step.
    max_direct : int, default=MAX_DIRECT_UNKNOWNS
        See :func:`depthwise_step`.
    tolerance : float, default=DEFAULT_TOLERANCE
        Stop alternating when one alternation lowers the error by less than this fraction
        of it (of the starting error's magnitude when ``energy`` is 0); ``0``: run all
        ``iterations``.
    solve_tolerance : float, default=DEFAULT_SOLVE_TOLERANCE
        A depthwise step solved by conjugate gradients stops once its last iterations
        lower the error by less than this fraction of it: an inexact step (the
        alternation only keeps steps that lower the error), far cheaper on wide layers.
        ``0``: solved to the residual tolerance, as :func:`depthwise_step`.
    rank : int, optional
        Keep the pointwise weights of rank at most ``rank`` (a GDWS layer with a low-rank
        pointwise): each pointwise step is then the exact rank-constrained least squares
        (:func:`gdws_approx.reduced_rank_fit`); ``pointwise`` must have that rank.

    Returns
    -------
    pointwise : torch.Tensor of shape (M, G)
    kernels : torch.Tensor of shape (G, K2)
    errors : list of float
        The error of the starting factors, then after every step (``2 * iterations + 1``
        steps, fewer when the alternation stopped early).

    Raises
    ------
    ValueError
        Inconsistent shapes, a negative ``ridge``, ``iterations`` or ``max_direct``.
    TypeError
        ``iterations`` or ``max_direct`` not an integer, ``ridge`` not a real number.
    """
    check_integer(iterations, "iterations", minimum=0)
    check_integer(max_direct, "max_direct", minimum=0)
    check_real(ridge, "ridge", minimum=0)
    check_real(tolerance, "tolerance", minimum=0)
    check_real(solve_tolerance, "solve_tolerance", minimum=0)
    k2 = check_factors(gram, cross, kernel_channels, pointwise, kernels)[3]
    blocks = KernelBlocks(gram, cross, kernel_channels, k2)
    if rank is not None:
        rank = check_integer(rank, "rank", minimum=1)
    return alternate(
        lambda p, k: blocks.error(energy, p, k),
        lambda k: (
            _pointwise_step(blocks, k, ridge)
            if rank is None
            else _reduced_rank_step(blocks, k, ridge, rank)
        ),
        lambda p, k, error: _depthwise_step(
            blocks, p, k, ridge, max_direct, solve_tolerance * max(abs(error), 1e-6 * energy)
        ),
        pointwise,
        kernels,
        energy=energy,
        iterations=iterations,
        tolerance=tolerance,
    )


def alternate(
    error_of: Callable[[torch.Tensor, torch.Tensor], float],
    pointwise_step_of: Callable[[torch.Tensor], torch.Tensor],
    depthwise_step_of: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor],
    pointwise: torch.Tensor,
    kernels: torch.Tensor,
    *,
    energy: float,
    iterations: int,
    tolerance: float,
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """The alternation of :func:`refit_layer_factors` over given steps.

    ``error_of(P, D)``, ``pointwise_step_of(D)`` and ``depthwise_step_of(P, D, error)``
    (``error``: the current layer error, for the solver's own stopping rule) define the
    problem; the reference steps of :mod:`.reference_steps` run through here too.
    """
    error = error_of(pointwise, kernels)
    errors = [error]
    # Relative slack for accepting a step: rounding of the error's cancellations.
    slack = 1e-10 * (abs(energy) + abs(error) + 1e-300)

    def accept(new_p, new_k):
        nonlocal pointwise, kernels, error
        candidate = error_of(new_p, new_k)
        if candidate <= error + slack:
            pointwise, kernels, error = new_p, new_k, min(candidate, error)
        errors.append(error)

    accept(pointwise_step_of(kernels), kernels)
    for _ in range(iterations):
        before = error
        new_k = depthwise_step_of(pointwise, kernels, error)
        norms = torch.linalg.vector_norm(new_k, dim=1)
        norms = torch.where(norms > 0, norms, torch.ones_like(norms))
        accept(pointwise * norms, new_k / norms[:, None])
        accept(pointwise_step_of(kernels), kernels)
        if tolerance and before - error <= tolerance * (error if energy > 0 else abs(errors[0])):
            break  # the alternation stopped paying
    return pointwise, kernels, errors


def refit_gdws(
    dense: nn.Module,
    converted: nn.Module,
    loader: Iterable,
    n_samples: int = 1000,
    *,
    depthwise: bool = True,
    iterations: int = 3,
    attack: Callable[[nn.Module], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
    | None = None,
    ridge: float = 1e-4,
    max_direct: int = MAX_DIRECT_UNKNOWNS,
    tolerance: float = DEFAULT_TOLERANCE,
    solve_tolerance: float = DEFAULT_SOLVE_TOLERANCE,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    products: torch.dtype = torch.float32,
    inplace: bool = False,
    progress: bool = True,
    return_errors: bool = False,
) -> nn.Module | tuple[nn.Module, dict[str, list[float]]]:
    """Re-solve every compressed layer by least squares to match the dense convs.

    In execution order, for each compressed layer ``L`` of ``converted`` (a
    :class:`~gdws_torch.GDWSConv2d` or a :class:`~gdws_torch.LowRankConv2d`, replacing
    the conv ``W`` of ``dense`` with the same name), with ``x`` the inputs ``converted``
    feeds ``L`` (earlier layers already refitted) and ``patch`` their ``C Kh Kw`` input
    patches (:func:`gdws_torch.common.conv_patches`): the patch Gram matrix
    ``S = sum patch patch^T`` over all calibration inputs and output positions is
    accumulated in float64, and the layer's output error
    ``sum ||W patch - What patch||^2 = tr((W - What) S (W - What)^T)`` is minimised:

    - GDWS (``What = P D``): by :func:`refit_layer_factors` over the pointwise weights
      ``P`` and, with ``depthwise``, the depthwise kernels ``D``, alternating (with a
      low-rank pointwise, ``P`` stays of its rank);
    - low-rank: exactly, over both convs (the top eigenvectors of ``W S W^T``).

    Every form, ``G``, rank, the kernels' channels, the biases and the MACs are unchanged.

    Parameters
    ----------
    dense : torch.nn.Module
        The original network (read only).
    converted : torch.nn.Module
        Its compressed version (from :func:`gdws_torch.convert`); copied unless
        ``inplace``.
    loader : iterable of images or (images, labels)
        Calibration inputs (training data; labels only for ``attack``).
    n_samples : int, default=1000
    depthwise : bool, default=True
        Also refit the depthwise kernels (``False``: the pointwise weights only, as
        :func:`refit_pointwise`).
    iterations : int, default=3
        Alternations (depthwise step, then pointwise step) after the first pointwise step;
        ignored without ``depthwise``.
    attack : callable, optional
        ``attack(model) -> attack(images, labels)``: calibrate on adversarial inputs
        crafted against ``dense`` instead (measured best for robust accuracy).
    ridge : float, default=1e-4
        Relative Tikhonov regularisation of every least-squares step.
    max_direct : int, default=MAX_DIRECT_UNKNOWNS
        Layers with more than this many depthwise unknowns (``G Kh Kw``) solve the
        depthwise step by conjugate gradients instead of a dense ``(G Kh Kw)^2`` matrix.
    tolerance : float, default=DEFAULT_TOLERANCE
        A layer stops alternating when one alternation lowers its error by less than this
        fraction (:func:`refit_layer_factors`); ``0``: always ``iterations``.
    solve_tolerance : float, default=DEFAULT_SOLVE_TOLERANCE
        Of the depthwise steps' conjugate gradients (:func:`refit_layer_factors`).
    cache_bytes : int, default=2 GiB
        Memory for the cached inputs of enclosing modules (stages, blocks), from which
        each layer's pass over the calibration inputs resumes instead of running the
        network's whole prefix (:class:`~gdws_torch.recovery.statistics.LayerInputs`: the
        same inputs, fewer passes); ``0``: every pass from the model's input.
    products : torch.dtype, default=torch.float32
        Of the patch products behind ``S``: float32 multiplies a float32 network's inputs
        as they are, 1024 patches at a time, summed in float64 (about twice as fast on a
        CPU; on PreActResNet-18 the layer errors agree with float64 products to 5e-6
        relative but the last layer's 2e-4); ``torch.float64`` multiplies in float64.
        Inputs of a float64 network are always multiplied in float64.
    inplace, progress : bool
        ``progress``: a bar over the layers, with the current layer's name.
    return_errors : bool, default=False
        Also return ``{layer name: errors}``, the layer's residual sum of squares before
        and after every step (see :func:`refit_layer_factors`).

    Returns
    -------
    torch.nn.Module
        The refitted model, in ``converted``'s train/eval modes (and the errors when
        ``return_errors``).

    Raises
    ------
    ValueError
        Bad ``n_samples``, ``iterations``, ``ridge`` or ``max_direct``, no GDWS
        layer, a ``dense`` without the matching convs, a loader with fewer samples, or
        adversarial calibration without labels. ``converted`` is untouched then.
    TypeError
        ``n_samples``, ``iterations`` or ``max_direct`` not an integer, ``ridge`` not a
        real number. ``converted`` is untouched then.
    """
    check_integer(n_samples, "n_samples", minimum=1)
    check_integer(iterations, "iterations", minimum=0)
    check_integer(max_direct, "max_direct", minimum=0)
    check_real(ridge, "ridge", minimum=0)
    check_real(tolerance, "tolerance", minimum=0)
    check_real(solve_tolerance, "solve_tolerance", minimum=0)
    check_integer(cache_bytes, "cache_bytes", minimum=0)
    check_products(products)
    alternation = {
        "iterations": iterations if depthwise else 0,
        "ridge": ridge,
        "max_direct": max_direct,
        "tolerance": tolerance,
        "solve_tolerance": solve_tolerance,
    }
    work = copy.deepcopy(converted)
    dense_modules = dict(dense.named_modules())
    from gdws_torch.nn.planned import compressed_layers

    layers = compressed_layers(work)
    if not layers:
        raise ValueError("converted has no GDWSConv2d or LowRankConv2d layer: nothing to refit.")
    for name, layer in layers:
        conv = dense_modules.get(name)
        if not isinstance(conv, nn.Conv2d) or conv.weight.shape[:2] != (
            layer.out_channels,
            layer.in_channels,
        ):
            raise ValueError(
                f"dense has no conv {name!r} matching the compressed layer ({layer.out_channels}"
                f"x{layer.in_channels}); pass the model converted was made from."
            )
    device = next(iter(work.parameters())).device
    crafter = None if attack is None else attack(copy.deepcopy(dense).eval())
    batches = [
        batch[0]
        for batch in calibration_inputs(loader, n_samples, crafter, device=device, stage="refit")
    ]
    errors: dict[str, list[float]] = {}
    what = "refit pointwise" if not alternation["iterations"] else "refit pointwise + depthwise"
    bar = tqdm(total=len(layers), desc=what, unit="layer", disable=not progress)
    # The passes to each layer run the GDWS convs fused (one dense conv each: faster in
    # eager PyTorch, the same outputs); each conv's own mode comes back afterwards.
    from gdws_torch.nn.layers import GDWSConv2d

    modes = [(m, m.fused) for m in work.modules() if isinstance(m, GDWSConv2d)]
    with eval_mode(work):
        try:
            for module, _ in modes:
                module.fused = True
            feeds = LayerInputs(work, batches, cache_bytes)
            for name, layer in layers:
                bar.set_postfix_str(name)
                statistics = layer_statistics(
                    layer,
                    dense_modules[name],
                    work,
                    batches,
                    inputs=feeds.of(name),
                    products=products,
                )
                errors[name] = _refit_layer(layer, dense_modules[name], statistics, alternation)
                bar.update()
        finally:
            bar.close()
            for module, fused in modes:
                module.fused = fused
    if inplace:
        converted.load_state_dict(work.state_dict())
        work = converted
    return (work, errors) if return_errors else work


def _refit_layer(
    layer: nn.Module, conv: nn.Conv2d, statistics: tuple, alternation: dict[str, Any]
) -> list[float]:
    """One layer refitted in place from its statistics ``(S, W S, tr(W S W^T))``; returns
    its output errors (residual sums of squares) before and after every step."""
    gram, cross, energy = statistics
    if getattr(layer, "gdws", None) is False:  # a low-rank layer with a dense first conv
        return _refit_lowrank(layer, conv, gram)
    gdws = layer.first if hasattr(layer, "first") else layer
    pointwise = gdws.pointwise.weight.detach().to(torch.float64).flatten(1)
    rank = None
    if gdws is not layer:  # the low-rank pointwise: P = second @ first's 1 x 1
        rank = layer.rank
        pointwise = layer.second.weight.detach().to(torch.float64).flatten(1) @ pointwise
    pointwise, kernels, errors = refit_layer_factors(
        gram,
        cross,
        gdws.kernel_channels,
        pointwise,
        gdws.depthwise.weight.detach().to(torch.float64).flatten(1),
        energy=energy,
        rank=rank,
        **alternation,
    )
    _copy(gdws.depthwise.weight, kernels)
    if rank is None:
        _copy(gdws.pointwise.weight, pointwise)
    else:  # P has rank <= R: its exact factors, the top eigenvectors of P P^T
        eye = torch.eye(pointwise.shape[1], dtype=pointwise.dtype, device=pointwise.device)
        inner, outer = reduced_rank_fit(pointwise, eye, rank)
        _copy(gdws.pointwise.weight, _widen(inner, rank))
        _copy(layer.second.weight, _widen(outer.T, rank).T)
    return errors


def _refit_lowrank(layer: nn.Module, conv: nn.Conv2d, gram: torch.Tensor) -> list[float]:
    """A low-rank layer's exact least-squares optimum for its inputs' Gram matrix."""
    weight = conv.weight.detach().to(device=gram.device, dtype=torch.float64)
    before = response_error(weight, layer.dense_weight().detach().to(torch.float64), gram)
    optimum = ResponseErrors(weight, moment=gram)
    first, second = optimum.lowrank_factors(layer.rank)
    _copy(layer.first.weight, first)
    _copy(layer.second.weight, second)
    return [before, optimum.lowrank(layer.rank)]


def _widen(rows: torch.Tensor, rank: int) -> torch.Tensor:
    """``rows`` with zero rows added up to ``rank`` (``M < R`` keeps ``M`` factors)."""
    extra = rank - rows.shape[0]
    return rows if extra <= 0 else torch.cat([rows, rows.new_zeros(extra, rows.shape[1])])


def _copy(parameter: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        parameter.copy_(value.to(parameter.dtype).view_as(parameter))


def refit_pointwise(
    dense: nn.Module,
    converted: nn.Module,
    loader: Iterable,
    n_samples: int = 1000,
    *,
    attack: Callable[[nn.Module], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
    | None = None,
    ridge: float = 1e-4,
    inplace: bool = False,
    progress: bool = True,
) -> nn.Module:
    """Re-solve the pointwise weights of every GDWS layer to match the dense conv's output.

    :func:`refit_gdws` with ``depthwise=False``: in execution order,
    for each GDWS layer, ``P = argmin ||W * x - P d(x)||^2 + ridge * mean(diag) * ||P||^2``
    over all calibration inputs and positions, ``x`` the inputs ``converted`` feeds the
    layer and ``d(x)`` its depthwise outputs (solved in float64). Biases, depthwise kernels
    and MACs are unchanged.

    Parameters
    ----------
    dense : torch.nn.Module
        The original network (read only): the target of each layer.
    converted : torch.nn.Module
        Its GDWS version (from :func:`gdws_torch.convert`); copied unless ``inplace``.
    loader : iterable of images or (images, labels)
        Calibration inputs (training data; labels only for ``attack``).
    n_samples : int, default=1000
    attack : callable, optional
        ``attack(model) -> attack(images, labels)``: calibrate on adversarial inputs
        crafted against ``dense`` instead (measured best for robust accuracy).
    ridge : float, default=1e-4
        Relative Tikhonov regularisation of the least squares.
    inplace, progress : bool

    Returns
    -------
    torch.nn.Module
        The refitted model, in ``converted``'s train/eval modes.
    """
    return refit_gdws(
        dense,
        converted,
        loader,
        n_samples,
        depthwise=False,
        attack=attack,
        ridge=ridge,
        inplace=inplace,
        progress=progress,
    )
