"""``gdws sweep``: robust accuracy vs conv MACs (and FPS) for every weighting strategy."""

from __future__ import annotations

import argparse
import math

import torch
from torch.utils.data import DataLoader

from gdws_approx.latency_planning import GDWS_FORMS
from gdws_torch.cli import _common as common
from gdws_torch.cli import _speed as speed
from gdws_torch.cli._errors import WorkFailed
from gdws_torch.conversion.options import Latency
from gdws_torch.conversion.pipeline import CalibrationAttack
from gdws_torch.conversion.weightings import STRATEGIES
from gdws_torch.experiments.sweep import METHODS, REFITS
from gdws_torch.io.datasets import DATASETS
from gdws_torch.robustness.checks import NORMS

HELP = "robust accuracy vs conv MACs and FPS for each error weighting, with and without recovery"

COLUMNS = [
    ("method", "method"),
    ("strategy", "strategy"),
    ("allocation", "allocation"),
    ("recovery", "recovery"),
    ("target", "target"),
    ("mac_reduction", "MACs x fewer"),
    ("natural", "natural %"),
    ("robust", "robust %"),
    ("measured", "speed target: measured x"),
    ("fps", "FPS"),
    ("speedup", "FPS x"),
]


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("sweep", help=HELP, description=HELP[0].upper() + HELP[1:] + ".")
    model = parser.add_argument_group("model and data (default: the embedded demo model)")
    model.add_argument("--model", help="architecture; with --fname/--checkpoint")
    model.add_argument("--dataset", default="cifar10", choices=DATASETS)
    model.add_argument("--data-dir", "--root", dest="data_dir")
    model.add_argument("--fname")
    model.add_argument("--checkpoint")
    common.add_checkpoint_format_argument(model)
    model.add_argument("--no-norm", action="store_true")
    model.add_argument("--batch-size", type=int, default=128)
    model.add_argument("--seed", type=int, default=0)
    model.add_argument("--threads", type=int)
    model.add_argument("--no-progress", action="store_true")
    attack = parser.add_argument_group("attack (1/255 units; default: the demo's, or 8/2/10)")
    attack.add_argument(
        "--attack",
        default="pgd",
        choices=common.EVALUATION_ATTACKS[:-1],
        help=common.ATTACK_HELP,
    )
    attack.add_argument(
        "--norm",
        default="Linf",
        type=common.norm_flag,
        choices=NORMS,
        help=common.NORM_HELP,
    )
    attack.add_argument("--epsilon", type=float)
    attack.add_argument("--pgd-alpha", type=float)
    attack.add_argument("--attack-iters", type=int)
    sweep = parser.add_argument_group("sweep")
    sweep.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=["gdws"],
        help="GDWS and/or the training-free baselines at the same conv MACs: dws "
        "(depthwise-separable), lowrank, prune (channel pruning); default gdws "
        "(docs/baselines.md)",
    )
    sweep.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    sweep.add_argument("--targets", nargs="+", type=float, default=[1.5, 2.0, 2.5])
    sweep.add_argument(
        "--allocation", choices=("common_beta", "global", "both"), default="common_beta"
    )
    sweep.add_argument(
        "--target-speedup",
        nargs="+",
        type=float,
        default=[],
        metavar="X",
        help="also convert for these measured speed-ups (rows 'latency'; docs/fps.md)",
    )
    common.add_latency_arguments(sweep)
    sweep.add_argument(
        "--recalibrate-bn",
        type=int,
        default=1000,
        metavar="N",
        help="recovery rows with BatchNorm re-estimated on N training inputs (0: none)",
    )
    sweep.add_argument("--weighting-samples", type=int, default=256)
    sweep.add_argument(
        "--refit",
        type=int,
        default=0,
        metavar="N",
        help="also rows with the refit on N PGD training inputs (the --epsilon, --pgd-alpha "
        "and --attack-iters of a Linf --norm), then BN (0: none)",
    )
    sweep.add_argument(
        "--refit-variants",
        nargs="+",
        choices=REFITS,
        default=["joint"],
        help="which refits get rows: joint (depthwise kernels and pointwise weights, rows "
        "'refit+BN', the default), pointwise (rows 'pointwise refit+BN'; docs/weightings.md)",
    )
    sweep.add_argument(
        "--refit-iterations",
        type=int,
        default=3,
        metavar="K",
        help="alternations of the joint refit (default 3)",
    )
    sweep.add_argument("--n-test", type=int, help="first N test inputs")
    sweep.add_argument(
        "--fps-backend",
        default="eager",
        choices=("eager", "channels_last", "onnxruntime", "none"),
    )
    sweep.add_argument("--out-dir", default="gdws-results/sweep")
    common.add_overwrite_argument(sweep)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from gdws_torch.experiments import demo
    from gdws_torch.experiments.sweep import plot_frontier, run_sweep

    if args.threads:
        torch.set_num_threads(args.threads)
    if any(not (math.isfinite(t) and t > 1) for t in args.targets):
        raise common.UsageError(f"--targets must be finite and > 1; got {args.targets}.")
    if any(not (math.isfinite(t) and t > 1) for t in args.target_speedup):
        raise common.UsageError(f"--target-speedup must be > 1; got {args.target_speedup}.")
    if args.target_speedup and "gdws" not in args.methods:
        raise common.UsageError(
            "--target-speedup converts GDWS for a measured speed-up; the baselines of "
            f"--methods {' '.join(args.methods)} are built for MAC targets only: add gdws to "
            "--methods, or drop --target-speedup."
        )
    if args.latency_batch_size < 1:
        raise common.UsageError(
            f"--latency-batch-size must be positive; got {args.latency_batch_size}."
        )
    for name in ("batch_size", "weighting_samples", "n_test", "attack_iters"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise common.UsageError(f"--{name.replace('_', '-')} must be positive; got {value}.")
    if args.recalibrate_bn < 0 or args.refit < 0 or args.refit_iterations < 0:
        raise common.UsageError("--recalibrate-bn, --refit and --refit-iterations must be >= 0.")
    outputs = common.outputs(args)
    out_dir = outputs.folder("--out-dir", args.out_dir)
    json_path = outputs.file("--out-dir's results", out_dir / "sweep.json")
    plot_path = outputs.file("--out-dir's plot", out_dir / "sweep.png")
    if args.model is not None:
        outputs.input("--checkpoint", common.checkpoint_path(args))
        outputs.input("--data-dir", args.data_dir)
    speed.declare_latency_table(args, outputs)
    outputs.check()
    speed.open_latency_table(args)
    if args.model is None:
        network, shape, description = demo.demo_network(), demo.INPUT_SHAPE, "digits CNN (demo)"
        args.dataset, args.no_norm = "digits", True
        defaults = {k: v * 255 for k, v in demo.DEMO_ATTACK.items() if k != "steps"}
        eps, step, steps = defaults["eps"], defaults["alpha"], demo.DEMO_ATTACK["steps"]
    else:
        architecture = common.architecture_name(args.model)
        shape = common.input_shape(args.dataset, architecture)
        network = common.build_network(args, common.checkpoint_path(args))
        description, eps, step, steps = architecture, 8.0, 2.0, 10
    eps = args.epsilon if args.epsilon is not None else eps
    step = args.pgd_alpha if args.pgd_alpha is not None else step
    steps = args.attack_iters or (100 if args.attack == "apgd" else steps)
    label = common.attack_label(args.attack, args.norm, eps, steps)

    def attack(model):
        return common.build_attack(
            args.attack, model, args.norm, eps / 255, step=step / 255, steps=steps, seed=args.seed
        )

    # The recipes' calibration: Linf PGD at the Linf threat model's radius and step.
    calibration = CalibrationAttack(seed=args.seed)
    if args.norm == "Linf":
        pgd = args.attack == "pgd"
        calibration = CalibrationAttack(
            eps / 255, steps if pgd else 10, step / 255 if pgd else None, args.seed
        )
    elif args.refit or "noise_gains" in args.strategies:
        print("the recipes calibrate on Linf PGD inputs: at the default 8/255 (--norm not Linf)")

    test = common.dataset(args, "test")
    train = common.dataset(args, "train")
    generator = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, generator=generator)
    allocations = ["common_beta", "global"] if args.allocation == "both" else [args.allocation]
    results = run_sweep(
        network,
        shape,
        DataLoader(test, batch_size=args.batch_size),
        train_loader,
        attack,
        methods=list(dict.fromkeys(args.methods)),
        strategies=args.strategies,
        targets=args.targets,
        allocations=allocations,
        speedup_targets=args.target_speedup,
        latency=Latency(  # the sweep's speed rows are its GDWS method's
            backend=args.backend,
            batch_size=args.latency_batch_size,
            table=getattr(args, "latency_table_object", None),
            forms=GDWS_FORMS,
        ),
        recalibration_samples=min(args.recalibrate_bn, len(train)),
        weighting_samples=min(args.weighting_samples, len(train)),
        refit_samples=min(args.refit, len(train)),
        refit_variants=list(dict.fromkeys(args.refit_variants)),
        refit_iterations=args.refit_iterations,
        calibration=calibration,
        n_test=args.n_test,
        wrap=lambda model: common.with_normalization(args, model),
        fps_backend=None if args.fps_backend == "none" else args.fps_backend,
        progress=not args.no_progress,
    )
    settings = {"pgd": {"alpha": step / 255, "steps": steps}, "apgd": {"steps": steps}}
    settings = settings.get(args.attack, {})
    results.update(
        model=description,
        attack={"attack": args.attack, "label": label, "norm": args.norm, "eps": eps / 255}
        | settings,
    )
    dense = results["dense"]
    print()
    print(
        f"{description}: dense {dense['natural']:.2f} % natural, {dense['robust']:.2f} % robust "
        f"({label})"
    )
    print(common.format_table([_cells(row) for row in results["rows"]], COLUMNS))
    if not results["rows"]:
        print("no model: every target was out of reach (the lines above say why)")
    dense_model = common.with_normalization(args, network)
    results["masking_checks"] = common.masking_checks(
        dense_model,
        test,
        next(network.parameters()).device,
        n_samples=args.n_test,
        attack=attack(dense_model),
    )
    common.write_json(args, json_path, results)
    title = f"{description}: {label} (dotted: dense - 1 point)"
    outputs.write(plot_path, lambda temporary: plot_frontier(results, temporary, title))
    print(f"done in {results['seconds']:.0f} s")
    missed = [r for r in results["rows"] if r.get("reached") is False and r["recovery"] == "none"]
    if missed and not args.allow_miss:
        which = ", ".join(
            f"{r['strategy']} {r['target']:g}x (measured {r['measured_speedup']:.3g}x)"
            for r in missed
        )
        raise WorkFailed(
            f"speed target(s) not reached: {which}; their rows say so. Pass --allow-miss to "
            "accept the closest models"
        )
    return 0


def _cells(row: dict) -> dict:
    """A row as the table shows it: a speed target's measured speed-up and whether it was
    reached."""
    if row.get("measured_speedup") is None:
        return row
    reached = "reached" if row["reached"] else "MISSED"
    return {**row, "measured": f"{row['measured_speedup']:.2f} {reached}"}
