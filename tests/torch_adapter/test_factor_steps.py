"""The structured refit steps against the dense reference solvers (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gdws_torch.recovery import depthwise_step, pointwise_step, refit_error, refit_layer_factors
from gdws_torch.recovery.factor_steps import KernelBlocks
from gdws_torch.recovery.reference_steps import (
    reference_depthwise_step,
    reference_pointwise_step,
    reference_refit_error,
    reference_refit_layer_factors,
)


def random_layer(seed: int, c: int, k2: int, m: int, g: int, samples: int, dead: int):
    """Statistics of a layer with ``dead`` channels that no kernel reads, an input channel
    that is always zero, and ``samples`` patches (``< C K2``: a singular Gram matrix)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((c * k2, samples))
    x[:k2] = 0.0  # channel 0 never sees a signal
    weight = rng.standard_normal((m, c * k2))
    live = np.arange(dead, c) if dead < c else np.arange(c)
    channels = np.sort(rng.choice(live, size=g))
    pointwise = rng.standard_normal((m, g))
    kernels = rng.standard_normal((g, k2))
    gram = x @ x.T
    y = weight @ x
    return [
        torch.as_tensor(gram),
        torch.as_tensor(y @ x.T),
        torch.as_tensor(channels),
        torch.as_tensor(pointwise),
        torch.as_tensor(kernels),
        float((y**2).sum()),
    ]


def objective(gram, cross, energy, channels, pointwise, kernels) -> float:
    return reference_refit_error(gram, cross, energy, channels, pointwise, kernels)


layers = st.builds(
    random_layer,
    seed=st.integers(0, 10_000),
    c=st.integers(1, 6),
    k2=st.sampled_from([1, 4, 9]),
    m=st.integers(1, 7),
    g=st.integers(1, 14),
    samples=st.integers(1, 60),
    dead=st.integers(0, 3),
)


@given(layers)
def test_the_error_is_the_reference_error(layer):
    gram, cross, channels, pointwise, kernels, energy = layer
    expected = objective(gram, cross, energy, channels, pointwise, kernels)
    got = refit_error(gram, cross, energy, channels, pointwise, kernels)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-9 * energy)


@given(layers, st.sampled_from([0.0, 1e-4, 1e-1]))
def test_the_pointwise_step_is_the_references(layer, ridge):
    gram, cross, channels, _, kernels, energy = layer
    expected = reference_pointwise_step(gram, cross, channels, kernels, ridge)
    got = pointwise_step(gram, cross, channels, kernels, ridge)
    assert objective(gram, cross, energy, channels, got, kernels) == pytest.approx(
        objective(gram, cross, energy, channels, expected, kernels), rel=1e-8, abs=1e-9 * energy
    )
    if ridge > 0:  # a unique solution
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-8)


@given(layers, st.sampled_from([0.0, 1e-4, 1e-1]), st.sampled_from([0, 10**6]))
def test_the_depthwise_step_is_the_references(layer, ridge, max_direct):
    gram, cross, channels, pointwise, kernels, energy = layer
    expected = reference_depthwise_step(
        gram, cross, channels, pointwise, kernels, ridge, max_direct
    )
    got = depthwise_step(gram, cross, channels, pointwise, kernels, ridge, max_direct)
    assert objective(gram, cross, energy, channels, pointwise, got) == pytest.approx(
        objective(gram, cross, energy, channels, pointwise, expected),
        rel=1e-8,
        abs=1e-9 * energy,
    )


def test_the_hessian_product_is_the_dense_matrix_times_the_kernels():
    """``H k`` through the channels equals the explicitly built ``H`` (a loop)."""
    gram, cross, channels, pointwise, kernels, _ = random_layer(3, 4, 9, 5, 11, 20, 1)
    q = pointwise.T @ pointwise
    g, k2 = kernels.shape
    h = torch.zeros(g * k2, g * k2, dtype=torch.float64)
    for a in range(g):
        for b in range(g):
            block = gram[channels[a] * k2 : (channels[a] + 1) * k2][
                :, channels[b] * k2 : (channels[b] + 1) * k2
            ]
            h[a * k2 : (a + 1) * k2, b * k2 : (b + 1) * k2] = q[a, b] * block
    blocks = KernelBlocks(gram, cross, channels, k2)
    got = blocks.hessian(q)(kernels)
    torch.testing.assert_close(got.reshape(-1), h @ kernels.reshape(-1), rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("max_direct", [0, 10**6])
def test_the_alternation_reaches_the_reference_alternations_error(max_direct):
    gram, cross, channels, pointwise, kernels, energy = random_layer(7, 6, 9, 8, 17, 40, 2)
    _, _, errors = refit_layer_factors(
        gram,
        cross,
        channels,
        pointwise,
        kernels,
        energy=energy,
        iterations=4,
        max_direct=max_direct,
        tolerance=0.0,
        solve_tolerance=0.0,
    )
    *_, expected = reference_refit_layer_factors(
        gram, cross, channels, pointwise, kernels, energy=energy, iterations=4
    )
    reference = expected[-1]
    # Each step is exact to ~1e-10 of the error; over 4 alternations the paths may part by
    # a little more (the early-stopped conjugate gradients), never to a worse error.
    assert errors[-1] <= reference * (1 + 1e-8)
    assert errors[-1] == pytest.approx(reference, rel=1e-6)
