"""``gdws convert``: approximate a checkpoint and save the GDWS model with its report."""

from __future__ import annotations

import argparse

from gdws_torch.cli import _common as common
from gdws_torch.cli import _speed as speed
from gdws_torch.cli._outputs import report_beside
from gdws_torch.io.checkpoints import save_converted

HELP = "replace the convolutions of a checkpoint by GDWS ones and save the result"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help=HELP, description=HELP[0].upper() + HELP[1:] + "."
    )
    common.add_model_arguments(parser, device=False)
    common.add_gdws_arguments(parser)
    common.add_attack_arguments(parser)  # for --recalibrate-attack
    parser.add_argument(
        "--out",
        default="gdws_model.pth",
        help="converted model file (relative to FNAME; its report goes beside it as .json)",
    )
    common.add_overwrite_argument(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    common.check_common(args)
    common.check_gdws(args)
    architecture = common.architecture_name(args.model)
    shape = common.input_shape(args.dataset, architecture)
    checkpoint = common.checkpoint_path(args)
    outputs = common.outputs(args)
    outputs.input("--checkpoint", checkpoint)
    outputs.input("--alphas-filename", common.in_run_folder(args, args.alphas))
    outputs.input("--data-dir", args.data_dir)
    out = outputs.file("--out", common.in_run_folder(args, args.out))
    report_path = outputs.file("--out's report", report_beside(out))
    speed.declare_latency_table(args, outputs)
    outputs.check()
    speed.open_latency_table(args)
    network = common.build_network(args, checkpoint)
    converted, report, alphas_path = common.approximate(args, network, shape, default_recipe=True)
    outputs.write(
        out,
        lambda temporary: save_converted(
            temporary,
            converted,
            report,
            model_name=architecture,
            dataset=args.dataset,
            checkpoint=str(checkpoint),
            alphas=None if alphas_path is None else str(alphas_path),
        ),
    )
    common.write_json(
        args,
        report_path,
        {"command": "convert", "model": architecture, "checkpoint": checkpoint, **report.to_dict()},
    )
    return 0
