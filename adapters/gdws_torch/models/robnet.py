"""RobNet-free for CIFAR-10 (Guo et al., "When NAS Meets Robustness", CVPR 2020).

The original's ``--model robnetfree``: the cell-based network RobNets searched for
adversarial robustness, with its published architecture code (:data:`ROBNET_FREE_CODE`,
one code per cell: "free" means the cells differ). C=36 channels at first, 20 cells, 4
intermediate nodes per cell whose last 4 are concatenated (multiplier 4), a 3x36-channel
stem; the channels double in the reduction cells 6 and 13 (``layers // 3`` and
``2 * layers // 3``), which halve the resolution.

In a cell, node ``i`` (``i = 0 .. 3``) sums one operation on each earlier state (the two
inputs and nodes ``0 .. i - 1``): 2 + 3 + 4 + 5 = 14 edges, each with a two-character
code: ``"00"`` none (zeros), ``"01"`` separable 3x3 conv, ``"10"`` identity (a factorized
reduction where the edge has stride 2), ``"11"`` separable 3x3 conv plus that identity.
A separable conv is ReLU, depthwise 3x3, pointwise 1x1, BN, ReLU, depthwise 3x3,
pointwise 1x1, BN; every BatchNorm in the cells is without affine parameters.

Parameter names are those of the RobNets checkpoints (``stem.0.weight``,
``cells.N.preprocess0.op.1.weight``, ``cells.N._ops.K.op.conv.op.1.weight``, ...,
``classifier.weight``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["ROBNET_FREE_CODE", "RobNet", "RobNetFree"]

# The published code of RobNet-free, one row of 14 edge codes per cell (RobNets' release).
ROBNET_FREE_CODE = (
    ("11", "10", "11", "11", "10", "11", "01", "01", "10", "11", "11", "00", "11", "01"),
    ("11", "00", "01", "10", "01", "00", "10", "10", "00", "01", "11", "10", "11", "00"),
    ("11", "11", "11", "01", "01", "11", "01", "00", "10", "00", "10", "10", "00", "11"),
    ("10", "11", "10", "01", "01", "10", "10", "01", "10", "11", "00", "00", "01", "10"),
    ("11", "11", "01", "00", "10", "10", "10", "01", "10", "01", "00", "10", "01", "11"),
    ("11", "10", "11", "11", "11", "01", "10", "11", "00", "10", "01", "11", "01", "11"),
    ("11", "11", "11", "10", "10", "01", "11", "10", "01", "10", "10", "10", "01", "10"),
    ("01", "11", "11", "11", "01", "11", "11", "11", "01", "11", "01", "11", "10", "00"),
    ("11", "11", "11", "11", "11", "01", "01", "11", "10", "01", "00", "10", "01", "11"),
    ("10", "11", "01", "00", "11", "11", "10", "11", "01", "11", "11", "11", "11", "00"),
    ("11", "10", "11", "00", "00", "00", "11", "00", "01", "10", "00", "01", "10", "11"),
    ("01", "11", "01", "11", "11", "10", "10", "11", "10", "11", "01", "11", "10", "00"),
    ("11", "11", "10", "10", "01", "00", "10", "11", "11", "01", "10", "10", "00", "01"),
    ("01", "11", "11", "11", "01", "01", "11", "01", "01", "11", "11", "01", "10", "10"),
    ("01", "11", "11", "11", "11", "01", "00", "01", "10", "10", "11", "10", "10", "11"),
    ("11", "11", "00", "11", "11", "01", "00", "01", "10", "00", "11", "01", "11", "11"),
    ("11", "11", "01", "11", "11", "10", "11", "10", "10", "10", "10", "10", "11", "11"),
    ("10", "11", "01", "11", "11", "01", "11", "00", "11", "11", "00", "10", "00", "01"),
    ("11", "10", "11", "11", "11", "11", "11", "10", "11", "00", "11", "01", "11", "11"),
    ("11", "11", "01", "01", "11", "11", "01", "00", "00", "10", "00", "01", "01", "11"),
)


class ReLUConvBN(nn.Module):
    """ReLU, conv (no bias), BatchNorm without affine parameters: ``op.1``, ``op.2``."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int, padding: int):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(c_out, affine=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class SepConv(nn.Module):
    """Two rounds of ReLU, depthwise conv, pointwise conv, BatchNorm (``op.1`` .. ``op.7``);
    the stride is the first depthwise conv's."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int, padding: int):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_in, kernel_size, stride, padding, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_in, 1, padding=0, bias=False),
            nn.BatchNorm2d(c_in, affine=False),
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_in, kernel_size, 1, padding, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, padding=0, bias=False),
            nn.BatchNorm2d(c_out, affine=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Zero(nn.Module):
    """No connection: zeros of the output's shape (subsampled by ``stride``)."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return x.mul(0.0)
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class FactorizedReduce(nn.Module):
    """Halve the resolution: ReLU, two stride-2 1x1 convs (the second one pixel off),
    concatenated, then BatchNorm without affine parameters."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        if c_out % 2:
            raise ValueError(f"c_out must be even; got {c_out}.")
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, padding=0, bias=False)
        self.conv_2 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, padding=0, bias=False)
        self.bn = nn.BatchNorm2d(c_out, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1))


class ResSepConv(nn.Module):
    """A separable conv (``conv``) plus the identity, or a factorized reduction (``res``)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int, padding: int):
        super().__init__()
        self.conv = SepConv(c_in, c_out, kernel_size, stride, padding)
        self.res = nn.Identity() if stride == 1 else FactorizedReduce(c_in, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.res(x)


def _operation(code: str, channels: int, stride: int) -> nn.Module:
    if code == "00":
        return Zero(stride)
    if code == "01":
        return SepConv(channels, channels, 3, stride, 1)
    if code == "10":
        return nn.Identity() if stride == 1 else FactorizedReduce(channels, channels)
    if code == "11":
        return ResSepConv(channels, channels, 3, stride, 1)
    raise ValueError(f"unknown RobNet edge code {code!r}: expected '00', '01', '10' or '11'.")


class ChosenOperation(nn.Module):
    """One edge of a cell: the operation of its code, as ``op``."""

    def __init__(self, channels: int, stride: int, code: str) -> None:
        super().__init__()
        self.op = _operation(code, channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Cell(nn.Module):
    """A RobNet cell: two preprocessed inputs, ``steps`` nodes, the last ``multiplier``
    states concatenated."""

    def __init__(
        self,
        steps: int,
        multiplier: int,
        c_prev_prev: int,
        c_prev: int,
        channels: int,
        reduction: bool,
        reduction_prev: bool,
        code: Sequence[str],
    ) -> None:
        super().__init__()
        n_edges = sum(2 + i for i in range(steps))
        if len(code) != n_edges:
            raise ValueError(
                f"a cell of {steps} nodes needs {n_edges} edge codes; got {len(code)}."
            )
        self.reduction = reduction
        self._steps = steps
        self._multiplier = multiplier
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(c_prev_prev, channels)
        else:
            self.preprocess0 = ReLUConvBN(c_prev_prev, channels, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(c_prev, channels, 1, 1, 0)
        self._ops = nn.ModuleList()
        offset = 0
        for i in range(steps):
            for j in range(2 + i):
                stride = 2 if reduction and j < 2 else 1
                self._ops.append(ChosenOperation(channels, stride, code[offset + j]))
            offset += 2 + i

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self._steps):
            node = sum(self._ops[offset + j](h) for j, h in enumerate(states))
            offset += len(states)
            states.append(node)
        return torch.cat(states[-self._multiplier :], dim=1)


class RobNet(nn.Module):
    """A RobNet for 32x32 inputs: stem, ``layers`` cells, global average pool, linear.

    Parameters
    ----------
    code : sequence of sequences of str
        One code per cell (``layers`` of them), or a single one shared by every cell.
    num_classes : int, default=10
    channels : int, default=36
        ``C``: the first cells' node channels.
    layers : int, default=20
    steps : int, default=4
    multiplier : int, default=4
    stem_multiplier : int, default=3
    """

    def __init__(
        self,
        code: Sequence[Sequence[str]] = ROBNET_FREE_CODE,
        num_classes: int = 10,
        channels: int = 36,
        layers: int = 20,
        steps: int = 4,
        multiplier: int = 4,
        stem_multiplier: int = 3,
    ) -> None:
        super().__init__()
        if len(code) not in (1, layers):
            raise ValueError(f"code needs 1 or {layers} cell codes; got {len(code)}.")
        c_curr = stem_multiplier * channels
        self.stem = nn.Sequential(
            nn.Conv2d(3, c_curr, 3, padding=1, bias=False), nn.BatchNorm2d(c_curr)
        )
        c_prev_prev, c_prev, c_curr = c_curr, c_curr, channels
        reduction_prev = False
        self.cells = nn.ModuleList()
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                c_curr *= 2
            cell_code = code[0] if len(code) == 1 else code[i]
            self.cells.append(
                Cell(
                    steps,
                    multiplier,
                    c_prev_prev,
                    c_prev,
                    c_curr,
                    reduction,
                    reduction_prev,
                    cell_code,
                )
            )
            reduction_prev = reduction
            c_prev_prev, c_prev = c_prev, multiplier * c_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1)
        return self.classifier(self.global_pooling(s1).flatten(1))


def RobNetFree(num_classes: int = 10) -> RobNet:
    """RobNet-free for 32x32 inputs (the original's ``robnetfree``): C=36, 20 cells."""
    return RobNet(ROBNET_FREE_CODE, num_classes)
