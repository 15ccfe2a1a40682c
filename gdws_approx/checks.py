"""Scalar argument checks shared by every package of the library.

Each raises ``TypeError`` when the value has the wrong type and ``ValueError`` when it has
the right type but a wrong value, and names the argument and the value received.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["check_integer", "check_real"]


def check_integer(value: Any, name: str, *, minimum: int | None = None) -> int:
    """``value`` as an ``int``, checked to be an integer ``>= minimum``.

    Parameters
    ----------
    value : object
        The argument received. ``bool`` is refused: ``True`` is not a count.
    name : str
        The argument's name, for the message.
    minimum : int, optional
        The smallest value allowed.

    Raises
    ------
    TypeError
        ``value`` is not an integer.
    ValueError
        ``value`` is below ``minimum``.
    """
    bound = "" if minimum is None else f" >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{name} must be an integer{bound}; got {value!r} ({type(value).__name__})."
        )
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an integer{bound}; got {value!r}.")
    return int(value)


def check_real(
    value: Any,
    name: str,
    *,
    minimum: float | None = None,
    strict: bool = False,
    maximum: float | None = None,
    unit: str = "",
) -> float:
    """``value`` as a finite ``float``, checked against its bounds.

    Parameters
    ----------
    value : object
        The argument received (any real number but ``bool``).
    name : str
        The argument's name, for the message.
    minimum : float, optional
        The lower bound: ``value >= minimum``, or ``value > minimum`` with ``strict``.
    strict : bool, default=False
    maximum : float, optional
        The upper bound, inclusive.
    unit : str, default=""
        Said in the message (e.g. ``"pixel units"``).

    Raises
    ------
    TypeError
        ``value`` is not a real number.
    ValueError
        ``value`` is not finite or out of its bounds.
    """
    bounds = []
    if minimum is not None:
        bounds.append(f"{'>' if strict else '>='} {minimum:g}")
    if maximum is not None:
        bounds.append(f"<= {maximum:g}")
    what = "a finite real number" + (" " + " and ".join(bounds) if bounds else "")
    if unit:
        what += f" ({unit})"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {what}; got {value!r} ({type(value).__name__}).")
    number = float(value)
    too_low = minimum is not None and (number <= minimum if strict else number < minimum)
    too_high = maximum is not None and number > maximum
    if not math.isfinite(number) or too_low or too_high:
        raise ValueError(f"{name} must be {what}; got {value!r}.")
    return number
