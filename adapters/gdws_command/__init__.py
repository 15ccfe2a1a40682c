"""The ``gdws`` console script's entry point.

It imports nothing heavy itself, so that Ctrl-C while torch is still loading ends in one
line and exit code 130 like Ctrl-C at any later moment (``gdws_torch.cli.main``).
"""

from __future__ import annotations

import signal
import sys

__all__ = ["console_script"]


def console_script() -> None:
    """Run ``gdws`` with the process's arguments and exit with its code."""
    interrupted = []

    def on_interrupt(signum, frame):
        interrupted.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        from gdws_torch.cli import main
    except BaseException as exc:
        # A library may turn the interrupt of its import into another error (numpy:
        # "cannot load module more than once"): the signal says what happened.
        if interrupted or isinstance(exc, KeyboardInterrupt):
            print("gdws: interrupted while starting; nothing written.", file=sys.stderr)
            sys.exit(130)
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
    sys.exit(main())
