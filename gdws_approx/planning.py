"""Network-level planning: one allocation per layer for a whole network.

Adapters describe each layer to approximate (its weight, its error weights ``alpha`` and
how many output pixels it computes) and the MACs of everything that stays as it is; the
planner returns, per layer, a fitted :class:`~gdws_approx.GDWSApproximator` (or the
decision to keep the layer dense) and the network's MAC totals. Three modes:

- LEGO with one ``beta`` for every layer (the original work's Algorithm 3);
- MEGO with a kernel budget per layer;
- a target MAC reduction over the whole network, met by the smallest ``beta`` (so the
  least error) whose network MACs are low enough. Each layer's kernel count is a step
  function of ``beta`` with steps at its :func:`~gdws_approx.lego_breakpoints`, so the
  network MACs are a non-increasing step function too, and a binary search over the
  union of breakpoints finds the exact smallest ``beta``.

A layer whose GDWS form would not be cheaper than the dense convolution
(``G * (K2 + M) >= M * C * K2``) stays dense unless ``only_if_cheaper=False``.

Over 400 lines because the plan objects (:class:`LayerPlan`, :class:`NetworkPlan` and
their report) and the three planning modes that build them change together.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import array_api_compat
import numpy as np

from gdws_approx import cost
from gdws_approx._namespace import work_dtype
from gdws_approx._validation import (
    check_alpha,
    check_beta,
    check_input_transforms,
    check_n_kernels,
    check_output_weights,
    check_spectrum_range,
    check_svd_solver,
    check_weight,
)
from gdws_approx.checks import check_integer, check_real
from gdws_approx.estimator import GDWSApproximator, weighted_channel_spectra
from gdws_approx.selection import lego_breakpoints

__all__ = ["LatencyPlan", "LayerPlan", "LayerSpec", "NetworkPlan", "plan_network"]


@dataclass(frozen=True)
class LayerSpec:
    """One layer to plan.

    Parameters
    ----------
    name : str
        The layer's name (for example the module path ``"layer1.0.conv1"``).
    weight : array of shape (M, C, Kh, Kw)
        Its weight, any array-API library. Not modified.
    output_pixels : int
        ``H' * W'``: output positions per input sample at the planned input size.
    alpha : array of shape (C,) or None, default=None
        Per-input-channel error weights (noise gains); all ones when ``None``.
    n_kernels : int or None, default=None
        This layer's MEGO budget (overrides the network-wide one).
    output_weights : array of shape (M,) or None, default=None
        Per-output-channel error weights (see :meth:`GDWSApproximator.fit`).
    input_transforms : array of shape (C, K2, K2) or (K2, K2) or None, default=None
        Per-input-channel kernel-space weightings ``B_c`` (see
        :meth:`GDWSApproximator.fit`).
    input_moment : array of shape (C*K2, C*K2) or None, default=None
        ``Sigma``, the second moment of the layer's input patches on calibration inputs
        (summed over output positions, averaged over samples). :func:`plan_latency`
        compares the forms of a layer by their response error under it
        (:class:`gdws_approx.ResponseErrors`); ``None``: under the weighting's own moment.
        The other planners do not use it.
    """

    name: str
    weight: Any
    output_pixels: int
    alpha: Any = None
    n_kernels: int | None = None
    output_weights: Any = None
    input_transforms: Any = None
    input_moment: Any = None


@dataclass
class LayerPlan:
    """The plan of one layer.

    Attributes
    ----------
    name : str
    shape : tuple of int
        ``(M, C, Kh, Kw)``.
    output_pixels : int
    replaced : bool
        Whether the layer changes (``False``: it stays dense).
    reason : str
        Why it stays dense, empty when replaced.
    estimator : GDWSApproximator or None
        Fitted on the layer's weight with the planned budget (also for a layer that
        stays dense, so its would-be cost and error are reported); ``None`` for a
        low-rank layer.
    n_kernels : int
        ``G`` of the fitted GDWS form (0 for a low-rank layer).
    multiplier_histogram : dict of int to int
        ``{g: number of input channels with g kernels}``.
    error : float
        Error of the planned form (0 for a layer kept dense): the weighted squared error
        of the GDWS form, or, in a plan for a speed-up, the response error of any form
        (:class:`gdws_approx.ResponseErrors`).
    dense_macs : int
        MACs of the dense layer per input sample (``M*C*K2 * output_pixels``).
    macs : int
        MACs of the layer as planned (its form when replaced, dense otherwise).
    timings_ms : dict of str to float or None
        Measured times of the layer, ``{"dense": ms, <form>: ms}`` (``"gdws"`` for every
        GDWS form), when an adapter timed it (latency-aware conversion); ``None``
        otherwise.
    kernel_multiple : int, default=1
        The deployed layer's ``G`` is padded up to a multiple of this with zero kernels
        (same outputs, more MACs): see :attr:`padded_n_kernels` and :attr:`padded_macs`.
    grouped_multiplier : int or None, default=None
        ``m`` when the layer is deployed without a channel gather, as a depthwise conv
        with the uniform channel multiplier ``m`` (every channel padded with zero kernels
        to ``m``): ``padded_n_kernels = C * m``.
    rank : int or None, default=None
        ``R`` of a low-rank layer (``estimator`` is ``None``: a ``Kh x Kw`` conv ``C -> R``,
        then a ``1 x 1`` conv ``R -> M``) or of a GDWS layer's low-rank pointwise
        (``1 x 1`` convs ``G -> R -> M``).
    factors : tuple of two arrays or None, default=None
        With ``rank``: a low-rank layer's ``(first (R, C*K2), second (M, R))``, or a GDWS
        layer's pointwise factors ``(inner (R, G), outer (M, R))``, columns of ``inner``
        in ``estimator``'s kernel order.
    """

    name: str
    shape: tuple[int, int, int, int]
    output_pixels: int
    replaced: bool
    reason: str
    estimator: GDWSApproximator | None
    n_kernels: int
    multiplier_histogram: dict[int, int]
    error: float
    dense_macs: int
    macs: int
    timings_ms: dict[str, float] | None = None
    kernel_multiple: int = 1
    grouped_multiplier: int | None = None
    rank: int | None = None
    factors: tuple[Any, Any] | None = None

    @property
    def form(self) -> str:
        """``"dense"``, ``"gdws"``, ``"grouped"``, ``"lowrank"`` or ``"gdws_lowrank"``
        (GDWS with a low-rank pointwise)."""
        if not self.replaced:
            return "dense"
        if self.rank is not None:
            return "lowrank" if self.estimator is None else "gdws_lowrank"
        return "gdws" if self.grouped_multiplier is None else "grouped"

    @property
    def form_label(self) -> str:
        """:attr:`form` with its size: ``"grouped x2"``, ``"lowrank R=8"``, ..."""
        if self.form == "grouped":
            return f"grouped x{self.grouped_multiplier}"
        if self.form in ("lowrank", "gdws_lowrank"):
            return f"{self.form} R={self.rank}"
        return self.form

    @property
    def mac_reduction(self) -> float:
        """``dense_macs / macs`` for this layer."""
        return cost.mac_reduction(self.dense_macs, self.macs)

    @property
    def padded_n_kernels(self) -> int:
        """``G`` as deployed: rounded up to ``kernel_multiple`` when replaced (``C * m``
        when :attr:`grouped`)."""
        if not self.replaced:
            return self.n_kernels
        if self.grouped_multiplier is not None:
            return self.shape[1] * self.grouped_multiplier
        return -(-self.n_kernels // self.kernel_multiple) * self.kernel_multiple

    @property
    def padded_macs(self) -> int:
        """MACs per input sample as deployed, the zero kernels of the padding included."""
        m, _, kh, kw = self.shape
        extra = self.padded_n_kernels - self.n_kernels
        # A padded kernel costs its depthwise pass and its column of the 1 x 1 conv after.
        width = self.rank if self.form == "gdws_lowrank" else m
        return self.macs + cost.gdws_macs(extra, kh * kw, width) * self.output_pixels

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (without the estimator)."""
        return {
            "name": self.name,
            "shape": list(self.shape),
            "output_pixels": self.output_pixels,
            "replaced": self.replaced,
            "form": self.form,
            "rank": self.rank,
            "reason": self.reason,
            "n_kernels": self.n_kernels,
            "multiplier_histogram": {str(g): n for g, n in self.multiplier_histogram.items()},
            "error": self.error,
            "dense_macs": self.dense_macs,
            "macs": self.macs,
            "mac_reduction": _finite_or_none(self.mac_reduction),
            "timings_ms": self.timings_ms,
            "kernel_multiple": self.kernel_multiple,
            "grouped_multiplier": self.grouped_multiplier,
            "padded_n_kernels": self.padded_n_kernels,
            "padded_macs": self.padded_macs,
        }


