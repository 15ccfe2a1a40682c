"""``gdws alphas``: compute noise gains (the per-layer weight error vectors) and save them."""

from __future__ import annotations

import argparse
from pathlib import Path

from torch.utils.data import DataLoader, Subset

from gdws_torch.cli import _common as common
from gdws_torch.cli._outputs import report_beside
from gdws_torch.conversion.noise_gains import noise_gains
from gdws_torch.io.checkpoints import save_channel_weights
from gdws_torch.robustness.distributed import WithIndices, shard

HELP = "compute the noise gains (alphas) of a checkpoint on training samples"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "alphas", help=HELP, description=HELP[0].upper() + HELP[1:] + "."
    )
    common.add_model_arguments(parser)
    common.add_attack_arguments(parser)
    parser.add_argument(
        "--sample-size", type=int, default=1000, help="training samples averaged over"
    )
    parser.add_argument("--chunk-size", type=int, default=32, help="samples per batched pass")
    parser.add_argument(
        "--out",
        "--alphas-filename",
        dest="out",
        default="alphas.pth",
        help="output file (relative to FNAME; default alphas.pth)",
    )
    common.add_overwrite_argument(parser)
    common.add_distributed_arguments(parser, resume=False)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    common.check_common(args)
    if args.chunk_size < 1:
        raise common.UsageError(f"--chunk-size must be positive; got {args.chunk_size}.")
    checkpoint = common.checkpoint_path(args)
    outputs = common.outputs(args)
    outputs.input("--checkpoint", checkpoint)
    outputs.input("--data-dir", args.data_dir)
    out = outputs.file("--out", common.in_run_folder(args, args.out))
    outputs.file("--out's summary", report_beside(out))
    outputs.check()
    device = common.device(args)
    with common.distributed(args, device) as group:
        return _run(args, checkpoint, out, device, group)


def _run(args: argparse.Namespace, checkpoint: Path, out: Path, device, group) -> int:
    network = common.build_network(args, checkpoint)
    model = common.with_normalization(args, network).to(device)
    data = common.dataset(args, "train")
    if args.sample_size > len(data):
        raise common.UsageError(
            f"--sample-size {args.sample_size} exceeds the {len(data)} training samples."
        )
    if args.sample_size < group.world_size:
        raise common.UsageError(
            f"--sample-size {args.sample_size} is less than the {group.world_size} processes."
        )
    # Each process averages its share of the samples; the weighted sum over processes is
    # the average over all (each sample's attack is seeded by its index, not its process).
    mine = shard(range(args.sample_size), group.rank, group.world_size)
    loader = DataLoader(
        Subset(WithIndices(data), mine), batch_size=args.batch_size, num_workers=args.workers
    )
    attack = common.make_attack(args, model)
    share = noise_gains(
        model,
        loader,
        len(mine),
        attack=attack,
        chunk_size=args.chunk_size,
        progress=not args.no_progress,
    )
    gains = {
        name: group.all_reduce_sum(value * len(mine)) / args.sample_size
        for name, value in share.items()
    }
    if not group.is_main:
        return 0
    rows = [
        {
            "layer": name,
            "channels": len(value),
            "mean": float(value.mean()),
            "min": float(value.min()),
            "max": float(value.max()),
        }
        for name, value in gains.items()
    ]
    print(
        common.format_table(
            [{**r, **{k: f"{r[k]:.4g}" for k in ("mean", "min", "max")}} for r in rows],
            [
                ("layer", "layer"),
                ("channels", "C"),
                ("mean", "mean"),
                ("min", "min"),
                ("max", "max"),
            ],
        )
    )
    args.outputs.write(
        out,
        lambda temporary: save_channel_weights(
            temporary,
            gains,
            attack=args.attack,
            norm=args.norm,
            epsilon=args.epsilon,
            **{"attack-iters": args.attack_iters},
            sample_size=args.sample_size,
            model=common.architecture_name(args.model),
            dataset=args.dataset,
        ),
    )
    common.write_json(
        args, report_beside(out), {"command": "alphas", "checkpoint": checkpoint, "layers": rows}
    )
    return 0
