"""scikit-learn's own estimator checks judge the API (2-D input, 1 x 1 kernels)."""

from __future__ import annotations

from sklearn.utils.estimator_checks import parametrize_with_checks

from gdws_approx import GDWSApproximator

# scikit-learn's checks pass 2-D (n_samples, n_features) data of arbitrary width, so the
# columns are read as 1 x 1 kernels: every width is then a valid C * Kh * Kw.
ESTIMATORS = [
    GDWSApproximator(kernel_size=1),
    GDWSApproximator(kernel_size=(1, 1), beta=0.5),
    GDWSApproximator(kernel_size=1, solver="mego", n_kernels=2, svd_solver="covariance_eigh"),
]


@parametrize_with_checks(ESTIMATORS)
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)