@dataclass(frozen=True)
class LatencyPlan:
    """What a plan for a speed-up predicts (:func:`gdws_approx.plan_latency`).

    Attributes
    ----------
    target_speedup : float
        The speed-up planned for.
    network_dense_ms : float
        The whole dense network's measured latency.
    predicted_ms : float
        The network's latency the plan predicts: ``network_dense_ms`` minus what each
        layer's chosen form saves on its dense latency.
    predicted_speedup : float
        ``network_dense_ms / predicted_ms``.
    best_predicted_speedup : float
        The prediction with the fastest form of every layer.
    forms_offered : tuple of str
        The forms the planner could choose besides dense.
    forms : mapping of str to str
        Each layer's form (:attr:`LayerPlan.form_label`), by layer name.
    """

    target_speedup: float
    network_dense_ms: float
    predicted_ms: float
    predicted_speedup: float
    best_predicted_speedup: float
    forms_offered: tuple[str, ...]
    forms: Mapping[str, str]

    def renamed(self, rename: Any) -> LatencyPlan:
        """A copy with every layer name ``n`` of :attr:`forms` replaced by ``rename(n)``."""
        forms = {rename(name): form for name, form in self.forms.items()}
        return dataclasses.replace(self, forms=forms)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "target_speedup": self.target_speedup,
            "network_dense_ms": self.network_dense_ms,
            "predicted_ms": self.predicted_ms,
            "predicted_speedup": self.predicted_speedup,
            "best_predicted_speedup": self.best_predicted_speedup,
            "forms_offered": list(self.forms_offered),
            "forms": dict(self.forms),
        }

    def summary(self) -> str:
        """One line: the target and the prediction."""
        return (
            f"latency plan: target {self.target_speedup:.3g}x, predicted "
            f"{self.predicted_speedup:.3g}x ({self.network_dense_ms:.4g} ms dense -> "
            f"{self.predicted_ms:.4g} ms)."
        )


