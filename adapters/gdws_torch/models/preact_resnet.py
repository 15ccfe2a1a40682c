"""Pre-activation ResNet for 32x32 inputs (He et al., 2016), as used for CIFAR-10 robust training.

Parameter names match the checkpoints of the original GDWS work and of the
adversarial-training code it used (``conv1``, ``layer1.0.bn1``, ..., ``bn``, ``linear``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PreActBlock", "PreActResNet", "PreActResNet18"]


class PreActBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3, BN-ReLU-conv3x3, plus a shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet with four stages (64, 128, 256, 512 channels) for 32x32 inputs.

    Parameters
    ----------
    num_blocks : sequence of 4 int
        Blocks per stage (``(2, 2, 2, 2)`` for PreActResNet-18).
    num_classes : int, default=10
    block : type, default=PreActBlock
        The block class, with an ``expansion`` attribute (its output channels per
        ``planes``): :class:`PreActBlock`, or the bottleneck of PreActResNet-50.
    """

    def __init__(self, num_blocks=(2, 2, 2, 2), num_classes: int = 10, block=None) -> None:
        super().__init__()
        block = PreActBlock if block is None else block
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], 1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], 2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], 2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], 2)
        self.bn = nn.BatchNorm2d(512 * block.expansion)
        self.linear = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, planes: int, n_blocks: int, stride: int) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (n_blocks - 1):
            blocks.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def PreActResNet18(num_classes: int = 10) -> PreActResNet:
    """PreActResNet-18 for 32x32 inputs."""
    return PreActResNet((2, 2, 2, 2), num_classes)
