"""The ``gdws`` command: ``gdws demo | eval | alphas | convert | train | fps | sweep | ...``.

Every failure is one line on standard error: exit code 2 for bad input, 1 for a failure
during the work, 130 when interrupted (``gdws_torch.cli._errors``); ``--debug`` shows the
traceback. Nothing heavy is imported before the first ``try`` (the console script enters
through :mod:`gdws_command`), so even Ctrl-C during start-up ends in one line.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence

__all__ = ["main"]


def build_parser():
    from gdws_torch.cli import _common as common
    from gdws_torch.cli import (
        alphas,
        convert,
        demo,
        fps,
        latency_table,
        onnx_convert,
        sweep,
        train,
    )
    from gdws_torch.cli import eval as evaluate

    parser = common.OneLineParser(
        prog="gdws",
        description="GDWS approximation of robust CNNs: the embedded demo, robustness "
        "evaluation, noise gains, conversion, training, FPS, ONNX rewriting.",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of a failure (for reports)"
    )
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=common.OneLineParser
    )
    modules = (demo, evaluate, alphas, convert, train, fps, latency_table, sweep, onnx_convert)
    for module in modules:
        module.add_parser(subparsers)
    return parser


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``gdws`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    from gdws_torch.cli import _errors as errors

    args = None
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    debug = "--debug" in argv  # accepted anywhere on the line
    argv = [a for a in argv if a != "--debug"]
    previous = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, _interrupt)  # a killed run cleans up like Ctrl-C
    except ValueError:  # not the main thread: leave the signals alone
        previous = None
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return errors.BAD_INPUT
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(f"gdws: interrupted; {_kept(args)}", file=sys.stderr)
        return errors.INTERRUPTED
    except errors.UsageError as exc:
        if debug:
            raise
        message = errors.one_line(exc)
        if not message.startswith("gdws"):
            command = getattr(args, "command", None)
            message = f"gdws{' ' + command if command else ''}: error: {message}"
        print(message, file=sys.stderr)
        return errors.BAD_INPUT
    except Exception as exc:
        if debug:
            raise
        started = getattr(getattr(args, "outputs", None), "checked", False)
        message = errors.one_line(exc)
        if not errors.expected(exc):
            message = (
                f"internal error ({type(exc).__name__}): {message} (run with --debug for the "
                "traceback and report it)"
            )
        if started:
            message = f"{message.rstrip('.')}; {_kept(args)}"
        print(f"gdws: error: {message}", file=sys.stderr)
        return errors.exit_code(exc, started)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _kept(args) -> str:
    """What an interrupted or failed run leaves: the outputs written, resumable results."""
    outputs = getattr(args, "outputs", None)
    written = [str(p) for p in getattr(outputs, "written", [])]
    kept = f"kept {', '.join(written)}" if written else "no output written"
    table = getattr(args, "latency_table_object", None)
    if getattr(table, "saved", 0):
        kept += f"; the {table.saved} layer(s) timed are saved in {table.path}"
    resume = getattr(args, "resume_note", None)
    return f"{kept}{'; ' + resume if resume else ''}."
