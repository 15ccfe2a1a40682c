"""FPS: dense vs GDWS on every backend, batch 1 and 32, PreActResNet-18 and the demo model.

PreActResNet-18 at 32x32 (random weights with a fixed seed; timing does not depend on
them) converted with per-layer MEGO budgets that cut every eligible layer's MACs
``--layer-reduction`` times (default 3.5: the network's conv MACs 3.4x fewer, the first
conv staying dense), and the embedded digits CNN with its demo conversion (LEGO, 1.25x).
Every (model, backend) pair is timed interleaved with the others in one process
(:func:`gdws_torch.cost.throughput.measure_throughput`), medians over ``--rounds`` rounds.

Printed per model, backend and batch size: dense and GDWS FPS, their ratio, and that ratio
over the MAC reduction (the share of the MAC saving that becomes speed). Then, for
PreActResNet-18 at each ``--speedup-batch-sizes`` (default 32) and on every backend, the
model converted with ``target_speedup=--speedup-target`` (default 1.5) *on that backend*
(latency tables and the plan's own check) and timed again here against dense: the
speed-up a user gets by converting for the backend they deploy on (a target out of reach
keeps the model dense: 1.00x), and its share of the MAC saving. The last line compares the
fastest GDWS run with the fastest dense run (any backend) at batch 1 on PreActResNet-18.
Run: ``python bench/fps.py [--rounds N] [--batch-sizes 1 32] [--backends ...] [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from gdws_approx.files import write_json_atomic
from gdws_torch import compress, count_macs, eligible_convs
from gdws_torch.conversion.options import Latency
from gdws_torch.cost.throughput import BACKENDS, available_backends, measure_throughput
from gdws_torch.models import PreActResNet18


def preact_resnet18(layer_reduction: float) -> tuple[nn.Module, nn.Module]:
    """PreActResNet-18 and its GDWS version with every eligible layer's MACs cut so."""
    torch.manual_seed(0)
    dense = PreActResNet18().eval()
    with torch.no_grad():
        for module in dense.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_var.uniform_(0.5, 2.0)
    budgets = {}
    for name, conv in eligible_convs(dense):
        m, c, kh, kw = conv.weight.shape
        k2 = kh * kw
        budgets[name] = max(1, int(m * c * k2 / (layer_reduction * (k2 + m))))
    gdws, _ = compress(dense, n_kernels=budgets, recipe="unit")
    return dense, gdws


def demo_models() -> tuple[nn.Module, nn.Module]:
    from gdws_torch.experiments import demo

    dense = demo.demo_network()
    gdws, _ = compress(
        dense, target_mac_reduction=demo.DEFAULT_TARGET, recipe="unit", input_size=demo.INPUT_SHAPE
    )
    return dense, gdws


