"""Planning for a measured speed-up: the per-channel cap and the latency plan, against
brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gdws_approx import GDWSApproximator, LayerLatency, LayerSpec, plan_latency
from gdws_approx.testing import (
    STRUCTURES,
    all_allocations,
    channel_singular_values,
    structured_weight,
    weighted_error,
)


@st.composite
def capped_problems(draw):
    n_out, n_in = draw(st.integers(1, 5)), draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    W = structured_weight(
        draw(st.integers(0, 2**31)), n_out, n_in, kh, kw, draw(st.sampled_from(STRUCTURES))
    )
    return W, draw(st.integers(1, 3))


@settings(max_examples=50)
@given(capped_problems(), st.floats(0.0, 1.2))
def test_mego_under_a_channel_cap_is_optimal(problem, fraction):
    W, cap = problem
    values = channel_singular_values(W) ** 2
    n_kernels = round(fraction * values.size)
    est = GDWSApproximator(solver="mego", n_kernels=n_kernels, max_multiplier=cap).fit(W)
    assert int(np.max(est.multipliers_)) <= cap and est.n_kernels_ <= n_kernels
    best = min(
        err for g, count, err in all_allocations(values) if count <= n_kernels and max(g) <= cap
    )
    tol = 1e-9 * (1 + values.sum())
    assert est.error_ <= best + tol
    W_hat = est.inverse_transform(est.pointwise_weights_)
    assert abs(weighted_error(W, W_hat, np.ones(W.shape[1])) - est.error_) <= tol


@settings(max_examples=50)
@given(capped_problems(), st.floats(0.0, 1.0))
def test_lego_under_a_channel_cap_keeps_the_fewest_kernels(problem, fraction):
    W, cap = problem
    values = channel_singular_values(W) ** 2
    beta = fraction * float(values.sum())
    feasible = [count for g, count, err in all_allocations(values) if err <= beta and max(g) <= cap]
    estimator = GDWSApproximator(beta=beta, max_multiplier=cap)
    if not feasible:
        with pytest.raises(ValueError, match="max_multiplier"):
            estimator.fit(W)
        return
    est = estimator.fit(W)
    assert est.n_kernels_ == min(feasible) and est.error_ <= beta * (1 + 1e-12) + 1e-12


def test_max_multiplier_is_validated():
    W = np.ones((2, 2, 3, 3))
    message = r"The 'max_multiplier' parameter of GDWSApproximator must be an int in the range"
    with pytest.raises(ValueError, match=rf"{message} \[1, inf\) or None\. Got 0 instead"):
        GDWSApproximator(max_multiplier=0).fit(W)
    with pytest.raises(TypeError, match=rf"{message} .* Got 1\.5 instead"):
        GDWSApproximator(max_multiplier=1.5).fit(W)
    with pytest.raises(
        TypeError, match=r"max_multiplier \(or None: no cap\) must be an integer >= 1"
    ):
        GDWSApproximator(max_multiplier=True).fit(W)


def _layers(seed, n_layers):
    rng = np.random.default_rng(seed)
    specs, latencies = [], {}
    for i in range(n_layers):
        m, c = int(rng.integers(2, 5)), int(rng.integers(2, 4))
        specs.append(LayerSpec(f"l{i}", rng.standard_normal((m, c, 2, 2)), 16))
        counts = tuple(sorted(rng.choice(np.arange(1, c * min(m, 4) + 1), 3, replace=False)))
        ms = tuple(np.sort(rng.uniform(0.1, 1.0, 3)))
        multipliers = tuple(sorted(rng.choice([1, 2, 3], int(rng.integers(1, 3)), replace=False)))
        latencies[f"l{i}"] = LayerLatency(
            float(rng.uniform(0.5, 1.5)),
            counts,
            ms,
            multipliers=multipliers,
            grouped_ms=tuple(rng.uniform(0.05, 0.8, len(multipliers))),
        )
    return specs, latencies


def _brute_force(specs, latencies, budget_ms):
    """Least error over every combination of each layer's options (dense, grouped at each
    timed multiplier, or GDWS at every kernel count), computed from the spectra alone."""
    per_layer = []
    for spec in specs:
        values = channel_singular_values(spec.weight) ** 2
        ordered = np.sort(values[values > 0])[::-1]
        lat = latencies[spec.name]
        options = [(lat.dense_ms, 0.0)]
        for m, ms in zip(lat.multipliers, lat.grouped_ms, strict=True):
            top_m = sum(sum(sorted(channel, reverse=True)[:m]) for channel in values)
            options.append((ms, float(values.sum() - top_m)))
        for g in range(lat.kernel_counts[0], min(lat.kernel_counts[-1], ordered.size) + 1):
            options.append((lat.gdws_at(g), float(ordered[g:].sum())))
        per_layer.append(options)
    best = None
    for choice in itertools.product(*per_layer):
        cost = sum(c for c, _ in choice)
        error = sum(e for _, e in choice)
        if cost <= budget_ms and (best is None or error < best):
            best = error
    return best


@settings(max_examples=30)
@given(st.integers(0, 2**31 - 1), st.integers(1, 3), st.floats(1.05, 2.5))
def test_the_latency_plan_is_least_error_within_the_budget(seed, n_layers, target):
    specs, latencies = _layers(seed, n_layers)
    dense_sum = sum(lat.dense_ms for lat in latencies.values())
    network = dense_sum + 0.3  # 0.3 ms of layers that do not change
    budget = dense_sum - network * (1 - 1 / target)
    best = _brute_force(specs, latencies, budget)
    if best is None:
        with pytest.raises(ValueError, match="out of reach"):
            plan_latency(specs, latencies, target_speedup=target, network_dense_ms=network)
        return
    plan = plan_latency(specs, latencies, target_speedup=target, network_dense_ms=network)
    assert plan.latency["predicted_ms"] <= network / target + 1e-9
    assert plan.latency["predicted_speedup"] >= target - 1e-9
    # The dynamic programme rounds latencies up to 1/4000 of the budget: its error is at
    # most the least error of a budget smaller by one step per layer.
    tighter = _brute_force(specs, latencies, budget - budget / 4000 * n_layers)
    assert plan.error <= (best if tighter is None else tighter) + 1e-9
    assert plan.error >= best - 1e-9
    for layer in plan.layers:  # the reported error is the fitted layer's
        form = plan.latency["forms"][layer.name]
        if form == "dense":
            assert not layer.replaced and layer.error == 0
        else:
            assert layer.replaced and layer.error == pytest.approx(layer.estimator.error_)
        if form.startswith("grouped"):
            m = int(form.removeprefix("grouped x"))
            assert layer.grouped_multiplier == m
            assert int(np.max(layer.estimator.multipliers_)) <= m
            assert layer.padded_n_kernels == layer.shape[1] * m
        else:
            assert layer.grouped_multiplier is None


def test_an_unreachable_target_says_the_best_predicted_speedup():
    specs, latencies = _layers(0, 2)
    with pytest.raises(ValueError, match=r"out of reach: .* predicted speed-up is"):
        plan_latency(specs, latencies, target_speedup=50.0, network_dense_ms=10.0)
    with pytest.raises(ValueError, match="no entry for layer"):
        plan_latency(specs, {}, target_speedup=1.5, network_dense_ms=10.0)


def test_layer_latency_is_validated_and_interpolates():
    lat = LayerLatency(1.0, (4, 8), (0.2, 0.4))
    assert lat.gdws_at(6) == pytest.approx(0.3) and lat.gdws_at(2) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="increasing"):
        LayerLatency(1.0, (8, 4), (0.2, 0.4))
    with pytest.raises(ValueError, match="finite and > 0"):
        LayerLatency(float("nan"), (4,), (0.2,))
    with pytest.raises(ValueError, match="multipliers and grouped_ms"):
        LayerLatency(1.0, (4,), (0.2,), multipliers=(1, 2), grouped_ms=(0.1,))
    with pytest.raises(ValueError, match="multipliers must be increasing"):
        LayerLatency(1.0, (4,), (0.2,), multipliers=(2, 1), grouped_ms=(0.1, 0.2))
