"""Wide ResNet (WRN-28-4) for 32x32 inputs, with the parameter names of the original checkpoints.

The WRN definition the original used has an unused ``sub_block1`` (a copy of the first
stage's structure that the forward pass never calls). :func:`WRN28_4` keeps it, so
checkpoints saved with it load strictly; it never runs, so it is neither counted nor
converted. The original's evaluation deleted it (``model.sub_block1 = None``) before
loading, so its WRN checkpoints lack those entries: :func:`WRN28_4_WithoutSubBlock`
(``--model wideresnet_28_4``) is that network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["WRN28_4", "WRN28_4_WithoutSubBlock", "WideBasicBlock", "WideResNet"]


class WideBasicBlock(nn.Module):
    """Pre-activation wide block: BN-ReLU-conv3x3, BN-ReLU-conv3x3, identity or 1x1 shortcut."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = (
            None
            if self.equal_in_out
            else nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(activated)))
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        return shortcut + out


class NetworkBlock(nn.Module):
    def __init__(self, n_layers: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBasicBlock(
                    in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1
                )
                for i in range(n_layers)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen for 32x32 inputs (stages of 16k, 32k, 64k channels).

    ``sub_block1=False`` sets the unused ``sub_block1`` to ``None``, as the original's
    evaluation did: the state dict then has no ``sub_block1.*`` entries.
    """

    def __init__(
        self, depth: int = 28, widen_factor: int = 4, num_classes: int = 10, sub_block1: bool = True
    ) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"depth must be 6n + 4; got {depth!r}.")
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, channels[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1)
        # unused, see above
        self.sub_block1 = NetworkBlock(n, channels[0], channels[1], 1) if sub_block1 else None
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(channels[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def WRN28_4(num_classes: int = 10) -> WideResNet:
    """WRN-28-4 for 32x32 inputs."""
    return WideResNet(28, 4, num_classes)


def WRN28_4_WithoutSubBlock(num_classes: int = 10) -> WideResNet:
    """WRN-28-4 without the unused ``sub_block1``: the original's ``wideresnet_28_4``."""
    return WideResNet(28, 4, num_classes, sub_block1=False)
