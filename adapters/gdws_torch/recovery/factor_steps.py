"""The least-squares steps of the refit, in the kernels' block structure.

A GDWS layer's output error over calibration patches is ``tr((W - P D) S (W - P D)^T)``,
``S`` the ``(C K2, C K2)`` patch Gram matrix, ``R = W S``, ``P`` the ``(M, G)`` pointwise
weights and ``D`` the ``G`` depthwise kernels, each reading one channel ``c(g)``: row ``g``
of ``D`` is non-zero in channel ``c(g)``'s ``K2`` columns only. Every product the steps
need goes through that sparsity instead of dense ``(M, C K2) x (C K2, C K2)`` products:

- ``U = D S``: each channel's kernels times its ``K2`` rows of ``S``
  (``G K2 C K2`` flops instead of ``M (C K2)^2``);
- ``D S D^T`` and ``R D^T``: ``U`` and ``R`` read at each kernel's own channel;
- the depthwise normal equations ``H k = b`` with ``H[(g, i), (h, j)] = (P^T P)[g, h]
  S[(c(g), i), (c(h), j)]``: ``H k`` is ``(P^T P) U`` read at each kernel's channel
  (``G^2 K2`` more flops), so conjugate gradients cost ``O(G K2 (C K2 + G))`` per
  iteration, not ``O(M (C K2)^2)``.

The kernels live in a padded layout ``(C, width, K2)`` (``width`` the largest number of
kernels of one channel, at most ``K2`` for an SVD-based layer) so that these are batched
matrix products. The arithmetic is float64 like the reference solvers
(:mod:`gdws_torch.recovery.reference_steps`), which the tests compare with.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gdws_approx import reduced_rank_fit

__all__ = ["KernelBlocks", "depthwise_step", "pointwise_step", "refit_error"]

#: Largest ``G * Kh * Kw`` whose depthwise normal equations are solved directly (their
#: matrix takes ``8 * (G Kh Kw)^2`` bytes and a Cholesky factorisation ``(G Kh Kw)^3 / 3``
#: flops); larger layers use conjugate gradients, each iteration
#: ``O(G Kh Kw (C Kh Kw + G))`` flops.
MAX_DIRECT_UNKNOWNS = 6144
CG_TOLERANCE = 1e-10
CG_MAX_ITERATIONS = 2000
#: Conjugate gradients given a stopping error also stop once their last :data:`CG_WINDOW`
#: iterations lowered the layer error by less than it in all (the Hestenes-Stiefel
#: estimate of what is left): on the ill-conditioned systems of wide layers this takes a
#: few hundred iterations where the residual test takes thousands.
CG_WINDOW = 20
#: At most this many iterations for such an inexact step: where the layer can be fitted
#: almost exactly (fewer calibration patches than unknowns), the error keeps falling
#: slowly towards zero and the window test alone would run to :data:`CG_MAX_ITERATIONS`.
#: Measured on PreActResNet-18's wide layers (300 PGD calibration inputs): 60 iterations
#: end at the same layer errors (8 digits) as 250, four to five times sooner.
CG_INEXACT_MAX_ITERATIONS = 60


def check_factors(gram, cross, kernel_channels, pointwise, kernels) -> tuple[int, int, int, int]:
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


def solve_spd(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``matrix^-1 rhs`` for a symmetric positive semi-definite ``matrix`` (a least-squares
    minimiser when it is singular)."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, factor)
    return torch.linalg.pinv(matrix, hermitian=True) @ rhs


class KernelBlocks:
    """One layer's statistics and its kernels' channels, for the structured products.

    Parameters
    ----------
    gram : torch.Tensor of shape (C*K2, C*K2)
        ``S``.
    cross : torch.Tensor of shape (M, C*K2)
        ``R``.
    kernel_channels : torch.LongTensor of shape (G,)
    k2 : int
        Entries of one kernel.
    """

    def __init__(
        self, gram: torch.Tensor, cross: torch.Tensor, kernel_channels: torch.Tensor, k2: int
    ):
        n = gram.shape[0]
        self.m, self.c, self.k2, self.g = cross.shape[0], n // k2, k2, len(kernel_channels)
        self.gram, self.cross, self.kernel_channels = gram, cross, kernel_channels
        counts = torch.bincount(kernel_channels, minlength=self.c)
        self.width = max(1, int(counts.max()) if self.g else 1)
        order = torch.argsort(kernel_channels, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(kernel_channels)
        rank[order] = torch.arange(self.g, device=gram.device) - starts[kernel_channels[order]]
        #: Each kernel's row in the padded ``(C * width)`` layout.
        self.index = kernel_channels * self.width + rank
        self.slots = self.c * self.width
        self._gram_rows = gram.view(self.c, k2, n)
        self._cross3 = cross.view(self.m, self.c, k2)

    def pad(self, kernels: torch.Tensor) -> torch.Tensor:
        """``(G, K2)`` kernels as ``(C, width, K2)``, zeros in the unused slots."""
        out = kernels.new_zeros(self.slots, self.k2)
        out[self.index] = kernels
        return out.view(self.c, self.width, self.k2)

    def times_gram(self, padded: torch.Tensor) -> torch.Tensor:
        """``D S`` in the padded layout, ``(C * width, C, K2)``."""
        return torch.bmm(padded, self._gram_rows).view(self.slots, self.c, self.k2)

    def features(self, padded: torch.Tensor, times_gram: torch.Tensor) -> torch.Tensor:
        """``D S D^T``, ``(G, G)``: the depthwise outputs' Gram matrix."""
        full = torch.einsum("csi,hci->csh", padded, times_gram).reshape(self.slots, self.slots)
        return full[self.index][:, self.index]

    def cross_features(self, padded: torch.Tensor) -> torch.Tensor:
        """``R D^T``, ``(M, G)``."""
        full = torch.einsum("mci,csi->mcs", self._cross3, padded).reshape(self.m, self.slots)
        return full[:, self.index]

    def kernel_targets(self, pointwise: torch.Tensor) -> torch.Tensor:
        """``b[g] = (P^T R)[g, c(g)]``, ``(G, K2)``: the depthwise step's right-hand side."""
        padded = pointwise.new_zeros(self.m, self.slots)
        padded[:, self.index] = pointwise
        full = torch.einsum("mcs,mci->csi", padded.view(self.m, self.c, self.width), self._cross3)
        return full.reshape(self.slots, self.k2)[self.index]

    def diagonal_blocks(self, q: torch.Tensor) -> torch.Tensor:
        """``Q[g, g] S[c(g), c(g)]``, ``(G, K2, K2)``: the block diagonal of ``H``."""
        gram4 = self.gram.view(self.c, self.k2, self.c, self.k2)
        channels = self.kernel_channels
        return torch.diagonal(q)[:, None, None] * gram4[channels, :, channels, :]

    def hessian(self, q: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """``k -> H k`` for ``Q = P^T P`` (without the ridge), matrix-free."""
        padded_q = q.new_zeros(self.slots, self.slots)
        padded_q[self.index[:, None], self.index[None, :]] = q
        padded_q = padded_q.view(self.c, self.width, self.slots)

        def apply(kernels: torch.Tensor) -> torch.Tensor:
            times_gram = self.times_gram(self.pad(kernels))
            out = torch.einsum("csh,hci->csi", padded_q, times_gram)
            return out.reshape(self.slots, self.k2)[self.index]

        return apply

    def error(self, energy: float, pointwise: torch.Tensor, kernels: torch.Tensor) -> float:
        """``energy - 2 tr(P D R^T) + tr(P D S D^T P^T)``."""
        padded = self.pad(kernels)
        features = self.features(padded, self.times_gram(padded))
        linear = (pointwise * self.cross_features(padded)).sum()
        quadratic = ((pointwise @ features) * pointwise).sum()
        return float(energy - 2 * linear + quadratic)


def refit_error(gram, cross, energy, kernel_channels, pointwise, kernels) -> float:
    """The layer error ``energy - 2 tr(P D R^T) + tr(P D S D^T P^T)``.

    With ``S = sum patch patch^T``, ``R = sum y patch^T`` and ``energy = sum ||y||^2`` this is
    ``sum ||y - P D patch||^2`` (for ``y = W patch``: ``tr((W - P D) S (W - P D)^T)``).
    """
    k2 = check_factors(gram, cross, kernel_channels, pointwise, kernels)[3]
    return KernelBlocks(gram, cross, kernel_channels, k2).error(energy, pointwise, kernels)


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
    k2 = check_factors(gram, cross, kernel_channels, pointwise, kernels)[3]
    return _pointwise_step(KernelBlocks(gram, cross, kernel_channels, k2), kernels, ridge)


def _pointwise_step(blocks: KernelBlocks, kernels: torch.Tensor, ridge: float) -> torch.Tensor:
    padded = blocks.pad(kernels)
    features = blocks.features(padded, blocks.times_gram(padded))
    features = (features + features.T) / 2
    scale = torch.diagonal(features).mean().clamp_min(1e-30)
    eye = torch.eye(blocks.g, dtype=features.dtype, device=features.device)
    return solve_spd(features + ridge * scale * eye, blocks.cross_features(padded).T).T


def _reduced_rank_step(
    blocks: KernelBlocks, kernels: torch.Tensor, ridge: float, rank: int
) -> torch.Tensor:
    """The best pointwise weights of rank at most ``rank`` for fixed kernels (a GDWS
    layer with a low-rank pointwise), exactly: :func:`gdws_approx.reduced_rank_fit`."""
    padded = blocks.pad(kernels)
    features = blocks.features(padded, blocks.times_gram(padded))
    inner, outer = reduced_rank_fit(blocks.cross_features(padded), features, rank, ridge=ridge)
    return outer @ inner


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
    Up to ``max_direct`` unknowns they are solved directly (Cholesky); beyond, by
    conjugate gradients with a block-Jacobi preconditioner, started from ``kernels``
    (each iterate lowers the regularised error), each product ``H k`` computed through
    the kernels' channels (module notes), so memory stays ``O(M C K2 + (C K2)^2)``.

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
    k2 = check_factors(gram, cross, kernel_channels, pointwise, kernels)[3]
    blocks = KernelBlocks(gram, cross, kernel_channels, k2)
    return _depthwise_step(blocks, pointwise, kernels, ridge, max_direct)


def _depthwise_step(
    blocks: KernelBlocks,
    pointwise: torch.Tensor,
    kernels: torch.Tensor,
    ridge,
    max_direct,
    enough: float | None = None,
) -> torch.Tensor:
    q = pointwise.T @ pointwise
    b = blocks.kernel_targets(pointwise)
    diagonal_blocks = blocks.diagonal_blocks(q)
    lam = ridge * torch.diagonal(diagonal_blocks, dim1=1, dim2=2).mean().clamp_min(1e-30)
    g, k2 = blocks.g, blocks.k2
    if g * k2 <= max_direct:
        return _direct_solve(blocks.gram, blocks.kernel_channels, q, b, lam, k2)
    return conjugate_gradients(blocks.hessian(q), diagonal_blocks, lam, b, kernels, enough)


def _direct_solve(gram, kernel_channels, q, b, lam, k2) -> torch.Tensor:
    """The depthwise normal equations built as a dense ``(G K2)^2`` matrix and solved."""
    g = len(kernel_channels)
    c = gram.shape[0] // k2
    gram4 = gram.view(c, k2, c, k2)
    h = gram4[kernel_channels][:, :, kernel_channels]  # (G, K2, G, K2)
    h.mul_(q[:, None, :, None])
    h = h.reshape(g * k2, g * k2)
    h = (h + h.T) / 2
    h.diagonal().add_(lam)
    return solve_spd(h, b.reshape(-1, 1)).reshape(g, k2)


def conjugate_gradients(
    hessian: Callable[[torch.Tensor], torch.Tensor],
    diagonal_blocks: torch.Tensor,
    lam: torch.Tensor,
    b: torch.Tensor,
    start: torch.Tensor,
    enough: float | None = None,
) -> torch.Tensor:
    """Preconditioned conjugate gradients for ``(H + lam I) k = b`` from ``start``.

    The preconditioner is the block diagonal ``diagonal_blocks + lam I`` (Cholesky per
    kernel), or its diagonal where a block is singular (``lam = 0`` on a dead channel).
    Stops at a relative residual of :data:`CG_TOLERANCE`, once the last
    :data:`CG_WINDOW` iterations lowered ``k^T (H + lam I) k - 2 b^T k`` by less than
    ``enough`` in all (then after :data:`CG_INEXACT_MAX_ITERATIONS` iterations at most),
    after :data:`CG_MAX_ITERATIONS` iterations, or where the curvature vanishes.
    """
    k2 = b.shape[1]
    eye = torch.eye(k2, dtype=b.dtype, device=b.device)
    factor, info = torch.linalg.cholesky_ex(diagonal_blocks + lam * eye)
    if int(info.max()) != 0:
        factor = None
        diagonal = torch.diagonal(diagonal_blocks, dim1=1, dim2=2) + lam
        diagonal = torch.where(diagonal > 0, diagonal, torch.ones_like(diagonal))

    def precondition(r: torch.Tensor) -> torch.Tensor:
        if factor is None:
            return r / diagonal
        return torch.cholesky_solve(r[:, :, None], factor)[:, :, 0]

    def apply(k: torch.Tensor) -> torch.Tensor:
        return hessian(k) + lam * k

    x = start.clone()
    r = b - apply(x)
    z = precondition(r)
    p = z.clone()
    rz = (r * z).sum()
    norm_b = torch.linalg.vector_norm(b).clamp_min(1e-300)
    decreases: list[float] = []
    limit = CG_MAX_ITERATIONS if not enough else CG_INEXACT_MAX_ITERATIONS
    for _ in range(limit):
        if torch.linalg.vector_norm(r) <= CG_TOLERANCE * norm_b:
            break
        if enough is not None and len(decreases) >= CG_WINDOW:
            if sum(decreases[-CG_WINDOW:]) <= enough:
                break
        hp = apply(p)
        curvature = (p * hp).sum()
        if curvature <= 0:
            break
        step = rz / curvature
        decreases.append(float(step * rz))  # the error this iteration removes
        x += step * p
        r -= step * hp
        z = precondition(r)
        rz_next = (r * z).sum()
        p = z + (rz_next / rz) * p
        rz = rz_next
    return x