@dataclass
class NetworkPlan:
    """Per-layer plans and network totals.

    Attributes
    ----------
    layers : list of LayerPlan
    solver : {"lego", "mego"}
    beta : float or None
        The LEGO budget used (found by the search with ``target_mac_reduction``).
    target_mac_reduction : float or None
    other_macs : int
        MACs of the layers outside the plan (they stay as they are).
    dense_macs : int
        Network MACs before: ``other_macs`` plus every planned layer dense.
    macs : int
        Network MACs after.
    kernel_multiple : int, default=1
        Every replaced layer's ``G`` is padded up to a multiple of this when deployed
        (set on each layer); :attr:`padded_macs` counts the padding.
    latency : LatencyPlan or None, default=None
        For a plan made for a speed-up (:func:`gdws_approx.plan_latency`): the target,
        the dense and predicted network latencies and each layer's form. What an adapter
        measures of the built model is its own report's, not the plan's.
    """

    layers: list[LayerPlan]
    solver: str
    beta: float | None
    target_mac_reduction: float | None
    other_macs: int
    kernel_multiple: int = 1
    latency: LatencyPlan | None = None
    dense_macs: int = field(init=False)
    macs: int = field(init=False)

    def __post_init__(self) -> None:
        self.kernel_multiple = cost.check_kernel_multiple(self.kernel_multiple)
        self.layers = [
            layer
            if layer.kernel_multiple == self.kernel_multiple
            else dataclasses.replace(layer, kernel_multiple=self.kernel_multiple)
            for layer in self.layers
        ]
        self.dense_macs = self.other_macs + sum(layer.dense_macs for layer in self.layers)
        self.macs = self.other_macs + sum(layer.macs for layer in self.layers)

    @property
    def padded_macs(self) -> int:
        """Network MACs as deployed, the zero kernels of the padding included."""
        return self.other_macs + sum(layer.padded_macs for layer in self.layers)

    @property
    def mac_reduction(self) -> float:
        """``dense_macs / macs`` over the network."""
        return cost.mac_reduction(self.dense_macs, self.macs)

    @property
    def error(self) -> float:
        """Sum of the replaced layers' weighted squared errors."""
        return sum(layer.error for layer in self.layers)

    def renamed(self, rename: Any) -> NetworkPlan:
        """A copy with every layer name ``n`` replaced by ``rename(n)`` (e.g. a wrapper's
        ``"module."`` prefix removed)."""
        return dataclasses.replace(
            self,
            layers=[dataclasses.replace(layer, name=rename(layer.name)) for layer in self.layers],
            latency=None if self.latency is None else self.latency.renamed(rename),
        )

    def __getitem__(self, name: str) -> LayerPlan:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r} in the plan")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "solver": self.solver,
            "beta": self.beta,
            "target_mac_reduction": self.target_mac_reduction,
            "layers": [layer.to_dict() for layer in self.layers],
            "n_replaced": sum(layer.replaced for layer in self.layers),
            "other_macs": self.other_macs,
            "dense_macs": self.dense_macs,
            "macs": self.macs,
            "mac_reduction": _finite_or_none(self.mac_reduction),
            "error": self.error,
            "kernel_multiple": self.kernel_multiple,
            "padded_macs": self.padded_macs,
            "padded_mac_reduction": _finite_or_none(
                cost.mac_reduction(self.dense_macs, self.padded_macs)
            ),
            "latency": None if self.latency is None else self.latency.to_dict(),
        }

    def format_table(self) -> str:
        """The per-layer report as a text table, with the network totals.

        The ``form`` column says what each layer becomes (``dense``, ``gdws``,
        ``grouped xm``: a depthwise conv with channel multiplier ``m``, ``lowrank R=r``,
        ``gdws_lowrank R=r``). With ``kernel_multiple > 1`` or grouped layers the ``G``
        column reads ``G->padded G`` where they differ, and a "MACs padded" column gives
        the MACs as deployed.
        """
        header = (
            "layer",
            "shape",
            "form",
            "G",
            "g histogram",
            "error",
            "MACs before",
            "MACs after",
            "fewer",
        )
        padded = self.kernel_multiple > 1 or any(
            lp.grouped_multiplier and lp.replaced for lp in self.layers
        )
        timed = any(layer.timings_ms for layer in self.layers)
        extra = ("MACs padded",) * padded + ("ms dense / planned",) * timed
        rows = []
        for layer in self.layers:
            histogram = " ".join(f"{g}:{n}" for g, n in sorted(layer.multiplier_histogram.items()))
            kernels = str(layer.n_kernels)
            if layer.padded_n_kernels != layer.n_kernels:
                kernels += f"->{layer.padded_n_kernels}"
            gdws = layer.form in ("gdws", "grouped", "gdws_lowrank")
            row = (
                layer.name,
                "x".join(map(str, layer.shape)),
                layer.form_label,
                kernels if gdws else "",
                histogram if gdws else layer.reason,
                f"{layer.error:.4g}",
                f"{layer.dense_macs:,}",
                f"{layer.macs:,}",
                f"{layer.mac_reduction:.2f}",
            )
            if padded:
                row = (*row, f"{layer.padded_macs:,}")
            if timed:
                row = (*row, _timing_cell(layer.timings_ms))
            rows.append(row)
        other = (
            "(other layers)",
            *("",) * 5,
            f"{self.other_macs:,}",
            f"{self.other_macs:,}",
        )
        total = (
            "total",
            "",
            "",
            "",
            f"{sum(lp.replaced for lp in self.layers)}/{len(self.layers)} replaced",
            f"{self.error:.4g}",
            f"{self.dense_macs:,}",
            f"{self.macs:,}",
            f"{self.mac_reduction:.2f}",
        )
        rows.append((*other, "", *((f"{self.other_macs:,}",) * padded), *(("",) * timed)))
        rows.append((*total, *((f"{self.padded_macs:,}",) * padded), *(("",) * timed)))
        header = (*header, *extra)
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True))
            for r in [header, *rows]
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if padded:
            reduction = cost.mac_reduction(self.dense_macs, self.padded_macs)
            how = (
                f"G padded to a multiple of {self.kernel_multiple}"
                if self.kernel_multiple > 1
                else "Grouped layers padded to a uniform multiplier"
            )
            lines.append(
                f"{how} when deployed (zero kernels, same outputs): {self.padded_macs:,} MACs, "
                f"{reduction:.2f}x fewer."
            )
        if self.latency is not None:
            lines.append(self.latency.summary())
        return "\n".join(line.rstrip() for line in lines)

    def __str__(self) -> str:
        return self.format_table()


