"""Training-free baselines at the same conv MACs as GDWS: DWS, low-rank, channel pruning.

:func:`compress_baseline` builds each with the budget, the eligible layers and the
recovery (least-squares refit, BatchNorm re-estimation) of :func:`gdws_torch.convert`,
so that the question "does GDWS beat the obvious alternatives at the same cost on my
model?" has a direct answer (``gdws sweep --methods gdws dws lowrank prune``).

- :mod:`.dws`: one depthwise kernel per channel (a :class:`~gdws_torch.GDWSConv2d` with
  every ``g_c = 1``), layers chosen by least weight error;
- :mod:`.lowrank`: a conv as ``Kh x Kw -> R`` then ``1 x 1 -> M`` (:class:`LowRankConv2d`),
  by the SVD of the weight or the PCA of the responses (Zhang et al. 2015);
- :mod:`.pruning`: whole output channels removed with the next conv's inputs (Li et al.
  2017's L1 criterion, or the reconstruction error; He et al. 2017's least-squares
  refit of the next conv);
- :mod:`.common`: the report, the shared statistics and least-squares solve.
"""

from gdws_torch.baselines.common import BaselineLayer, BaselineReport
from gdws_torch.baselines.compress import CRITERIA, METHODS, compress_baseline
from gdws_torch.baselines.dws import dws_factors, dws_layer
from gdws_torch.baselines.lowrank import lowrank_basis
from gdws_torch.baselines.pruning import PrunablePair, prunable_pairs, prune_channels
from gdws_torch.nn.lowrank import LowRankConv2d

__all__ = [
    "CRITERIA",
    "METHODS",
    "BaselineLayer",
    "BaselineReport",
    "LowRankConv2d",
    "PrunablePair",
    "compress_baseline",
    "dws_factors",
    "dws_layer",
    "lowrank_basis",
    "prunable_pairs",
    "prune_channels",
]
