"""Planning for a measured speed-up: the per-channel cap and the latency plan, against
brute force."""

from __future__ import annotations

import dataclasses
import functools
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gdws_approx import GDWSApproximator, LayerLatency, LayerSpec, plan_latency
from gdws_approx.latency_planning import DEFAULT_FORMS, FORMS
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


def _layers(seed, n_layers, moments=False):
    rng = np.random.default_rng(seed)
    specs, latencies = [], {}
    for i in range(n_layers):
        m, c = int(rng.integers(2, 5)), int(rng.integers(2, 4))
        moment = None
        if moments:
            x = rng.standard_normal((c * 4, c * 4 + 2))
            moment = x @ x.T
        specs.append(LayerSpec(f"l{i}", rng.standard_normal((m, c, 2, 2)), 16, input_moment=moment))
        counts = tuple(sorted(rng.choice(np.arange(1, c * min(m, 4) + 1), 3, replace=False)))
        ms = tuple(np.sort(rng.uniform(0.1, 1.0, 3)))
        multipliers = tuple(sorted(rng.choice([1, 2, 3], int(rng.integers(1, 3)), replace=False)))
        ranks = tuple(sorted(rng.choice(np.arange(1, m + 1), min(m, 2), replace=False)))
        points = ((int(counts[0]), 1), (int(counts[-1]), int(rng.integers(1, m + 1))))
        latencies[f"l{i}"] = LayerLatency(
            float(rng.uniform(0.5, 1.5)),
            counts,
            ms,
            multipliers=multipliers,
            grouped_ms=tuple(rng.uniform(0.05, 0.8, len(multipliers))),
            ranks=ranks,
            lowrank_ms=tuple(np.sort(rng.uniform(0.05, 0.9, len(ranks)))),
            gdws_lowrank_points=points,
            gdws_lowrank_ms=tuple(rng.uniform(0.05, 0.8, 2)),
        )
    return specs, latencies


def _trace(W, W_hat, sigma):
    diff = (W - W_hat).reshape(W.shape[0], -1)
    return float(np.trace(diff @ sigma @ diff.T))


def _root(sigma):
    values, vectors = np.linalg.eigh(sigma)
    return vectors * np.sqrt(np.clip(values, 0, None))


def _gdws_hat(W, n_kernels, cap=None):
    est = GDWSApproximator(solver="mego", n_kernels=n_kernels, max_multiplier=cap).fit(W)
    return est, est.inverse_transform(est.pointwise_weights_)


def _lowrank_hat(W, rank, sigma):
    """The best rank-R weight, from the SVD of ``W L`` (``L L^T = Sigma``)."""
    m = W.shape[0]
    u = np.linalg.svd(W.reshape(m, -1) @ _root(sigma))[0][:, :rank]
    return (u @ u.T @ W.reshape(m, -1)).reshape(W.shape)


def _gdws_lowrank_hat(W, n_kernels, rank, sigma):
    """MEGO's kernels, the pointwise matrix's best rank-R approximation in the metric of
    the kernels' responses (the SVD of ``P D L``)."""
    est, _ = _gdws_hat(W, n_kernels)
    _, c, kh, kw = W.shape
    kernels = np.zeros((est.n_kernels_, c, kh * kw))
    kernels[np.arange(est.n_kernels_), est.kernel_channels_] = est.depthwise_kernels_.reshape(
        est.n_kernels_, -1
    )
    responses = kernels.reshape(est.n_kernels_, -1) @ _root(sigma)
    u = np.linalg.svd(est.pointwise_weights_ @ responses)[0][:, :rank]
    return est.inverse_transform(u @ u.T @ est.pointwise_weights_)


def _brute_force(specs, latencies, budget_ms, forms):
    """Least error over every combination of each layer's options of ``forms`` (and
    dense), each error an explicit trace of its explicit weight."""
    per_layer = []
    for spec in specs:
        W = spec.weight
        sigma = np.eye(W[0].size) if spec.input_moment is None else spec.input_moment
        useful = int(np.sum(channel_singular_values(W) > 1e-12))
        lat = latencies[spec.name]
        options = [(lat.dense_ms, 0.0)]
        if "grouped" in forms:
            for m, ms in zip(lat.multipliers, lat.grouped_ms, strict=True):
                W_hat = _gdws_hat(W, W.shape[1] * m, cap=m)[1]
                options.append((ms, _trace(W, W_hat, sigma)))
        if "gdws" in forms:
            for g in range(lat.kernel_counts[0], min(lat.kernel_counts[-1], useful) + 1):
                options.append((lat.gdws_at(g), _trace(W, _gdws_hat(W, g)[1], sigma)))
        if "lowrank" in forms:
            for r in range(lat.ranks[0], min(lat.ranks[-1], min(W.shape[0], W[0].size)) + 1):
                options.append((lat.lowrank_at(r), _trace(W, _lowrank_hat(W, r, sigma), sigma)))
        if "gdws_lowrank" in forms:
            for (g, r), ms in zip(lat.gdws_lowrank_points, lat.gdws_lowrank_ms, strict=True):
                if g <= useful:
                    options.append((ms, _trace(W, _gdws_lowrank_hat(W, g, r, sigma), sigma)))
        per_layer.append(options)
    best = None
    for choice in itertools.product(*per_layer):
        cost = sum(c for c, _ in choice)
        error = sum(e for _, e in choice)
        if cost <= budget_ms and (best is None or error < best):
            best = error
    return best


FORM_SETS = (DEFAULT_FORMS, ("gdws", "grouped"), ("lowrank",), FORMS)


