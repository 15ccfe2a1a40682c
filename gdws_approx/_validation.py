"""Argument checks. Every error names the argument, the value received and what is allowed."""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import array_api_compat

from gdws_approx._namespace import as_float_array, get_namespace
from gdws_approx.checks import check_integer, check_real
from gdws_approx.spectra import SVD_METHODS

SOLVERS = ("lego", "mego")


def check_solver(solver: Any) -> str:
    if not isinstance(solver, str) or solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}; got {solver!r}.")
    return solver


def check_beta(beta: Any) -> float:
    return check_real(beta, "beta", minimum=0)


def check_n_kernels(n_kernels: Any) -> int:
    return check_integer(n_kernels, "n_kernels", minimum=0)


def check_solver_budget(solver: str, beta: Any, n_kernels: Any) -> tuple[float, int | None]:
    """Validate the budget that matches ``solver`` and refuse the other one."""
    beta = check_beta(beta)
    if solver == "lego":
        if n_kernels is not None:
            raise ValueError(
                f"n_kernels={n_kernels!r} is MEGO's kernel budget, but solver='lego' takes "
                "the error budget beta: leave n_kernels=None or set solver='mego'."
            )
        return beta, None
    if n_kernels is None:
        raise ValueError("solver='mego' needs its kernel budget: set n_kernels to an integer >= 0.")
    if beta != 0.0:
        raise ValueError(
            f"beta={beta!r} is LEGO's error budget, but solver='mego' takes the kernel budget "
            "n_kernels: leave beta=0 or set solver='lego'."
        )
    return beta, check_n_kernels(n_kernels)


def check_max_multiplier(value: Any) -> int | None:
    """``None``, or a per-channel kernel cap ``>= 1``."""
    if value is None:
        return None
    return check_integer(value, "max_multiplier (or None: no cap)", minimum=1)


def check_kernel_size(kernel_size: Any) -> tuple[int, int] | None:
    if kernel_size is None:
        return None
    if isinstance(kernel_size, numbers.Integral) and not isinstance(kernel_size, bool):
        pair = (int(kernel_size), int(kernel_size))
    elif (
        isinstance(kernel_size, (tuple, list))
        and len(kernel_size) == 2
        and all(isinstance(k, numbers.Integral) and not isinstance(k, bool) for k in kernel_size)
    ):
        pair = (int(kernel_size[0]), int(kernel_size[1]))
    else:
        raise TypeError(
            f"kernel_size must be None, an int or a pair of ints (Kh, Kw); got {kernel_size!r}."
        )
    if min(pair) < 1:
        raise ValueError(f"kernel_size must be positive; got {kernel_size!r}.")
    return pair


def check_svd_solver(svd_solver: Any) -> str:
    if not isinstance(svd_solver, str) or svd_solver not in SVD_METHODS:
        raise ValueError(f"svd_solver must be one of {SVD_METHODS}; got {svd_solver!r}.")
    return svd_solver


class Weight(NamedTuple):
    """A validated convolution weight, flattened to ``(M, C, K2)``."""

    xp: Any
    W3: Any
    n_out: int
    n_in: int
    kernel_size: tuple[int, int]
    ndim: int


def check_finite(xp: Any, x: Any, name: str) -> None:
    if not bool(xp.all(xp.isfinite(x))):
        raise ValueError(f"{name} contains NaN or inf values; all entries must be finite.")


def check_spectrum_range(xp: Any, values: Any, dtype: Any, name: str = "W") -> None:
    """Refuse weighted squared singular values that are not finite or overflow ``dtype``.

    ``values`` (``alpha_c * sigma_{c,i}**2``, computed in the working precision) are
    returned in ``dtype``, and their sum is the error: all of it must be representable.
    """
    largest, total = float(xp.max(values)), float(xp.sum(values))
    limit = float(xp.finfo(dtype).max)
    if not (math.isfinite(total) and largest <= limit):
        raise ValueError(
            f"{name} has values too large: its weighted squared singular values "
            f"(alpha * sigma**2, largest {largest:.3g}, sum {total:.3g}) overflow {dtype} "
            f"(largest finite {limit:.3g}). Scale the weights (or alpha) first, dividing them "
            "by their largest magnitude, and scale the results back."
        )