def _timing_cell(timings: Mapping[str, float] | None) -> str:
    """``"dense / planned"`` milliseconds of a timed layer (empty when not timed)."""
    if not timings:
        return ""
    planned = next((ms for form, ms in timings.items() if form != "dense"), timings["dense"])
    return f"{timings['dense']:.4g} / {planned:.4g}"


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def plan_network(
    layers: Sequence[LayerSpec],
    *,
    beta: float | None = None,
    n_kernels: int | Mapping[str, int] | None = None,
    target_mac_reduction: float | None = None,
    other_macs: int = 0,
    only_if_cheaper: bool = True,
    svd_solver: str = "auto",
    allocation: str = "common_beta",
    kernel_multiple: int = 1,
) -> NetworkPlan:
    """Plan the GDWS approximation of a whole network.

    Give exactly one budget: ``beta`` (LEGO, the same error budget for every layer),
    ``n_kernels`` (MEGO, one budget for all layers or one per layer name; a
    :attr:`LayerSpec.n_kernels` overrides it) or ``target_mac_reduction`` (LEGO with the
    smallest common ``beta`` that reaches it). With none of them, ``beta=0`` (exact).

    Parameters
    ----------
    layers : sequence of LayerSpec
        The layers to approximate, with distinct names.
    beta : float, optional
    n_kernels : int or mapping of str to int, optional
    target_mac_reduction : float, optional
        ``dense_macs / macs`` to reach over the network (``other_macs`` included), ``> 1``.
    other_macs : int, default=0
        MACs of the network's layers that are not planned (they stay as they are).
    only_if_cheaper : bool, default=True
        Keep a layer dense when its GDWS form would cost at least as many MACs.
    svd_solver : {"auto", "full", "covariance_eigh"}, default="auto"
    allocation : {"common_beta", "global"}, default="common_beta"
        How ``target_mac_reduction`` is met. ``"common_beta"``: LEGO with one ``beta``
        for every layer (the original work's rule). ``"global"``: the least total error
        for the MACs, over all layers at once: singular values are kept in the order of
        ``weighted sigma^2 / MACs of one kernel of their layer`` while they fit the MAC
        budget, then each layer is fitted by MEGO with the kernels it got. Each such
        prefix is the least-error allocation among all allocations with at most its MACs
        (a Lagrangian argument). A layer never gets so many kernels that GDWS would cost
        as much as the dense conv, and at least one.
    kernel_multiple : int, default=1
        The multiple (1 to 64) each replaced layer's ``G`` is padded up to when deployed
        (zero kernels, same outputs). The plan is the same; the report records it and the
        padded MACs (:attr:`NetworkPlan.padded_macs`).

    Returns
    -------
    NetworkPlan

    Raises
    ------
    ValueError
        No layer; duplicate names; several budgets; a budget that leaves a layer with no
        kernel at all; an unreachable ``target_mac_reduction`` (the message says the
        largest reachable one).
    """
    specs = _check_specs(layers)
    other_macs = check_integer(other_macs, "other_macs", minimum=0)
    svd_solver = check_svd_solver(svd_solver)
    kernel_multiple = cost.check_kernel_multiple(kernel_multiple)
    given = [
        name
        for name, value in (
            ("beta", beta),
            ("n_kernels", n_kernels),
            ("target_mac_reduction", target_mac_reduction),
        )
        if value is not None
    ]
    if len(given) > 1:
        raise ValueError(f"give one budget, not {' and '.join(given)}.")
    if allocation not in ("common_beta", "global"):
        raise ValueError(f"allocation must be 'common_beta' or 'global'; got {allocation!r}.")
    target = None
    if allocation == "global":
        if given != ["target_mac_reduction"] or any(s.n_kernels is not None for s in specs):
            raise ValueError("allocation='global' needs target_mac_reduction as the only budget.")
        target = _check_target(target_mac_reduction)
        budgets = _global_budgets(specs, target, other_macs, svd_solver)
        plans = [
            _plan_layer(s, "mego", budgets[s.name], only_if_cheaper, svd_solver) for s in specs
        ]
        return NetworkPlan(
            layers=plans,
            solver="mego",
            beta=None,
            target_mac_reduction=target,
            other_macs=other_macs,
            kernel_multiple=kernel_multiple,
        )
    if n_kernels is not None or any(s.n_kernels is not None for s in specs):
        if given and given != ["n_kernels"]:
            raise ValueError(f"per-layer MEGO budgets (LayerSpec.n_kernels) exclude {given[0]}.")
        solver, budgets = "mego", _mego_budgets(specs, n_kernels)
    else:
        if target_mac_reduction is not None:
            target = _check_target(target_mac_reduction)
            beta = _search_beta(specs, target, other_macs, only_if_cheaper, svd_solver)
        beta = 0.0 if beta is None else check_beta(beta)
        solver, budgets = "lego", dict.fromkeys((s.name for s in specs), beta)
    plans = [_plan_layer(s, solver, budgets[s.name], only_if_cheaper, svd_solver) for s in specs]
    empty = [p for p in plans if p.replaced and p.n_kernels == 0]
    if empty:
        names = ", ".join(p.name for p in empty)
        what = f"beta={beta!r}" if solver == "lego" else "the MEGO budget"
        raise ValueError(
            f"{what} keeps no kernel in layer(s) {names}: the whole weighted energy of the "
            f"layer is within the budget (smallest: {min(_energy(p) for p in empty):.6g})."
            + (" Use a smaller beta." if solver == "lego" else " Its weight is all zero.")
        )
    plan = NetworkPlan(
        plans, solver, beta if solver == "lego" else None, target, other_macs, kernel_multiple
    )
    if target is not None and plan.dense_macs < target * plan.macs:
        raise RuntimeError("internal error: the planned beta misses the MAC target")
    return plan


