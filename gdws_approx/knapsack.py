"""The multiple-choice knapsack behind latency-targeted planning.

Every layer offers a few options (dense, or GDWS in some form with some kernel count),
each with a cost (its measured latency) and an error. Choose exactly one option per layer
so that the total error is least while the total cost stays within a budget.

:func:`choose_options` solves it by dynamic programming over the cost, on a grid of
``resolution`` steps of the budget. Every cost is rounded *up* to the grid, so a solution
of the grid problem always fits the real budget; and when the costs are multiples of the
grid step (integers with ``resolution=budget``), the solution is exactly optimal. The
test suite checks it against brute-force enumeration.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gdws_approx.checks import check_integer, check_real

__all__ = ["choose_options"]


def choose_options(
    costs: Sequence[Sequence[float]],
    errors: Sequence[Sequence[float]],
    budget: float,
    *,
    resolution: int = 4000,
) -> list[int] | None:
    """One option per group minimising the total error with total cost ``<= budget``.

    Parameters
    ----------
    costs, errors : sequence of sequences of float
        ``costs[i][k]`` and ``errors[i][k]``: option ``k`` of group ``i`` (finite, costs
        ``>= 0``). Every group has at least one option.
    budget : float
        The largest total cost allowed, ``>= 0``.
    resolution : int, default=4000
        Grid steps the budget is divided into; costs are rounded up to the grid.

    Returns
    -------
    list of int or None
        The chosen option of each group; ``None`` if no choice fits the budget on the
        grid (the cheapest choice's cost exceeds it). Among choices of equal error, the
        cheaper one; among equal ones, the lowest option indices.

    Raises
    ------
    ValueError
        Mismatched shapes, an empty group, non-finite or negative values.
    """
    if len(costs) != len(errors) or not costs:
        raise ValueError(
            f"costs and errors need one entry per group, at least one; got {len(costs)} "
            f"and {len(errors)}."
        )
    check_real(budget, "budget", minimum=0)
    check_integer(resolution, "resolution", minimum=1)
    if resolution > 10**6:
        raise ValueError(f"resolution must be from 1 to 1e6; got {resolution!r}.")
    groups = []
    for i, (group_costs, group_errors) in enumerate(zip(costs, errors, strict=True)):
        c = np.asarray(group_costs, dtype=np.float64)
        e = np.asarray(group_errors, dtype=np.float64)
        if c.ndim != 1 or c.shape != e.shape or c.size == 0:
            raise ValueError(f"group {i}: costs and errors must be equal, non-empty 1-D lists.")
        if not (np.isfinite(c).all() and np.isfinite(e).all()) or (c < 0).any():
            raise ValueError(f"group {i}: costs must be finite and >= 0, errors finite.")
        groups.append((c, e))
    step = budget / resolution if budget > 0 else 1.0
    # Rounded up: a grid solution never exceeds the budget. The small tolerance keeps
    # costs that are exact grid multiples from moving up a step through rounding noise.
    units = [np.ceil(c / step - 1e-9).astype(np.int64) for c, _ in groups]
    if budget == 0:
        units = [np.where(c > 0, resolution + 1, 0) for c, _ in groups]
    # best[b]: least total error of the groups so far at total grid cost exactly b.
    size = resolution + 1
    best = np.full(size, np.inf)
    best[0] = 0.0
    picks = []
    for (_, e), u in zip(groups, units, strict=True):
        new = np.full(size, np.inf)
        pick = np.full(size, -1, dtype=np.int64)
        for k in range(len(e)):
            if u[k] >= size:
                continue
            candidate = np.full(size, np.inf)
            candidate[u[k] :] = best[: size - u[k]] + e[k]
            better = candidate < new
            new[better] = candidate[better]
            pick[better] = k
        best = new
        picks.append(pick)
    if not np.isfinite(best).any():
        return None
    least = best.min()
    # The cheapest total cost reaching the least error (ties: lower cost).
    b = int(np.flatnonzero(best <= least)[0])
    chosen = []
    for pick, u in zip(reversed(picks), reversed(units), strict=True):
        k = int(pick[b])
        chosen.append(k)
        b -= int(u[k])
    return chosen[::-1]
