"""Shared test set-up: the hypothesis CI profile and weight generators."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# scikit-learn runs its array-API estimator checks (array-api-strict, torch) only when
# SciPy's array-API mode is on; it must be set before SciPy is first imported.
os.environ.setdefault("SCIPY_ARRAY_API", "1")
# Latency tables a test does not place itself go to a throw-away folder, not ~/.cache.
os.environ["GDWS_CACHE_DIR"] = tempfile.mkdtemp(prefix="gdws-test-cache-")

import numpy as np
from hypothesis import HealthCheck, settings

atexit.register(shutil.rmtree, os.environ["GDWS_CACHE_DIR"], ignore_errors=True)

# Property tests run derandomized, without deadline, with a bounded number of examples, so
# the suite is reproducible and its time predictable on a 2-core CI machine.
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile("dev", deadline=None, max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def structured_weight(
    seed: int, n_out: int, n_in: int, kh: int, kw: int, structure: str
) -> np.ndarray:
    """A float64 conv weight with the structure the solvers must get right.

    ``structure`` is one of ``"random"``, ``"low_rank"`` (rank-deficient slices),
    ``"zero_channel"``, ``"duplicate"`` (identical channels: exact ties across channels),
    ``"flat_spectrum"`` (equal singular values within a channel: ties inside a channel)
    and ``"integer"`` (small integers: frequent exact ties).
    """
    rng = np.random.default_rng(seed)
    k2 = kh * kw
    rank = min(n_out, k2)
    W = rng.standard_normal((n_out, n_in, k2))
    if structure == "low_rank":
        for c in range(n_in):
            r = int(rng.integers(0, rank + 1))
            W[:, c] = rng.standard_normal((n_out, r)) @ rng.standard_normal((r, k2))
    elif structure == "zero_channel":
        W[:, int(rng.integers(0, n_in))] = 0.0
    elif structure == "duplicate":
        W[:, :] = W[:, :1]
    elif structure == "flat_spectrum":
        for c in range(n_in):
            q_left, _ = np.linalg.qr(rng.standard_normal((n_out, rank)))
            q_right, _ = np.linalg.qr(rng.standard_normal((k2, rank)))
            W[:, c] = 2.0 * q_left @ q_right.T
    elif structure == "integer":
        W = rng.integers(-2, 3, size=W.shape).astype(np.float64)
    return W.reshape(n_out, n_in, kh, kw)


STRUCTURES = ("random", "low_rank", "zero_channel", "duplicate", "flat_spectrum", "integer")
