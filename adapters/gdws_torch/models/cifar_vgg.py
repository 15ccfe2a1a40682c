"""The original's own VGG-11/13/16/19 for 32x32 inputs (``--model vgg11`` ... ``vgg19``).

Not HYDRA's VGG-16 (:class:`~gdws_torch.models.VGG`, ``vgg16_bn``/``vgg16_hydra``): here
every conv has a bias and is followed by BatchNorm and ReLU, five max-pools take 32x32 to
1x1, and the classifier is a single linear layer (512 -> classes). Parameter names:
``features.N.weight``/``.bias`` for the convs, ``features.N+1.*`` for their BatchNorm,
``classifier.weight``/``.bias`` (indices as in the usual CIFAR VGG: conv, BN, ReLU, and a
max-pool after each group; a final 1x1 average pool that does nothing).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CIFAR_VGG_CONFIGS", "VGG11", "VGG13", "VGG16", "VGG19", "CifarVGG"]

CIFAR_VGG_CONFIGS = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (
        *(64, 64, "M", 128, 128, "M", 256, 256, 256, "M"),
        *(512, 512, 512, "M", 512, 512, 512, "M"),
    ),
    "vgg19": (
        *(64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M"),
        *(512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
    ),
}


class CifarVGG(nn.Module):
    """``features`` (conv+bias, BN, ReLU, max-pools), then ``classifier`` (one linear layer).

    Parameters
    ----------
    name : {"vgg11", "vgg13", "vgg16", "vgg19"}
    num_classes : int, default=10
    """

    def __init__(self, name: str = "vgg16", num_classes: int = 10) -> None:
        super().__init__()
        if name not in CIFAR_VGG_CONFIGS:
            raise ValueError(f"name must be one of {sorted(CIFAR_VGG_CONFIGS)}; got {name!r}.")
        layers: list[nn.Module] = []
        in_channels = 3
        for item in CIFAR_VGG_CONFIGS[name]:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            layers.append(nn.Conv2d(in_channels, item, 3, padding=1))
            layers.append(nn.BatchNorm2d(item))
            layers.append(nn.ReLU(inplace=True))
            in_channels = item
        layers.append(nn.AvgPool2d(1, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def VGG11(num_classes: int = 10) -> CifarVGG:
    """The original's ``vgg11`` (8 convs) for 32x32 inputs."""
    return CifarVGG("vgg11", num_classes)


def VGG13(num_classes: int = 10) -> CifarVGG:
    """The original's ``vgg13`` (10 convs) for 32x32 inputs."""
    return CifarVGG("vgg13", num_classes)


def VGG16(num_classes: int = 10) -> CifarVGG:
    """The original's ``vgg16`` (13 convs) for 32x32 inputs; HYDRA's is ``VGG16_BN``."""
    return CifarVGG("vgg16", num_classes)


def VGG19(num_classes: int = 10) -> CifarVGG:
    """The original's ``vgg19`` (16 convs) for 32x32 inputs."""
    return CifarVGG("vgg19", num_classes)
