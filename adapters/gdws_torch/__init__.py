"""gdws_torch: the PyTorch adapter of gdws-approx.

GDWS layers, whole-model conversion (:func:`compress` runs a whole recipe), MAC
counting, noise gains and checkpoint files; :func:`compress_baseline` builds the
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
from gdws_torch.conversion.options import Latency, Recovery, Weighting
from gdws_torch.conversion.recipes import (
    RECIPES,
    Recipe,
    RecipeInputs,
    compress,
    get_recipe,
    recipe_inputs,
)
from gdws_torch.conversion.speed_target import SpeedTargetMissed
from gdws_torch.conversion.weightings import weighting
from gdws_torch.cost.macs import LayerMacs, MacCount, count_macs
from gdws_torch.io.checkpoints import (
    load_alphas,
    load_checkpoint,
    load_converted,
    load_state_dict_file,
    save_alphas,
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
    "GDWSConv2d",
    "Latency",
    "LayerMacs",
    "LowRankConv2d",
    "MacCount",
    "Recipe",
    "RecipeInputs",
    "Recovery",
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
    "load_alphas",
    "load_checkpoint",
    "load_converted",
    "load_original_checkpoint",
    "load_state_dict_file",
    "noise_gains",
    "pad_kernels",
    "plan_noise_gain_forms",
    "recalibrate_batchnorm",
    "recipe_inputs",
    "reference_noise_gains",
    "refit_pointwise",
    "replace_module",
    "save_alphas",
    "save_checkpoint",
    "save_converted",
    "set_fused",
    "weighting",
]
