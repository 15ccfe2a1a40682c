"""The scikit-learn estimator: ``GDWSApproximator``."""

from __future__ import annotations

from numbers import Integral, Real
from typing import Any, ClassVar

import array_api_compat
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from gdws_approx import cost
from gdws_approx._namespace import compute_dtype, get_namespace, work_dtype
from gdws_approx._validation import (
    check_alpha,
    check_finite,
    check_input_transforms,
    check_kernel_size,
    check_max_multiplier,
    check_output_weights,
    check_solver,
    check_solver_budget,
    check_spectrum_range,
    check_svd_solver,
    check_weight,
)
from gdws_approx.factors import kernel_layout, pad_kernels, project, reconstruct
from gdws_approx.selection import channel_errors, lego_multipliers, mego_multipliers
from gdws_approx.spectra import (
    ChannelSpectra,
    channel_spectra,
    check_weight_scale,
    resolve_svd_method,
)

__all__ = ["GDWSApproximator"]


class GDWSApproximator(TransformerMixin, BaseEstimator):
    """Optimal generalized depthwise-separable (GDWS) approximation of a convolution weight.

    A GDWS convolution gives input channel ``c`` its own ``g_c`` depthwise kernels followed
    by one ``1 x 1`` pointwise convolution; its dense equivalent is
    ``What_c = P_c @ D_c``. Fitting chooses the multipliers ``g`` and the factors that
    minimise, exactly, the weighted squared error
    ``e = sum_c alpha_c * ||W_c - What_c||_F**2`` under a kernel budget (MEGO), or the
    number of kernels ``G = sum(g)`` under an error budget (LEGO).

    Like :class:`sklearn.decomposition.PCA`: :meth:`fit` learns the depthwise kernels,
    :meth:`transform` gives the pointwise weights of a weight (its projection on the
    kernels) and :meth:`inverse_transform` the dense equivalent weight. Rows of a 2-D
    weight (the ``M`` output channels) play the role of samples.

    Any array-API library works (NumPy, CuPy, torch, JAX, array-api-strict): computation
    runs in the input's namespace and on its device, and fitted arrays are of the same
    kind. The solver runs in float64 where the backend has it; float16 and bfloat16 inputs
    are computed in that wider float and returned in their own dtype.

    Parameters
    ----------
    solver : {"lego", "mego"}, default="lego"
        ``"lego"``: fewest kernels with weighted squared error ``<= beta``.
        ``"mego"``: least weighted squared error with at most ``n_kernels`` kernels.
    beta : float, default=0.0
        LEGO's budget on the weighted *squared* error. ``0`` keeps every non-zero singular
        value: an exact representation.
    n_kernels : int or None, default=None
        MEGO's kernel budget ``gamma`` (required with ``solver="mego"``, refused with LEGO).
    kernel_size : int, (int, int) or None, default=None
        ``(Kh, Kw)``; required for a 2-D weight ``(M, C*Kh*Kw)``, checked against a 4-D one.
    max_multiplier : int or None, default=None
        At most this many kernels per input channel (``g_c <= max_multiplier``); both
        solvers stay optimal under the cap (each channel's values beyond it are dropped
        first, the rest ranked as usual). ``1`` gives the best ordinary
        depthwise-separable form, which runs without gathering channels.
    svd_solver : {"auto", "full", "covariance_eigh"}, default="auto"
        How the per-channel spectra are computed. ``"covariance_eigh"`` eigendecomposes
        the ``K2 x K2`` Gram matrices (fast; exact to float64 Gram precision),
        ``"full"`` runs a batched SVD. ``"auto"`` picks ``"covariance_eigh"`` when float64
        is wider than the input (float32/16 weights) and ``"full"`` otherwise.

    Attributes
    ----------
    multipliers_ : array of shape (C,), integer
        Channel multipliers ``g``: depthwise kernels kept per input channel.
    n_kernels_ : int
        ``G = sum(g)``.
    depthwise_kernels_ : array of shape (G, Kh, Kw)
        The kernels, grouped by input channel (ascending) and, within a channel, by
        decreasing singular value. Orthonormal within each channel.
    kernel_channels_ : array of shape (G,), integer
        Input channel read by each depthwise kernel. Integer arrays use the namespace's
        index dtype: int64, or int32 on JAX without x64.
    pointwise_weights_ : array of shape (M, G)
        Pointwise (``1 x 1``) weights; ``P @ D`` per channel is the dense equivalent.
    singular_values_ : array of shape (C, R)
        ``sigma_{c,i}`` per channel, non-increasing, ``R = min(M, Kh*Kw)``.
    weighted_spectrum_ : array of shape (C, R)
        ``alpha_c * sigma_{c,i}**2``: the values the solvers rank.
    alpha_ : array of shape (C,)
        The per-channel error weights used.
    channel_errors_ : array of shape (C,)
        Weighted squared error of each channel.
    error_ : float
        Weighted squared error ``sum_c alpha_c ||W_c - What_c||_F**2``.
    dense_macs_ : int
        MACs per output pixel of the dense convolution, ``M * C * Kh * Kw``.
    gdws_macs_ : int
        MACs per output pixel of the GDWS convolution, ``G * (Kh * Kw + M)``.
    mac_reduction_ : float
        ``dense_macs_ / gdws_macs_`` (``inf`` when no kernel is kept).
    n_output_channels_ : int
        ``M``.
    n_input_channels_ : int
        ``C``.
    kernel_size_ : tuple of int
        ``(Kh, Kw)``.
    output_weights_ : array of shape (M,) or None
        The per-output-channel weights ``a`` used (``None``: all ones).
    input_transforms_ : array of shape (C, Kh*Kw, Kh*Kw) or None
        The per-channel input transforms ``B_c`` used (``None``: identities).
    svd_solver_ : str
        The method ``svd_solver="auto"`` resolved to.
    n_features_in_ : int
        ``C * Kh * Kw``.

    See Also
    --------
    gdws_approx.mego_multipliers, gdws_approx.lego_multipliers : the solvers alone.

    Examples
    --------
    >>> import numpy as np
    >>> from gdws_approx import GDWSApproximator
    >>> W = np.random.default_rng(0).standard_normal((64, 32, 3, 3))
    >>> gdws = GDWSApproximator(beta=0.1 * float((W**2).sum())).fit(W)
    >>> gdws.n_kernels_ < 32 * 9
    True
    >>> W_hat = gdws.inverse_transform(gdws.pointwise_weights_)
    >>> W_hat.shape
    (64, 32, 3, 3)
    """

    _parameter_constraints: ClassVar[dict[str, list]] = {
        "solver": [StrOptions({"lego", "mego"})],
        "beta": [Interval(Real, 0, None, closed="left")],
        "n_kernels": [Interval(Integral, 0, None, closed="left"), None],
        "kernel_size": [Interval(Integral, 1, None, closed="left"), tuple, list, None],
        "svd_solver": [StrOptions({"auto", "full", "covariance_eigh"})],
        "max_multiplier": [Interval(Integral, 1, None, closed="left"), None],
    }

    def __init__(
        self,
        *,
        solver: str = "lego",
        beta: float = 0.0,
        n_kernels: int | None = None,
        kernel_size: int | tuple[int, int] | None = None,
        svd_solver: str = "auto",
        max_multiplier: int | None = None,
    ) -> None:
        self.solver = solver
        self.beta = beta
        self.n_kernels = n_kernels
        self.kernel_size = kernel_size
        self.svd_solver = svd_solver
        self.max_multiplier = max_multiplier

    # The weight is validated by fit itself: any array library, 2-D or 4-D.
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(
        self,
        W: Any,
        y: Any = None,
        alpha: Any = None,
        output_weights: Any = None,
        input_transforms: Any = None,
    ) -> GDWSApproximator:
        """Choose the multipliers and learn the depthwise and pointwise factors of ``W``.

        Parameters
        ----------
        W : array of shape (M, C, Kh, Kw) or (M, C*Kh*Kw)
            Convolution weight (``groups=1``), any array-API library. Not modified.
        y : None
            Ignored; present for scikit-learn compatibility. Pass ``alpha`` by keyword.
        alpha : array-like of shape (C,), default=None
            Non-negative per-input-channel error weights (for example noise gains); all
            ones when ``None``.
        output_weights : array-like of shape (M,), default=None
            Positive per-output-channel weights ``a``: the error of output channel ``m``
            counts ``a_m**2`` times (``A = diag(a)``; e.g. the scale a following BatchNorm
            applies). ``None``: all ones.
        input_transforms : array-like of shape (C, K2, K2) or (K2, K2), default=None
            Invertible ``B_c`` (one for all channels, or one per channel) weighting the
            error inside each kernel (e.g. the square root of channel ``c``'s input patch
            covariance). ``None``: identity.

        With all three the error is ``sum_c alpha_c ||A (W_c - What_c) B_c||_F**2``
        (``W_c`` the ``(M, K2)`` slice of input channel ``c``); MEGO and LEGO stay exact
        under it: each channel's best rank-``g`` approximation is the truncated SVD of
        ``A W_c B_c`` mapped back, so the solvers rank its singular values.

        Returns
        -------
        self : GDWSApproximator
        """
        solver = check_solver(self.solver)
        beta, n_kernels = check_solver_budget(solver, self.beta, self.n_kernels)
        cap = check_max_multiplier(self.max_multiplier)
        svd_solver = check_svd_solver(self.svd_solver)
        weight = check_weight(W, check_kernel_size(self.kernel_size))
        xp, W3 = weight.xp, weight.W3
        device = array_api_compat.device(W3)
        out_dtype = W3.dtype
        wide = work_dtype(xp, device)
        matmul_dtype = compute_dtype(xp, out_dtype, device)
        kh, kw = weight.kernel_size

        alpha = check_alpha(alpha, weight.n_in, W3, wide)
        output_weights = check_output_weights(output_weights, weight.n_out, W3, wide)
        transforms, inverses = check_input_transforms(
            input_transforms, weight.n_in, kh * kw, W3, wide
        )
        spectra = weighted_channel_spectra(W3, output_weights, transforms, svd_solver)
        values = alpha[:, None] * spectra.squared_singular_values
        check_spectrum_range(xp, values, out_dtype)
        ranked = values if cap is None else values[:, :cap]
        if solver == "lego":
            beyond = 0.0 if cap is None else float(xp.sum(values[:, cap:]))
            if beyond > beta:
                raise ValueError(
                    f"max_multiplier={cap} alone drops a weighted squared error of "
                    f"{beyond:.6g} > beta={beta!r}: raise beta or max_multiplier."
                )
            multipliers = lego_multipliers(ranked, beta - beyond)
        else:
            multipliers = mego_multipliers(ranked, n_kernels)

        layout = kernel_layout(multipliers)
        directions = spectra.right_singular_vectors[:, : layout.n_slots, :]  # V_c^T rows
        source = W3
        if transforms is not None:
            # Kernels V_c^T B_c^-1; pointwise weights W_c B_c V_c (A cancels out of them).
            source = _times_transforms(xp, xp.astype(W3, wide, copy=False), transforms)
            directions_out = xp.matmul(directions, inverses)
        else:
            directions_out = directions
        pointwise = project(
            xp.astype(source, matmul_dtype, copy=False),
            xp.astype(directions, matmul_dtype, copy=False),
            layout,
        )
        padded = xp.astype(directions_out, matmul_dtype, copy=False)
        kernels = xp.take(
            xp.reshape(padded, (weight.n_in * layout.n_slots, kh * kw)), layout.kernel_slots, axis=0
        )
        errors = channel_errors(values, multipliers)

        self.n_output_channels_ = weight.n_out
        self.n_input_channels_ = weight.n_in
        self.kernel_size_ = weight.kernel_size
        self.n_features_in_ = weight.n_in * kh * kw
        self.svd_solver_ = spectra.method
        self.multipliers_ = multipliers
        self.n_kernels_ = int(kernels.shape[0])
        self.depthwise_kernels_ = xp.astype(xp.reshape(kernels, (-1, kh, kw)), out_dtype)
        self.kernel_channels_ = layout.kernel_channels
        self.pointwise_weights_ = xp.astype(pointwise, out_dtype, copy=False)
        self.singular_values_ = xp.astype(xp.sqrt(spectra.squared_singular_values), out_dtype)
        self.weighted_spectrum_ = xp.astype(values, out_dtype)
        self.alpha_ = xp.astype(alpha, out_dtype)
        self.output_weights_ = (
            None if output_weights is None else xp.astype(output_weights, out_dtype)
        )
        self.input_transforms_ = None if transforms is None else xp.astype(transforms, out_dtype)
        self.channel_errors_ = xp.astype(errors, out_dtype)
        self.error_ = float(xp.sum(errors))
        self.dense_macs_ = cost.dense_macs(weight.n_out, weight.n_in, kh * kw)
        self.gdws_macs_ = cost.gdws_macs(self.n_kernels_, kh * kw, weight.n_out)
        self.mac_reduction_ = cost.mac_reduction(self.dense_macs_, self.gdws_macs_)
        self._fitted_ndim = weight.ndim
        return self

    def fit_transform(
        self,
        W: Any,
        y: Any = None,
        alpha: Any = None,
        output_weights: Any = None,
        input_transforms: Any = None,
    ) -> Any:
        """Fit and return the pointwise weights of ``W``, shape ``(M, G)``.

        Same as ``fit(W, ...).transform(W)``, without projecting twice.
        """
        self.fit(
            W, y, alpha=alpha, output_weights=output_weights, input_transforms=input_transforms
        )
        return self.pointwise_weights_

    def _check_same_namespace(self, x: Any, method: str) -> Any:
        """The namespace of ``x``, which must be the fit's (library and device)."""
        fitted = self.depthwise_kernels_
        where = f"{type(self).__name__}.{method}()"
        try:
            xp = array_api_compat.array_namespace(x, fitted)
        except TypeError:
            raise ValueError(
                f"{where}: inputs must use the same namespace as the fit; got "
                f"{type(x).__module__}.{type(x).__name__}, fitted on "
                f"{type(fitted).__module__}.{type(fitted).__name__}. Fit and call it with "
                "arrays of the same library."
            ) from None
        x_device, fitted_device = array_api_compat.device(x), array_api_compat.device(fitted)
        if x_device != fitted_device:
            raise ValueError(
                f"{where}: inputs must use the same namespace and device as the fit; got "
                f"device {x_device}, fitted on {fitted_device}."
            )
        return xp

    def _padded_kernels(self, xp: Any, dtype: Any) -> tuple[Any, Any]:
        layout = kernel_layout(self.multipliers_)
        kh, kw = self.kernel_size_
        kernels = xp.astype(xp.reshape(self.depthwise_kernels_, (self.n_kernels_, kh * kw)), dtype)
        return pad_kernels(kernels, layout, self.n_input_channels_), layout

    def transform(self, W: Any) -> Any:
        """Pointwise weights of ``W`` on the fitted depthwise kernels.

        ``P[m, j] = <W[m, c_j], D_j>``, the least-squares pointwise weight for the fitted
        kernels (they are orthonormal within a channel); with ``input_transforms`` the
        least-squares weight under that weighting. For the fitted ``W`` this is
        ``pointwise_weights_``.

        Parameters
        ----------
        W : array of shape (M', C, Kh, Kw) or (M', C*Kh*Kw)
            Same array library as the fit.

        Returns
        -------
        array of shape (M', G)
            In ``W``'s dtype.
        """
        check_is_fitted(self)
        weight = check_weight(W, self.kernel_size_, expected_in=self.n_input_channels_)
        xp = self._check_same_namespace(weight.W3, "transform")
        device = array_api_compat.device(weight.W3)
        dtype = compute_dtype(xp, weight.W3.dtype, device)
        padded, layout = self._padded_kernels(xp, dtype)
        W3 = xp.astype(weight.W3, dtype, copy=False)
        if self.input_transforms_ is not None:
            # Least squares under the fitted weighting: P_c = W_c B_c V_c, V_c^T = D_c B_c.
            transforms = xp.astype(self.input_transforms_, dtype)
            W3 = _times_transforms(xp, W3, transforms)
            padded = xp.matmul(padded, transforms)
        pointwise = project(W3, padded, layout)
        return xp.astype(pointwise, weight.W3.dtype, copy=False)

    def inverse_transform(self, P: Any) -> Any:
        """Dense equivalent weight of pointwise weights ``P`` and the fitted kernels.

        Parameters
        ----------
        P : array of shape (M', G)

        Returns
        -------
        array of shape (M', C, Kh, Kw), or (M', C*Kh*Kw) when fitted on a 2-D weight
            ``What[m, c] = sum_{j: c_j = c} P[m, j] D_j``, in ``P``'s dtype.
        """
        check_is_fitted(self)
        xp = self._check_same_namespace(P, "inverse_transform")
        if P.ndim != 2 or P.shape[1] != self.n_kernels_:
            raise ValueError(
                f"P must be a 2-D array (M, G) with G={self.n_kernels_} columns (one per "
                f"depthwise kernel); got shape {tuple(P.shape)}."
            )
        if not xp.isdtype(P.dtype, "real floating"):
            raise TypeError(f"P must be a real floating array; got dtype {P.dtype}.")
        check_finite(xp, P, "P")
        dtype = compute_dtype(xp, P.dtype, array_api_compat.device(P))
        padded, layout = self._padded_kernels(xp, dtype)
        dense = reconstruct(xp.astype(P, dtype, copy=False), padded, layout)
        m = P.shape[0]
        kh, kw = self.kernel_size_
        c = self.n_input_channels_
        shape = (m, c, kh, kw) if self._fitted_ndim == 4 else (m, c * kh * kw)
        return xp.astype(xp.reshape(dense, shape), P.dtype, copy=False)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        tags.input_tags.allow_nan = False
        tags.array_api_support = True
        return tags


