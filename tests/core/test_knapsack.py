"""The multiple-choice knapsack of latency-targeted planning, against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gdws_approx.knapsack import choose_options


def brute_force(costs, errors, budget):
    """Least error (then least cost) over every choice whose cost is within the budget."""
    best = None
    for choice in itertools.product(*(range(len(c)) for c in costs)):
        cost = sum(c[k] for c, k in zip(costs, choice, strict=True))
        error = sum(e[k] for e, k in zip(errors, choice, strict=True))
        if cost <= budget and (best is None or (error, cost) < best[:2]):
            best = (error, cost, choice)
    return best


groups = st.lists(
    st.lists(st.tuples(st.integers(0, 12), st.integers(0, 40)), min_size=1, max_size=4),
    min_size=1,
    max_size=4,
)


@settings(max_examples=60)
@given(groups, st.integers(0, 45))
def test_integer_costs_match_brute_force_exactly(options, budget):
    costs = [[c for c, _ in group] for group in options]
    errors = [[float(e) for _, e in group] for group in options]
    expected = brute_force(costs, errors, budget)
    chosen = choose_options(costs, errors, budget, resolution=max(budget, 1))
    if expected is None:
        assert chosen is None
        return
    assert chosen is not None
    cost = sum(c[k] for c, k in zip(costs, chosen, strict=True))
    error = sum(e[k] for e, k in zip(errors, chosen, strict=True))
    assert cost <= budget
    assert (error, cost) == expected[:2]


@settings(max_examples=40)
@given(groups, st.floats(0.5, 40.0), st.integers(0, 2**31 - 1))
def test_real_costs_always_fit_and_are_near_optimal(options, budget, seed):
    rng = np.random.default_rng(seed)
    costs = [[c + float(rng.random()) for c, _ in group] for group in options]
    errors = [[float(e) for _, e in group] for group in options]
    chosen = choose_options(costs, errors, budget, resolution=2000)
    expected = brute_force(costs, errors, budget)
    if chosen is None:  # rounding up may only lose choices that are within one step
        slack = budget / 2000 * len(costs)
        assert expected is None or expected[1] > budget - slack
        return
    cost = sum(c[k] for c, k in zip(costs, chosen, strict=True))
    error = sum(e[k] for e, k in zip(errors, chosen, strict=True))
    assert cost <= budget
    # Optimal for a budget smaller by at most one grid step per group.
    tighter = brute_force(costs, errors, budget - budget / 2000 * len(costs))
    assert tighter is None or error <= tighter[0]


def test_the_cheapest_choice_wins_ties_and_nothing_fits_gives_none():
    assert choose_options([[2, 1], [3, 3]], [[0.0, 0.0], [1.0, 1.0]], 10) == [1, 0]
    assert choose_options([[5], [6]], [[0.0], [0.0]], 10) is None
    assert choose_options([[0, 1]], [[5.0, 0.0]], 0) == [0]


@pytest.mark.parametrize(
    ("costs", "errors", "budget", "error", "match"),
    [
        ([], [], 1.0, ValueError, "one entry per group"),
        ([[1.0]], [[1.0, 2.0]], 1.0, ValueError, "equal, non-empty"),
        ([[-1.0]], [[1.0]], 1.0, ValueError, "finite and >= 0"),
        ([[1.0]], [[float("nan")]], 1.0, ValueError, "errors finite"),
        ([[1.0]], [[1.0]], float("inf"), ValueError, "budget must be a finite"),
        (
            [[1.0]],
            [[1.0]],
            "1",
            TypeError,
            r"budget must be a finite real number >= 0; got '1' \(str\)",
        ),
    ],
)
def test_bad_input_is_refused(costs, errors, budget, error, match):
    with pytest.raises(error, match=match):
        choose_options(costs, errors, budget)
