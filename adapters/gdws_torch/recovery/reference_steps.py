"""The refit's least-squares steps by dense products: the reference the fast steps of
:mod:`gdws_torch.recovery.factor_steps` are tested against.

Each step forms the dense ``(M, C K2)`` weight ``P D`` (or the ``(G, C K2)`` scattered
kernels) and multiplies it by the full ``(C K2, C K2)`` patch Gram matrix: simple to check,
``O(M (C K2)^2)`` flops per product, too slow for wide layers.
"""

from __future__ import annotations

import torch

from gdws_torch.recovery.factor_steps import (
    MAX_DIRECT_UNKNOWNS,
    check_factors,
    conjugate_gradients,
    solve_spd,
)

__all__ = [
    "REFERENCE_MAX_DIRECT",
    "reference_depthwise_step",
    "reference_pointwise_step",
    "reference_refit_error",
    "reference_refit_layer_factors",
]

#: The direct-solve threshold the reference solver used (``G * K2`` unknowns).
REFERENCE_MAX_DIRECT = 6144


def _dense_weight(pointwise, kernels, kernel_channels, c: int) -> torch.Tensor:
    """``P D`` as ``(M, C * K2)``: column block ``c`` sums the kernels reading channel ``c``."""
    m, k2 = pointwise.shape[0], kernels.shape[1]
    out = pointwise.new_zeros(m, c, k2)
    out.index_add_(1, kernel_channels, pointwise[:, :, None] * kernels[None])
    return out.reshape(m, c * k2)


def _scattered(kernels, kernel_channels, c: int) -> torch.Tensor:
    """``D`` as ``(G, C * K2)``: row ``g`` holds kernel ``g`` in its channel's block."""
    g, k2 = kernels.shape
    out = kernels.new_zeros(g, c, k2)
    out[torch.arange(g, device=kernels.device), kernel_channels] = kernels
    return out.reshape(g, c * k2)


def reference_refit_error(gram, cross, energy, kernel_channels, pointwise, kernels) -> float:
    """:func:`gdws_torch.recovery.refit_error` by ``tr((P D) S (P D)^T)`` formed densely."""
    c = check_factors(gram, cross, kernel_channels, pointwise, kernels)[2]
    what = _dense_weight(pointwise, kernels, kernel_channels, c)
    return float(energy - 2 * (what * cross).sum() + ((what @ gram) * what).sum())


def reference_pointwise_step(gram, cross, kernel_channels, kernels, ridge=1e-4) -> torch.Tensor:
    """:func:`gdws_torch.recovery.pointwise_step` with ``D S D^T`` formed densely."""
    pointwise = cross.new_zeros(cross.shape[0], kernels.shape[0])
    _, g, c, _ = check_factors(gram, cross, kernel_channels, pointwise, kernels)
    scattered = _scattered(kernels, kernel_channels, c)
    features = scattered @ gram @ scattered.T
    features = (features + features.T) / 2
    scale = torch.diagonal(features).mean().clamp_min(1e-30)
    regular = features + ridge * scale * torch.eye(g, dtype=gram.dtype, device=gram.device)
    return solve_spd(regular, (cross @ scattered.T).T).T


def reference_depthwise_step(
    gram, cross, kernel_channels, pointwise, kernels, ridge=1e-4, max_direct=MAX_DIRECT_UNKNOWNS
) -> torch.Tensor:
    """:func:`gdws_torch.recovery.depthwise_step` with ``H k`` through the dense ``P D S``."""
    m, g, c, k2 = check_factors(gram, cross, kernel_channels, pointwise, kernels)
    gram4 = gram.view(c, k2, c, k2)
    q = pointwise.T @ pointwise
    rows = torch.arange(g, device=gram.device)
    b = (pointwise.T @ cross).view(g, c, k2)[rows, kernel_channels]
    blocks = torch.diagonal(q)[:, None, None] * gram4[kernel_channels, :, kernel_channels, :]
    lam = ridge * torch.diagonal(blocks, dim1=1, dim2=2).mean().clamp_min(1e-30)
    if g * k2 <= max_direct:
        h = gram4[kernel_channels][:, :, kernel_channels]
        h.mul_(q[:, None, :, None])
        h = h.reshape(g * k2, g * k2)
        h = (h + h.T) / 2
        h.diagonal().add_(lam)
        return solve_spd(h, b.reshape(-1, 1)).reshape(g, k2)

    def hessian(k: torch.Tensor) -> torch.Tensor:
        what = _dense_weight(pointwise, k, kernel_channels, c)
        z = (what @ gram).view(m, c, k2)[:, kernel_channels]
        return torch.einsum("mg,mgi->gi", pointwise, z)

    return conjugate_gradients(hessian, blocks, lam, b, kernels)


def reference_refit_layer_factors(
    gram, cross, kernel_channels, pointwise, kernels, *, energy=0.0, iterations=3, ridge=1e-4
):
    """:func:`gdws_torch.recovery.refit_layer_factors` as it was: the dense steps, the
    direct solve up to :data:`REFERENCE_MAX_DIRECT` unknowns, every alternation run."""
    from gdws_torch.recovery.refit import alternate

    def depthwise(p, k, _error):
        return reference_depthwise_step(
            gram, cross, kernel_channels, p, k, ridge, REFERENCE_MAX_DIRECT
        )

    return alternate(
        lambda p, k: reference_refit_error(gram, cross, energy, kernel_channels, p, k),
        lambda k: reference_pointwise_step(gram, cross, kernel_channels, k, ridge),
        depthwise,
        pointwise,
        kernels,
        energy=energy,
        iterations=iterations,
        tolerance=0.0,
    )