@settings(max_examples=30)
@given(
    st.integers(0, 2**31 - 1),
    st.integers(1, 3),
    st.floats(1.05, 2.5),
    st.sampled_from(FORM_SETS),
    st.booleans(),
)
def test_the_latency_plan_is_least_error_within_the_budget(seed, n_layers, target, forms, moments):
    specs, latencies = _layers(seed, n_layers, moments)
    dense_sum = sum(lat.dense_ms for lat in latencies.values())
    network = dense_sum + 0.3  # 0.3 ms of layers that do not change
    budget = dense_sum - network * (1 - 1 / target)
    best = _brute_force(specs, latencies, budget, forms)
    plan_it = functools.partial(
        plan_latency, specs, latencies, target_speedup=target, network_dense_ms=network, forms=forms
    )
    if best is None:
        with pytest.raises(ValueError, match="out of reach"):
            plan_it()
        return
    plan = plan_it()
    assert plan.latency.predicted_ms <= network / target + 1e-9
    assert plan.latency.predicted_speedup >= target - 1e-9
    # The dynamic programme rounds latencies up to 1/4000 of the budget: its error is at
    # most the least error of a budget smaller by one step per layer.
    tighter = _brute_force(specs, latencies, budget - budget / 4000 * n_layers, forms)
    tol = 1e-8 * (1 + sum(np.sum(s.weight**2) for s in specs))
    assert plan.error <= (best if tighter is None else tighter) + tol
    assert plan.error >= best - tol
    for layer, spec in zip(plan.layers, specs, strict=True):
        form = plan.latency.forms[layer.name]
        assert form == layer.form_label and (layer.form in forms or layer.form == "dense")
        sigma = np.eye(spec.weight[0].size) if spec.input_moment is None else spec.input_moment
        assert layer.error == pytest.approx(
            _trace(spec.weight, _planned_weight(layer, spec.weight), sigma), abs=tol
        )
        if layer.form == "dense":
            assert not layer.replaced and layer.error == 0
        elif layer.form in ("gdws", "grouped") and spec.input_moment is None:
            assert layer.replaced and layer.error == pytest.approx(layer.estimator.error_)
        if form.startswith("grouped"):
            m = int(form.removeprefix("grouped x"))
            assert layer.grouped_multiplier == m
            assert int(np.max(layer.estimator.multipliers_)) <= m
            assert layer.padded_n_kernels == layer.shape[1] * m
        else:
            assert layer.grouped_multiplier is None
        assert layer.macs == _macs(layer)


def _planned_weight(layer, weight):
    """The weight the layer's plan builds: from its estimator and factors."""
    if layer.form == "dense":
        return weight
    if layer.form == "lowrank":
        first, second = layer.factors
        return (second @ first).reshape(layer.shape)
    est = layer.estimator
    pointwise = est.pointwise_weights_
    if layer.form == "gdws_lowrank":
        inner, outer = layer.factors
        pointwise = outer @ inner
    return est.inverse_transform(pointwise)


def _macs(layer):
    m, c, kh, kw = layer.shape
    per_pixel = {
        "dense": m * c * kh * kw,
        "gdws": layer.n_kernels * (kh * kw + m),
        "grouped": layer.n_kernels * (kh * kw + m),
        "lowrank": (layer.rank or 0) * (c * kh * kw + m),
        "gdws_lowrank": layer.n_kernels * kh * kw
        + layer.n_kernels * (layer.rank or 0)
        + (layer.rank or 0) * m,
    }[layer.form]
    return per_pixel * layer.output_pixels


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


def test_low_rank_latencies_are_validated_and_interpolate():
    lat = LayerLatency(1.0, (4,), (0.2,), ranks=(2, 6), lowrank_ms=(0.1, 0.3))
    assert lat.lowrank_at(4) == pytest.approx(0.2) and lat.lowrank_at(1) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="ranks must be increasing"):
        LayerLatency(1.0, (4,), (0.2,), ranks=(6, 2), lowrank_ms=(0.1, 0.3))
    with pytest.raises(ValueError, match="ranks and lowrank_ms"):
        LayerLatency(1.0, (4,), (0.2,), ranks=(2,), lowrank_ms=())
    with pytest.raises(ValueError, match="distinct"):
        LayerLatency(
            1.0, (4,), (0.2,), gdws_lowrank_points=((4, 1), (4, 1)), gdws_lowrank_ms=(1, 1)
        )
    with pytest.raises(ValueError, match="G, R >= 1"):
        LayerLatency(1.0, (4,), (0.2,), gdws_lowrank_points=((4, 0),), gdws_lowrank_ms=(1,))
    with pytest.raises(ValueError, match="finite and > 0"):
        LayerLatency(1.0, (4,), (0.2,), ranks=(2,), lowrank_ms=(0.0,))
    with pytest.raises(ValueError, match="not timed"):
        LayerLatency(1.0, (4,), (0.2,)).lowrank_at(3)


def test_forms_and_moments_are_checked_before_planning():
    specs, latencies = _layers(0, 2)
    plan = functools.partial(plan_latency, target_speedup=1.2, network_dense_ms=10.0)
    with pytest.raises(ValueError, match="forms must name at least one of"):
        plan(specs, latencies, forms=("gdws", "pruned"))
    with pytest.raises(ValueError, match="forms must name at least one of"):
        plan(specs, latencies, forms=())
    with pytest.raises(TypeError, match="forms must be a sequence"):
        plan(specs, latencies, forms="lowrank")
    with_moment = [dataclasses.replace(specs[0], input_moment=np.eye(specs[0].weight[0].size))]
    with pytest.raises(ValueError, match="every layer or for none"):
        plan([*with_moment, specs[1]], latencies)
    bad = [dataclasses.replace(spec, input_moment=np.eye(3)) for spec in specs]
    with pytest.raises(ValueError, match="layer 'l0': moment must have shape"):
        plan(bad, latencies)
