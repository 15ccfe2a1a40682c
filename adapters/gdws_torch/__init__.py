"""gdws_torch: the PyTorch adapter of gdws-approx.

GDWS layers; the pipeline from a dense model to a compressed one (:func:`compress`
chains :func:`recipe_inputs`, :func:`convert` and :func:`recover` for a :class:`Recipe`);
MAC counting, noise gains and checkpoint files; :func:`compress_baseline` builds the
training-free baselines (DWS, low-rank, channel pruning) at the same conv MACs.
"""

from gdws_torch.baselines import BaselineReport, compress_baseline
from gdws_torch.conversion.convert import convert, pad_kernels, replace_module, set_fused
from gdws_torch.conversion.eligibility import eligible_convs, is_approximable
from gdws_torch.conversion.noise_gains import (
    noise_gains,
    plan_noise_gain_forms,
    reference_noise_gains,
)
from gdws_torch.conversion.options import (
    BatchNormStatistics,
    ErrorWeights,
    Latency,
    Recovery,
    Refit,
    Weighting,
)
from gdws_torch.conversion.pipeline import (
    CalibrationAttack,
    RecipeInputs,
    compress,
    recipe_inputs,
)
from gdws_torch.conversion.recipes import RECIPES, Recipe, get_recipe
from gdws_torch.conversion.recover import recover
from gdws_torch.conversion.reports import (
    CompressionReport,
    ConversionReport,
    RecoveryReport,
    SpeedMeasurement,
)
from gdws_torch.conversion.speed_target import SpeedTargetMissed
from gdws_torch.cost.macs import LayerMacs, MacCount, count_macs
from gdws_torch.io.checkpoints import (
    load_channel_weights,
    load_checkpoint,
    load_converted,
    load_state_dict_file,
    save_channel_weights,
    save_checkpoint,
    save_converted,
)
from gdws_torch.io.original_checkpoints import load_original_checkpoint
from gdws_torch.nn.layers import GDWSConv2d
from gdws_torch.nn.lowrank import LowRankConv2d
from gdws_torch.recovery import recalibrate_batchnorm, refit_pointwise
from gdws_torch.robustness.apgd import APGD, APGDT
from gdws_torch.robustness.attacks import PGD, PGDL1, PGDL2, Attack
from gdws_torch.robustness.autoattack import AutoAttack
from gdws_torch.robustness.evaluate import evaluate
from gdws_torch.robustness.fab import FAB
from gdws_torch.robustness.masking import check_gradient_masking
from gdws_torch.robustness.square import Square

__all__ = [
    "APGD",
    "APGDT",
    "FAB",
    "PGD",
    "PGDL1",
    "PGDL2",
    "RECIPES",
    "Attack",
    "AutoAttack",
    "BaselineReport",
    "BatchNormStatistics",
    "CalibrationAttack",
    "CompressionReport",
    "ConversionReport",
    "ErrorWeights",
    "GDWSConv2d",
    "Latency",
    "LayerMacs",
    "LowRankConv2d",
    "MacCount",
    "Recipe",
    "RecipeInputs",
    "Recovery",
    "RecoveryReport",
    "Refit",
    "SpeedMeasurement",
    "SpeedTargetMissed",
    "Square",
    "Weighting",
    "check_gradient_masking",
    "compress",
    "compress_baseline",
    "convert",
    "count_macs",
    "eligible_convs",
    "evaluate",
    "get_recipe",
    "is_approximable",
    "load_channel_weights",
    "load_checkpoint",
    "load_converted",
    "load_original_checkpoint",
    "load_state_dict_file",
    "noise_gains",
    "pad_kernels",
    "plan_noise_gain_forms",
    "recalibrate_batchnorm",
    "recipe_inputs",
    "recover",
    "reference_noise_gains",
    "refit_pointwise",
    "replace_module",
    "save_channel_weights",
    "save_checkpoint",
    "save_converted",
    "set_fused",
]
