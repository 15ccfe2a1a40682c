"""Planning for a measured speed-up: least error under a latency budget.

An adapter measures, on the device and runtime the model will be deployed on, every
eligible layer's latency in each form it can run as, plus the whole dense network:

- dense;
- GDWS at a grid of kernel counts ``G`` (channel gather, depthwise conv, ``1 x 1`` conv);
- *grouped* at channel multipliers ``m``: every channel keeps ``m`` kernels, the
  depthwise stage is one grouped conv over the input (``groups=C``, no gather);
  ``m = 1`` is the ordinary depthwise-separable layer.
 :func:`plan_latency` then chooses each layer's
form so that the total weighted error is least while the predicted network latency,

    network dense latency - sum over layers of (layer dense latency - chosen latency),

is at most ``network dense latency / target_speedup``. This is a multiple-choice
knapsack over the per-layer options (:func:`gdws_approx.knapsack.choose_options`).

Each option's error is exact: keeping ``G`` kernels, MEGO's least error is the sum of
all but the ``G`` largest weighted squared singular values of the layer; ``m`` kernels
per channel keep each channel's ``m`` largest. Latencies between two measured kernel
counts are interpolated linearly.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from gdws_approx import cost
from gdws_approx.checks import check_real
from gdws_approx.knapsack import choose_options
from gdws_approx.planning import (
    LayerPlan,
    LayerSpec,
    NetworkPlan,
    _check_specs,
    _check_target,
    _layer_values,
    _plan_layer,
    _to_numpy,
)

__all__ = ["LayerLatency", "plan_latency"]

# Kernel counts offered per layer between the smallest and largest measured one.
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
    """

    dense_ms: float
    kernel_counts: tuple[int, ...]
    gdws_ms: tuple[float, ...]
    multipliers: tuple[int, ...] = ()
    grouped_ms: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        for counts_name, times_name, empty_ok in (
            ("kernel_counts", "gdws_ms", False),
            ("multipliers", "grouped_ms", True),
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
        every = [self.dense_ms, *self.gdws_ms, *self.grouped_ms]
        if not all(math.isfinite(t) and t > 0 for t in map(float, every)):
            raise ValueError("latencies must be finite and > 0 (milliseconds).")

    def gdws_at(self, n_kernels: int) -> float:
        """The GDWS latency at ``n_kernels``, interpolated between the measured counts
        (the nearest measurement outside them)."""
        return float(np.interp(n_kernels, self.kernel_counts, self.gdws_ms))


def _options(values: np.ndarray, latency: LayerLatency, kernel_multiple: int) -> list[dict]:
    """Dense, grouped-at-``m`` and GDWS-at-``G`` options with their cost and error."""
    ordered = np.sort(values[values > 0])[::-1]
    total = float(ordered.sum())
    kept = np.concatenate([[0.0], np.cumsum(ordered)])  # kept[G]: the G largest values
    options = [{"form": "dense", "ms": latency.dense_ms, "error": 0.0}]
    by_channel = np.sort(values, axis=1)[:, ::-1]
    for m, ms in zip(latency.multipliers, latency.grouped_ms, strict=True):
        if ordered.size:  # m beyond a channel's rank keeps all of it (zero kernels padded)
            error = total - float(by_channel[:, :m].sum())
            options.append({"form": "grouped", "multiplier": m, "ms": ms, "error": error})
    low, high = latency.kernel_counts[0], min(latency.kernel_counts[-1], ordered.size)
    if ordered.size and low <= high:
        step = max(kernel_multiple, math.ceil((high - low) / _OPTIONS_PER_LAYER))
        measured = (g for g in latency.kernel_counts if g <= high)
        counts = sorted({*range(low, high + 1, step), *measured})
        for g in counts:
            g = int(g)
            options.append(
                {"form": "gdws", "n_kernels": g, "ms": latency.gdws_at(g), "error": total - kept[g]}
            )
    return options


def plan_latency(
    layers: Sequence[LayerSpec],
    latencies: Mapping[str, LayerLatency],
    *,
    target_speedup: float,
    network_dense_ms: float,
    other_macs: int = 0,
    svd_solver: str = "auto",
    kernel_multiple: int = 1,
) -> NetworkPlan:
    """The least-error GDWS plan whose predicted latency meets ``target_speedup``.

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

    Returns
    -------
    NetworkPlan
        ``solver="latency"``; :attr:`NetworkPlan.latency` holds the target, the dense and
        predicted network latencies and each layer's form (``"dense"``, ``"gdws"`` or
        ``"grouped xm"``); each layer's ``timings_ms`` holds its dense and chosen
        latencies; grouped layers have :attr:`LayerPlan.grouped_multiplier`.

    Raises
    ------
    ValueError
        A layer without latencies, or a target out of reach (the message gives the best
        predicted speed-up).
    """
    specs = _check_specs(layers)
    target = _check_target(target_speedup, "target_speedup", "1.5 for 1.5 times the speed")
    check_real(network_dense_ms, "network_dense_ms", minimum=0, strict=True)
    kernel_multiple = cost.check_kernel_multiple(kernel_multiple)
    missing = [s.name for s in specs if s.name not in latencies]
    if missing:
        raise ValueError(f"latencies has no entry for layer(s) {missing}.")
    per_layer = []
    for spec in specs:
        values, _ = _layer_values(spec, svd_solver)
        per_layer.append(_options(_to_numpy(values), latencies[spec.name], kernel_multiple))
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
    plans, forms = [], {}
    for spec, options, k in zip(specs, per_layer, chosen, strict=True):
        option = options[k]
        plans.append(_layer_plan(spec, option, latencies[spec.name], svd_solver))
        forms[spec.name] = (
            f"grouped x{option['multiplier']}" if option["form"] == "grouped" else option["form"]
        )
    predicted = network_dense_ms - sum(
        latencies[p.name].dense_ms - p.timings_ms["gdws"] for p in plans
    )
    latency = {
        "target_speedup": target,
        "network_dense_ms": float(network_dense_ms),
        "predicted_ms": float(predicted),
        "predicted_speedup": float(network_dense_ms / predicted),
        "best_predicted_speedup": float(best),
        "forms": forms,
    }
    return NetworkPlan(plans, "latency", None, None, other_macs, kernel_multiple, latency)


def _layer_plan(spec: LayerSpec, option: dict, latency: LayerLatency, svd_solver: str) -> LayerPlan:
    timings = {"dense": latency.dense_ms, "gdws": float(option["ms"])}
    if option["form"] == "dense":
        # Fitted anyway (one kernel per channel) so the report shows what GDWS would cost.
        channels = int(spec.weight.shape[1])
        plan = _plan_layer(spec, "mego", channels, False, svd_solver)
        return dataclasses.replace(
            plan,
            replaced=False,
            reason=f"kept dense: fastest within the latency budget ({latency.dense_ms:.3g} ms)",
            error=0.0,
            macs=plan.dense_macs,
            timings_ms=timings,
        )
    if option["form"] == "grouped":
        m = option["multiplier"]
        channels = int(spec.weight.shape[1])
        plan = _plan_layer(spec, "mego", channels * m, False, svd_solver, max_multiplier=m)
        # Channels with fewer than m nonzero values keep fewer kernels: padded to m.
        plan = dataclasses.replace(plan, grouped_multiplier=m)
    else:
        plan = _plan_layer(spec, "mego", option["n_kernels"], False, svd_solver)
    return dataclasses.replace(plan, timings_ms=timings)
