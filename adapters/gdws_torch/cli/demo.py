"""``gdws demo``: the whole pipeline on the embedded robust digits model."""

from __future__ import annotations

import argparse
import warnings

from gdws_torch.cli import _common as common
from gdws_torch.cost.latency_tables import default_cache
from gdws_torch.cost.throughput import BACKENDS, backend_available
from gdws_torch.robustness.masking import MaskingReport

HELP = (
    "run the pipeline on the embedded robust digits CNN: dense vs GDWS built for a measured "
    "speed-up, and a sweep"
)

HEADLINE_COLUMNS = [
    ("model", "model"),
    ("natural", "natural %"),
    ("robust", "robust %"),
    ("conv_macs", "conv MACs"),
    ("mac_reduction", "MACs x fewer"),
    ("params", "parameters"),
    ("fps", "FPS"),
    ("speedup", "FPS x"),
]
SWEEP_COLUMNS = [
    ("model", "model"),
    ("beta", "beta"),
    ("mac_reduction", "MACs x fewer"),
    ("natural", "natural %"),
    ("robust", "robust %"),
    ("fps", "FPS"),
    ("speedup", "FPS x"),
]


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("demo", help=HELP, description=HELP[0].upper() + HELP[1:] + ".")
    parser.add_argument("--out-dir", default="gdws-results/demo", help="where JSON and PNG go")
    parser.add_argument(
        "--targets",
        type=float,
        nargs="+",
        help="conv MAC reductions of the sweep (default: 1.5 2 2.5)",
    )
    parser.add_argument(
        "--default-target",
        type=float,
        help="MAC target of the best recipe's model shown in the headline (2)",
    )
    parser.add_argument(
        "--speed-target",
        type=float,
        help="speed-up over dense at batch 1 the headline GDWS model is built for (1.05)",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        help="plan the headline for and time every model on this backend (default: the "
        "installed graph runtime where the speed target costs the least error)",
    )
    parser.add_argument(
        "--recipes",
        nargs="+",
        metavar="RECIPE",
        help="the sweep's recipes (default: 'unit' 'noise gains' "
        "'data, global + joint refit + BN'; also 'unit + BN' 'unit + refit + BN')",
    )
    parser.add_argument(
        "--n-test", type=int, help="first N of the 400 test digits (the other 140 validate)"
    )
    parser.add_argument(
        "--alpha-samples",
        type=int,
        default=512,
        help="training digits the noise gains (channel weights) average over",
    )
    parser.add_argument(
        "--attack",
        default="pgd",
        choices=common.EVALUATION_ATTACKS[:-1],
        help="the evaluation attack, Linf at 24/255: " + common.ATTACK_HELP,
    )
    parser.add_argument(
        "--attack-iters", type=int, help="PGD iterations (default 20), or APGD's (default 100)"
    )
    parser.add_argument("--fps-rounds", type=int, default=15)
    parser.add_argument(
        "--refit-depthwise",
        action=argparse.BooleanOptionalAction,
        default=True,
        help='the "unit + refit + BN" rows\' refit also re-solves the depthwise kernels '
        "(the joint refit, the default; --no-refit-depthwise: the pointwise weights only; "
        "docs/weightings.md)",
    )
    parser.add_argument("--refit-iterations", type=int, help="alternations of the joint refits (3)")
    parser.add_argument("--quick", action="store_true", help="a small smoke run (tests use it)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--no-progress", action="store_true")
    common.add_overwrite_argument(parser)
    parser.set_defaults(run=run)


def _columns(columns, attack: str):
    """The table's columns, the robust one named after the attack (``PGD robust %``)."""
    return [(key, f"{attack} robust %" if key == "robust" else head) for key, head in columns]


def _format(rows):
    out = []
    for row in rows:
        row = dict(row)
        if row.get("beta") is not None:
            row["beta"] = f"{row['beta']:.4g}"
        out.append(row)
    return out


def _choice(results) -> str:
    """Why the headline's backend: what each candidate's plan reached."""
    parts = []
    for entry in results["backend_choice"]:
        if "error" not in entry:
            parts.append(f"{entry['backend']}: out of reach")
            continue
        parts.append(
            f"{entry['backend']}: {entry['realised_speedup']:.2f}x at weighted error "
            f"{entry['error']:.3g}, dense {1000 / entry['dense_ms']:.0f} FPS"
            + (" (chosen)" if entry["chosen"] else "")
        )
    return "backend by least error at the speed target: " + "; ".join(parts)