def check_weight(
    W: Any,
    kernel_size: tuple[int, int] | None,
    *,
    name: str = "W",
    expected_in: int | None = None,
    estimator: str = "GDWSApproximator",
) -> Weight:
    """Validate a convolution weight: 4-D ``(M, C, Kh, Kw)`` or 2-D ``(M, C*Kh*Kw)``.

    With ``expected_in`` (the fitted ``C``), the features must match the fitted ones; the
    message then starts the way scikit-learn's checks expect.
    """
    xp, W = as_float_array(W, name)
    shape = tuple(W.shape)
    if W.ndim == 4:
        n_out, n_in, kh, kw = shape
        if kernel_size is not None and (kh, kw) != kernel_size:
            raise ValueError(
                f"{name} has kernel {kh}x{kw} (shape {shape}) but kernel_size={kernel_size}."
            )
        kernel_size = (kh, kw)
        n_features = n_in * kh * kw
    elif W.ndim == 2:
        n_out, n_features = shape
        if kernel_size is None:
            raise ValueError(
                f"kernel_size is required for a 2-D {name} (shape {shape}): set "
                "kernel_size=(Kh, Kw) so its columns read as C channels of Kh*Kw entries."
            )
        area = kernel_size[0] * kernel_size[1]
        if expected_in is None and n_features % area:
            raise ValueError(
                f"{name} has {n_features} columns, not a multiple of Kh*Kw = {area} "
                f"(kernel_size={kernel_size}); a 2-D weight must be (M, C*Kh*Kw)."
            )
        n_in = n_features // area
    else:
        raise ValueError(
            f"{name} must be a 4-D array (M, C, Kh, Kw) or a 2-D array (M, C*Kh*Kw); got "
            f"ndim={W.ndim} with shape {shape}. Reshape your data, e.g. W.reshape(1, -1) "
            "for a single output channel."
        )
    kh, kw = kernel_size
    if expected_in is not None:
        expected = expected_in * kh * kw
        if n_features != expected or (W.ndim == 4 and n_in != expected_in):
            raise ValueError(
                f"X has {n_features} features, but {estimator} is expecting {expected} features "
                f"as input: {name} must be (M, {expected_in}, {kh}, {kw}) or (M, {expected}); "
                f"got shape {shape}."
            )
    if n_out == 0:
        raise ValueError(
            f"{name} has 0 output channels (shape={shape}) while a minimum of 1 is required."
        )
    if n_features == 0:
        raise ValueError(
            f"{name} has 0 feature(s) (shape={shape}) while a minimum of 1 is required."
        )
    check_finite(xp, W, name)
    W3 = xp.reshape(W, (n_out, n_in, kh * kw))
    return Weight(xp, W3, n_out, n_in, (kh, kw), W.ndim)


def _channel_vector(
    xp: Any, values: Any, n: int, like: Any, dtype: Any, name: str, size: str, side: str
) -> Any:
    """``values`` as a finite 1-D real array of length ``n`` in ``like``'s namespace, ``dtype``."""
    if not array_api_compat.is_array_api_obj(values):
        values = xp.asarray(values, device=array_api_compat.device(like))
    else:
        get_namespace(values, like)  # refuses a mix of array libraries
    if values.ndim != 1 or values.shape[0] != n:
        raise ValueError(
            f"{name} must be a 1-D array of length {size}={n} (one weight per {side} "
            f"channel); got shape {tuple(values.shape)}."
        )
    if not xp.isdtype(values.dtype, ("real floating", "integral")):
        raise TypeError(f"{name} must hold real numbers; got dtype {values.dtype}.")
    values = xp.astype(values, dtype)
    check_finite(xp, values, name)
    return values


def check_alpha(alpha: Any, n_channels: int, like: Any, dtype: Any) -> Any:
    """Per-channel error weights: length ``C``, finite, non-negative; ones by default.

    Returned in the namespace and on the device of the array ``like``, as ``dtype``.
    """
    xp = get_namespace(like)
    device = array_api_compat.device(like)
    if alpha is None:
        return xp.ones(n_channels, dtype=dtype, device=device)
    alpha = _channel_vector(xp, alpha, n_channels, like, dtype, "alpha", "C", "input")
    if bool(xp.any(alpha < 0)):
        raise ValueError(f"alpha must be non-negative; got minimum {float(xp.min(alpha))!r}.")
    return alpha


def check_output_weights(weights: Any, n_out: int, like: Any, dtype: Any) -> Any:
    """Per-output-channel weights (the diagonal of ``A``): length ``M``, finite, > 0."""
    if weights is None:
        return None
    xp = get_namespace(like)
    weights = _channel_vector(xp, weights, n_out, like, dtype, "output_weights", "M", "output")
    if bool(xp.any(weights <= 0)):
        raise ValueError(
            f"output_weights must be positive; got minimum {float(xp.min(weights))!r}."
        )
    return weights


def check_input_transforms(transforms: Any, n_in: int, k2: int, like: Any, dtype: Any) -> Any:
    """Per-input-channel ``B_c``: ``(C, K2, K2)`` or one ``(K2, K2)`` for all, invertible.

    Returns ``(B, B^-1)`` as ``(C, K2, K2)`` arrays, or ``(None, None)``.
    """
    if transforms is None:
        return None, None
    xp = get_namespace(like)
    device = array_api_compat.device(like)
    if not array_api_compat.is_array_api_obj(transforms):
        transforms = xp.asarray(transforms, device=device)
    else:
        get_namespace(transforms, like)
    shape = tuple(transforms.shape)
    if shape not in ((k2, k2), (n_in, k2, k2)):
        raise ValueError(
            f"input_transforms must have shape (K2, K2) = ({k2}, {k2}) or (C, K2, K2) = "
            f"({n_in}, {k2}, {k2}); got {shape}."
        )
    if not xp.isdtype(transforms.dtype, ("real floating", "integral")):
        raise TypeError(f"input_transforms must hold real numbers; got dtype {transforms.dtype}.")
    transforms = xp.astype(transforms, dtype)
    check_finite(xp, transforms, "input_transforms")
    if transforms.ndim == 2:
        transforms = xp.broadcast_to(transforms[None, ...], (n_in, k2, k2))
    # Invertible, and not so badly conditioned that the factors lose their meaning.
    singular = xp.linalg.svdvals(transforms)
    smallest, largest = xp.min(singular, axis=-1), xp.max(singular, axis=-1)
    eps = xp.finfo(dtype).eps
    if bool(xp.any(smallest <= largest * (k2 * eps * 1e3))):
        ratio = smallest / xp.where(largest > 0, largest, xp.ones_like(largest))
        worst = int(xp.argmin(ratio))
        raise ValueError(
            f"input_transforms must be invertible; the matrix of channel {worst} is singular "
            "or nearly so."
        )
    return transforms, xp.linalg.inv(transforms)