def weighted_channel_spectra(
    W3: Any, output_weights: Any, transforms: Any, svd_solver: str
) -> ChannelSpectra:
    """Spectra of ``diag(output_weights) W_c B_c`` for every channel (validated inputs).

    ``svd_solver="auto"`` decides on ``W3``'s own precision, as an unweighted fit would.
    """
    xp = get_namespace(W3)
    device = array_api_compat.device(W3)
    method = resolve_svd_method(svd_solver, xp, W3.dtype, device)
    weighted = xp.astype(W3, work_dtype(xp, device), copy=False)
    check_weight_scale(xp, weighted)
    if output_weights is not None:
        weighted = output_weights[:, None, None] * weighted
    if transforms is not None:
        weighted = _times_transforms(xp, weighted, transforms)
    if output_weights is not None or transforms is not None:
        check_weight_scale(xp, weighted, "W weighted by output_weights and input_transforms")
    return channel_spectra(weighted, method=method)


def _times_transforms(xp: Any, W3: Any, transforms: Any) -> Any:
    """``W3[:, c, :] @ transforms[c]`` for every channel, shape ``(M, C, K2)``."""
    by_channel = xp.matmul(xp.permute_dims(W3, (1, 0, 2)), transforms)
    return xp.permute_dims(by_channel, (1, 0, 2))