def _energy(plan: LayerPlan) -> float:
    return float(plan.estimator.error_)


def _check_specs(layers: Sequence[LayerSpec]) -> list[LayerSpec]:
    specs = list(layers)
    if not specs:
        raise ValueError("layers is empty: give at least one LayerSpec to plan.")
    for spec in specs:
        if not isinstance(spec, LayerSpec):
            raise TypeError(f"layers must hold LayerSpec objects; got {type(spec).__name__}.")
        check_integer(spec.output_pixels, f"output_pixels of layer {spec.name!r}", minimum=0)
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"layer names must be distinct; repeated: {duplicates}.")
    return specs


def _check_target(
    target: Any, name: str = "target_mac_reduction", example: str = "3.0 for three times fewer MACs"
) -> float:
    return check_real(target, name, minimum=1, strict=True, unit=f"for example {example}")


def _mego_budgets(specs: list[LayerSpec], n_kernels: Any) -> dict[str, int]:
    budgets = {}
    if isinstance(n_kernels, Mapping):
        unknown = sorted(set(n_kernels) - {s.name for s in specs})
        if unknown:
            raise ValueError(f"n_kernels names layers that are not planned: {unknown}.")
    for spec in specs:
        if spec.n_kernels is not None:
            budget = spec.n_kernels
        elif isinstance(n_kernels, Mapping):
            if spec.name not in n_kernels:
                raise ValueError(f"n_kernels has no budget for layer {spec.name!r}.")
            budget = n_kernels[spec.name]
        elif n_kernels is None:
            raise ValueError(f"solver='mego' needs n_kernels for layer {spec.name!r}.")
        else:
            budget = n_kernels
        try:
            budgets[spec.name] = check_n_kernels(budget)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"layer {spec.name!r}: {exc}") from None
        if budgets[spec.name] == 0:
            raise ValueError(f"n_kernels=0 for layer {spec.name!r} keeps no kernel; give >= 1.")
    return budgets


