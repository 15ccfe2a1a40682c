"""Network-level planning in the core (NumPy weights): budgets, the MAC-target search, errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gdws_approx import GDWSApproximator, LayerSpec, dense_macs, gdws_macs, plan_network


def network(seed: int, n_layers: int = 3) -> list[LayerSpec]:
    rng = np.random.default_rng(seed)
    specs = []
    for i in range(n_layers):
        m, c = (int(v) for v in rng.integers(8, 24, size=2))
        # Decaying per-channel spectra, so that GDWS pays at moderate budgets.
        W = rng.standard_normal((m, c, 3, 3)) * np.geomspace(1, 0.05, 9).reshape(1, 1, 3, 3)
        alpha = rng.uniform(0.1, 2.0, size=c)
        specs.append(LayerSpec(f"layer{i}", W, int(rng.integers(1, 65)), alpha))
    return specs


def test_lego_plan_is_the_estimator_per_layer():
    specs = network(0)
    plan = plan_network(specs, beta=0.5, only_if_cheaper=False)
    for spec, layer in zip(specs, plan.layers, strict=True):
        reference = GDWSApproximator(beta=0.5).fit(spec.weight, alpha=spec.alpha)
        assert layer.n_kernels == reference.n_kernels_
        assert layer.error == pytest.approx(reference.error_)
        m, c = spec.weight.shape[:2]
        assert layer.dense_macs == dense_macs(m, c, 9) * spec.output_pixels
        assert layer.macs == gdws_macs(layer.n_kernels, 9, m) * spec.output_pixels
    assert plan.macs == sum(layer.macs for layer in plan.layers)
    assert plan.error == pytest.approx(sum(layer.error for layer in plan.layers))


def test_other_macs_count_on_both_sides():
    specs = network(1)
    plan = plan_network(specs, beta=0.5, other_macs=1000)
    assert plan.dense_macs == 1000 + sum(layer.dense_macs for layer in plan.layers)
    assert plan.macs == 1000 + sum(layer.macs for layer in plan.layers)


@given(seed=st.integers(0, 10_000), target=st.floats(1.05, 3.0), cheaper=st.booleans())
def test_target_search_returns_the_smallest_sufficient_beta(seed, target, cheaper):
    specs = network(seed)
    try:
        plan = plan_network(specs, target_mac_reduction=target, only_if_cheaper=cheaper)
    except ValueError as exc:
        assert "out of reach" in str(exc)
        # Out of reach: even one kernel short of emptying a layer does not get there.
        return
    assert plan.mac_reduction >= target
    if plan.beta > 0:
        below = plan_network(specs, beta=float(np.nextafter(plan.beta, 0)), only_if_cheaper=cheaper)
        assert below.mac_reduction < target
        assert below.error <= plan.error


def weighted_network(seed: int) -> list[LayerSpec]:
    rng = np.random.default_rng(seed)
    specs = []
    for spec in network(seed):
        m, c = spec.weight.shape[:2]
        a = rng.uniform(0.3, 3.0, size=m)
        B = rng.standard_normal((c, 9, 9)) * 0.3 + np.eye(9)
        specs.append(LayerSpec(spec.name, spec.weight, spec.output_pixels, spec.alpha, None, a, B))
    return specs


@given(seed=st.integers(0, 10_000), target=st.floats(1.05, 3.0))
def test_weighted_layers_plan_like_the_estimator_and_meet_the_target(seed, target):
    specs = weighted_network(seed)
    try:
        plan = plan_network(specs, target_mac_reduction=target, only_if_cheaper=False)
    except ValueError as exc:
        assert "out of reach" in str(exc)
        return
    assert plan.mac_reduction >= target
    for spec, layer in zip(specs, plan.layers, strict=True):
        reference = GDWSApproximator(beta=plan.beta).fit(
            spec.weight,
            alpha=spec.alpha,
            output_weights=spec.output_weights,
            input_transforms=spec.input_transforms,
        )
        assert layer.n_kernels == reference.n_kernels_
        assert layer.error == pytest.approx(reference.error_)
    if plan.beta > 0:
        below = plan_network(specs, beta=float(np.nextafter(plan.beta, 0)), only_if_cheaper=False)
        assert below.mac_reduction < target


def test_mego_budgets_and_overrides():
    specs = network(2)
    specs[1] = LayerSpec(specs[1].name, specs[1].weight, specs[1].output_pixels, n_kernels=7)
    plan = plan_network(specs, n_kernels=5, only_if_cheaper=False)
    assert [layer.n_kernels for layer in plan.layers] == [5, 7, 5]
    assert plan.solver == "mego" and plan.beta is None


def test_plan_table_and_dict():
    plan = plan_network(network(3), beta=1.0)
    text = str(plan)
    assert text.splitlines()[0].split()[:4] == ["layer", "shape", "form", "G"]
    assert "layer0" in text and "total" in text
    forms = [line.split()[2] for line in text.splitlines()[2:5]]
    assert forms == [layer.form for layer in plan.layers]
    summary = plan.to_dict()
    assert [layer["form"] for layer in summary["layers"]] == [la.form for la in plan.layers]
    assert summary["n_replaced"] == sum(layer.replaced for layer in plan.layers)
    assert plan["layer2"].name == "layer2"
    with pytest.raises(KeyError):
        plan["missing"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"beta": 1.0, "n_kernels": 3}, "one budget"),
        ({"target_mac_reduction": 1.0}, "> 1"),
        ({"target_mac_reduction": 1e6}, "out of reach"),
        ({"beta": 1e12}, "keeps no kernel"),
        ({"n_kernels": 0}, "keeps no kernel"),
        ({"n_kernels": {"layer0": 3}}, "no budget for layer 'layer1'"),
        ({"n_kernels": {"layer0": 3, "layer1": 3, "layer2": 3, "x": 1}}, "not planned"),
        ({"other_macs": -1}, "other_macs"),
    ],
)
def test_bad_budgets(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_network(network(4), **kwargs)


def test_bad_layers():
    with pytest.raises(ValueError, match="empty"):
        plan_network([])
    spec = network(5, 1)[0]
    with pytest.raises(ValueError, match="distinct"):
        plan_network([spec, spec])
    with pytest.raises(TypeError, match="LayerSpec"):
        plan_network([spec.weight])
    bad_alpha = LayerSpec("x", spec.weight, 4, alpha=np.ones(3))
    with pytest.raises(ValueError, match=r"layer 'x'.*alpha"):
        plan_network([bad_alpha], beta=0.1)


def test_bad_alpha_names_the_layer_in_the_target_search_too():
    spec = network(6, 1)[0]
    bad_alpha = LayerSpec("x", spec.weight, 4, alpha=-np.ones(spec.weight.shape[1]))
    with pytest.raises(ValueError, match=r"layer 'x'.*non-negative"):
        plan_network([bad_alpha], target_mac_reduction=1.5)


@st.composite
def tiny_networks(draw):
    """Two or three tiny layers: every allocation can be enumerated."""
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    specs = []
    for i in range(draw(st.integers(2, 3))):
        m = draw(st.integers(2, 6))
        c = draw(st.integers(1, 2))
        kw = draw(st.integers(2, 3))
        W = rng.standard_normal((m, c, 1, kw)) * rng.uniform(0.2, 3.0)
        specs.append(LayerSpec(f"l{i}", W, draw(st.integers(1, 20))))
    return specs, draw(st.floats(1.05, 4.0))


def allocation_cost_and_error(specs, counts_per_channel):
    macs, error = 0, 0.0
    for spec, counts in zip(specs, counts_per_channel, strict=True):
        m, _, kh, kw = spec.weight.shape
        for ch, g in enumerate(counts):
            s = np.linalg.svd(spec.weight[:, ch].reshape(m, -1), compute_uv=False)
            error += float(np.sum(s[g:] ** 2))
        macs += sum(counts) * (kh * kw + m) * spec.output_pixels
    return macs, error


@given(tiny_networks())
def test_global_allocation_has_the_least_error_for_its_macs(problem):
    specs, target = problem
    try:
        plan = plan_network(
            specs, target_mac_reduction=target, allocation="global", only_if_cheaper=False
        )
    except ValueError as exc:
        assert "out of reach" in str(exc)
        return
    assert plan.mac_reduction >= target
    planned_macs = sum(layer.macs for layer in plan.layers)
    ranks = [min(s.weight.shape[0], s.weight.shape[3]) for s in specs]
    channels = [s.weight.shape[1] for s in specs]
    choices = [
        list(itertools.product(range(r + 1), repeat=c))
        for r, c in zip(ranks, channels, strict=True)
    ]
    # The planner's constraints: every layer keeps at least one kernel, and fewer than
    # would make GDWS as costly as the dense conv.
    caps = []
    for spec in specs:
        m, c, kh, kw = spec.weight.shape
        caps.append(max(1, (m * c * kh * kw - 1) // (kh * kw + m)))
    for allocation in itertools.product(*choices):
        if not all(1 <= sum(g) <= cap for g, cap in zip(allocation, caps, strict=True)):
            continue
        macs, error = allocation_cost_and_error(specs, allocation)
        if macs <= planned_macs:
            assert error >= plan.error - 1e-9 * (1 + plan.error)


def test_global_allocation_needs_a_mac_target():
    with pytest.raises(ValueError, match="needs target_mac_reduction"):
        plan_network(network(0), beta=0.5, allocation="global")
    with pytest.raises(ValueError, match="allocation must be"):
        plan_network(network(0), target_mac_reduction=2.0, allocation="greedy")
