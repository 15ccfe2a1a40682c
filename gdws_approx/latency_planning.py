"""Planning for a measured speed-up: least error under a latency budget, every form.

An adapter measures, on the device and runtime the model will be deployed on, every
eligible layer's latency in each form it can run as, plus the whole dense network:

- dense;
- GDWS at a grid of kernel counts ``G`` (channel gather, depthwise conv, ``1 x 1`` conv);
- *grouped* at channel multipliers ``m``: every channel keeps ``m`` kernels, the
  depthwise stage is one grouped conv over the input (``groups=C``, no gather);
  ``m = 1`` is the ordinary depthwise-separable layer;
- *low-rank* at a grid of ranks ``R``: a ``Kh x Kw`` conv ``C -> R``, then a ``1 x 1`` conv
  ``R -> M`` (``R (C K2 + M)`` MACs per output pixel);
- optionally, GDWS with a rank-``R`` pointwise (``1 x 1`` convs ``G -> R -> M``,
  ``G K2 + G R + R M`` MACs) at measured ``(G, R)`` points: offered only when asked
  (``forms``), until measurements show where it pays.

:func:`plan_latency` then chooses each layer's form so that the total error is least
while the predicted network latency,

    network dense latency - sum over layers of (layer dense latency - chosen latency),

is at most ``network dense latency / target_speedup``. This is a multiple-choice
knapsack over the per-layer options (:func:`gdws_approx.knapsack.choose_options`).

Every option's error is the layer's response error (:class:`gdws_approx.ResponseErrors`),
one measure for every form: under the layer's measured input moment when the specs carry
one, else under the error weighting's own moment (with unit weights, the weight error;
the GDWS options' errors are then MEGO's weighted errors). Latencies between two
measured kernel counts (ranks) are interpolated linearly.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gdws_approx import cost
from gdws_approx.checks import check_real
from gdws_approx.knapsack import choose_options
from gdws_approx.planning import (
    LatencyPlan,
    LayerPlan,
    LayerSpec,
    NetworkPlan,
    _check_specs,
    _check_target,
    _plan_layer,
)
from gdws_approx.response import ResponseErrors

__all__ = ["DEFAULT_FORMS", "FORMS", "GDWS_FORMS", "LayerLatency", "plan_latency"]

#: The forms a layer may take besides staying dense.
FORMS = ("gdws", "grouped", "lowrank", "gdws_lowrank")
#: The forms :func:`plan_latency` offers by default: those measurements show can pay
#: (``"gdws_lowrank"`` waits for its benchmark, ``bench/lowrank_forms.py``).
DEFAULT_FORMS = ("gdws", "grouped", "lowrank")
#: The GDWS forms only (gather and grouped; grouped at ``m = 1`` is depthwise-separable).
GDWS_FORMS = ("gdws", "grouped")

# Kernel counts (ranks) offered per layer between the smallest and largest measured one.
_OPTIONS_PER_LAYER = 48


@dataclass(frozen=True)
class LayerLatency:
    """Measured latencies of one layer, in milliseconds, at the planned batch size.

    Parameters
    ----------
    dense_ms : float
        The dense convolution.
    kernel_counts : sequence of int
        Increasing ``G`` at which the GDWS form was timed.
    gdws_ms : sequence of float
        Its latency at each of ``kernel_counts``.
    multipliers : sequence of int, default=()
        Increasing channel multipliers ``m`` at which the grouped form (``m`` kernels
        per channel, no gather) was timed; ``1`` is the depthwise-separable layer.
    grouped_ms : sequence of float, default=()
        Its latency at each of ``multipliers``.
    ranks : sequence of int, default=()
        Increasing ranks ``R`` at which the low-rank form was timed.
    lowrank_ms : sequence of float, default=()
        Its latency at each of ``ranks``.
    gdws_lowrank_points : sequence of (int, int), default=()
        Distinct ``(G, R)`` at which GDWS with a rank-``R`` pointwise was timed.
    gdws_lowrank_ms : sequence of float, default=()
        Its latency at each of ``gdws_lowrank_points``.
    """

    dense_ms: float
    kernel_counts: tuple[int, ...]
    gdws_ms: tuple[float, ...]
    multipliers: tuple[int, ...] = ()
    grouped_ms: tuple[float, ...] = ()
    ranks: tuple[int, ...] = ()
    lowrank_ms: tuple[float, ...] = ()
    gdws_lowrank_points: tuple[tuple[int, int], ...] = ()
    gdws_lowrank_ms: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        for counts_name, times_name, empty_ok in (
            ("kernel_counts", "gdws_ms", False),
            ("multipliers", "grouped_ms", True),
            ("ranks", "lowrank_ms", True),
        ):
            counts = tuple(int(g) for g in getattr(self, counts_name))
            times = tuple(float(t) for t in getattr(self, times_name))
            object.__setattr__(self, counts_name, counts)
            object.__setattr__(self, times_name, times)
            if (not counts and not empty_ok) or len(counts) != len(times):
                raise ValueError(
                    f"{counts_name} and {times_name} must be {'' if empty_ok else 'non-empty and '}"
                    f"of equal length; got {len(counts)} and {len(times)}."
                )
            if any(b <= a for a, b in itertools.pairwise(counts)) or (counts and counts[0] < 1):
                raise ValueError(f"{counts_name} must be increasing and >= 1; got {counts}.")
        self._check_points()
        every = [self.dense_ms, *self.gdws_ms, *self.grouped_ms, *self.lowrank_ms]
        if not all(math.isfinite(t) and t > 0 for t in [*every, *self.gdws_lowrank_ms]):
            raise ValueError("latencies must be finite and > 0 (milliseconds).")

    def _check_points(self) -> None:
        points = tuple((int(g), int(r)) for g, r in self.gdws_lowrank_points)
        times = tuple(float(t) for t in self.gdws_lowrank_ms)
        object.__setattr__(self, "gdws_lowrank_points", points)
        object.__setattr__(self, "gdws_lowrank_ms", times)
        if len(points) != len(times) or len(set(points)) != len(points):
            raise ValueError(
                "gdws_lowrank_points must be distinct (G, R) pairs, one per entry of "
                f"gdws_lowrank_ms; got {len(points)} pairs and {len(times)} times."
            )
        if any(min(point) < 1 for point in points):
            raise ValueError(f"gdws_lowrank_points must hold G, R >= 1; got {points}.")

    def gdws_at(self, n_kernels: int) -> float:
        """The GDWS latency at ``n_kernels``, interpolated between the measured counts
        (the nearest measurement outside them)."""
        return float(np.interp(n_kernels, self.kernel_counts, self.gdws_ms))

    def lowrank_at(self, rank: int) -> float:
        """The low-rank latency at ``rank``, interpolated as :meth:`gdws_at`."""
        if not self.ranks:
            raise ValueError("this layer's low-rank form was not timed (ranks is empty).")
        return float(np.interp(rank, self.ranks, self.lowrank_ms))


def _grid(low: int, high: int, measured: Sequence[int], multiple: int) -> list[int]:
    """Counts offered from ``low`` to ``high``: a step of ``multiple`` or more, and every
    measured count within."""
    step = max(multiple, math.ceil((high - low) / _OPTIONS_PER_LAYER))
    return sorted({*range(low, high + 1, step), *(g for g in measured if low <= g <= high)})


def _options(
    errors: ResponseErrors, latency: LayerLatency, kernel_multiple: int, forms: Sequence[str]
) -> list[dict[str, Any]]:
    """The layer's options of the given forms, with their latency and response error."""
    options = [{"form": "dense", "ms": latency.dense_ms, "error": 0.0}]
    useful = errors.max_kernels
    if "grouped" in forms and useful:  # m beyond a channel's rank: zero kernels padded
        for m, ms in zip(latency.multipliers, latency.grouped_ms, strict=True):
            options.append({"form": "grouped", "multiplier": m, "ms": ms})
    low, high = latency.kernel_counts[0], min(latency.kernel_counts[-1], useful)
    if "gdws" in forms and low <= high:
        for g in _grid(low, high, latency.kernel_counts, kernel_multiple):
            options.append({"form": "gdws", "n_kernels": g, "ms": latency.gdws_at(g)})
    if "lowrank" in forms and latency.ranks:
        top = min(latency.ranks[-1], errors.max_rank)
        for r in _grid(latency.ranks[0], top, latency.ranks, 1):
            options.append({"form": "lowrank", "rank": r, "ms": latency.lowrank_at(r)})
    if "gdws_lowrank" in forms:
        for (g, r), ms in zip(latency.gdws_lowrank_points, latency.gdws_lowrank_ms, strict=True):
            if g <= useful:
                options.append({"form": "gdws_lowrank", "n_kernels": g, "rank": r, "ms": ms})
    for option in options[1:]:
        option["error"] = _error(errors, option)
    return options


