"""The command line's speed targets: the latency table as an input and output, and what a
missed target does (exit code 1 unless ``--allow-miss``)."""

from __future__ import annotations

import argparse
import warnings
from typing import Any

from gdws_torch.cli._errors import UsageError, WorkFailed
from gdws_torch.cli._outputs import Outputs
from gdws_torch.conversion.speed_target import SpeedTargetMissed
from gdws_torch.cost.latency_tables import LatencyTable, default_cache


def uses_latency_table(args: argparse.Namespace) -> bool:
    """Whether the command plans for a speed-up (one ``--target-speedup`` or several)."""
    speedup = getattr(args, "target_speedup", None)
    return bool(speedup) if isinstance(speedup, list) else speedup is not None


def check_speed_flags(args: argparse.Namespace) -> None:
    """``--latency-table`` and ``--allow-miss`` serve ``--target-speedup`` only."""
    if uses_latency_table(args):
        return
    given = [
        flag
        for flag, on in (
            ("--latency-table", getattr(args, "latency_table", None) is not None),
            ("--allow-miss", getattr(args, "allow_miss", False)),
        )
        if on
    ]
    if given:
        raise UsageError(f"{' and '.join(given)} only apply with --target-speedup.")


def declare_latency_table(args: argparse.Namespace, outputs: Outputs) -> None:
    """The latency table a speed target reads and extends (``--latency-table``, else the
    user cache), declared as the command's input and output: checked with the other
    outputs before the work. A user cache that cannot be written is not refused (the
    layers are then timed without being cached)."""
    check_speed_flags(args)
    if not uses_latency_table(args):
        return
    if args.latency_table is not None:
        args.latency_table_path = outputs.table("--latency-table", args.latency_table)
    else:
        path = default_cache()
        args.latency_table_path = outputs.table("the latency cache", path, required=False)


def open_latency_table(args: argparse.Namespace, where: Any = "cpu") -> None:
    """Read and check the declared table before the work (a table refused is one line
    naming it, exit code 2); says in one line when the user cache will not be written."""
    if not uses_latency_table(args):
        return
    try:
        if args.latency_table is not None:
            table = LatencyTable(
                args.backend, args.latency_batch_size, where, args.latency_table_path
            )
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # said below, in one line
                table = LatencyTable.default(args.backend, args.latency_batch_size, where)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if table.not_cached:
        print(f"note: {table.not_cached}.")
    args.latency_table_object = table


def speed_target_missed(exc: SpeedTargetMissed) -> WorkFailed:
    """A missed ``--target-speedup``, as the command line reports it (exit code 1)."""
    return WorkFailed(f"{exc.reason}. Pass --allow-miss to keep the closest model.")


def say_accepted_miss(args: argparse.Namespace, report) -> None:
    """One line when ``--allow-miss`` kept a model that missed its speed target."""
    speed = report.speed
    if speed is not None and not speed.reached:
        print(
            f"speed target {speed.target_speedup:g}x not reached (measured "
            f"{speed.realised_speedup:.3g}x): kept the closest model (--allow-miss)."
        )