def for_speedup(backend: str, batch: int, target: float, rounds: int) -> dict:
    """PreActResNet-18 converted for ``target`` on ``backend`` at ``batch``, timed again."""
    dense, _ = preact_resnet18(2.0)
    with tempfile.TemporaryDirectory() as folder:
        try:
            gdws, report = compress(
                dense,
                recipe="unit",
                target_speedup=target,
                latency=Latency(
                    backend=backend, batch_size=batch, table=Path(folder) / "table.json"
                ),
                require_target=False,  # the FPS ratio is what is reported
            )
        except ValueError as exc:  # out of reach: the model stays dense
            print(f"  {backend:14s} batch {batch}: {exc} (kept dense: 1.00x)")
            return {"backend": backend, "batch_size": batch, "fps_ratio": 1.0, "note": str(exc)}
    rows = measure_throughput(
        {"dense": dense, "gdws": gdws},
        (3, 32, 32),
        backends=(backend,),
        batch_sizes=(batch,),
        rounds=rounds,
    )
    fps = {r["model"]: r["fps"] for r in rows}
    record = report.to_dict()["latency"]
    print(
        f"  {backend:14s} batch {batch}: dense {fps['dense']:8.1f} FPS, GDWS {fps['gdws']:8.1f} "
        f"FPS, {fps['gdws'] / fps['dense']:.2f}x (predicted {record['predicted_speedup']:.2f}x, "
        f"the conversion's check {record['realised_speedup']:.2f}x; {report.mac_reduction:.2f}x "
        f"fewer MACs, share {fps['gdws'] / fps['dense'] / report.mac_reduction:.2f})"
    )
    return {
        "backend": backend,
        "batch_size": batch,
        "dense_fps": fps["dense"],
        "gdws_fps": fps["gdws"],
        "fps_ratio": fps["gdws"] / fps["dense"],
        "mac_reduction": report.mac_reduction,
        "share_of_mac_reduction": fps["gdws"] / fps["dense"] / report.mac_reduction,
        "conversion_record": record,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--backends", nargs="+", choices=BACKENDS)
    parser.add_argument("--layer-reduction", type=float, default=3.5)
    parser.add_argument("--speedup-target", type=float, default=1.5)
    parser.add_argument("--speedup-batch-sizes", type=int, nargs="*", default=[32])
    parser.add_argument("--quick", action="store_true", help="a smoke run (the tests use it)")
    parser.add_argument("--out", type=Path, default=Path("gdws-results/fps.json"))
    args = parser.parse_args(argv)
    if args.rounds < 1 or min(args.batch_sizes) < 1 or not args.layer_reduction > 1:
        print("error: --rounds, --batch-sizes must be >= 1, --layer-reduction > 1", file=sys.stderr)
        return 2
    backends = args.backends or list(available_backends())
    if args.quick:
        args.rounds, args.batch_sizes, args.speedup_batch_sizes = 3, [1, 2], []

    models = {
        "PreActResNet-18": (*preact_resnet18(args.layer_reduction), (3, 32, 32)),
        "digits CNN (demo)": (*demo_models(), (1, 16, 16)),
    }
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores "
        f"({platform.machine()}); backends {', '.join(backends)}; medians of {args.rounds} "
        "interleaved rounds"
    )
    header = (
        f"{'model':18s} {'backend':14s} {'batch':>5s} {'dense FPS':>10s} {'GDWS FPS':>10s} "
        f"{'FPS x':>6s} {'MACs x':>6s} {'share':>6s}"
    )
    results = []
    for label, (dense, gdws, shape) in models.items():
        mac_ratio = count_macs(dense, shape).conv_macs / count_macs(gdws, shape).conv_macs
        rows = measure_throughput(
            {"dense": dense, "gdws": gdws},
            shape,
            backends=backends,
            batch_sizes=args.batch_sizes,
            rounds=args.rounds,
        )
        fps = {(r["model"], r["backend"], r["batch_size"]): r for r in rows}
        print()
        print(header)
        print("-" * len(header))
        for batch in args.batch_sizes:
            for backend in backends:
                d = fps[("dense", backend, batch)]["fps"]
                g = fps[("gdws", backend, batch)]["fps"]
                print(
                    f"{label:18s} {backend:14s} {batch:5d} {d:10.1f} {g:10.1f} {g / d:6.2f} "
                    f"{mac_ratio:6.2f} {g / d / mac_ratio:6.2f}"
                )
                results.append(
                    {
                        "model": label,
                        "backend": backend,
                        "batch_size": batch,
                        "dense_fps": d,
                        "gdws_fps": g,
                        "fps_ratio": g / d,
                        "mac_reduction": mac_ratio,
                        "share_of_mac_reduction": g / d / mac_ratio,
                        "dense_fps_quartiles": [
                            fps[("dense", backend, batch)][k] for k in ("fps_q1", "fps_q3")
                        ],
                        "gdws_fps_quartiles": [
                            fps[("gdws", backend, batch)][k] for k in ("fps_q1", "fps_q3")
                        ],
                    }
                )
    speedup_rows = []
    for batch in args.speedup_batch_sizes:
        target = args.speedup_target
        print(f"\nPreActResNet-18 converted with target_speedup={target} on each backend")
        for backend in backends:
            speedup_rows.append(for_speedup(backend, batch, args.speedup_target, args.rounds))
    if speedup_rows:
        slowest = min(speedup_rows, key=lambda r: r["fps_ratio"])
        print(
            f"slowest backend after target_speedup: {slowest['backend']} at batch "
            f"{slowest['batch_size']}, {slowest['fps_ratio']:.2f}x dense"
        )
    main_rows = [
        r
        for r in results
        if r["model"] == "PreActResNet-18" and r["batch_size"] == min(args.batch_sizes)
    ]
    best_gdws = max(main_rows, key=lambda r: r["gdws_fps"])
    best_dense = max(main_rows, key=lambda r: r["dense_fps"])
    ratio = best_gdws["gdws_fps"] / best_dense["dense_fps"]
    write_json_atomic(
        args.out,
        {
            "threads": torch.get_num_threads(),
            "rounds": args.rounds,
            "rows": results,
            "target_speedup_rows": speedup_rows,
            "best_gdws": best_gdws,
            "best_dense": best_dense,
        },
    )
    print(f"\nJSON: {args.out}")
    print(
        f"RESULT fps: {ratio:.2f}x (GDWS on {best_gdws['backend']} vs dense on "
        f"{best_dense['backend']}, PreActResNet-18, batch {best_gdws['batch_size']}, "
        f"{best_gdws['mac_reduction']:.2f}x fewer conv MACs)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
