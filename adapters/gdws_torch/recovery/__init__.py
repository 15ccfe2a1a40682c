"""Training-free recovery after the approximation.

- :func:`recalibrate_batchnorm` (:mod:`.batchnorm`): BatchNorm statistics re-estimated on
  unlabelled inputs, no weight changed.
- :func:`refit_gdws`, :func:`refit_pointwise` (:mod:`.refit`): the GDWS factors re-solved
  by least squares to match the dense convolutions on calibration inputs; each layer's
  statistics from :mod:`.statistics`, its steps from :mod:`.factor_steps`.
- :func:`calibration_inputs` (:mod:`.calibration`): the calibration inputs, natural or
  crafted by an attack (the library's one crafter).
"""

from gdws_torch.recovery.batchnorm import batchnorm_layers, recalibrate_batchnorm
from gdws_torch.recovery.calibration import calibration_inputs
from gdws_torch.recovery.refit import (
    depthwise_step,
    pointwise_step,
    refit_error,
    refit_gdws,
    refit_layer_factors,
    refit_pointwise,
)

__all__ = [
    "batchnorm_layers",
    "calibration_inputs",
    "depthwise_step",
    "pointwise_step",
    "recalibrate_batchnorm",
    "refit_error",
    "refit_gdws",
    "refit_layer_factors",
    "refit_pointwise",
]