def _candidates(results) -> str:
    """Which speed plans were built and which one the headline is."""
    parts = []
    for entry in results["headline_candidates"]:
        layers = entry["layers"] if entry["layers"] == "all" else ", ".join(entry["layers"])
        robust = entry.get("validation_robust")
        parts.append(
            f"{layers}: {entry['realised_speedup']:.2f}x"
            + (f", {robust:.1f} %" if robust is not None else "")
            + (" (chosen)" if entry["chosen"] else "")
        )
    return (
        f"Headline plan ({results['headline_rule']}; dense: "
        f"{results['dense_validation_robust']:.1f} %): " + "; ".join(parts)
    )


def run(args: argparse.Namespace) -> int:
    from gdws_torch.experiments import demo

    common.check_common(args)
    targets = args.targets or list(demo.SWEEP_TARGETS)
    default_target = demo.DEFAULT_TARGET if args.default_target is None else args.default_target
    speed_target = demo.SPEED_TARGET if args.speed_target is None else args.speed_target
    for value in [*targets, default_target, speed_target]:
        if not value > 1:
            raise common.UsageError(
                f"--targets/--default-target/--speed-target must be > 1; got {value}."
            )
    recipes = args.recipes or list(demo.SWEEP_RECIPES)
    unknown = [r for r in recipes if r not in demo.RECIPES]
    if unknown:
        raise common.UsageError(f"--recipes: unknown {unknown}; choose from {demo.RECIPES}.")
    if args.backend and not backend_available(args.backend):
        raise common.UsageError(
            f"--backend {args.backend} cannot run here (is onnxruntime or openvino installed?)."
        )
    settings = dict(
        targets=targets,
        default_target=default_target,
        recipes=recipes,
        speed_target=speed_target,
        backend=args.backend,
        n_test=args.n_test,
        noise_gain_samples=args.alpha_samples,
        attack_steps=args.attack_iters or (100 if args.attack == "apgd" else 20),
        attack=args.attack,
        fps_rounds=args.fps_rounds,
    )
    settings["refit_depthwise"] = args.refit_depthwise
    settings["refit_iterations"] = (
        demo.REFIT_ITERATIONS if args.refit_iterations is None else args.refit_iterations
    )
    if settings["refit_iterations"] < 0:
        raise common.UsageError(
            f"--refit-iterations must be >= 0; got {settings['refit_iterations']}."
        )
    if args.quick:
        settings.update(
            targets=args.targets or [2.5],
            n_test=args.n_test or 100,
            noise_gain_samples=64,
            attack_steps=args.attack_iters or 5,
            fps_rounds=3,
        )
    for name in ("n_test", "noise_gain_samples", "attack_steps", "fps_rounds"):
        if settings[name] is not None and settings[name] < 1:
            raise common.UsageError(f"--{name.replace('_', '-')} must be positive.")
    outputs = common.outputs(args)
    out_dir = outputs.folder("--out-dir", args.out_dir)
    json_path = outputs.file("--out-dir's results", out_dir / "demo.json")
    plot_path = outputs.file("--out-dir's plot", out_dir / "demo_sweep.png")
    cache = outputs.table("the latency cache", default_cache(), required=False)
    outputs.check()
    with warnings.catch_warnings():
        if cache in outputs.unwritable:  # said here, in one line, before the work
            print(
                f"note: the latency cache {str(cache)!r} cannot be written "
                f"({outputs.unwritable[cache]}): layers timed now are not cached."
            )
            warnings.filterwarnings("ignore", message="the latency cache")
        results = demo.run_demo(progress=not args.no_progress, **settings)
    attack = results["attack"]
    name = demo.ATTACKS[attack["name"]]
    steps = f"-{attack['steps']}" if attack["name"] in ("pgd", "apgd") else ""
    print()
    print(
        f"Robust digits CNN ({results['dataset']}; {results['n_test']} test digits), "
        f"Linf {name}{steps} at eps {attack['eps'] * 255:.0f}/255, CPU with "
        f"{results['threads']} threads"
    )
    headline = [results["dense"], results["speed"]]
    headline += [results["default"]] if results["default"] else []
    print(f"Batch-1 FPS on {results['backend']}; {_choice(results)}")
    print(common.format_table(_format(headline), _columns(HEADLINE_COLUMNS, name)))
    print(_candidates(results))
    print()
    print(
        "Sweep: LEGO with the smallest common beta reaching each MAC target (global: per-layer"
        " budgets, no common beta)"
    )
    print(common.format_table(_format(results["sweep"]), _columns(SWEEP_COLUMNS, name)))
    if attack.get("by_attack"):
        steps = " -> ".join(f"{k} {v:.2f} %" for k, v in attack["by_attack"].items())
        print(f"dense model, {attack['label']}: {steps}")
    print(MaskingReport.from_dict(results["masking_checks"]).format())
    common.write_json(args, json_path, results)
    outputs.write(plot_path, lambda temporary: demo.plot_sweep(results, temporary))
    print(f"done in {results['seconds']:.0f} s")
    return 0
