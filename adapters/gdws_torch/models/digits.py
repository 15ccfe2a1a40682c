"""The embedded demo's network: a small CNN for scikit-learn's digits upsampled to 16x16.

Wide enough for GDWS to pay (32 to 128 channels: with ``M < 9 * 8`` output channels,
keeping every depthwise kernel of a 3x3 layer costs more MACs than the dense conv), small
enough to ship its adversarially trained checkpoint inside the package (under 2 MB).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DigitsCNN", "DigitsCNNWide"]


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

    widths = (32, 64, 64, 128, 128)
    strides = (1, 1, 2, 1, 2)

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        layers, c_in = [], in_channels
        for width, stride in zip(self.widths, self.strides, strict=True):
            layers.append(_conv_bn(c_in, width, stride))
            c_in = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


class DigitsCNNWide(DigitsCNN):
    """A wider variant for the weighting studies: 64, 128 (stride 2), 128, 128 (stride 2),
    128 channels; 519 k parameters, 19.0 M conv MACs per 16x16 input."""

    widths = (64, 128, 128, 128, 128)
    strides = (1, 2, 1, 2, 1)