def _error(errors: ResponseErrors, option: Mapping[str, Any]) -> float:
    form = option["form"]
    if form == "grouped":
        return errors.grouped(option["multiplier"])
    if form == "gdws":
        return errors.gdws(option["n_kernels"])
    if form == "lowrank":
        return errors.lowrank(option["rank"])
    return errors.gdws_lowrank(option["n_kernels"], option["rank"])


def _check_forms(forms: Any) -> tuple[str, ...]:
    if isinstance(forms, str) or not isinstance(forms, Sequence):
        raise TypeError(f"forms must be a sequence of form names; got {forms!r}.")
    unknown = [form for form in forms if form not in FORMS]
    if unknown or not forms:
        raise ValueError(
            f"forms must name at least one of {FORMS} (a layer may always stay dense); "
            f"got {tuple(forms)!r}."
        )
    return tuple(dict.fromkeys(forms))


def _response_errors(spec: LayerSpec, svd_solver: str) -> ResponseErrors:
    try:
        return ResponseErrors(
            spec.weight,
            moment=spec.input_moment,
            alpha=spec.alpha,
            output_weights=spec.output_weights,
            input_transforms=spec.input_transforms,
            svd_solver=svd_solver,
        )
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"layer {spec.name!r}: {exc}") from None


def plan_latency(
    layers: Sequence[LayerSpec],
    latencies: Mapping[str, LayerLatency],
    *,
    target_speedup: float,
    network_dense_ms: float,
    other_macs: int = 0,
    svd_solver: str = "auto",
    kernel_multiple: int = 1,
    forms: Sequence[str] = DEFAULT_FORMS,
) -> NetworkPlan:
    """The least-error plan (every form) whose predicted latency meets ``target_speedup``.

    Parameters
    ----------
    layers : sequence of LayerSpec
        The layers that may change (distinct names).
    latencies : mapping of str to LayerLatency
        Each layer's measured latencies, by name.
    target_speedup : float
        ``network_dense_ms / predicted latency`` to reach, ``> 1``.
    network_dense_ms : float
        The whole dense network's measured latency, on the same device, runtime and batch
        size as ``latencies``.
    other_macs : int, default=0
        MACs of the convolutions not planned (for the report's MAC totals).
    svd_solver : {"auto", "full", "covariance_eigh"}, default="auto"
    kernel_multiple : int, default=1
        The multiple ``G`` is padded to when deployed; options are offered on multiples
        of it where the measured grid allows.
    forms : sequence of str, default=DEFAULT_FORMS
        The forms offered besides dense, from :data:`FORMS`: ``"gdws"``, ``"grouped"``,
        ``"lowrank"`` (where ``latencies`` timed them) and ``"gdws_lowrank"`` (not by
        default). ``("gdws", "grouped")`` plans GDWS only, ``("lowrank",)`` low-rank only.

    Returns
    -------
    NetworkPlan
        ``solver="latency"``; :attr:`NetworkPlan.latency` (a :class:`LatencyPlan`) holds
        the target, the dense and predicted network latencies, the forms offered and each
        layer's form (:attr:`LayerPlan.form_label`: ``"dense"``, ``"gdws"``, ``"grouped xm"``,
        ``"lowrank R=r"``, ``"gdws_lowrank R=r"``); each layer's ``timings_ms`` holds
        its dense and chosen latencies, its ``error`` the option's response error.

    Raises
    ------
    ValueError
        A layer without latencies, input moments given for some layers only, an unknown
        form, or a target out of reach (the message gives the best predicted speed-up).
    """
    specs = _check_specs(layers)
    forms = _check_forms(forms)
    target = _check_target(target_speedup, "target_speedup", "1.5 for 1.5 times the speed")
    check_real(network_dense_ms, "network_dense_ms", minimum=0, strict=True)
    kernel_multiple = cost.check_kernel_multiple(kernel_multiple)
    missing = [s.name for s in specs if s.name not in latencies]
    if missing:
        raise ValueError(f"latencies has no entry for layer(s) {missing}.")
    with_moment = [s.name for s in specs if s.input_moment is not None]
    if with_moment and len(with_moment) != len(specs):
        raise ValueError(
            "input_moment must be given for every layer or for none (the errors of the "
            f"layers must be comparable); given for {with_moment} only."
        )
    # Each layer's errors are dropped once its options are known (their terms are G x G).
    per_layer = [
        _options(_response_errors(s, svd_solver), latencies[s.name], kernel_multiple, forms)
        for s in specs
    ]
    dense_sum = sum(latencies[s.name].dense_ms for s in specs)
    # predicted = network - sum(dense_i - chosen_i) <= network / target
    budget = dense_sum - network_dense_ms * (1 - 1 / target)
    fastest = sum(min(o["ms"] for o in options) for options in per_layer)
    best = network_dense_ms / max(network_dense_ms - dense_sum + fastest, 1e-12)
    if budget < fastest - 1e-9 * network_dense_ms:  # tolerance: a target set to `best`
        raise ValueError(
            f"target_speedup={target!r} is out of reach: with the fastest measured form of "
            f"every layer the predicted speed-up is {best:.3g}x (the layers that can change "
            f"take {dense_sum:.3g} of the network's {network_dense_ms:.3g} ms)."
        )
    chosen = choose_options(
        [[o["ms"] for o in options] for options in per_layer],
        [[o["error"] for o in options] for options in per_layer],
        budget,
    )
    if chosen is None:  # within one grid step of the fastest choice
        chosen = [min(range(len(opts)), key=lambda k, o=opts: o[k]["ms"]) for opts in per_layer]
    plans = [
        _layer_plan(spec, options[k], latencies[spec.name], svd_solver)
        for spec, options, k in zip(specs, per_layer, chosen, strict=True)
    ]
    predicted = network_dense_ms - sum(
        latencies[spec.name].dense_ms - options[k]["ms"]
        for spec, options, k in zip(specs, per_layer, chosen, strict=True)
    )
    latency = LatencyPlan(
        target_speedup=target,
        network_dense_ms=float(network_dense_ms),
        predicted_ms=float(predicted),
        predicted_speedup=float(network_dense_ms / predicted),
        best_predicted_speedup=float(best),
        forms_offered=tuple(forms),
        forms={plan.name: plan.form_label for plan in plans},
    )
    return NetworkPlan(plans, "latency", None, None, other_macs, kernel_multiple, latency)


