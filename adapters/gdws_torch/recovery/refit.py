"""GDWS factors refitted by least squares to match the dense network (training-free).

Each GDWS layer's ``1 x 1`` weights (and, jointly, its depthwise kernels, by alternating
least squares) are re-solved, layer after layer, so that its output matches the dense
convolution's on the inputs the converted network really feeds it (natural or
adversarial calibration inputs); ``G``, hence the MACs, stay as they are.

Over 400 lines because the three solvers (pointwise, depthwise, joint) share the
calibration set-up and the per-layer Gram accumulation.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from gdws_approx.checks import check_integer, check_real
from gdws_torch.common import conv_patches, take_samples
from gdws_torch.nn.module_tree import eval_mode

__all__ = [
    "calibration_inputs",
    "depthwise_step",
    "pointwise_step",
    "refit_error",
    "refit_gdws",
    "refit_layer_factors",
    "refit_pointwise",
]


def calibration_inputs(
    loader: Iterable, n_samples: int, dense: nn.Module, attack: Any, device: Any
) -> list[torch.Tensor]:
    """``n_samples`` inputs of ``loader`` in batches; adversarial against ``dense`` if asked."""
    batches = []
    crafter = None if attack is None else attack(copy.deepcopy(dense).eval())
    for batch in take_samples(loader, n_samples, labels=crafter is not None, device=device):
        images = batch[0] if crafter is None else crafter(batch[0], batch[1]).detach()
        batches.append(images)
    return batches


# -- refit: pointwise and depthwise factors by (alternating) least squares -------------------

#: Largest ``G * Kh * Kw`` whose depthwise normal equations are solved directly (their
#: matrix takes ``8 * (G Kh Kw)^2`` bytes); larger layers use conjugate gradients.
MAX_DIRECT_UNKNOWNS = 6144
_CG_TOLERANCE = 1e-10
_CG_MAX_ITERATIONS = 2000
_PATCH_CHUNK_BYTES = 64 * 2**20


def _check_factors(gram, cross, kernel_channels, pointwise, kernels) -> tuple[int, int, int, int]:
    """``(M, G, C, K2)`` of consistent refit arguments; ``ValueError`` naming the culprit."""
    for name, value, ndim in (
        ("gram", gram, 2),
        ("cross", cross, 2),
        ("kernel_channels", kernel_channels, 1),
        ("pointwise", pointwise, 2),
        ("kernels", kernels, 2),
    ):
        if not isinstance(value, torch.Tensor) or value.ndim != ndim:
            raise ValueError(
                f"{name} must be a {ndim}-D torch tensor; got "
                f"{type(value).__name__} of shape {tuple(getattr(value, 'shape', ()))}."
            )
    n = gram.shape[0]
    m, g = pointwise.shape
    k2 = kernels.shape[1]
    if gram.shape != (n, n):
        raise ValueError(f"gram must be square; got shape {tuple(gram.shape)}.")
    if k2 < 1 or n % k2:
        raise ValueError(
            f"gram's size {n} must be C * K2 for kernels of K2={k2} entries; it is not."
        )
    if cross.shape != (m, n):
        raise ValueError(f"cross must have shape (M, C*K2) = ({m}, {n}); got {tuple(cross.shape)}.")
    if kernels.shape[0] != g or kernel_channels.shape != (g,):
        raise ValueError(
            f"kernels ({tuple(kernels.shape)}) and kernel_channels "
            f"({tuple(kernel_channels.shape)}) must have G={g} rows, as pointwise's columns."
        )
    c = n // k2
    if kernel_channels.dtype.is_floating_point or (
        g and (int(kernel_channels.min()) < 0 or int(kernel_channels.max()) >= c)
    ):
        got = (
            f"dtype {kernel_channels.dtype}"
            if kernel_channels.dtype.is_floating_point
            else f"values from {int(kernel_channels.min())} to {int(kernel_channels.max())}"
        )
        raise ValueError(
            f"kernel_channels must be integer channel indices in [0, C={c}); got {got}."
        )
    return m, g, c, k2


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


def refit_error(gram, cross, energy, kernel_channels, pointwise, kernels) -> float:
    """The layer error ``energy - 2 tr(P D R^T) + tr(P D S D^T P^T)``.

    With ``S = sum patch patch^T``, ``R = sum y patch^T`` and ``energy = sum ||y||^2`` this is
    ``sum ||y - P D patch||^2`` (for ``y = W patch``: ``tr((W - P D) S (W - P D)^T)``).
    """
    c = _check_factors(gram, cross, kernel_channels, pointwise, kernels)[2]
    what = _dense_weight(pointwise, kernels, kernel_channels, c)
    return float(energy - 2 * (what * cross).sum() + ((what @ gram) * what).sum())


def _solve_spd(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``matrix^-1 rhs`` for a symmetric positive semi-definite ``matrix`` (a least-squares
    minimiser when it is singular)."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, factor)
    return torch.linalg.pinv(matrix, hermitian=True) @ rhs


def pointwise_step(gram, cross, kernel_channels, kernels, ridge: float = 1e-4) -> torch.Tensor:
    """The best pointwise weights for fixed depthwise kernels.

    ``P = R D^T (D S D^T + ridge * mean(diag(D S D^T)) I)^-1``, the minimiser of
    ``sum ||y - P D patch||^2`` plus the ridge (see :func:`refit_error` for the symbols).

    Parameters
    ----------
    gram : torch.Tensor of shape (C*K2, C*K2)
        ``S``, the input patch Gram matrix.
    cross : torch.Tensor of shape (M, C*K2)
        ``R = sum y patch^T`` (``W S`` to match the layer's dense weight ``W``).
    kernel_channels : torch.LongTensor of shape (G,)
    kernels : torch.Tensor of shape (G, K2)
        The depthwise kernels ``D``.
    ridge : float, default=1e-4
        Relative Tikhonov regularisation.

    Returns
    -------
    torch.Tensor of shape (M, G)
    """
    pointwise = cross.new_zeros(cross.shape[0], kernels.shape[0])
    _, g, c, _ = _check_factors(gram, cross, kernel_channels, pointwise, kernels)
    scattered = _scattered(kernels, kernel_channels, c)
    features = scattered @ gram @ scattered.T  # D S D^T: the depthwise outputs' Gram
    features = (features + features.T) / 2
    scale = torch.diagonal(features).mean().clamp_min(1e-30)
    regular = features + ridge * scale * torch.eye(g, dtype=gram.dtype, device=gram.device)
    return _solve_spd(regular, (cross @ scattered.T).T).T


def depthwise_step(
    gram,
    cross,
    kernel_channels,
    pointwise,
    kernels,
    ridge: float = 1e-4,
    max_direct: int = MAX_DIRECT_UNKNOWNS,
) -> torch.Tensor:
    """The best depthwise kernels for fixed pointwise weights.

    With ``Q = P^T P``, the ``G * K2`` kernel entries solve the normal equations
    ``H vec(k) = b``, ``H[(g, i), (h, j)] = Q[g, h] S[(c(g), i), (c(h), j)]`` and
    ``b[(g, i)] = (P^T R)[g, (c(g), i)]``, plus ``ridge * mean(diag(H))`` on the diagonal.
    Up to ``max_direct`` unknowns they are solved directly (Cholesky, float64 advised);
    beyond, by conjugate gradients with a block-Jacobi preconditioner, started from
    ``kernels`` (each iterate lowers the regularised error), so memory stays
    ``O(M C K2 + (C K2)^2)``.

    Parameters
    ----------
    gram, cross, kernel_channels
        See :func:`pointwise_step`.
    pointwise : torch.Tensor of shape (M, G)
    kernels : torch.Tensor of shape (G, K2)
        The current kernels (the conjugate gradients' start; their shape otherwise).
    ridge : float, default=1e-4
    max_direct : int, default=MAX_DIRECT_UNKNOWNS

    Returns
    -------
    torch.Tensor of shape (G, K2)
    """
    m, g, c, k2 = _check_factors(gram, cross, kernel_channels, pointwise, kernels)
    gram4 = gram.view(c, k2, c, k2)
    q = pointwise.T @ pointwise
    rows = torch.arange(g, device=gram.device)
    b = (pointwise.T @ cross).view(g, c, k2)[rows, kernel_channels]  # (G, K2)
    # The diagonal blocks Q[g, g] S_{c(g) c(g)}: the block-Jacobi part of H.
    blocks = torch.diagonal(q)[:, None, None] * gram4[kernel_channels, :, kernel_channels, :]
    lam = ridge * torch.diagonal(blocks, dim1=1, dim2=2).mean().clamp_min(1e-30)
    eye = torch.eye(k2, dtype=gram.dtype, device=gram.device)
    if g * k2 <= max_direct:
        h = gram4[kernel_channels][:, :, kernel_channels]  # (G, K2, G, K2)
        h.mul_(q[:, None, :, None])
        h = h.reshape(g * k2, g * k2)
        h = (h + h.T) / 2
        h.diagonal().add_(lam)
        return _solve_spd(h, b.reshape(-1, 1)).reshape(g, k2)

    def apply(k: torch.Tensor) -> torch.Tensor:  # H vec(k) + lam k, matrix-free
        what = _dense_weight(pointwise, k, kernel_channels, c)
        z = (what @ gram).view(m, c, k2)[:, kernel_channels]  # (M, G, K2)
        return torch.einsum("mg,mgi->gi", pointwise, z) + lam * k

    factor, info = torch.linalg.cholesky_ex(blocks + lam * eye)
    if int(info.max()) != 0:  # a singular block (lam = 0 on a dead channel): Jacobi only
        factor = None
        diagonal = torch.diagonal(blocks, dim1=1, dim2=2) + lam
        diagonal = torch.where(diagonal > 0, diagonal, torch.ones_like(diagonal))

    def precondition(r: torch.Tensor) -> torch.Tensor:
        if factor is None:
            return r / diagonal
        return torch.cholesky_solve(r[:, :, None], factor)[:, :, 0]

    x = kernels.clone()
    r = b - apply(x)
    z = precondition(r)
    p = z.clone()
    rz = (r * z).sum()
    norm_b = torch.linalg.vector_norm(b).clamp_min(1e-300)
    for _ in range(_CG_MAX_ITERATIONS):
        if torch.linalg.vector_norm(r) <= _CG_TOLERANCE * norm_b:
            break
        hp = apply(p)
        curvature = (p * hp).sum()
        if curvature <= 0:
            break
        step = rz / curvature
        x += step * p
        r -= step * hp
        z = precondition(r)
        rz_next = (r * z).sum()
        p = z + (rz_next / rz) * p
        rz = rz_next
    return x


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
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Alternating least squares for one GDWS layer from its patch statistics.

    Minimises ``sum ||y - P D patch||^2`` (:func:`refit_error`) over the pointwise weights
    ``P`` and the depthwise kernels ``D`` (same ``G``, same channels, hence same MACs): a
    :func:`pointwise_step`, then ``iterations`` times a :func:`depthwise_step` and a
    :func:`pointwise_step`. A step is kept only if it does not raise the (unregularised)
    error, so the error never increases; each depthwise step rescales the kernels to unit
    norm (their pointwise columns compensate: the product is unchanged).

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

    Returns
    -------
    pointwise : torch.Tensor of shape (M, G)
    kernels : torch.Tensor of shape (G, K2)
    errors : list of float
        The error of the starting factors, then after every step (``2 * iterations + 1``
        steps).

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
    _check_factors(gram, cross, kernel_channels, pointwise, kernels)
    error = refit_error(gram, cross, energy, kernel_channels, pointwise, kernels)
    errors = [error]
    # Relative slack for accepting a step: rounding of the error's cancellations.
    slack = 1e-10 * (abs(energy) + abs(error) + 1e-300)

    def accept(new_p, new_k):
        nonlocal pointwise, kernels, error
        candidate = refit_error(gram, cross, energy, kernel_channels, new_p, new_k)
        if candidate <= error + slack:
            pointwise, kernels, error = new_p, new_k, min(candidate, error)
        errors.append(error)

    accept(pointwise_step(gram, cross, kernel_channels, kernels, ridge), kernels)
    for _ in range(iterations):
        new_k = depthwise_step(gram, cross, kernel_channels, pointwise, kernels, ridge, max_direct)
        norms = torch.linalg.vector_norm(new_k, dim=1)
        norms = torch.where(norms > 0, norms, torch.ones_like(norms))
        accept(pointwise * norms, new_k / norms[:, None])
        accept(pointwise_step(gram, cross, kernel_channels, kernels, ridge), kernels)
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
    inplace: bool = False,
    progress: bool = True,
    return_errors: bool = False,
) -> nn.Module | tuple[nn.Module, dict[str, list[float]]]:
    """Re-solve the factors of every GDWS layer by least squares to match the dense convs.

    In execution order, for each :class:`~gdws_torch.GDWSConv2d` ``L`` of ``converted``
    (replacing the conv ``W`` of ``dense`` with the same name), with ``x`` the inputs
    ``converted`` feeds ``L`` (earlier layers already refitted) and ``patch`` their
    ``C Kh Kw`` input patches (:func:`gdws_torch.common.conv_patches`): the patch Gram matrix
    ``S = sum patch patch^T`` over all calibration inputs and output positions is
    accumulated in float64, and :func:`refit_layer_factors` minimises the layer's output
    error ``sum ||W patch - P D patch||^2 = tr((W - P D) S (W - P D)^T)`` over the
    pointwise weights ``P`` and, with ``depthwise``, the depthwise kernels ``D`` by
    alternating least squares. ``G``, the kernels' channels, the biases and the MACs are
    unchanged.

    Parameters
    ----------
    dense : torch.nn.Module
        The original network (read only).
    converted : torch.nn.Module
        Its GDWS version (from :func:`gdws_torch.convert`); copied unless ``inplace``.
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
    inplace, progress : bool
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
    from gdws_torch.nn.layers import GDWSConv2d

    check_integer(n_samples, "n_samples", minimum=1)
    check_integer(iterations, "iterations", minimum=0)
    check_integer(max_direct, "max_direct", minimum=0)
    check_real(ridge, "ridge", minimum=0)
    steps = iterations if depthwise else 0
    work = copy.deepcopy(converted)
    dense_modules = dict(dense.named_modules())
    layers = [(n, m) for n, m in work.named_modules() if isinstance(m, GDWSConv2d)]
    if not layers:
        raise ValueError("converted has no GDWSConv2d layer: nothing to refit.")
    for name, layer in layers:
        conv = dense_modules.get(name)
        if not isinstance(conv, nn.Conv2d) or conv.weight.shape[:2] != (
            layer.out_channels,
            layer.in_channels,
        ):
            raise ValueError(
                f"dense has no conv {name!r} matching the GDWS layer ({layer.out_channels}x"
                f"{layer.in_channels}); pass the model converted was made from."
            )
    device = next(iter(work.parameters())).device
    batches = calibration_inputs(loader, n_samples, dense, attack, device)
    errors: dict[str, list[float]] = {}
    what = "refit pointwise" if steps == 0 else "refit pointwise + depthwise"
    bar = tqdm(total=len(layers), desc=what, unit="layer", disable=not progress)
    with eval_mode(work):
        try:
            for name, layer in layers:
                gram, cross, energy = _layer_statistics(layer, dense_modules[name], work, batches)
                pointwise, kernels, errors[name] = refit_layer_factors(
                    gram,
                    cross,
                    layer.kernel_channels,
                    layer.pointwise.weight.detach().to(torch.float64).flatten(1),
                    layer.depthwise.weight.detach().to(torch.float64).flatten(1),
                    energy=energy,
                    iterations=steps,
                    ridge=ridge,
                    max_direct=max_direct,
                )
                with torch.no_grad():
                    for parameter, value in (
                        (layer.pointwise.weight, pointwise),
                        (layer.depthwise.weight, kernels),
                    ):
                        parameter.copy_(value.to(parameter.dtype).view_as(parameter))
                bar.update()
        finally:
            bar.close()
    if inplace:
        converted.load_state_dict(work.state_dict())
        work = converted
    return (work, errors) if return_errors else work


def _layer_statistics(layer, conv, work, batches):
    """``(S, W S, tr(W S W^T))`` of one GDWS layer over the calibration batches, in float64."""
    device = layer.kernel_channels.device
    weight = conv.weight.detach().to(device=device, dtype=torch.float64)
    m = weight.shape[0]
    n = weight[0].numel()
    gram = torch.zeros(n, n, dtype=torch.float64, device=device)
    captured: dict[str, torch.Tensor] = {}

    def capture(module, inputs):
        captured["x"] = inputs[0].detach()

    handle = layer.register_forward_pre_hook(capture)
    try:
        for images in batches:
            with torch.no_grad():
                work(images)
                x = captured["x"].to(torch.float64)
                per_sample = n * conv_patches(layer.depthwise, x[:1]).shape[-1] * 8
                chunk = max(1, _PATCH_CHUNK_BYTES // max(per_sample, 1))
                for start in range(0, len(x), chunk):
                    patches = conv_patches(layer.depthwise, x[start : start + chunk])
                    flat = patches.transpose(0, 1).reshape(n, -1)
                    gram += flat @ flat.T
    finally:
        handle.remove()
    gram = (gram + gram.T) / 2
    flat_weight = weight.reshape(m, n)
    cross = flat_weight @ gram
    return gram, cross, float((flat_weight * cross).sum())


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
