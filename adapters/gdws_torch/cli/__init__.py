"""The ``gdws`` command: ``gdws eval | alphas | convert | train | demo``.

Every error is one line on stderr and exit code 2 (no traceback).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from gdws_torch.cli import _common as common

__all__ = ["main"]

# What bad input raises; anything else is a bug and keeps its traceback.
_EXPECTED_ERRORS = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError)


def build_parser() -> common.OneLineParser:
    from gdws_torch.cli import alphas, convert, demo, fps, onnx_convert, sweep, train
    from gdws_torch.cli import eval as evaluate

    parser = common.OneLineParser(
        prog="gdws",
        description="GDWS approximation of robust CNNs: the embedded demo, robustness "
        "evaluation, noise gains, conversion, training, FPS, ONNX rewriting.",
    )
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=common.OneLineParser
    )
    for module in (demo, evaluate, alphas, convert, train, fps, sweep, onnx_convert):
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``gdws`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    args = None
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        return int(args.run(args) or 0)
    except common.UsageError as exc:
        message = str(exc)
        if not message.startswith("gdws"):
            command = getattr(args, "command", None)
            message = f"gdws{' ' + command if command else ''}: error: {message}"
        print(message, file=sys.stderr)
        return 2
    except _EXPECTED_ERRORS as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"gdws: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gdws: interrupted", file=sys.stderr)
        return 130


def _console_script() -> None:
    sys.exit(main())