def _layer_values(spec: LayerSpec, svd_solver: str) -> tuple[np.ndarray, Any]:
    """The weighted spectrum exactly as :meth:`GDWSApproximator.fit` computes it."""
    weight = check_weight(spec.weight, None, name=f"weight of layer {spec.name!r}")
    if weight.ndim != 4:
        raise ValueError(f"weight of layer {spec.name!r} must be 4-D (M, C, Kh, Kw).")
    xp, W3 = weight.xp, weight.W3
    wide = work_dtype(xp, array_api_compat.device(W3))
    try:
        alpha = check_alpha(spec.alpha, weight.n_in, W3, wide)
        output_weights = check_output_weights(spec.output_weights, weight.n_out, W3, wide)
        transforms, _ = check_input_transforms(
            spec.input_transforms, weight.n_in, W3.shape[2], W3, wide
        )
        spectra = weighted_channel_spectra(W3, output_weights, transforms, svd_solver)
        values = alpha[:, None] * spectra.squared_singular_values
        check_spectrum_range(xp, values, W3.dtype)
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"layer {spec.name!r}: {exc}") from None
    return values, weight


def _global_budgets(
    specs: Sequence[LayerSpec], target: float, other_macs: int, svd_solver: str
) -> dict[str, int]:
    """Kernels per layer: weighted singular values taken by value per MAC within budget."""
    candidates = []  # (value per MAC, layer index, cost of one kernel)
    dense_total, floor_macs, caps = other_macs, other_macs, []
    for index, spec in enumerate(specs):
        values, weight = _layer_values(spec, svd_solver)
        values = _to_numpy(values)
        m, c, kh, kw = weight.W3.shape[0], weight.n_in, *weight.kernel_size
        kernel_macs = cost.gdws_macs(1, kh * kw, m) * spec.output_pixels
        dense = cost.dense_macs(m, c, kh * kw) * spec.output_pixels
        dense_total += dense
        # Fewer kernels than break-even, so that GDWS stays cheaper than the dense conv.
        caps.append(max(1, (dense - 1) // kernel_macs))
        ordered = np.sort(values[values > 0])[::-1]
        if ordered.size == 0:
            raise ValueError(f"layer {spec.name!r}: its weighted weight is all zero.")
        floor_macs += kernel_macs  # every layer keeps its largest value
        candidates += [(v / kernel_macs, index, kernel_macs) for v in ordered[1:]]
    budget = dense_total / target
    if floor_macs > budget:
        raise ValueError(
            f"target_mac_reduction={target!r} is out of reach: with one kernel per layer the "
            f"network reaches at most {dense_total / floor_macs:.4g}x fewer MACs."
        )
    counts = [1] * len(specs)
    used = floor_macs
    candidates.sort(key=lambda item: -item[0])
    for _, index, kernel_macs in candidates:
        if used + kernel_macs > budget:
            break  # a prefix of the order: optimal for its own MACs
        if counts[index] >= caps[index]:
            continue
        counts[index] += 1
        used += kernel_macs
    return {spec.name: count for spec, count in zip(specs, counts, strict=True)}


def _search_beta(
    specs: list[LayerSpec], target: float, other_macs: int, only_if_cheaper: bool, svd_solver: str
) -> float:
    """The smallest common LEGO ``beta`` whose network MACs are ``<= dense / target``."""
    steps = []  # per layer: (breakpoints as float64 numpy, M, C, K2, pixels)
    for spec in specs:
        values, weight = _layer_values(spec, svd_solver)
        breakpoints = np.asarray(_to_numpy(lego_breakpoints(values)), dtype=np.float64)
        kh, kw = weight.kernel_size
        steps.append((breakpoints, weight.n_out, weight.n_in, kh * kw, spec.output_pixels))
    dense = other_macs + sum(m * c * k2 * px for _, m, c, k2, px in steps)

    def network_macs(b: float) -> int:
        total = other_macs
        for breakpoints, m, c, k2, px in steps:
            g = breakpoints.size - int(np.searchsorted(breakpoints, b, side="right"))
            layer_dense = cost.dense_macs(m, c, k2)
            layer_gdws = cost.gdws_macs(g, k2, m)
            use_gdws = layer_gdws < layer_dense or not only_if_cheaper
            total += px * (layer_gdws if use_gdws else layer_dense)
        return total

    # Every layer must keep a kernel: beta below each layer's total weighted energy.
    ceiling = min(bp[-1] for bp, *_ in steps)
    candidates = np.unique(np.concatenate([[0.0], *[bp[bp < ceiling] for bp, *_ in steps]]))
    if dense < target * network_macs(float(candidates[-1])):
        best = dense / network_macs(float(candidates[-1]))
        raise ValueError(
            f"target_mac_reduction={target!r} is out of reach: with at least one kernel per "
            f"layer the network reaches at most {best:.3f}x fewer MACs (other layers: "
            f"{other_macs:,} MACs stay as they are)."
        )
    lo, hi = 0, candidates.size - 1  # network_macs(candidates[hi]) meets the target
    while lo < hi:
        mid = (lo + hi) // 2
        if dense >= target * network_macs(float(candidates[mid])):
            hi = mid
        else:
            lo = mid + 1
    return float(candidates[lo])


def _to_numpy(x: Any) -> Any:
    """A host copy of a small 1-D array of any library (breakpoints for the search)."""
    if hasattr(x, "detach"):  # torch, without importing it
        return x.detach().cpu().numpy()
    if hasattr(x, "get"):  # cupy
        return x.get()
    return np.asarray(x)


def _plan_layer(
    spec: LayerSpec,
    solver: str,
    budget: float | int,
    only_if_cheaper: bool,
    svd_solver: str,
    max_multiplier: int | None = None,
) -> LayerPlan:
    if solver == "lego":
        estimator = GDWSApproximator(
            solver="lego", beta=budget, svd_solver=svd_solver, max_multiplier=max_multiplier
        )
    else:
        estimator = GDWSApproximator(
            solver="mego", n_kernels=budget, svd_solver=svd_solver, max_multiplier=max_multiplier
        )
    try:
        estimator.fit(
            spec.weight,
            alpha=spec.alpha,
            output_weights=spec.output_weights,
            input_transforms=spec.input_transforms,
        )
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"layer {spec.name!r}: {exc}") from None
    m, c = estimator.n_output_channels_, estimator.n_input_channels_
    kh, kw = estimator.kernel_size_
    dense = estimator.dense_macs_ * spec.output_pixels
    gdws = estimator.gdws_macs_ * spec.output_pixels
    cheaper = estimator.gdws_macs_ < estimator.dense_macs_
    replaced = cheaper or not only_if_cheaper
    reason = (
        ""
        if replaced
        else f"kept dense: GDWS needs {estimator.gdws_macs_:,} MACs/pixel >= dense "
        f"{estimator.dense_macs_:,}"
    )
    histogram = Counter(int(g) for g in _to_numpy(estimator.multipliers_).tolist())
    return LayerPlan(
        name=spec.name,
        shape=(m, c, kh, kw),
        output_pixels=spec.output_pixels,
        replaced=replaced,
        reason=reason,
        estimator=estimator,
        n_kernels=estimator.n_kernels_,
        multiplier_histogram=dict(sorted(histogram.items())),
        error=float(estimator.error_) if replaced else 0.0,
        dense_macs=dense,
        macs=gdws if replaced else dense,
    )
