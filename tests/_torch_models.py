"""Small real torch models for the adapter tests (every conv option the adapter must honour)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SmallResNet(nn.Module):
    """Stem, a strided residual block with a 1x1 shortcut, non-square, dilated, reflect convs.

    On a 3x16x16 input (per sample):
    ``stem``       3 -> 8,  3x3, 16x16 out: 8*3*9*256      =  55,296 MACs (first conv: skipped)
    ``block.conv1`` 8 -> 24, 3x3 s2 bias, 8x8: 24*8*9*64    = 110,592
    ``block.conv2`` 24 -> 24, 3x1 pad (1,0), 8x8: 24*24*3*64 = 110,592
    ``block.shortcut`` 8 -> 24, 1x1 s2, 8x8: 24*8*64        =  12,288 (1x1: not eligible)
    ``dilated``    24 -> 24, 3x3 dil 2 pad 2, 8x8: 24*24*9*64 = 331,776
    ``reflect``    24 -> 32, 3x3 reflect pad 1 bias, 8x8: 32*24*9*64 = 442,368
    ``grouped``    32 -> 32, 3x3 groups 4, 8x8: 32*8*9*64     = 147,456 (grouped: not eligible)
    ``head``       32 -> n_classes linear                     =  32 * n_classes
    """

    def __init__(self, n_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.block = nn.Module()
        self.block.conv1 = nn.Conv2d(8, 24, 3, stride=2, padding=1, bias=True)
        self.block.bn1 = nn.BatchNorm2d(24)
        self.block.conv2 = nn.Conv2d(24, 24, (3, 1), padding=(1, 0), bias=False)
        self.block.shortcut = nn.Conv2d(8, 24, 1, stride=2, bias=False)
        self.dilated = nn.Conv2d(24, 24, 3, padding=2, dilation=2, bias=False)
        self.bn2 = nn.BatchNorm2d(24)
        self.reflect = nn.Conv2d(24, 32, 3, padding=1, padding_mode="reflect", bias=True)
        self.grouped = nn.Conv2d(32, 32, 3, padding=1, groups=4, bias=False)
        self.head = nn.Linear(32, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        out = F.relu(self.block.bn1(self.block.conv1(x)))
        out = self.block.conv2(out) + self.block.shortcut(x)
        out = F.relu(self.bn2(self.dilated(F.relu(out))) + out)
        out = F.relu(self.reflect(out))
        out = F.relu(self.grouped(out))
        return self.head(F.adaptive_avg_pool2d(out, 1).flatten(1))


# MACs per sample at input (3, 16, 16), by hand (see the class docstring).
SMALL_RESNET_MACS = {
    "stem": 8 * 3 * 9 * 256,
    "block.conv1": 24 * 8 * 9 * 64,
    "block.conv2": 24 * 24 * 3 * 64,
    "block.shortcut": 24 * 8 * 64,
    "dilated": 24 * 24 * 9 * 64,
    "reflect": 32 * 24 * 9 * 64,
    "grouped": 32 * 8 * 9 * 64,
}
SMALL_RESNET_ELIGIBLE = ["block.conv1", "block.conv2", "dilated", "reflect"]
INPUT_SIZE = (3, 16, 16)


def with_batchnorm_statistics(model: nn.Module) -> nn.Module:
    """``model`` with non-trivial BatchNorm running statistics (drawn from torch's RNG)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


def small_resnet(seed: int = 0, dtype: torch.dtype = torch.float64, n_classes: int = 5):
    """A SmallResNet in eval mode with random weights and non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = SmallResNet(n_classes).to(dtype)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


class NoEligible(nn.Module):
    """Only a stem conv, 1x1 convs and a linear: nothing to approximate."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.pw = nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pw(self.stem(x)).mean((2, 3)))
