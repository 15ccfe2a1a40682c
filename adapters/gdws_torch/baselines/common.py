"""What the three baselines share: the report, the layers they may change, the MAC budget,
the calibration statistics and the least-squares solve.

Every statistic is accumulated in float64 over the calibration inputs; every refit solves
``X = R (S + ridge * mean(diag(S)) I)^-1`` (``S`` a Gram matrix of the layer's features,
``R`` the cross-products with its targets), the regularisation of the GDWS refit
(:func:`gdws_torch.recovery.pointwise_step`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gdws_torch.common import take_samples
from gdws_torch.cost.macs import MacCount
from gdws_torch.nn.module_tree import eval_mode
from gdws_torch.recovery.statistics import LayerInputs

__all__ = [
    "BaselineLayer",
    "BaselineReport",
    "LayerSite",
    "OutOfReach",
    "capture_inputs",
    "layer_sites",
    "quadratic_error",
    "run_with_hooks",
    "solve_ridge",
    "take_batches",
]


@dataclass
class BaselineLayer:
    """One convolution a baseline changed (or kept dense).

    Attributes
    ----------
    name : str
    shape : tuple of int
        The dense weight's ``(M, C, Kh, Kw)``.
    form : str
        What it became: ``"dense"``, ``"dws"``, ``"low-rank R=8"``, ``"outputs 40/64"``
        (pruning), ...
    dense_macs : int
        MACs per sample of the dense conv.
    macs : int
        MACs per sample of what replaced it, counted by :func:`gdws_torch.count_macs`.
    error : float
        The criterion's error of the layer (``0`` when it stays dense): see the method.
    """

    name: str
    shape: tuple[int, ...]
    form: str
    dense_macs: int
    macs: int
    error: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "form": self.form,
            "dense_macs": self.dense_macs,
            "macs": self.macs,
            "error": self.error,
        }


@dataclass
class BaselineReport:
    """What :func:`gdws_torch.compress_baseline` did.

    Attributes
    ----------
    method : {"dws", "lowrank", "prune"}
    criterion : str
        The criterion that ranked the options (see :data:`CRITERIA`).
    target_mac_reduction : float
    dense_macs : int
        Conv MACs per sample of the dense model (every convolution).
    macs : int
        Conv MACs per sample of the compressed model, counted by
        :func:`gdws_torch.count_macs` (``<= dense_macs / target_mac_reduction``).
    layers : list of BaselineLayer
        The convolutions the method could change, in the model's order.
    refit_samples, recalibrate_samples : int
        Calibration inputs of the least-squares refit and of the BatchNorm re-estimation
        (``0``: not done).
    refit_errors : dict of str to (float, float)
        Per refitted layer: its output error on the calibration inputs before and after
        the refit (residual sums of squares).
    seconds : dict of str to float
        Time of each stage.
    """

    method: str
    criterion: str
    target_mac_reduction: float
    dense_macs: int
    macs: int
    layers: list[BaselineLayer]
    refit_samples: int = 0
    recalibrate_samples: int = 0
    refit_errors: dict[str, tuple[float, float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def mac_reduction(self) -> float:
        """``dense_macs / macs``: how many times fewer conv MACs."""
        return self.dense_macs / self.macs if self.macs else float("inf")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "method": self.method,
            "criterion": self.criterion,
            "target_mac_reduction": self.target_mac_reduction,
            "dense_macs": self.dense_macs,
            "macs": self.macs,
            "mac_reduction": self.mac_reduction,
            "layers": [layer.to_dict() for layer in self.layers],
            "refit_samples": self.refit_samples,
            "recalibrate_samples": self.recalibrate_samples,
            "refit_errors": {k: list(v) for k, v in self.refit_errors.items()},
            "seconds": dict(self.seconds),
        }

    def __str__(self) -> str:
        head = (
            f"{self.method} ({self.criterion}): conv MACs {self.dense_macs:,} -> {self.macs:,} "
            f"({self.mac_reduction:.3f}x fewer; target {self.target_mac_reduction:g}x)"
        )
        width = max([len(layer.name) for layer in self.layers] + [5])
        lines = [head, f"{'layer'.ljust(width)}  {'form':>22}  {'MACs':>13}  {'error':>11}"]
        for layer in self.layers:
            lines.append(
                f"{layer.name.ljust(width)}  {layer.form:>22}  {layer.macs:>13,}  "
                f"{layer.error:>11.4g}"
            )
        return "\n".join(lines)


@dataclass
class LayerSite:
    """A convolution of the model that runs once per forward pass, and its MACs there."""

    name: str
    conv: nn.Conv2d
    macs: int
    output_pixels: int


def layer_sites(macs: MacCount, chosen: list[tuple[str, nn.Conv2d]], input_size) -> list[LayerSite]:
    """The chosen convs with their MAC counts; a conv never called is left out, a conv
    called more than once is refused (as :func:`gdws_torch.convert` does)."""
    sites = []
    for name, conv in chosen:
        calls = [layer for layer in macs.layers if layer.name == name]
        if not calls:
            continue
        if len(calls) != 1:
            raise ValueError(
                f"layer {name!r} runs {len(calls)} times in one forward pass at input_size "
                f"{tuple(input_size)}; only convolutions called exactly once can be "
                "compressed. Exclude it with exclude=[...]."
            )
        sites.append(LayerSite(name, conv, calls[0].macs, calls[0].output_pixels))
    if not sites:
        raise ValueError(
            "none of the eligible convolutions runs in a forward pass at input_size "
            f"{tuple(input_size)}; nothing to compress."
        )
    return sites


def take_batches(data: Iterable, n_samples: int, device: Any) -> list[torch.Tensor]:
    """The first ``n_samples`` inputs of ``data`` (images, or (images, labels) batches)."""
    return [
        batch[0]
        for batch in take_samples(data, n_samples, stage="baseline criterion", device=device)
    ]


class OutOfReach(ValueError):
    """The layers cannot get under the MAC budget; ``least`` is the fewest MACs they reach
    (the caller turns it into the message with the largest reachable reduction)."""

    def __init__(self, least: float) -> None:
        super().__init__(f"the compressed layers need at least {least:,.0f} MACs")
        self.least = least


def capture_inputs(
    model: nn.Module, module: nn.Module, batches: Iterable[torch.Tensor]
) -> Iterator[torch.Tensor]:
    """The input ``model`` feeds ``module``, batch after batch (eval mode, no gradient).

    Each pass stops at ``module`` and runs on a copy of the batch
    (:class:`gdws_torch.recovery.statistics.LayerInputs`, the refit's passes).
    """
    name = next((n for n, m in model.named_modules() if m is module), None)
    if name is None:
        raise ValueError("module is not a submodule of model.")
    return LayerInputs(model, list(batches), cache_bytes=0).of(name)


def run_with_hooks(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    hooks: dict[nn.Module, Callable[..., None]],
    *,
    pre: bool,
) -> None:
    """One full pass of ``model`` over ``batches`` with forward (pre-)hooks installed."""
    register = "register_forward_pre_hook" if pre else "register_forward_hook"
    handles = [getattr(module, register)(hook) for module, hook in hooks.items()]
    try:
        with eval_mode(model), torch.no_grad():
            for batch in batches:
                model(batch.clone())
    finally:
        for handle in handles:
            handle.remove()


def solve_ridge(gram: torch.Tensor, cross: torch.Tensor, ridge: float) -> torch.Tensor:
    """``X = cross (gram + ridge * mean(diag(gram)) I)^-1``, in float64.

    The minimiser of ``sum ||y - X z||^2 + ridge * mean(diag(gram)) ||X||_F^2`` given
    ``gram = sum z z^T`` and ``cross = sum y z^T``. A singular system (``ridge=0`` with
    too few calibration inputs) is solved in the least-squares sense.
    """
    gram = ((gram + gram.T) / 2).to(torch.float64)
    cross = cross.to(torch.float64)
    scale = torch.diagonal(gram).mean().clamp_min(1e-300)
    system = gram + ridge * scale * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        return torch.cholesky_solve(cross.T, factor).T
    return torch.linalg.lstsq(system.cpu(), cross.T.cpu(), driver="gelsd").solution.T.to(
        gram.device
    )


def quadratic_error(
    solution: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, energy: float
) -> float:
    """``sum ||y - X z||^2 = energy - 2 tr(X cross^T) + tr(X gram X^T)``."""
    value = energy - 2 * float((solution * cross).sum()) + float((solution @ gram * solution).sum())
    return max(value, 0.0)
