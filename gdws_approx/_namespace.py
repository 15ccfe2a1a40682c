"""Array-namespace helpers: which library an input belongs to, and which float to compute in.

The namespace is always taken from the inputs of the call (never from global state), so
NumPy, CuPy, torch, JAX and array-api-strict arrays are handled alike: the computation runs
in the input's namespace, on the input's device, and results come back of the same kind.
"""

from __future__ import annotations

import warnings
from typing import Any

import array_api_compat
import numpy as np

__all__ = ["as_float_array", "compute_dtype", "get_namespace", "index_dtype", "work_dtype"]


def _describe(x: Any) -> str:
    module = type(x).__module__.split(".")[0]
    return f"{module}.{type(x).__name__}"


def get_namespace(*arrays: Any) -> Any:
    """Return the array-API namespace shared by ``arrays`` (``None`` entries ignored).

    Raises
    ------
    TypeError
        When the arrays come from different array libraries.
    """
    present = [a for a in arrays if a is not None]
    try:
        return array_api_compat.array_namespace(*present)
    except TypeError as exc:
        kinds = ", ".join(sorted({_describe(a) for a in present}))
        raise TypeError(
            f"all arrays of one call must come from the same array library; got {kinds}. "
            "Convert them explicitly (this library never converts behind your back)."
        ) from exc


def _is_array_api_obj(x: Any) -> bool:
    return array_api_compat.is_array_api_obj(x) and not isinstance(x, np.generic)


def as_float_array(x: Any, name: str) -> tuple[Any, Any]:
    """Return ``(xp, array)``: ``x`` as a real floating array of its own namespace.

    Arrays of any array-API library keep their namespace and device. Anything else
    (lists, array-likes) becomes a NumPy array. Integer and boolean arrays are promoted
    to the namespace's widest float; complex arrays and sparse matrices are refused.
    The input itself is never modified (promotion makes a copy).
    """
    if _is_sparse(x):
        raise TypeError(
            f"{name} is a sparse matrix ({type(x).__name__}); sparse input is not supported, "
            f"pass a dense array (for example {name}.toarray())."
        )
    if not _is_array_api_obj(x):
        x = np.asarray(x)
    if isinstance(x, np.ndarray) and x.dtype == object:
        x = x.astype(np.float64)
    xp = get_namespace(x)
    if xp.isdtype(x.dtype, "complex floating"):
        raise ValueError(f"Complex data not supported: {name} has dtype {x.dtype}.")
    if xp.isdtype(x.dtype, "real floating"):
        return xp, x
    if xp.isdtype(x.dtype, ("integral", "bool")):
        return xp, xp.astype(x, work_dtype(xp, array_api_compat.device(x)))
    raise TypeError(f"{name} must hold real numbers; got dtype {x.dtype}.")


def _is_sparse(x: Any) -> bool:
    try:
        import scipy.sparse
    except ImportError:  # pragma: no cover - scipy is a core dependency
        return False
    return scipy.sparse.issparse(x)


def work_dtype(xp: Any, device: Any) -> Any:
    """The widest real float the namespace supports on ``device``.

    float64 where available; float32 where the backend has no float64 (JAX without x64,
    Apple MPS). The solvers run in this precision whatever the input precision.
    """
    try:
        with warnings.catch_warnings():
            # JAX warns (and silently truncates) when x64 is disabled.
            warnings.simplefilter("ignore")
            probe = xp.zeros(1, dtype=xp.float64, device=device)
        if probe.dtype == xp.float64:
            return xp.float64
    except (TypeError, ValueError, RuntimeError):
        pass
    return xp.float32


def compute_dtype(xp: Any, dtype: Any, device: Any) -> Any:
    """The float matrix products run in: the input's own float32/float64, else ``work_dtype``.

    float16 and bfloat16 have no reliable matmul on every backend and too little precision
    for the solver, so they are computed in the wider float and cast back at the end.
    """
    if dtype == xp.float32 or dtype == xp.float64:
        return dtype
    return work_dtype(xp, device)


def index_dtype(xp: Any, device: Any) -> Any:
    """The namespace's default integer for indices and counts on ``device``.

    int64 almost everywhere; int32 on JAX without x64, which would otherwise truncate (and
    warn about) every int64 request.
    """
    try:
        return xp.__array_namespace_info__().default_dtypes(device=device)["indexing"]
    except (AttributeError, TypeError, KeyError):
        return xp.int64
