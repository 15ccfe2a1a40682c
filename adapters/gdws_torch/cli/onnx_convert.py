"""``gdws onnx-convert``: rewrite the convolutions of an ONNX model as GDWS subgraphs."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from gdws_approx.cost import MAX_KERNEL_MULTIPLE
from gdws_torch.cli import _common as common
from gdws_torch.cli._outputs import report_beside

HELP = "rewrite the convolutions of an ONNX model (from any framework) as GDWS subgraphs"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "onnx-convert", help=HELP, description=HELP[0].upper() + HELP[1:] + "."
    )
    parser.add_argument("input", metavar="IN.onnx", help="the model to rewrite (not modified)")
    parser.add_argument("output", metavar="OUT.onnx", help="the rewritten model (not IN)")
    common.add_budget_arguments(
        parser,
        required=True,
        target_help="overall Conv MAC reduction to reach (LEGO with the smallest common beta)",
    )
    parser.add_argument(
        "--input-shape",
        type=int,
        nargs="+",
        metavar="DIM",
        help="one sample's shape without the batch, e.g. 3 32 32 (for dynamic dimensions)",
    )
    parser.add_argument(
        "--include-first", action="store_true", help="also rewrite the network's first conv"
    )
    parser.add_argument(
        "--replace-all",
        action="store_true",
        help="replace every eligible conv, even where GDWS needs more MACs (the original)",
    )
    parser.add_argument(
        "--exclude",
        nargs="+",
        action="extend",
        default=[],
        metavar="NAME",
        help="convs to leave alone (node names, or Conv:WEIGHT for unnamed nodes)",
    )
    parser.add_argument(
        "--kernel-multiple",
        type=int,
        default=4,
        help="pad each layer's G to a multiple with zero kernels (ONNX Runtime is faster; 1: off)",
    )
    parser.add_argument(
        "--no-check", action="store_true", help="do not compare the models in onnxruntime"
    )
    parser.add_argument("--json", metavar="PATH", help="JSON report (default: OUT with .json)")
    common.add_overwrite_argument(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        import gdws_onnx
    except ImportError as exc:
        raise common.UsageError(
            f"onnx-convert needs the onnx package ({exc}): pip install 'gdws-approx[onnx]'."
        ) from None
    source = Path(args.input)
    if not source.is_file():
        raise common.UsageError(f"IN: no file at {str(source)!r}.")
    if args.input_shape is not None and any(d < 1 for d in args.input_shape):
        raise common.UsageError(f"--input-shape must be positive; got {args.input_shape}.")
    if not 1 <= args.kernel_multiple <= MAX_KERNEL_MULTIPLE:
        raise common.UsageError(
            f"--kernel-multiple must be an integer from 1 to {MAX_KERNEL_MULTIPLE}; got "
            f"{args.kernel_multiple}."
        )
    outputs = common.outputs(args)
    outputs.input("IN", source)
    out = outputs.file("OUT", args.output)
    report_path = outputs.file("--json", Path(args.json) if args.json else report_beside(out))
    outputs.check()
    budget: dict[str, Any] = {}
    if args.beta is not None:
        budget["beta"] = args.beta
    elif args.target_mac_reduction is not None:
        budget["target_mac_reduction"] = args.target_mac_reduction
    else:
        budget["n_kernels"] = args.n_kernels

    model = gdws_onnx.load_model(source)
    rewritten, report = gdws_onnx.rewrite(
        model,
        input_shape=args.input_shape,
        skip_first=not args.include_first,
        only_if_cheaper=not args.replace_all,
        exclude=args.exclude,
        kernel_multiple=args.kernel_multiple,
        **budget,
    )
    print(report.format_table())
    convs = gdws_onnx.conv_nodes(
        model,
        input_shape=args.input_shape,
        skip_first=not args.include_first,
        exclude=args.exclude,
    )
    for conv in convs:
        if not conv.eligible:
            print(f"left as it is: {conv.name} ({conv.reason})")

    result = None
    if not args.no_check:
        try:
            result = gdws_onnx.check(model, rewritten, input_shape=args.input_shape)
        except ModuleNotFoundError as exc:
            raise common.UsageError(f"{exc} Or pass --no-check.") from None
        print(
            f"onnxruntime check on {result['n_inputs']} random inputs: max abs difference "
            f"{result['max_abs_diff']:.3g}, max relative difference {result['max_rel_diff']:.3g}"
        )
    outputs.write(out, lambda temporary: gdws_onnx.save_model(rewritten, temporary))
    common.write_json(
        args,
        report_path,
        _finite(
            {
                "command": "onnx-convert",
                "input": str(source),
                "output": str(out),
                "input_shape": args.input_shape,
                "check": result,
                **report.to_dict(),
            }
        ),
    )
    return 0


def _finite(value: Any) -> Any:
    """JSON has no infinity: non-finite floats become ``None``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
