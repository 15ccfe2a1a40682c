"""``gdws fps``: frames per second of a dense model and its GDWS version on each backend."""

from __future__ import annotations

import argparse

import torch

from gdws_torch.cli import _common as common
from gdws_torch.cli import _speed as speed
from gdws_torch.cost.macs import count_macs
from gdws_torch.cost.throughput import (
    BACKENDS,
    available_backends,
    backend_available,
    measure_throughput,
)
from gdws_torch.io.datasets import DATASETS

HELP = "measure FPS of a dense model and its GDWS version (default: the demo model)"

COLUMNS = [
    ("model", "model"),
    ("backend", "backend"),
    ("batch_size", "batch"),
    ("fps", "FPS (median)"),
    ("spread", "FPS q1-q3"),
    ("speedup", "FPS x vs dense"),
    ("mac_reduction", "MACs x fewer"),
]


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("fps", help=HELP, description=HELP[0].upper() + HELP[1:] + ".")
    group = parser.add_argument_group("model (default: the embedded demo model)")
    group.add_argument("--model", help="architecture; with --fname/--checkpoint")
    group.add_argument(
        "--dataset", default="cifar10", choices=DATASETS, help="sets input shape and classes"
    )
    group.add_argument("--fname", help="run folder holding model_best.pth")
    group.add_argument("--checkpoint", help="checkpoint file (default: FNAME/model_best.pth)")
    common.add_checkpoint_format_argument(group)
    group.add_argument(
        "--random-weights", action="store_true", help="time --model with random weights"
    )
    group.add_argument("--converted", help="a model saved by `gdws convert` as the GDWS side")
    group.add_argument("--no-norm", action="store_true")
    common.add_gdws_arguments(parser, recalibration=False)
    timing = parser.add_argument_group("timing")
    timing.add_argument("--backends", nargs="+", choices=BACKENDS, help="default: all available")
    timing.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    timing.add_argument("--rounds", type=int, default=15)
    timing.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    timing.add_argument("--threads", type=int)
    timing.add_argument("--seed", type=int, default=0)
    timing.add_argument("--no-progress", action="store_true")
    timing.add_argument("--json", default="gdws-results/fps.json")
    common.add_overwrite_argument(timing)
    parser.set_defaults(run=run)


def _models(args: argparse.Namespace):
    """(dense, gdws, input shape, description)."""
    if args.model is None:
        from gdws_torch.experiments import demo

        network = demo.demo_network()
        budgets = (args.beta, args.target_mac_reduction, args.n_kernels, args.target_speedup)
        if all(budget is None for budget in budgets):
            args.target_mac_reduction = demo.DEFAULT_TARGET  # the demo's GDWS model
        converted, _, _ = common.approximate(args, network, demo.INPUT_SHAPE)
        return network, converted, demo.INPUT_SHAPE, "the embedded digits CNN"
    architecture = common.architecture_name(args.model)
    shape = common.input_shape(args.dataset, architecture)
    checkpoint = None if args.random_weights else common.checkpoint_path(args)
    network = common.build_network(args, checkpoint)
    if args.converted:
        from gdws_torch.io.checkpoints import load_converted

        converted, _ = load_converted(common.in_run_folder(args, args.converted), network)
    else:
        converted, _, _ = common.approximate(args, network, shape)
    return network, converted, shape, architecture


def run(args: argparse.Namespace) -> int:
    common.check_common(args)
    if args.rounds < 1 or any(b < 1 for b in args.batch_sizes):
        raise common.UsageError("--rounds and --batch-sizes must be positive.")
    device = common.device(args)
    backends = args.backends or list(available_backends(device))
    missing = sorted(b for b in set(backends) if not backend_available(b, device))
    if missing:
        raise common.UsageError(
            f"--backends {missing} cannot run here (is onnxruntime or openvino installed? "
            "openvino runs on the CPU only)."
        )
    common.check_gdws(args)
    outputs = common.outputs(args)
    if args.model is not None and not args.random_weights:
        outputs.input("--checkpoint", common.checkpoint_path(args))
    if args.converted:
        outputs.input("--converted", common.in_run_folder(args, args.converted))
    outputs.input("--alphas-filename", common.in_run_folder(args, args.alphas))
    json_path = outputs.file("--json", args.json)
    speed.declare_latency_table(args, outputs)
    outputs.check()
    speed.open_latency_table(args, device)
    dense, converted, shape, description = _models(args)
    dense_macs = count_macs(dense, shape).conv_macs
    gdws_macs = count_macs(converted, shape).conv_macs
    models = {"dense": common.with_normalization(args, dense) if args.model else dense}
    models["GDWS"] = common.with_normalization(args, converted) if args.model else converted
    rows = measure_throughput(
        models,
        shape,
        backends=backends,
        batch_sizes=args.batch_sizes,
        rounds=args.rounds,
        device=device,
        progress=not args.no_progress,
    )
    dense_fps = {(r["backend"], r["batch_size"]): r["fps"] for r in rows if r["model"] == "dense"}
    for row in rows:
        row["speedup"] = row["fps"] / dense_fps[(row["backend"], row["batch_size"])]
        row["mac_reduction"] = dense_macs / (gdws_macs if row["model"] == "GDWS" else dense_macs)
        row["spread"] = f"{row['fps_q1']:,.0f}-{row['fps_q3']:,.0f}"
    rows.sort(key=lambda r: (r["batch_size"], r["backend"], r["model"] != "dense"))
    print()
    print(
        f"{description}, input {tuple(shape)}, {device}, {torch.get_num_threads()} torch "
        f"threads; conv MACs {dense_macs:,} dense, {gdws_macs:,} GDWS"
    )
    print(common.format_table(rows, COLUMNS))
    common.write_json(
        args,
        json_path,
        {
            "command": "fps",
            "model": description,
            "input_shape": list(shape),
            "dense_conv_macs": dense_macs,
            "gdws_conv_macs": gdws_macs,
            "rows": [{k: v for k, v in r.items() if k != "spread"} for r in rows],
        },
    )
    return 0
