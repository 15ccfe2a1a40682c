"""Any array library: the namespace and device of the input are kept, results agree.

NumPy, array-api-strict (which refuses anything outside the standard, and has a second
device) and torch run here; CuPy and JAX tests run wherever those are installed.
"""

from __future__ import annotations

import array_api_compat
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gdws_approx import GDWSApproximator, channel_spectra, lego_multipliers, mego_multipliers
from gdws_approx.testing import STRUCTURES, structured_weight

xps = pytest.importorskip("array_api_strict")
torch = pytest.importorskip("torch")

ARRAY_ATTRIBUTES = (
    "multipliers_",
    "depthwise_kernels_",
    "kernel_channels_",
    "pointwise_weights_",
    "singular_values_",
    "weighted_spectrum_",
    "alpha_",
    "channel_errors_",
)


def _to_numpy(x):
    if array_api_compat.is_torch_array(x):
        return x.detach().cpu().double().numpy() if x.is_floating_point() else x.cpu().numpy()
    if array_api_compat.is_numpy_array(x):
        return x
    return np.asarray(x.__dlpack__() if hasattr(x, "__dlpack__") else x)


def _strict_to_numpy(x):
    return np.asarray(xps.asarray(x, device=xps.Device("CPU_DEVICE")))


BACKENDS = {
    "numpy": (lambda a: a, lambda x: x),
    "array_api_strict": (lambda a: xps.asarray(a), _strict_to_numpy),
    "torch": (lambda a: torch.from_numpy(a.copy()), _to_numpy),
}


def _fit(backend, W, **params):
    to_backend, _ = BACKENDS[backend]
    return GDWSApproximator(**params).fit(to_backend(W))


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_outputs_are_of_the_input_kind(backend, dtype):
    W = np.random.default_rng(0).standard_normal((12, 5, 3, 3)).astype(dtype)
    to_backend, _ = BACKENDS[backend]
    X = to_backend(W)
    est = GDWSApproximator(beta=2.0).fit(X)
    xp = array_api_compat.array_namespace(X)
    for name in ARRAY_ATTRIBUTES:
        value = getattr(est, name)
        assert array_api_compat.array_namespace(value) is xp, name
        if name not in ("multipliers_", "kernel_channels_"):
            assert value.dtype == X.dtype, name
    assert array_api_compat.array_namespace(est.transform(X)) is xp
    assert array_api_compat.array_namespace(est.inverse_transform(est.pointwise_weights_)) is xp


def test_a_non_default_device_is_kept():
    device = xps.Device("device1")
    W = xps.asarray(np.random.default_rng(1).standard_normal((9, 4, 3, 3)), device=device)
    est = GDWSApproximator(solver="mego", n_kernels=10).fit(W)
    for name in ARRAY_ATTRIBUTES:
        assert getattr(est, name).device == device, name
    assert est.transform(W).device == device
    assert est.inverse_transform(est.pointwise_weights_).device == device
    with pytest.raises(ValueError, match=r"same namespace and device"):
        est.transform(xps.asarray(np.zeros((2, 4, 3, 3))))


@st.composite
def weights(draw):
    structure = draw(st.sampled_from(STRUCTURES))
    shape = (draw(st.integers(1, 7)), draw(st.integers(1, 5)), 3, draw(st.integers(1, 3)))
    return structured_weight(draw(st.integers(0, 2**31)), *shape, structure)


@given(weights(), st.floats(0.0, 1.0), st.sampled_from(["float64", "float32"]))
def test_every_backend_chooses_the_same_multipliers(W, beta_fraction, dtype):
    W = W.astype(dtype)
    beta = beta_fraction * float(np.sum(W.astype(np.float64) ** 2))
    results = {backend: _fit(backend, W, beta=beta) for backend in BACKENDS}
    reference = results["numpy"]
    for backend, est in results.items():
        _, to_numpy = BACKENDS[backend]
        np.testing.assert_array_equal(to_numpy(est.multipliers_), reference.multipliers_)
        W_hat = to_numpy(est.inverse_transform(est.pointwise_weights_))
        reference_hat = reference.inverse_transform(reference.pointwise_weights_)
        tol = (1e-5 if dtype == "float32" else 1e-10) * (1 + float(np.abs(W).max()))
        np.testing.assert_allclose(W_hat, reference_hat, atol=tol, err_msg=backend)
        assert est.error_ == pytest.approx(reference.error_, rel=1e-6, abs=tol)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_torch_half_precision_is_computed_wide(dtype):
    W = np.random.default_rng(2).standard_normal((16, 6, 3, 3))
    X = torch.from_numpy(W).to(getattr(torch, dtype))
    est = GDWSApproximator(beta=4.0).fit(X)
    exact = GDWSApproximator(beta=4.0).fit(X.double())
    assert est.pointwise_weights_.dtype == X.dtype
    assert torch.equal(est.multipliers_, exact.multipliers_)
    assert est.error_ == pytest.approx(exact.error_, rel=1e-12)


def test_functional_layer_runs_on_the_strict_namespace():
    W = xps.asarray(np.random.default_rng(3).standard_normal((10, 4, 9)))
    spectra = channel_spectra(W, method="covariance_eigh")
    values = spectra.squared_singular_values
    assert values.shape == (4, 9) and isinstance(values, type(W))
    g_lego = lego_multipliers(values, 5.0)
    g_mego = mego_multipliers(values, 12)
    assert int(xps.sum(g_mego)) == 12
    assert g_lego.shape == (4,)


def test_cupy_on_a_gpu():
    cupy = pytest.importorskip("cupy")
    try:
        cupy.cuda.runtime.getDeviceCount()
    except Exception:
        pytest.skip("CuPy is installed but no CUDA device is available")
    W = np.random.default_rng(4).standard_normal((32, 16, 3, 3)).astype(np.float32)
    est = GDWSApproximator(beta=10.0).fit(cupy.asarray(W))
    assert isinstance(est.pointwise_weights_, cupy.ndarray)
    reference = GDWSApproximator(beta=10.0).fit(W)
    np.testing.assert_array_equal(cupy.asnumpy(est.multipliers_), reference.multipliers_)


def test_jax_arrays():
    jnp = pytest.importorskip("jax.numpy")
    W = np.random.default_rng(5).standard_normal((12, 4, 3, 3)).astype(np.float32)
    est = GDWSApproximator(beta=3.0).fit(jnp.asarray(W))
    assert est.pointwise_weights_.dtype == jnp.float32
    reference = GDWSApproximator(beta=3.0).fit(W)
    np.testing.assert_array_equal(np.asarray(est.multipliers_), reference.multipliers_)
