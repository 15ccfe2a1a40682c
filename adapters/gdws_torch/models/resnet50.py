"""ResNet-50 for 224x224 ImageNet inputs, with torchvision's parameter names.

The layout is torchvision's ``torchvision.models.resnet50`` (ResNet v1.5: the stride of a
downsampling bottleneck is on its 3x3 conv), module for module, so a checkpoint saved from
it (``torch.save(model.state_dict(), path)``, the format most robust ImageNet models are
published in) loads here with no renaming: ``conv1``, ``bn1``, ``layer1`` .. ``layer4`` of
:class:`Bottleneck` blocks (``conv1/bn1/conv2/bn2/conv3/bn3`` and ``downsample.0/1``),
``fc``. torchvision itself is not needed.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Bottleneck", "ImageNetResNet", "ResNet50"]


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (with the stride), 1x1 expand (x4), plus the shortcut, then ReLU.

    Parameters
    ----------
    inplanes : int
        Input channels.
    planes : int
        Channels of the 3x3 conv; the block outputs ``4 * planes``.
    stride : int, default=1
    downsample : torch.nn.Module, optional
        The shortcut's 1x1-conv-BN when the shape changes; identity otherwise.
    """

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        # Not in place: hooks (noise gains, refitting) may hold the BatchNorm outputs.
        self.relu = nn.ReLU()
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ImageNetResNet(nn.Module):
    """torchvision's ResNet with bottleneck blocks: 7x7 stem, max pool, four stages, fc.

    Parameters
    ----------
    layers : sequence of 4 int
        Blocks per stage; ``(3, 4, 6, 3)`` is ResNet-50.
    num_classes : int, default=1000
    """

    def __init__(self, layers=(3, 4, 6, 3), num_classes: int = 1000) -> None:
        super().__init__()
        if len(layers) != 4 or not all(isinstance(n, int) and n >= 1 for n in layers):
            raise ValueError(f"layers must be 4 positive integers; got {layers!r}.")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer; got {num_classes!r}.")
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0], 1)
        self.layer2 = self._make_layer(128, layers[1], 2)
        self.layer3 = self._make_layer(256, layers[2], 2)
        self.layer4 = self._make_layer(512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)
        for module in self.modules():  # torchvision's initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def ResNet50(num_classes: int = 1000) -> ImageNetResNet:
    """ResNet-50 (v1.5) for 224x224 inputs: 25,557,032 parameters with 1000 classes."""
    return ImageNetResNet((3, 4, 6, 3), num_classes)
