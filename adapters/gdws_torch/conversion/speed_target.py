"""Conversion for a measured speed-up: plan from latency tables, build, time, re-plan.

1. Every eligible layer's latencies (dense, GDWS at a grid of ``G``, grouped at a grid of
   channel multipliers ``m``, low-rank at a grid of ranks ``R``) and the whole dense
   network's latency come from a :class:`~gdws_torch.cost.latency_tables.LatencyTable`
   (cached, or timed now and cached) on the backend, device and batch size the model
   will run on. So the first plan depends on the table only: the same call on the same
   machine and table plans alike.
2. :func:`gdws_approx.plan_latency` chooses each layer's form (among ``forms``) for the
   least total response error whose predicted latency is ``dense / target_speedup``.
3. The converted network is timed against the dense one (interleaved rounds; the
   speed-up is the ratio of the medians, its *spread* the interquartile range of the
   per-round ratios). It is planned again only when it misses the target by more than
   ``tolerance`` (too slow, or so much faster that error was spent for nothing) *and* by
   more than the spread, which timing noise alone would explain: for a planned target
   between the attempts measured on either side of the target (linear interpolation),
   or the last planned target scaled by the measured ratio while all attempts lie on one
   side, at most ``attempts`` times in all. The result is the attempt of least error
   among those that reached the target (the fastest if none did).

A target is *reached* when the measured speed-up is at least ``target * (1 - tolerance)``
and above 1: a model that is not faster never reaches a target. A miss raises
:class:`SpeedTargetMissed` unless ``require_target=False`` accepts the closest model. A
measured speed-up more than 10 % below the table's prediction adds a warning to the
measurement (the table does not describe this machine now: rebuild it). What was
measured is a :class:`SpeedMeasurement`, beside the plan's prediction
(:class:`gdws_approx.LatencyPlan`).
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from gdws_approx import LayerSpec, NetworkPlan, plan_latency
from gdws_approx.latency_planning import DEFAULT_FORMS
from gdws_torch.conversion.reports import ConversionReport, SpeedMeasurement
from gdws_torch.cost.latency_tables import PREFERRED_MULTIPLE, LatencyTable
from gdws_torch.cost.throughput import measure_throughput
from gdws_torch.nn.module_tree import replace_module
from gdws_torch.nn.planned import build_layer

__all__ = [
    "MISPREDICTION",
    "SpeedTargetMissed",
    "convert_for_speedup",
    "measure_speedup",
]

#: A measured speed-up this far below the table's prediction (a fraction) is reported.
MISPREDICTION = 0.10


class SpeedTargetMissed(RuntimeError):
    """The converted model did not reach ``target_speedup`` (``require_target=True``).

    Attributes
    ----------
    reason : str
        What was measured and why it missed (the message, without the advice).
    report : ConversionReport
        The report of the closest model: ``report.speed`` has the measurement, its spread,
        every attempt and why the target was missed.
    """

    def __init__(self, reason: str, report: ConversionReport) -> None:
        super().__init__(f"{reason}. Pass require_target=False to keep the closest model.")
        self.reason = reason
        self.report = report


def measure_speedup(
    dense: nn.Module,
    converted: nn.Module,
    input_size: Sequence[int],
    *,
    backend: str,
    batch_size: int,
    device: Any,
    rounds: int = 15,
) -> dict[str, float]:
    """Both models timed interleaved: ``{"dense_ms", "gdws_ms", "speedup", "spread"}``.

    ``speedup`` is the ratio of the median latencies; ``spread`` the interquartile range
    of the per-round ratios (the rounds time both models back to back), the size of a
    difference that timing noise alone can make.
    """
    rows = measure_throughput(
        {"dense": dense, "gdws": converted},
        input_size,
        backends=(backend,),
        batch_sizes=(batch_size,),
        rounds=rounds,
        device=device,
    )
    by_model = {row["model"]: row for row in rows}
    ratios = [
        d / g
        for d, g in zip(by_model["dense"]["round_ms"], by_model["gdws"]["round_ms"], strict=True)
    ]
    spread = 0.0
    if len(ratios) > 1:
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
        spread = q3 - q1
    dense_ms, gdws_ms = by_model["dense"]["latency_ms"], by_model["gdws"]["latency_ms"]
    return {
        "dense_ms": dense_ms,
        "gdws_ms": gdws_ms,
        "speedup": dense_ms / gdws_ms,
        "spread": spread,
    }


def reached(speedup: float, target: float, tolerance: float) -> bool:
    """Whether a measured ``speedup`` reaches ``target``: within ``tolerance`` below it or
    above, and faster than dense."""
    return speedup >= target * (1 - tolerance) and speedup > 1


def convert_for_speedup(
    model: nn.Module,
    specs: Sequence[LayerSpec],
    input_shapes: Mapping[str, Sequence[int]],
    *,
    target_speedup: float,
    input_size: Sequence[int],
    table: LatencyTable,
    other_macs: int = 0,
    svd_solver: str = "auto",
    fused: bool = False,
    inplace: bool = False,
    attempts: int = 3,
    tolerance: float = 0.05,
    rounds: int = 15,
    require_target: bool = True,
    progress: bool = False,
    forms: Sequence[str] = DEFAULT_FORMS,
) -> tuple[nn.Module, NetworkPlan, SpeedMeasurement]:
    """``model`` converted for ``target_speedup`` on ``table``'s backend (see module notes).

    Returns
    -------
    converted : torch.nn.Module
    plan : gdws_approx.NetworkPlan
        The plan built (its ``latency``: the planner's prediction).
    speed : SpeedMeasurement
        What was measured of it.

    Raises
    ------
    SpeedTargetMissed
        The target was not reached and ``require_target`` (before ``model`` is changed,
        even with ``inplace``); its report holds the plan and the measurement.
    """
    if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 1:
        raise ValueError(f"attempts must be a positive integer; got {attempts!r}.")
    if not isinstance(require_target, bool):
        raise TypeError(f"require_target must be a bool; got {require_target!r}.")
    modules = dict(model.named_modules())
    convs = {spec.name: modules[spec.name] for spec in specs}
    latencies = table.layers(convs, input_shapes, progress=progress)
    reference = copy.deepcopy(model).float().eval()
    network_ms = table.network(reference, input_size, rounds=rounds)
    planned, history, tried = target_speedup, [], []
    for _ in range(attempts):
        plan = plan_latency(
            specs,
            latencies,
            target_speedup=planned,
            network_dense_ms=network_ms,
            other_macs=other_macs,
            svd_solver=svd_solver,
            kernel_multiple=PREFERRED_MULTIPLE.get(table.backend, 1),
            forms=forms,
        )
        converted = _build(model, plan, fused=False, inplace=False)
        measured = measure_speedup(
            reference,
            copy.deepcopy(converted).float().eval(),
            input_size,
            backend=table.backend,
            batch_size=table.batch_size,
            device=table.device,
            rounds=rounds,
        )
        history.append(
            {
                "planned_target": planned,
                "predicted_speedup": plan.latency.predicted_speedup,
                "measured_speedup": measured["speedup"],
                "spread": measured["spread"],
            }
        )
        tried.append((plan, converted, measured))
        miss = abs(measured["speedup"] - target_speedup)
        if miss <= tolerance * target_speedup or miss <= measured["spread"]:
            break  # on target, or off by no more than timing noise
        # Missed (or overshot, spending error for nothing) beyond the noise: plan again.
        again = min(_next_plan(history, target_speedup), plan.latency.best_predicted_speedup)
        if again <= 1 or any(abs(again - h["planned_target"]) <= 1e-3 * again for h in history):
            break
        planned = again
    # The least error among the attempts that reached the target, else the fastest.
    reaching = [t for t in tried if reached(t[2]["speedup"], target_speedup, tolerance)]
    if reaching:
        plan, converted, measured = min(reaching, key=lambda t: t[0].error)
    else:
        plan, converted, measured = max(tried, key=lambda t: t[2]["speedup"])
    speed = _measurement(plan, measured, table, target_speedup, tolerance, history)
    if not speed.reached and require_target:
        report = ConversionReport(plan, speed, seconds=0.0)
        raise SpeedTargetMissed(_missed_message(speed), report)
    if fused or inplace:
        converted = _build(model, plan, fused=fused, inplace=inplace)
    return converted, plan, speed


def _measurement(
    plan: NetworkPlan,
    measured: Mapping[str, float],
    table: LatencyTable,
    target: float,
    tolerance: float,
    history: list[dict],
) -> SpeedMeasurement:
    """What was planned, measured and concluded."""
    speedup, predicted = measured["speedup"], plan.latency.predicted_speedup
    why = warning = None
    if not reached(speedup, target, tolerance):
        faster = "" if speedup > 1 else " (not faster than dense)"
        why = (
            f"measured {speedup:.3g}x{faster} where the plan predicted {predicted:.3g}x (the "
            f"fastest plan is predicted at {plan.latency.best_predicted_speedup:.3g}x): the "
            "layers timed alone do not add up to the whole network on this backend "
            "(fusions, layout changes, overheads)"
        )
    if speedup < (1 - MISPREDICTION) * predicted:
        where = f" ({table.path})" if table.path is not None else ""
        warning = (
            f"the measured speed-up {speedup:.3g}x is {100 * (1 - speedup / predicted):.0f} % "
            f"below the {predicted:.3g}x the latency table{where} predicted: the table does "
            "not describe this machine now (timed elsewhere, under other load, or edited); "
            "rebuild it here with gdws latency-table"
        )
    return SpeedMeasurement(
        backend=table.backend,
        backend_version=table.machine["backend_version"],
        device=table.machine["device"],
        threads=table.machine["threads"],
        batch_size=table.batch_size,
        target_speedup=target,
        measured_dense_ms=measured["dense_ms"],
        measured_ms=measured["gdws_ms"],
        realised_speedup=speedup,
        spread=measured["spread"],
        reached=reached(speedup, target, tolerance),
        tolerance=tolerance,
        attempts=tuple(history),
        layers_timed=table.measured,
        why_not_reached=why,
        table_warning=warning,
    )


def _missed_message(speed: SpeedMeasurement) -> str:
    text = (
        f"target_speedup={speed.target_speedup:g} not reached: "
        f"{speed.why_not_reached}; spread of the timing {speed.spread:.2g}"
    )
    if speed.table_warning:
        text += f"; {speed.table_warning}"
    return text


def _next_plan(history: list[dict], target: float) -> float:
    """The planned target to try next: between the closest attempts on either side of the
    target, linearly (measured against planned speed-up); with none on one side, the last
    plan scaled by how far its measurement was off."""
    below = [h for h in history if h["measured_speedup"] < target]
    above = [h for h in history if h["measured_speedup"] >= target]
    if below and above:
        low = max(below, key=lambda h: h["measured_speedup"])
        high = min(above, key=lambda h: h["measured_speedup"])
        span = high["measured_speedup"] - low["measured_speedup"]
        share = (target - low["measured_speedup"]) / span if span > 0 else 0.5
        return low["planned_target"] + share * (high["planned_target"] - low["planned_target"])
    last = history[-1]
    return last["planned_target"] * target / last["measured_speedup"]


def _build(model: nn.Module, plan: NetworkPlan, *, fused: bool, inplace: bool) -> nn.Module:
    converted = model if inplace else copy.deepcopy(model)
    modules = dict(converted.named_modules())
    for layer in plan.layers:
        if layer.replaced:
            replace_module(
                converted, layer.name, build_layer(layer, modules[layer.name], fused=fused)
            )
    return converted
