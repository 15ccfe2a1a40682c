"""Converting for a measured speed-up: realised vs target, and error vs MAC-targeted plans.

For PreActResNet-18 (CIFAR shape, random weights with a fixed seed: latency and the error
ranking depend on shapes and spectra, not on training) and the embedded digits CNN, on a
backend (default: the one where the dense model is fastest here, at the batch size):

1. ``compress(target_speedup=t, recipe="unit")`` for each target (default 1.5 and 2):
   the latency tables are built (or read from ``--table``), the plan made and checked by
   the conversion itself; then the dense and converted models are timed again in a
   separate run (interleaved, medians of ``--rounds``), which gives the realised speed-up.
2. The MAC-targeted conversions (unit weights, ``allocation="global"``: the least error
   for the MACs) at MAC reductions from 1.5x to 6x are timed the same way; the
   comparison is the least weighted error among those measured at least as fast as the
   realised speed-up of step 1 (none: no MAC-targeted plan in that range is as fast).

Printed per model and target: realised speed-up (and whether it is within 10 % of the
target), the latency plan's weighted error, the MAC-targeted error at the same speed-up,
and their ratio. The last line: ``RESULT latency_target: <ratio>x (...)``, the
MAC-targeted error over the latency-planned error for PreActResNet-18 at the first
target (above 1: the latency plan is better at the same measured speed).
Run: ``python bench/latency_target.py [--backend B] [--batch-size N] [--targets ...]``.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from gdws_approx.files import write_json_atomic
from gdws_torch import Latency, Recipe, compress
from gdws_torch.conversion.speed_target import measure_speedup
from gdws_torch.cost.throughput import BACKENDS, available_backends, measure_throughput
from gdws_torch.models import PreActResNet18

MAC_TARGETS = (1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0)


def preact_resnet18() -> nn.Module:
    torch.manual_seed(0)
    dense = PreActResNet18().eval()
    with torch.no_grad():
        for module in dense.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_var.uniform_(0.5, 2.0)
    return dense


def fastest_backend(models, batch_size: int, rounds: int) -> str:
    """The backend where the dense models run fastest in total."""
    backends = [b for b in available_backends() if b in BACKENDS]
    total = dict.fromkeys(backends, 0.0)
    for dense, shape in models:
        for row in measure_throughput(
            {"dense": dense}, shape, backends=backends, batch_sizes=(batch_size,), rounds=rounds
        ):
            total[row["backend"]] += row["latency_ms"]
    return min(total, key=total.get)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=BACKENDS, help="default: the fastest dense one")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--targets", type=float, nargs="+", default=[1.5, 2.0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--table", type=Path, help="latency table JSON (default: a fresh one)")
    parser.add_argument("--quick", action="store_true", help="a smoke run (the tests use it)")
    parser.add_argument("--out", type=Path, default=Path("gdws-results/latency_target.json"))
    args = parser.parse_args(argv)
    from gdws_torch.experiments import demo

    models = {"PreActResNet-18": (preact_resnet18(), (3, 32, 32))}
    if not args.quick:
        models["digits CNN (demo)"] = (demo.demo_network(), demo.INPUT_SHAPE)
    mac_targets = (1.5, 3.0) if args.quick else MAC_TARGETS
    if args.quick:
        args.rounds, args.targets = 3, args.targets[:1]
    backend = args.backend or fastest_backend(models.values(), args.batch_size, args.rounds)
    folder = tempfile.TemporaryDirectory()
    table = args.table or Path(folder.name) / "latency-tables.json"
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores "
        f"({platform.machine()}); backend {backend}, batch {args.batch_size}; medians of "
        f"{args.rounds} interleaved rounds"
    )
    header = (
        f"{'model':18s} {'target':>6s} {'realised':>8s} {'within 10%':>10s} {'error':>10s} "
        f"{'MAC-plan error':>14s} {'ratio':>6s}"
    )
    print(header)
    print("-" * len(header))
    results = []
    for label, (dense, shape) in models.items():
        timing = {"backend": backend, "batch_size": args.batch_size, "device": "cpu"}
        curve = []  # (measured speed-up, error) of the MAC-targeted plans
        for mac_target in mac_targets:
            try:
                converted, report = compress(
                    dense,
                    target_mac_reduction=mac_target,
                    recipe=Recipe("unit, global", allocation="global"),
                    input_size=shape,
                )
            except ValueError:
                continue
            speed = measure_speedup(dense, converted, shape, rounds=args.rounds, **timing)
            curve.append((speed["speedup"], report.error, mac_target))
        curve.sort()
        for target in args.targets:
            try:
                converted, report = compress(
                    dense,
                    recipe="unit",
                    target_speedup=target,
                    input_size=shape,
                    latency=Latency(backend=backend, batch_size=args.batch_size, table=table),
                    require_target=False,  # the realised speed-up is what is reported
                )
            except ValueError as exc:
                print(f"{label:18s} {target:6.2f} out of reach: {exc}")
                results.append({"model": label, "target": target, "out_of_reach": str(exc)})
                continue
            again = measure_speedup(
                dense, copy.deepcopy(converted), shape, rounds=args.rounds, **timing
            )
            realised = again["speedup"]
            as_fast = [e for s, e, _ in curve if s >= realised]
            mac_error = min(as_fast) if as_fast else None
            ratio = mac_error / report.error if mac_error and report.error > 0 else None
            within = abs(realised / target - 1) <= 0.10
            nan = float("nan")
            print(
                f"{label:18s} {target:6.2f} {realised:8.2f} {within!s:>10s} "
                f"{report.error:10.4g} {nan if mac_error is None else mac_error:14.4g} "
                f"{nan if ratio is None else ratio:6.2f}"
            )
            results.append(
                {
                    "model": label,
                    "target": target,
                    "realised_speedup": realised,
                    "within_10_percent": within,
                    "conversion_record": report.to_dict()["latency"],
                    "error": report.error,
                    "mac_targeted_error_at_same_speedup": mac_error,
                    "error_ratio": ratio,
                    "mac_curve": [
                        {"mac_target": t, "measured_speedup": s, "error": e} for s, e, t in curve
                    ],
                    "mac_reduction": report.mac_reduction,
                }
            )
    folder.cleanup()
    write_json_atomic(
        args.out,
        {"backend": backend, "batch_size": args.batch_size, "rounds": args.rounds, "rows": results},
    )
    print(f"\nJSON: {args.out}")
    first = next((r for r in results if "error_ratio" in r), None)
    if first is None or first["error_ratio"] is None:
        fastest = max((s for s, _, _ in curve), default=float("nan"))
        print(
            f"RESULT latency_target: n/a (no MAC-targeted plan up to {mac_targets[-1]}x fewer "
            f"MACs is as fast as the target_speedup model; the fastest measured {fastest:.2f}x)"
        )
        return 0
    print(
        f"RESULT latency_target: {first['error_ratio']:.2f}x (least MAC-targeted error at a "
        f"measured speed-up >= {first['realised_speedup']:.2f}x vs the target_speedup error, "
        f"{first['model']}, {backend}, batch {args.batch_size})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
