"""Normalisation inside the model: attacks and evaluation work on pixels in ``[0, 1]``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["DATASET_NORMALIZATION", "Normalized", "normalized"]

# The statistics the original work normalised with (its datasets.py get_normalize).
DATASET_NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]] | None] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": (
        (0.5070751592371323, 0.48654887331495095, 0.4409178433670343),
        (0.2673342858792401, 0.2564384629170883, 0.27615047132568404),
    ),
    "svhn": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "digits": None,  # the demo network takes raw pixels
    # torchvision's ImageNet statistics, used by torchvision and robustness-library models.
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


class Normalized(nn.Module):
    """``module((x - mean) / std)``: a classifier that takes pixels in ``[0, 1]``.

    The wrapped network is the attribute ``module``, so parameter names carry the
    ``module.`` prefix exactly as under ``nn.DataParallel`` (the original's noise-gain files
    and checkpoints use it; :func:`gdws_torch.load_checkpoint`, :func:`gdws_torch.convert`
    and :func:`gdws_torch.load_channel_weights` accept names with or without it). ``mean`` and
    ``std`` are non-persistent buffers: the state dict is the wrapped network's.

    Parameters
    ----------
    module : torch.nn.Module
    mean, std : sequence of float
        One value per input channel.
    """

    def __init__(self, module: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean and std must have one value per channel; got {mean}, {std}.")
        if not all(math.isfinite(float(s)) and float(s) > 0 for s in std):
            raise ValueError(f"std must be positive and finite; got {tuple(std)}.")
        if not all(math.isfinite(float(m)) for m in mean):
            raise ValueError(f"mean must be finite; got {tuple(mean)}.")
        self.module = module
        shape = (1, len(mean), 1, 1)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(shape), False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(shape), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))

    def extra_repr(self) -> str:
        mean = ", ".join(f"{v:.4g}" for v in self.mean.flatten().tolist())
        std = ", ".join(f"{v:.4g}" for v in self.std.flatten().tolist())
        return f"mean=({mean}), std=({std})"


def normalized(module: nn.Module, dataset: str) -> nn.Module:
    """``module`` wrapped in the dataset's normalisation (unchanged when it has none)."""
    if dataset not in DATASET_NORMALIZATION:
        raise ValueError(f"dataset must be one of {tuple(DATASET_NORMALIZATION)}; got {dataset!r}.")
    stats = DATASET_NORMALIZATION[dataset]
    return module if stats is None else Normalized(module, *stats)
