"""``gdws eval``: natural and robust accuracy of a checkpoint, dense or GDWS-approximated."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from gdws_torch.cli import _common as common
from gdws_torch.cli import _speed as speed
from gdws_torch.conversion.convert import set_fused
from gdws_torch.cost.macs import count_macs
from gdws_torch.io.checkpoints import load_converted
from gdws_torch.robustness.evaluate import evaluate_dataset
from gdws_torch.robustness.resume import ResultStore, check_results_folder

HELP = (
    "natural and robust accuracy under PGD, APGD or AutoAttack, with gradient-masking checks "
    "(the original's eval_robustness.py flags work)"
)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("eval", help=HELP, description=HELP[0].upper() + HELP[1:] + ".")
    common.add_model_arguments(parser)
    common.add_attack_arguments(parser, union=True, evaluation=True)
    gdws = parser.add_argument_group("GDWS")
    gdws.add_argument("--apply-gdws", action="store_true", help="approximate before evaluating")
    gdws.add_argument("--converted", help="evaluate a model saved by `gdws convert` instead")
    common.add_gdws_arguments(parser)
    out = parser.add_argument_group("output")
    out.add_argument("--n-samples", type=int, help="evaluate the first N test samples only")
    out.add_argument(
        "--logfilename", help="append 'epsilon<TAB>acc' to this file (relative to FNAME)"
    )
    out.add_argument("--json", default="gdws-results/eval.json", help="results file")
    common.add_overwrite_argument(out)
    common.add_distributed_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    common.check_common(args)
    common.resolve_attack_iters(args)
    common.check_gdws_flags(args)
    if args.save_every < 0:
        raise common.UsageError(f"--save-every must be >= 0; got {args.save_every}.")
    device = common.device(args)
    with common.distributed(args, device) as group:
        return _run(args, device, group)


def _run(args: argparse.Namespace, device, group) -> int:
    architecture = common.architecture_name(args.model)
    shape = common.input_shape(args.dataset, architecture)
    report = converted_path = saved_report = checkpoint = None
    # Every argument and file is checked before the (long) evaluation starts.
    alphas_path = common.in_run_folder(args, args.alphas) if args.apply_gdws else None
    if alphas_path is not None and not alphas_path.is_file():
        raise common.UsageError(f"--alphas-filename: no file at {str(alphas_path)!r}.")
    if args.converted and args.refit:
        raise common.UsageError("--refit needs the dense model: use --apply-gdws, not --converted.")
    if args.apply_gdws:
        common.check_gdws(args)
    elif args.recalibrate_bn:
        common.check_recovery(args)
    if args.converted:
        converted_path = common.in_run_folder(args, args.converted)
        if not converted_path.is_file():
            raise common.UsageError(f"--converted: no file at {str(converted_path)!r}.")
    else:
        checkpoint = common.checkpoint_path(args)
    outputs = common.outputs(args)
    outputs.input("--checkpoint", checkpoint)
    outputs.input("--alphas-filename", alphas_path)
    outputs.input("--converted", converted_path)
    outputs.input("--data-dir", args.data_dir)
    log = None
    if args.logfilename:
        log = outputs.file(
            "--logfilename", common.in_run_folder(args, args.logfilename), append=True
        )
    json_path = outputs.file("--json", args.json)
    resume_dir = Path(args.resume_dir) if args.resume_dir else json_path.with_suffix(".partial")
    flag = "--resume-dir" if args.resume_dir else "the resume folder (--json with .partial)"
    outputs.folder(flag, resume_dir, exclusive=True)
    try:
        check_results_folder(resume_dir)
    except ValueError as exc:
        raise common.UsageError(f"{flag}: {exc}") from None
    if args.apply_gdws:
        speed.declare_latency_table(args, outputs)
    outputs.check()
    if args.apply_gdws:
        speed.open_latency_table(args, device)
    # The inputs are read and checked (weights, data, saved results) before the work.
    if args.converted:
        network, info = load_converted(converted_path, common.build_network(args, None))
        saved_report = info.get("report")
        print(f"loaded the converted {info['architecture']} from {converted_path}")
    else:
        network = common.build_network(args, checkpoint)
    data = common.dataset(args, "test")
    store = ResultStore(resume_dir, {})
    if args.fresh and group.is_main:
        store.discard()
    if args.converted and args.recalibrate_bn:
        common.recalibrate(args, network)
    elif args.apply_gdws:
        network, report, _ = common.approximate(args, network, shape)
    macs = count_macs(network, shape)
    parameters = common.count_parameters(network)
    # Fused GDWS layers: the same outputs, faster in eager PyTorch.
    model = common.with_normalization(args, set_fused(network, True)).to(device)
    attacks = common.make_attacks(args, model)
    start = time.perf_counter()
    args.resume_note = (
        f"the per-sample results saved so far are in {resume_dir}: the same command resumes"
    )
    try:
        result = evaluate_dataset(
            model,
            data,
            attacks,
            n_samples=args.n_samples,
            batch_size=args.batch_size,
            num_workers=args.workers,
            resume_dir=resume_dir,
            resume_description={
                "command": "gdws eval",
                "checkpoint": str(checkpoint or converted_path),
                "dataset": args.dataset,
                "data_dir": args.data_dir,
            },
            save_every_s=args.save_every,
            group=group,
            progress=not args.no_progress,
        )
    except ValueError:  # refused before evaluating: the saved results are not this run's
        args.resume_note = None
        raise
    seconds = time.perf_counter() - start  # the slowest process's: the results wait for it
    if not group.is_main:
        return 0
    if result["resumed"]:
        print(f"resumed: {result['resumed']} samples' results read from {resume_dir}")
    specs = common.attack_specs(args) if attacks else []
    for spec, (label, accuracy) in zip(specs, result["attacks"].items(), strict=True):
        spec.update(label=label, accuracy=accuracy)
    by_attack = result.get("by_attack", {})
    if not attacks:
        robust = None
    elif len(attacks) == 1:
        robust = specs[0]["accuracy"]
    else:
        robust = result["union"]
    row = {
        "model": f"{architecture}{' (GDWS)' if report or args.converted else ''}",
        "natural": result["natural"],
        **{spec["label"]: spec["accuracy"] for spec in specs},
        "union": result["union"] if len(attacks) > 1 else None,
        "conv_macs": macs.conv_macs,
        "params": parameters,
    }
    columns = [("model", "model"), ("natural", "natural acc. %")]
    columns += [(spec["label"], f"{spec['label']} acc. %") for spec in specs]
    if len(attacks) > 1:
        columns.append(("union", "union acc. %"))
    columns += [("conv_macs", "conv MACs"), ("params", "parameters")]
    print()
    print(common.format_table([row], columns))
    for label, stages in by_attack.items():
        steps = " -> ".join(f"{stage} {value:.2f} %" for stage, value in stages.items())
        print(f"{label}: natural {result['natural']:.2f} % -> {steps}")
    masking = None
    if attacks:
        print()
        masking = common.masking_checks(model, data, device, by_attack, args.n_samples)
    if log is not None:  # the original's lines: one per attack, or the natural accuracy
        results = specs or [{"epsilon": 0.0, "accuracy": result["natural"]}]
        common.append_log(args, log, [(spec["epsilon"], spec["accuracy"]) for spec in results])
    common.write_json(
        args,
        json_path,
        {
            "command": "eval",
            "model": architecture,
            "dataset": args.dataset,
            "checkpoint": checkpoint or converted_path,
            "attacks": [_attack_record(args, spec, by_attack) for spec in specs],
            "n_samples": result["n_samples"],
            "processes": result["world_size"],
            "resumed_samples": result["resumed"],
            "evaluation_seconds": seconds,
            "natural_accuracy": result["natural"],
            "robust_accuracy": robust,
            "union_accuracy": result["union"] if attacks else None,
            "masking_checks": masking,
            "conv_macs": macs.conv_macs,
            "parameters": parameters,
            "gdws": saved_report if report is None else report.to_dict(),
            "alphas": alphas_path,
        },
    )
    # The results are safely written: the per-sample results have served their purpose.
    store.clear()
    args.resume_note = None
    return 0


def _attack_record(args: argparse.Namespace, spec: dict, by_attack: dict) -> dict:
    """One attack's entry of the results file: what ran, its settings, its accuracy."""
    record = {"attack": args.attack, "label": spec["label"], "norm": spec["norm"]}
    record["eps"] = spec["epsilon"]
    if args.attack == "pgd":
        record.update(alpha=spec["step"], steps=args.attack_iters, n_restarts=args.restarts)
    elif args.attack == "apgd":
        record.update(loss="ce", steps=args.apgd_iters, n_restarts=args.restarts)
    else:
        stages = by_attack.get(spec["label"], {})
        record.update(
            version="fast" if args.attack == "autoattack-fast" else "standard",
            attacks=list(stages),
            accuracy_by_attack=stages,
        )
    record["accuracy"] = spec["accuracy"]
    return record
