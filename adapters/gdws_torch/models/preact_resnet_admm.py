"""The ADMM-pruned PreActResNet-18 of the original work (``--model preactresnet18_admm``).

Its checkpoints come from ADMM pruning code whose PreActResNet differs from the usual
one (:class:`~gdws_torch.models.PreActResNet`) at the end: no final BatchNorm and ReLU.
The last block's output is average-pooled and fed to ``linear`` as it is. The blocks are
the usual pre-activation blocks (1x1 shortcut convs inside a ``Sequential``, so their
parameters are ``layerN.0.shortcut.0.weight``). Parameter names, without the
``basic_model.`` component the checkpoints carry (see
:func:`gdws_torch.io.original_checkpoints.load_original_checkpoint`): ``conv1``,
``layer1.0.bn1``, ..., ``linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gdws_torch.models.preact_resnet import PreActBlock

__all__ = ["PreActResNet18_ADMM", "PreActResNetADMM"]


class PreActResNetADMM(nn.Module):
    """Pre-activation ResNet without the final BN-ReLU, for 32x32 inputs.

    Parameters
    ----------
    num_blocks : sequence of 4 int
        Blocks per stage (``(2, 2, 2, 2)`` for PreActResNet-18).
    num_classes : int, default=10
    """

    def __init__(self, num_blocks=(2, 2, 2, 2), num_classes: int = 10) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(64, num_blocks[0], 1)
        self.layer2 = self._make_layer(128, num_blocks[1], 2)
        self.layer3 = self._make_layer(256, num_blocks[2], 2)
        self.layer4 = self._make_layer(512, num_blocks[3], 2)
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, planes: int, n_blocks: int, stride: int) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (n_blocks - 1):
            blocks.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # the original: avg_pool2d(out, 4)
        return self.linear(out)


def PreActResNet18_ADMM(num_classes: int = 10) -> PreActResNetADMM:
    """The ADMM PreActResNet-18 for 32x32 inputs (the original's ``preactresnet18_admm``)."""
    return PreActResNetADMM((2, 2, 2, 2), num_classes)