def _layer_plan(
    spec: LayerSpec, option: Mapping[str, Any], latency: LayerLatency, svd_solver: str
) -> LayerPlan:
    form, error = option["form"], float(option["error"])
    timings = {"dense": latency.dense_ms, "gdws": float(option["ms"])}
    m, c, kh, kw = spec.weight.shape
    if form == "dense":
        # Fitted anyway (one kernel per channel) so the report shows what GDWS would cost.
        plan = _plan_layer(spec, "mego", c, False, svd_solver)
        return dataclasses.replace(
            plan,
            replaced=False,
            reason=f"kept dense: fastest within the latency budget ({latency.dense_ms:.3g} ms)",
            error=0.0,
            macs=plan.dense_macs,
            timings_ms=timings,
        )
    if form == "lowrank":
        rank = option["rank"]
        return LayerPlan(
            name=spec.name,
            shape=(m, c, kh, kw),
            output_pixels=spec.output_pixels,
            replaced=True,
            reason="",
            estimator=None,
            n_kernels=0,
            multiplier_histogram={},
            error=error,
            dense_macs=cost.dense_macs(m, c, kh * kw) * spec.output_pixels,
            macs=cost.lowrank_macs(rank, c, kh * kw, m) * spec.output_pixels,
            timings_ms={"dense": latency.dense_ms, "lowrank": float(option["ms"])},
            rank=rank,
            factors=_response_errors(spec, svd_solver).lowrank_factors(rank),
        )
    if form == "grouped":
        multiplier = option["multiplier"]
        plan = _plan_layer(spec, "mego", c * multiplier, False, svd_solver, multiplier)
        # Channels with fewer than m nonzero values keep fewer kernels: padded to m.
        return dataclasses.replace(
            plan, grouped_multiplier=multiplier, error=error, timings_ms=timings
        )
    plan = _plan_layer(spec, "mego", option["n_kernels"], False, svd_solver)
    if form == "gdws":
        return dataclasses.replace(plan, error=error, timings_ms=timings)
    errors = _response_errors(spec, svd_solver)
    inner, outer = errors.gdws_lowrank_factors(plan.n_kernels, option["rank"])
    rank = int(outer.shape[1])
    macs = cost.gdws_lowrank_macs(plan.n_kernels, kh * kw, rank, m) * spec.output_pixels
    return dataclasses.replace(
        plan, error=error, macs=macs, timings_ms=timings, rank=rank, factors=(inner, outer)
    )
