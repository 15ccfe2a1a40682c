"""``gdws train``: standard or PGD adversarial training of a bundled architecture."""

from __future__ import annotations

import argparse
import functools

import torch

from gdws_torch.cli import _common as common
from gdws_torch.cli._outputs import report_beside
from gdws_torch.io.checkpoints import save_checkpoint
from gdws_torch.robustness.training import random_crop_flip, train

HELP = "train a bundled architecture, standard or PGD adversarial (builds the demo model)"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("train", help=HELP, description=HELP[0].upper() + HELP[1:] + ".")
    common.add_model_arguments(parser, checkpoint=False)
    common.add_attack_arguments(parser)
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=int, default=30)
    group.add_argument("--lr", type=float, default=0.05, help="peak of the one-cycle schedule")
    group.add_argument("--weight-decay", type=float, default=5e-4)
    group.add_argument(
        "--no-augment",
        action="store_true",
        help="no random crop/flip (never used for digits, where flips change the class)",
    )
    group.add_argument(
        "--out", default="model_best.pth", help="checkpoint file (relative to FNAME)"
    )
    common.add_overwrite_argument(group)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    common.check_common(args)
    if args.epochs < 1:
        raise common.UsageError(f"--epochs must be positive; got {args.epochs}.")
    outputs = common.outputs(args)
    outputs.input("--data-dir", args.data_dir)
    out = outputs.file("--out", common.in_run_folder(args, args.out))
    outputs.file("--out's history", report_beside(out))
    outputs.check()
    architecture = common.architecture_name(args.model)
    network = common.build_network(args, None).train().to(common.device(args))
    model = common.with_normalization(args, network).to(common.device(args))
    train_data, test_data = common.dataset(args, "train"), common.dataset(args, "test")
    augment = None
    if not args.no_augment and args.dataset != "digits":
        generator = torch.Generator().manual_seed(args.seed + 1)
        augment = functools.partial(
            random_crop_flip, flip=args.dataset != "svhn", generator=generator
        )
    history = train(
        model,
        common.loader(train_data, args, shuffle=True),
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        attack=common.make_attack(args, model),
        augment=augment,
        test_loader=common.loader(test_data, args),
        progress=not args.no_progress,
        log=print,
    )
    settings = {
        key: value
        for key, value in vars(args).items()
        if key not in ("run", "command") and isinstance(value, (str, int, float, bool, type(None)))
    }
    outputs.write(
        out,
        lambda temporary: save_checkpoint(
            temporary,
            network,
            epoch=args.epochs,
            history=history,
            args=settings,
            architecture=architecture,
        ),
    )
    common.write_json(
        args, report_beside(out), {"command": "train", "args": settings, "history": history}
    )
    return 0
