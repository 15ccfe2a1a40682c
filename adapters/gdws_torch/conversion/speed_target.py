"""Conversion for a measured speed-up: plan from latency tables, build, time, re-plan.

1. Every eligible layer's latencies (dense, GDWS at a grid of ``G``, grouped at a grid of
   channel multipliers ``m``, low-rank at a grid of ranks ``R``) come from a
   :class:`~gdws_torch.cost.latency_tables.LatencyTable` (cached, or timed now) on the
   backend, device and batch size the model will run on; the dense network is timed
   whole.
2. :func:`gdws_approx.plan_latency` chooses each layer's form (among ``forms``) for the
   least total response error whose predicted latency is ``dense / target_speedup``.
3. The converted network is timed against the dense one (interleaved, medians). If the
   measured speed-up misses the target by more than ``tolerance`` (too slow, or so much
   faster that error was spent for nothing), the plan is made again for a planned target
   between the attempts measured on either side of the target (linear interpolation), or
   the last planned target scaled by the measured ratio while all attempts lie on one
   side, at most ``attempts`` times in all. The result
   is the attempt of least error among those that reached the target (the fastest if
   none did); the plan records what was predicted and measured at every attempt.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from gdws_approx import LayerSpec, NetworkPlan, plan_latency
from gdws_approx.latency_planning import DEFAULT_FORMS
from gdws_torch.cost.latency_tables import PREFERRED_MULTIPLE, LatencyTable
from gdws_torch.cost.throughput import measure_throughput
from gdws_torch.nn.module_tree import replace_module
from gdws_torch.nn.planned import build_layer

__all__ = ["convert_for_speedup", "measure_speedup"]


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
    """Both models timed interleaved: ``{"dense_ms", "gdws_ms", "speedup"}`` (medians)."""
    rows = measure_throughput(
        {"dense": dense, "gdws": converted},
        input_size,
        backends=(backend,),
        batch_sizes=(batch_size,),
        rounds=rounds,
        device=device,
    )
    ms = {row["model"]: row["latency_ms"] for row in rows}
    return {"dense_ms": ms["dense"], "gdws_ms": ms["gdws"], "speedup": ms["dense"] / ms["gdws"]}


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
    progress: bool = False,
    forms: Sequence[str] = DEFAULT_FORMS,
) -> tuple[nn.Module, NetworkPlan, dict[str, nn.Module]]:
    """``model`` converted for ``target_speedup`` on ``table``'s backend (see module notes).

    Returns
    -------
    converted : torch.nn.Module
    plan : gdws_approx.NetworkPlan
        ``plan.latency`` adds to the planner's record: ``backend``, ``device``,
        ``batch_size``, ``measured_dense_ms``, ``measured_ms``, ``realised_speedup``,
        ``reached`` (realised within ``tolerance`` of the target or above),
        ``attempts`` (planned target, predicted and measured speed-up of each) and
        ``layers_timed`` (0 when every layer came from the cache).
    originals : dict of str to torch.nn.Module
        The dense convolutions that were replaced, by name.
    """
    if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 1:
        raise ValueError(f"attempts must be a positive integer; got {attempts!r}.")
    modules = dict(model.named_modules())
    convs = {spec.name: modules[spec.name] for spec in specs}
    latencies = table.layers(convs, input_shapes, progress=progress)
    reference = copy.deepcopy(model).float().eval()
    (row,) = measure_throughput(
        {"dense": reference},
        input_size,
        backends=(table.backend,),
        batch_sizes=(table.batch_size,),
        rounds=rounds,
        device=table.device,
    )
    network_ms = row["latency_ms"]
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
        converted, originals = _build(model, plan, fused=False, inplace=False)
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
                "predicted_speedup": plan.latency["predicted_speedup"],
                "measured_speedup": measured["speedup"],
            }
        )
        tried.append((plan, (converted, originals), measured))
        ratio = measured["speedup"] / target_speedup
        if abs(ratio - 1) <= tolerance:
            break
        # Missed (or overshot, spending error for nothing): plan again.
        again = min(_next_plan(history, target_speedup), plan.latency["best_predicted_speedup"])
        if again <= 1 or any(abs(again - h["planned_target"]) <= 1e-3 * again for h in history):
            break
        planned = again
    # The least error among the attempts that reached the target, else the fastest.
    reaching = [t for t in tried if t[2]["speedup"] >= target_speedup * (1 - tolerance)]
    if reaching:
        plan, (converted, originals), measured = min(reaching, key=lambda t: t[0].error)
    else:
        plan, (converted, originals), measured = max(tried, key=lambda t: t[2]["speedup"])
    reached = measured["speedup"] >= target_speedup * (1 - tolerance)
    if not reached:
        plan.latency["why_not_reached"] = (
            f"measured {measured['speedup']:.3g}x where the plan predicted "
            f"{plan.latency['predicted_speedup']:.3g}x (the fastest plan is predicted at "
            f"{plan.latency['best_predicted_speedup']:.3g}x): the layers timed alone do not add "
            "up to the whole network on this backend (fusions, layout changes, overheads)"
        )
    plan.latency.update(
        backend=table.backend,
        backend_version=table.machine["backend_version"],
        device=table.machine["device"],
        threads=table.machine["threads"],
        batch_size=table.batch_size,
        target_speedup=target_speedup,
        measured_dense_ms=measured["dense_ms"],
        measured_ms=measured["gdws_ms"],
        realised_speedup=measured["speedup"],
        reached=reached,
        tolerance=tolerance,
        attempts=history,
        layers_timed=table.measured,
    )
    if fused or inplace:
        converted, originals = _build(model, plan, fused=fused, inplace=inplace)
    return converted, plan, originals


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


def _build(
    model: nn.Module, plan: NetworkPlan, *, fused: bool, inplace: bool
) -> tuple[nn.Module, dict[str, nn.Module]]:
    converted = model if inplace else copy.deepcopy(model)
    modules = dict(converted.named_modules())
    originals = {}
    for layer in plan.layers:
        if layer.replaced:
            originals[layer.name] = modules[layer.name]
            built = build_layer(layer, modules[layer.name], fused=fused)
            replace_module(converted, layer.name, built)
    return converted, originals
