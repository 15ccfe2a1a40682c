"""The embedded demo's network: a small CNN for scikit-learn's digits upsampled to 16x16.

Wide enough for GDWS to pay (32 to 128 channels: with ``M < 9 * 8`` output channels,
keeping every depthwise kernel of a 3x3 layer costs more MACs than the dense conv), small
enough to ship its adversarially trained checkpoint inside the package (under 2 MB).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DigitsCNN"]


def _conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU stack of 32, 64, 64 (stride 2), 128, 128 (stride 2) channels.

    Input ``(N, 1, 16, 16)`` pixels in ``[0, 1]``; output ``(N, num_classes)`` logits.
    Conv MACs per sample: 14.2 M, of which the first conv (kept dense by default) 0.07 M.

    Parameters
    ----------
    num_classes : int, default=10
    in_channels : int, default=1
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn(in_channels, 32),
            _conv_bn(32, 64),
            _conv_bn(64, 64, stride=2),
            _conv_bn(64, 128),
            _conv_bn(128, 128, stride=2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))
