"""Response errors: one comparable error for every form a layer can take.

A convolution with weight ``W`` (``M x N`` flattened, ``N = C Kh Kw``) maps an input patch
``p`` to ``W p``. Every form of the layer (dense, GDWS, grouped, low-rank, GDWS with a
low-rank pointwise) computes ``What p`` for some ``What``, and its *response error* is

    E(What) = tr(A (W - What) Sigma (W - What)^T A),

``Sigma`` (``N x N``) the second moment of the layer's input patches on calibration inputs
(the quantity the least-squares refit minimises) and ``A = diag(a)`` the output weights
(identity by default). Without a measured moment, ``Sigma`` is the block-diagonal moment
of the error weighting, channel ``c``'s block ``alpha_c B_c B_c^T``: the identity for unit
weights, where ``E`` is the weight error ``||W - What||_F^2``, and in general exactly the
weighted error GDWS's solvers minimise.

:class:`ResponseErrors` gives every form's error on one layer:

- **GDWS at every** ``G`` **at once.** MEGO keeps rank-one terms ``p_k d_k^T`` (pointwise
  column ``p_k``, depthwise kernel ``d_k`` placed in its channel's columns) in one order,
  so with ``x_k = A p_k``::

      E(G) = E0 - 2 sum_{k<G} a_k + sum_{k,l<G} b_kl,
      E0 = tr(A W Sigma W^T A),  a_k = x_k^T A W Sigma d_k,  b_kl = (x_k^T x_l)(d_k^T Sigma d_l),

  prefix sums over one ``G x G`` matrix, no fit per ``G``. The grouped form at ``m``
  keeps each channel's first ``m`` terms: the same sums over that set.
- **Low-rank at** ``R``: the least error of any rank-``R`` ``What`` is the sum of the
  eigenvalues of ``A W Sigma W^T A`` beyond the ``R`` largest, reached by
  ``What = A^-1 U_R U_R^T A W`` (``U`` its eigenvectors, largest first): a ``Kh x Kw``
  conv ``U_R^T A W`` (``C -> R``), then a ``1 x 1`` conv ``A^-1 U_R`` (``R -> M``).
- **GDWS with a low-rank pointwise** (``G`` kernels, rank ``R``): MEGO's ``G`` kernels,
  and the pointwise matrix replaced by its best rank-``R`` approximation in the metric of
  the kernels' responses (:func:`reduced_rank_fit`); exactly the least error for those
  kernels when ``Sigma`` is the weighting's own moment.

Everything is array-API generic and computed in float64 where the namespace has it.
Over 400 lines because the forms' errors share one set of terms and their derivations
(the docstrings are much of it).
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import array_api_compat

from gdws_approx._namespace import get_namespace, work_dtype
from gdws_approx._validation import (
    check_alpha,
    check_finite,
    check_input_transforms,
    check_kernel_size,
    check_output_weights,
    check_svd_solver,
    check_weight,
)
from gdws_approx.checks import check_integer, check_real
from gdws_approx.estimator import GDWSApproximator, weighted_channel_spectra
from gdws_approx.selection import keep_order

__all__ = ["ResponseErrors", "reduced_rank_fit", "response_error"]


def response_error(W: Any, W_hat: Any, moment: Any = None, output_weights: Any = None) -> float:
    """``tr(A (W - W_hat) Sigma (W - W_hat)^T A)`` computed from the two weights.

    Parameters
    ----------
    W, W_hat : arrays of shape (M, C, Kh, Kw) or (M, N)
        The layer's weight and an approximation of it (same shape, same library).
    moment : array of shape (N, N) or (C, Kh*Kw, Kh*Kw), optional
        ``Sigma``, full or block-diagonal (one block per input channel, for 4-D weights);
        the identity when ``None``.
    output_weights : array of shape (M,), optional
        The diagonal of ``A``; ones when ``None``.

    Returns
    -------
    float
    """
    xp = get_namespace(W, W_hat)
    if tuple(W.shape) != tuple(W_hat.shape):
        raise ValueError(f"W and W_hat must have one shape; got {W.shape} and {W_hat.shape}.")
    wide = work_dtype(xp, array_api_compat.device(W))
    diff = xp.reshape(xp.astype(W, wide) - xp.astype(W_hat, wide), (W.shape[0], -1))
    if output_weights is not None:
        weights = check_output_weights(output_weights, W.shape[0], diff, wide)
        diff = weights[:, None] * diff
    if moment is None:
        return float(xp.sum(diff * diff))
    n_in = W.shape[1] if W.ndim == 4 else 1
    blocks = _check_moment(moment, diff.shape[1], n_in, diff, wide)
    return float(xp.sum(diff * _times_moment(xp, diff, blocks)))


def reduced_rank_fit(cross: Any, features: Any, rank: int, *, ridge: float = 0.0) -> tuple:
    """The least-squares linear map of rank at most ``rank``, as two factors.

    Minimises ``sum ||y - P z||^2 + ridge * mean(diag(features)) ||P||_F^2`` over ``P``
    (``M x G``) of rank ``<= rank``, given ``features = sum z z^T`` and
    ``cross = sum y z^T`` (reduced-rank ridge regression): with
    ``F = features + ridge * mean(diag(features)) I`` and ``P* = cross F^-1`` (the
    unconstrained minimiser), the minimiser is ``U_R U_R^T P*``, ``U`` the eigenvectors
    of ``P* F P*^T`` (largest first).

    Parameters
    ----------
    cross : array of shape (M, G)
    features : array of shape (G, G)
        Symmetric positive semi-definite; singular only with ``ridge=0`` (then ``F^-1``
        is the pseudo-inverse).
    rank : int
        ``R >= 1``.
    ridge : float, default=0.0

    Returns
    -------
    inner : array of shape (R', G)
        ``U_R^T P*`` (``R' = min(R, M)``).
    outer : array of shape (M, R')
        ``U_R``: ``P = outer @ inner``.
    """
    xp = get_namespace(cross, features)
    rank = check_integer(rank, "rank", minimum=1)
    ridge = check_real(ridge, "ridge", minimum=0)
    m, g = cross.shape
    if tuple(features.shape) != (g, g):
        raise ValueError(f"features must be ({g}, {g}) for cross {tuple(cross.shape)}.")
    wide = work_dtype(xp, array_api_compat.device(cross))
    cross, features = xp.astype(cross, wide), xp.astype(features, wide)
    system = (features + xp.matrix_transpose(features)) / 2
    if ridge > 0:
        scale = xp.mean(xp.linalg.diagonal(system))
        eye = xp.eye(g, dtype=wide, device=array_api_compat.device(cross))
        system = system + ridge * (scale if float(scale) > 0 else 1.0) * eye
        optimum = xp.matrix_transpose(xp.linalg.solve(system, xp.matrix_transpose(cross)))
    else:
        optimum = cross @ xp.linalg.pinv(system)
    basis = _top_eigenvectors(xp, optimum @ xp.matrix_transpose(cross), min(rank, m))[1]
    return xp.matrix_transpose(basis) @ optimum, basis


class ResponseErrors:
    """The response error of every form of one layer (see the module notes).

    Parameters
    ----------
    W : array of shape (M, C, Kh, Kw) or (M, C*Kh*Kw)
        The layer's weight, any array-API library. Not modified.
    moment : array of shape (C*Kh*Kw, C*Kh*Kw) or (C, Kh*Kw, Kh*Kw), optional
        ``Sigma``: the second moment of the layer's input patches (full, or
        block-diagonal); ``None``: the weighting's own block-diagonal moment.
    alpha, output_weights, input_transforms : arrays, optional
        The GDWS error weighting, as :meth:`GDWSApproximator.fit` takes it: the GDWS forms
        are MEGO's fits under it, and without ``moment`` it defines ``Sigma``.
        ``output_weights`` is ``A`` in the error of every form.
    kernel_size : int or (int, int), optional
        Required for a 2-D ``W``.
    svd_solver : {"auto", "full", "covariance_eigh"}, default="auto"
        Of the GDWS fits.

    Attributes
    ----------
    energy : float
        ``E0``: the error of keeping nothing (``tr(A W Sigma W^T A)``).
    measured : bool
        Whether ``moment`` was given.
    """

    def __init__(
        self,
        W: Any,
        *,
        moment: Any = None,
        alpha: Any = None,
        output_weights: Any = None,
        input_transforms: Any = None,
        kernel_size: Any = None,
        svd_solver: str = "auto",
    ) -> None:
        weight = check_weight(W, check_kernel_size(kernel_size))
        xp = self._xp = weight.xp
        wide = work_dtype(xp, array_api_compat.device(weight.W3))
        self._weight = weight  # its own dtype: the GDWS fits are the planner's, bit for bit
        self._W3 = xp.astype(weight.W3, wide)
        m, c, k2 = self._W3.shape
        self.shape, self.kernel_size = (m, c, *weight.kernel_size), weight.kernel_size
        self._weighting = {
            "alpha": alpha,
            "output_weights": output_weights,
            "input_transforms": input_transforms,
        }
        self._svd_solver = check_svd_solver(svd_solver)
        self._alpha = check_alpha(alpha, c, self._W3, wide)
        self._a = check_output_weights(output_weights, m, self._W3, wide)
        self._transforms = check_input_transforms(input_transforms, c, k2, self._W3, wide)[0]
        self.measured = moment is not None
        if moment is None:
            eye = xp.eye(k2, dtype=wide, device=array_api_compat.device(self._W3))
            blocks = eye[None, ...]
            if self._transforms is not None:
                blocks = self._transforms @ _t(xp, self._transforms)
            self._moment = self._alpha[:, None, None] * blocks
        else:
            self._moment = _check_moment(moment, c * k2, c, self._W3, wide)
        flat = xp.reshape(self._W3, (m, c * k2))
        self._Y = flat if self._a is None else self._a[:, None] * flat
        self._Y_moment = _times_moment(xp, self._Y, self._moment)
        self.energy = float(xp.sum(self._Y * self._Y_moment))

    # -- low rank ------------------------------------------------------------------------

    @cached_property
    def _lowrank(self) -> tuple[Any, Any]:
        xp = self._xp
        return _top_eigenvectors(xp, self._Y_moment @ _t(xp, self._Y), min(self._Y.shape))

    @property
    def max_rank(self) -> int:
        """``min(M, C Kh Kw)``: the largest useful rank."""
        return min(self._Y.shape)

    def lowrank_errors(self) -> Any:
        """``E(R)`` for ``R = 0 .. max_rank``: the eigenvalues beyond the ``R`` largest."""
        xp = self._xp
        values = self._lowrank[0]
        tail = xp.flip(xp.cumulative_sum(xp.flip(values, axis=0)), axis=0)
        return xp.concat([tail, xp.zeros(1, dtype=tail.dtype, device=_device(tail))])

    def lowrank(self, rank: int) -> float:
        """The least response error of a rank-``rank`` form."""
        rank = check_integer(rank, "rank", minimum=0)
        return float(self.lowrank_errors()[min(rank, self.max_rank)])

    def lowrank_factors(self, rank: int) -> tuple[Any, Any]:
        """The optimal rank-``rank`` form: ``first`` (``R x N``: the ``Kh x Kw`` conv
        ``C -> R``, flattened) and ``second`` (``M x R``: the ``1 x 1`` conv), float64."""
        rank = check_integer(rank, "rank", minimum=1)
        if rank > self.max_rank:
            raise ValueError(f"rank must be at most min(M, C*Kh*Kw) = {self.max_rank}; got {rank}.")
        basis = self._lowrank[1][:, :rank]
        return _t(self._xp, basis) @ self._Y, self._unweighted(basis)

    # -- GDWS along MEGO's order --------------------------------------------------------

    @cached_property
    def _estimator(self) -> GDWSApproximator:
        m, c, kh, kw = self.shape
        every = c * min(m, kh * kw)
        estimator = GDWSApproximator(solver="mego", n_kernels=every, svd_solver=self._svd_solver)
        W = self._xp.reshape(self._weight.W3, self.shape)
        return estimator.fit(W, **self._weighting)

    @cached_property
    def _values(self) -> Any:
        """The weighted squared singular values ``(C, R)`` exactly as MEGO ranks them."""
        spectra = weighted_channel_spectra(
            self._weight.W3, self._a, self._transforms, self._svd_solver
        )
        return self._alpha[:, None] * spectra.squared_singular_values

    @cached_property
    def _terms(self) -> dict[str, Any]:
        """Each kept term's channel slot, keep rank, ``x_k``, ``a_k``, and ``b_kl``."""
        xp, est = self._xp, self._estimator
        c, k2 = self.shape[1], self.kernel_size[0] * self.kernel_size[1]
        channels, counts = est.kernel_channels_, est.multipliers_
        n, wide = est.n_kernels_, self._W3.dtype
        kernels = xp.astype(xp.reshape(est.depthwise_kernels_, (n, k2)), wide)
        pointwise = xp.astype(est.pointwise_weights_, wide)
        first = xp.cumulative_sum(counts) - counts
        slots = xp.arange(n, dtype=channels.dtype, device=_device(channels))
        slots = slots - xp.take(first, channels)
        values = self._values
        rank_of = xp.argsort(keep_order(values), stable=True)
        keep_rank = xp.take(rank_of, channels * values.shape[1] + slots)
        x = pointwise if self._a is None else self._a[:, None] * pointwise
        sizes = [int(counts[i]) for i in range(c)]
        kernels_moment = _kernels_times_moment(xp, kernels, channels, sizes, self._moment)
        cross = self._Y @ _t(xp, kernels_moment)
        gram = _kernel_gram(xp, kernels_moment, kernels, sizes)
        return {
            "slots": slots,
            "keep_rank": keep_rank,
            "x": x,
            "cross": cross,
            "gram": gram,
            "a": xp.sum(x * cross, axis=0),
            "b": (_t(xp, x) @ x) * gram,
        }

    @property
    def max_kernels(self) -> int:
        """The number of non-zero weighted singular values: the largest useful ``G``."""
        return int(self._xp.count_nonzero(self._values > 0))

    def gdws_errors(self) -> Any:
        """``E(G)`` for ``G = 0 .. max_kernels``, along MEGO's keep order."""
        xp = self._xp
        if not self.measured:  # the weighting's own moment: E(G) is MEGO's error
            values = xp.reshape(self._values, (-1,))
            kept = xp.take(values, keep_order(self._values))
            kept = xp.cumulative_sum(kept[: self.max_kernels])
            zero = xp.zeros(1, dtype=kept.dtype, device=_device(kept))
            return _clamp(xp, xp.sum(values) - xp.concat([zero, kept]))
        terms = self._terms
        order = xp.argsort(terms["keep_rank"], stable=True)
        a = xp.take(terms["a"], order)
        b = xp.take(xp.take(terms["b"], order, axis=0), order, axis=1)
        # sum_{k,l<G} b_kl: the diagonal of b's cumulative sums over both axes.
        quadratic = xp.cumulative_sum(xp.cumulative_sum(b, axis=0), axis=1)
        errors = self.energy - 2 * xp.cumulative_sum(a) + xp.linalg.diagonal(quadratic)
        zero = xp.asarray([self.energy], dtype=b.dtype, device=_device(b))
        return _clamp(xp, xp.concat([zero, errors]))

    def gdws(self, n_kernels: int) -> float:
        """The response error of MEGO's GDWS fit with ``n_kernels`` kernels."""
        n_kernels = check_integer(n_kernels, "n_kernels", minimum=0)
        return float(self.gdws_errors()[min(n_kernels, self.max_kernels)])

    def grouped(self, multiplier: int) -> float:
        """The response error of the grouped form: each channel's ``multiplier`` first
        kernels (MEGO with ``max_multiplier=multiplier``, ``C * multiplier`` kernels)."""
        multiplier = check_integer(multiplier, "multiplier", minimum=1)
        xp = self._xp
        values = self._values
        if not self.measured:
            return max(float(xp.sum(values) - xp.sum(values[:, :multiplier])), 0.0)
        terms = self._terms
        kept = xp.astype(terms["slots"] < multiplier, terms["a"].dtype)
        quadratic = xp.sum((terms["b"] @ kept) * kept)
        return max(float(self.energy - 2 * xp.sum(terms["a"] * kept) + quadratic), 0.0)

    # -- GDWS with a low-rank pointwise -----------------------------------------------------

    def _gdws_lowrank(self, n_kernels: int, rank: int) -> tuple[float, Any, Any]:
        n_kernels = check_integer(n_kernels, "n_kernels", minimum=1)
        rank = check_integer(rank, "rank", minimum=1)
        xp, terms = self._xp, self._terms
        kept = xp.nonzero(terms["keep_rank"] < n_kernels)[0]
        x = xp.take(terms["x"], kept, axis=1)
        cross = xp.take(terms["cross"], kept, axis=1)
        gram = xp.take(xp.take(terms["gram"], kept, axis=0), kept, axis=1)
        # x's best rank-R approximation in the metric `gram` (reduced_rank_fit with the
        # targets x z, z the kernels' responses): U_R U_R^T x, U the top eigenvectors of
        # x gram x^T.
        outer = _top_eigenvectors(xp, x @ gram @ _t(xp, x), min(rank, x.shape[0]))[1]
        inner = _t(xp, outer) @ x
        approximation = outer @ inner
        quadratic = xp.sum((approximation @ gram) * approximation)
        error = max(float(self.energy - 2 * xp.sum(approximation * cross) + quadratic), 0.0)
        return error, inner, self._unweighted(outer)

    def gdws_lowrank(self, n_kernels: int, rank: int) -> float:
        """The response error of MEGO's ``n_kernels`` kernels with a rank-``rank``
        pointwise matrix (see the module notes)."""
        return self._gdws_lowrank(n_kernels, rank)[0]

    def gdws_lowrank_factors(self, n_kernels: int, rank: int) -> tuple[Any, Any]:
        """The pointwise factors of :meth:`gdws_lowrank`: ``inner`` (``R' x G``, the
        ``1 x 1`` conv ``G -> R'``, columns in the order of
        ``GDWSApproximator(solver="mego", n_kernels=n_kernels)``'s kernels) and ``outer``
        (``M x R'``, the ``1 x 1`` conv ``R' -> M``), ``R' = min(rank, M)``; float64."""
        return self._gdws_lowrank(n_kernels, rank)[1:]

    def _unweighted(self, basis: Any) -> Any:
        return basis if self._a is None else basis / self._a[:, None]


def _t(xp: Any, x: Any) -> Any:
    return xp.matrix_transpose(x)


def _device(x: Any) -> Any:
    return array_api_compat.device(x)


def _clamp(xp: Any, errors: Any) -> Any:
    """Errors are non-negative; cancellation can leave ``-1e-16``-sized ones."""
    return xp.where(errors > 0, errors, xp.zeros_like(errors))


def _top_eigenvectors(xp: Any, matrix: Any, count: int) -> tuple[Any, Any]:
    """The ``count`` largest eigenvalues (clamped at 0) and eigenvectors of a symmetric
    ``matrix``, largest first."""
    values, vectors = xp.linalg.eigh((matrix + _t(xp, matrix)) / 2)
    values, vectors = xp.flip(values, axis=0)[:count], xp.flip(vectors, axis=1)[:, :count]
    return xp.where(values > 0, values, xp.zeros_like(values)), vectors


def _check_moment(moment: Any, n: int, n_in: int, like: Any, dtype: Any) -> Any:
    """``moment`` as a float array ``(n, n)`` or ``(C, K2, K2)``, symmetric, finite."""
    xp = get_namespace(like)
    if not array_api_compat.is_array_api_obj(moment):
        moment = xp.asarray(moment, device=array_api_compat.device(like))
    get_namespace(moment, like)  # refuses a mix of array libraries
    k2 = n // n_in
    if tuple(moment.shape) not in ((n, n), (n_in, k2, k2)):
        raise ValueError(
            f"moment must have shape (C*Kh*Kw, C*Kh*Kw) = ({n}, {n}) or (C, Kh*Kw, Kh*Kw) = "
            f"({n_in}, {k2}, {k2}); got {tuple(moment.shape)}."
        )
    if not xp.isdtype(moment.dtype, ("real floating", "integral")):
        raise TypeError(f"moment must hold real numbers; got dtype {moment.dtype}.")
    moment = xp.astype(moment, dtype)
    check_finite(xp, moment, "moment")
    return (moment + _t(xp, moment)) / 2


def _times_moment(xp: Any, rows: Any, moment: Any) -> Any:
    """``rows @ Sigma`` for ``rows`` of shape ``(R, N)``, ``Sigma`` full or by blocks."""
    if moment.ndim == 2:
        return rows @ moment
    c, k2, _ = moment.shape
    by_channel = xp.permute_dims(xp.reshape(rows, (rows.shape[0], c, k2)), (1, 0, 2))
    return xp.reshape(xp.permute_dims(by_channel @ moment, (1, 0, 2)), (rows.shape[0], c * k2))


def _kernels_times_moment(
    xp: Any, kernels: Any, channels: Any, sizes: list[int], moment: Any
) -> Any:
    """``D Sigma`` (``G x N``), ``D`` the kernels placed in their channels' columns (kernels
    in channel order, ``sizes[c]`` of channel ``c``): only channel ``c``'s rows of
    ``Sigma`` meet its kernels."""
    g, k2 = kernels.shape
    if moment.ndim == 3:  # block-diagonal: each kernel stays in its own channel's columns
        local = (kernels[:, None, :] @ xp.take(moment, channels, axis=0))[:, 0, :]
        c = moment.shape[0]
        mask = channels[:, None] == xp.arange(c, dtype=channels.dtype, device=_device(channels))
        placed = xp.astype(mask, local.dtype)[:, :, None] * local[:, None, :]
        return xp.reshape(placed, (g, c * k2))
    rows = xp.reshape(moment, (len(sizes), k2, moment.shape[1]))
    parts, start = [xp.zeros((0, moment.shape[1]), dtype=moment.dtype, device=_device(moment))], 0
    for channel, size in enumerate(sizes):
        if size:
            parts.append(kernels[start : start + size, :] @ rows[channel, ...])
            start += size
    return xp.concat(parts, axis=0)


def _kernel_gram(xp: Any, kernels_moment: Any, kernels: Any, sizes: list[int]) -> Any:
    """``D Sigma D^T`` (``G x G``) from ``D Sigma``, reading each kernel's channel."""
    g, k2 = kernels.shape
    by_channel = xp.reshape(kernels_moment, (g, len(sizes), k2))
    parts, start = [xp.zeros((g, 0), dtype=kernels.dtype, device=_device(kernels))], 0
    for channel, size in enumerate(sizes):
        if size:
            parts.append(by_channel[:, channel, :] @ _t(xp, kernels[start : start + size, :]))
            start += size
    return xp.concat(parts, axis=1)
