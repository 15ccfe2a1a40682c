"""VGG-16 with BatchNorm for 32x32 inputs, with the parameter names of the original checkpoints.

``features`` is the usual conv/BN/ReLU/max-pool stack (indices as in torchvision's
``make_layers``); the classifier is 2x2 average pooling and three linear layers
(2048 -> 256 -> 256 -> classes), as in the robust VGG-16 checkpoints the original used.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["VGG", "VGG16_BN"]

VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


class VGG(nn.Module):
    """A VGG network: ``features``, 2x2 adaptive average pooling, ``classifier``."""

    def __init__(self, config=VGG16_CONFIG, num_classes: int = 10, batch_norm: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            layers.append(nn.Conv2d(in_channels, item, 3, padding=1, bias=False))
            if batch_norm:
                layers.append(nn.BatchNorm2d(item))
            layers.append(nn.ReLU(inplace=True))
            in_channels = item
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(
            nn.Linear(in_channels * 4, 256),
            nn.ReLU(True),
            nn.Linear(256, 256),
            nn.ReLU(True),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def VGG16_BN(num_classes: int = 10) -> VGG:
    """VGG-16 with BatchNorm for 32x32 inputs."""
    return VGG(VGG16_CONFIG, num_classes, batch_norm=True)
