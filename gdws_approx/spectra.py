"""Per-input-channel spectra of a convolution weight.

For input channel ``c`` the slice ``W_c = W[:, c].reshape(M, K2)`` is factored as
``U_c diag(sigma_c) V_c^T``. GDWS keeps, per channel, a prefix of the right singular
vectors (the depthwise kernels); everything the solvers need is the squared singular
values ``sigma_c**2`` and the rows of ``V_c^T``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import array_api_compat

from gdws_approx._namespace import get_namespace, work_dtype

__all__ = ["SVD_METHODS", "ChannelSpectra", "channel_spectra", "resolve_svd_method"]

SVD_METHODS = ("auto", "full", "covariance_eigh")


class ChannelSpectra(NamedTuple):
    """Spectra of every input channel, in the working precision.

    Attributes
    ----------
    squared_singular_values : array of shape (C, R)
        ``sigma_{c,i}**2`` in non-increasing order per channel, ``R = min(M, K2)``.
        Values at or below the numerical rank tolerance are exactly zero.
    right_singular_vectors : array of shape (C, R, K2)
        Row ``i`` of channel ``c`` is the right singular vector of ``sigma_{c,i}``, with a
        deterministic sign (its largest-magnitude entry is positive).
    method : str
        ``"full"`` or ``"covariance_eigh"``, the method that produced them.
    """

    squared_singular_values: Any
    right_singular_vectors: Any
    method: str


def check_weight_scale(xp: Any, W3: Any, name: str = "W") -> None:
    """Refuse a weight ``(M, C, K2)`` whose squared singular values could overflow its dtype.

    A squared singular value of a channel slice is at most the slice's squared Frobenius
    norm, ``M * K2 * max|W|**2``, which also bounds the entries of its Gram matrix; both
    stay finite when ``max|W| <= sqrt(finfo.max / (M * K2))``.
    """
    n_out, _, k2 = W3.shape
    largest = float(xp.max(xp.abs(W3)))
    limit = math.sqrt(float(xp.finfo(W3.dtype).max) / (n_out * k2))
    if not largest <= limit:  # NaN too
        raise ValueError(
            f"{name} has values too large: its largest magnitude {largest:.3g} exceeds "
            f"{limit:.3g} (for M={n_out}, Kh*Kw={k2}), so its squared singular values overflow "
            f"{W3.dtype}. Scale the weights first (divide them by their largest magnitude) and "
            "scale the results back."
        )


def resolve_svd_method(method: str, xp: Any, input_dtype: Any, device: Any) -> str:
    """Turn ``"auto"`` into a concrete method.

    ``"covariance_eigh"`` (eigendecomposition of the ``K2 x K2`` Gram matrices, computed in
    float64) when that precision exceeds the input's: it is several times faster than a
    batched SVD and resolves every singular value the input's own precision can express.
    ``"full"`` (batched SVD) for float64 input or backends without float64, where forming
    the Gram matrix would square the condition number in the input's own precision.
    """
    if method != "auto":
        return method
    wide = work_dtype(xp, device)
    if wide == xp.float64 and input_dtype != xp.float64:
        return "covariance_eigh"
    return "full"


def _sign_normalised(xp: Any, vectors: Any) -> Any:
    """Flip each row of ``vectors`` so that its largest-magnitude entry is positive."""
    k2 = vectors.shape[-1]
    position = xp.argmax(xp.abs(vectors), axis=-1)
    columns = xp.arange(k2, device=array_api_compat.device(vectors))
    is_max = columns == position[..., None]
    pivot = xp.sum(xp.where(is_max, vectors, xp.zeros_like(vectors)), axis=-1)
    sign = xp.where(pivot < 0, -xp.ones_like(pivot), xp.ones_like(pivot))
    return vectors * sign[..., None]


def _full_svd(xp: Any, slices: Any) -> tuple[Any, Any]:
    _, s, vt = xp.linalg.svd(slices, full_matrices=False)
    m, k2 = slices.shape[-2:]
    eps = xp.finfo(slices.dtype).eps
    # The numerical-rank rule of numpy.linalg.matrix_rank, applied per channel.
    tol = s[:, :1] * (max(m, k2) * eps)
    s = xp.where(s <= tol, xp.zeros_like(s), s)
    return s * s, vt


def _covariance_eigh(xp: Any, slices: Any) -> tuple[Any, Any]:
    m, k2 = slices.shape[-2:]
    rank = min(m, k2)
    gram = xp.matmul(xp.matrix_transpose(slices), slices)
    eigenvalues, eigenvectors = xp.linalg.eigh(gram)
    # eigh sorts ascending: keep the top `rank` pairs, largest first.
    eigenvalues = xp.flip(eigenvalues, axis=-1)[:, :rank]
    vt = xp.matrix_transpose(xp.flip(eigenvectors, axis=-1))[:, :rank, :]
    eps = xp.finfo(slices.dtype).eps
    # Forming the Gram matrix costs precision: its eigenvalues carry an absolute error of
    # about max(M, K2) * eps * lambda_max; anything below that is indistinguishable from 0.
    tol = eigenvalues[:, :1] * (max(m, k2) * eps)
    eigenvalues = xp.where(eigenvalues <= tol, xp.zeros_like(eigenvalues), eigenvalues)
    return eigenvalues, vt


def channel_spectra(W3: Any, *, method: str = "auto") -> ChannelSpectra:
    """Squared singular values and right singular vectors of every input-channel slice.

    Parameters
    ----------
    W3 : array of shape (M, C, K2)
        Convolution weight with the kernel flattened (``W.reshape(M, C, Kh * Kw)``), any
        array-API library, real floating dtype.
    method : {"auto", "full", "covariance_eigh"}, default="auto"
        How the spectra are computed; see :func:`resolve_svd_method`.

    Returns
    -------
    ChannelSpectra
        In the namespace and on the device of ``W3``, in the working precision (float64
        where the backend has it).
    """
    xp = get_namespace(W3)
    if W3.ndim != 3:
        raise ValueError(f"W3 must be a 3-D array (M, C, K2); got shape {tuple(W3.shape)}.")
    device = array_api_compat.device(W3)
    method = resolve_svd_method(method, xp, W3.dtype, device)
    if method not in ("full", "covariance_eigh"):
        raise ValueError(f"method must be one of {SVD_METHODS}; got {method!r}.")
    solve = _full_svd if method == "full" else _covariance_eigh
    # Cast while the memory is still (M, C, K2)-contiguous: casting the permuted view is a
    # strided copy several times slower.
    wide = xp.astype(W3, work_dtype(xp, device), copy=False)
    check_weight_scale(xp, wide, "W3")
    values, vectors = solve(xp, xp.permute_dims(wide, (1, 0, 2)))
    return ChannelSpectra(values, _sign_normalised(xp, vectors), method)
