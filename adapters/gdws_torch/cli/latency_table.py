"""``gdws latency-table``: time every eligible layer of a model, dense and in every form."""

from __future__ import annotations

import argparse

from gdws_torch.cli import _common as common
from gdws_torch.conversion.eligibility import eligible_convs
from gdws_torch.cost.latency import layer_input_shapes
from gdws_torch.cost.latency_tables import LatencyTable, default_cache
from gdws_torch.cost.throughput import BACKENDS, backend_available
from gdws_torch.io.datasets import DATASETS

HELP = "time each eligible layer dense and as GDWS on a backend: the table --target-speedup uses"

COLUMNS = [
    ("layer", "layer"),
    ("shape", "shape"),
    ("input", "input"),
    ("dense", "dense ms"),
    ("curve", "GDWS ms at G"),
    ("grouped", "grouped ms at m"),
    ("lowrank", "low-rank ms at R"),
    ("best", "best x"),
]


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "latency-table", help=HELP, description=HELP[0].upper() + HELP[1:] + "."
    )
    group = parser.add_argument_group("model (default: the embedded demo model)")
    group.add_argument("--model", help="architecture; with --fname/--checkpoint")
    group.add_argument("--dataset", default="cifar10", choices=DATASETS)
    group.add_argument("--fname", help="run folder holding model_best.pth")
    group.add_argument("--checkpoint", help="checkpoint file (default: FNAME/model_best.pth)")
    common.add_checkpoint_format_argument(group)
    group.add_argument(
        "--random-weights", action="store_true", help="no checkpoint: timings need shapes only"
    )
    group.add_argument("--include-first", action="store_true", help="time the first conv too")
    timing = parser.add_argument_group("timing")
    timing.add_argument("--backend", default="eager", choices=BACKENDS)
    timing.add_argument("--batch-size", type=int, default=1)
    timing.add_argument("--rounds", type=int, default=9, help="interleaved rounds per layer")
    timing.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    timing.add_argument("--threads", type=int)
    timing.add_argument("--seed", type=int, default=0)
    timing.add_argument("--no-progress", action="store_true")
    timing.add_argument(
        "--out",
        help="the table's JSON file, created or extended (default: the user cache, "
        "$GDWS_CACHE_DIR/latency-tables.json or ~/.cache/gdws-approx/latency-tables.json)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    common.check_common(args)
    if args.rounds < 1:
        raise common.UsageError(f"--rounds must be positive; got {args.rounds}.")
    device = common.device(args)
    if not backend_available(args.backend, device):
        raise common.UsageError(
            f"--backend {args.backend} cannot run on {device} here (is onnxruntime or "
            "openvino installed? openvino runs on the CPU only; tensorrt needs a CUDA GPU)."
        )
    outputs = common.outputs(args)
    if args.model is not None and not args.random_weights:
        outputs.input("--checkpoint", common.checkpoint_path(args))
    flag = "--out" if args.out is not None else "the latency cache"
    out = outputs.table(flag, args.out if args.out is not None else default_cache())
    outputs.check()
    try:
        table = LatencyTable(args.backend, args.batch_size, device, out, add_key=True)
    except ValueError as exc:
        raise common.UsageError(f"{flag}: {exc}") from None
    if args.model is None:
        from gdws_torch.experiments import demo

        network, shape, description = demo.demo_network(), demo.INPUT_SHAPE, "digits CNN (demo)"
    else:
        architecture = common.architecture_name(args.model)
        shape = common.input_shape(args.dataset, architecture)
        checkpoint = None if args.random_weights else common.checkpoint_path(args)
        network, description = common.build_network(args, checkpoint), architecture
    convs = dict(eligible_convs(network, skip_first=not args.include_first))
    shapes = layer_input_shapes(network, list(convs), shape)
    convs = {name: conv for name, conv in convs.items() if name in shapes}
    before = len(table)
    args.latency_table_object = table  # an interruption says what was saved
    latencies = table.layers(convs, shapes, rounds=args.rounds, progress=not args.no_progress)
    table.network(network, shape, rounds=args.rounds)
    rows = []
    for name, latency in latencies.items():
        fastest = min((*latency.gdws_ms, *latency.grouped_ms, *latency.lowrank_ms))
        rows.append(
            {
                "layer": name,
                "shape": "x".join(map(str, convs[name].weight.shape)),
                "input": "x".join(map(str, shapes[name])),
                "dense": f"{latency.dense_ms:.4g}",
                "curve": _curve(latency.kernel_counts, latency.gdws_ms),
                "grouped": _curve(latency.multipliers, latency.grouped_ms),
                "lowrank": _curve(latency.ranks, latency.lowrank_ms),
                "best": f"{latency.dense_ms / fastest:.2f}",
            }
        )
    machine = table.machine
    print()
    print(
        f"{description}, input {tuple(shape)}, batch {args.batch_size}, {machine['device']}, "
        f"{machine['backend_version']}, {machine['threads']} threads"
    )
    print(common.format_table(rows, COLUMNS))
    timed = table.measured
    print(
        f"{timed} layer(s) timed, {len(latencies) - timed} from the table; "
        f"{'wrote' if len(table) != before or timed else 'unchanged:'} {out}"
    )
    return 0


def _curve(points, times) -> str:
    return " ".join(f"{p}:{ms:.3g}" for p, ms in zip(points, times, strict=True))
