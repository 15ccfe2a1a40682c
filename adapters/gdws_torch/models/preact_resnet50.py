"""PreActResNet-50 for 32x32 inputs, with the parameter names of the original's checkpoints.

The original's ``--model preactresnet50``: :class:`PreActResNet` (as PreActResNet-18: the
stem conv, four stages, a final BN-ReLU, global average pooling, ``linear``) built from
pre-activation bottlenecks, ``(3, 4, 6, 3)`` of them, 2048 channels at the end.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gdws_torch.models.preact_resnet import PreActResNet

__all__ = ["PreActBottleneck", "PreActResNet50"]


class PreActBottleneck(nn.Module):
    """BN-ReLU-conv1x1, BN-ReLU-conv3x3 (the stride), BN-ReLU-conv1x1 (4x the channels),
    plus the input or, where the shape changes, a 1x1 conv of the first activation."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = self.expansion * planes
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + shortcut


def PreActResNet50(num_classes: int = 10) -> PreActResNet:
    """PreActResNet-50 for 32x32 inputs (the original's ``preactresnet50``)."""
    return PreActResNet((3, 4, 6, 3), num_classes, block=PreActBottleneck)
