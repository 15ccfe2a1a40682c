"""Shared test set-up: the hypothesis CI profile (weight generators: gdws_approx.testing).

The tests are grouped like the packages: ``core/`` (gdws_approx), ``torch_adapter/``,
``onnx_adapter/`` and ``cli/``. Their shared helpers (``_torch_models``, the dataset
writers of ``test_datasets``) are importable from every group.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

# scikit-learn runs its array-API estimator checks (array-api-strict, torch) only when
# SciPy's array-API mode is on; it must be set before SciPy is first imported.
os.environ.setdefault("SCIPY_ARRAY_API", "1")
# Latency tables a test does not place itself go to a throw-away folder, not ~/.cache.
os.environ["GDWS_CACHE_DIR"] = tempfile.mkdtemp(prefix="gdws-test-cache-")

from hypothesis import HealthCheck, settings

atexit.register(shutil.rmtree, os.environ["GDWS_CACHE_DIR"], ignore_errors=True)

_HERE = Path(__file__).resolve().parent
for _folder in (_HERE, _HERE / "torch_adapter"):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

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
