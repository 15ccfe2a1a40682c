"""The ``gdws`` console script's entry point.

It imports nothing heavy itself, so that Ctrl-C while torch is still loading ends in one
line and exit code 130 like Ctrl-C at any later moment (``gdws_torch.cli.main``).
"""

from __future__ import annotations

import sys

__all__ = ["console_script"]


def console_script() -> None:
    """Run ``gdws`` with the process's arguments and exit with its code."""
    try:
        from gdws_torch.cli import main
    except KeyboardInterrupt:
        print("gdws: interrupted while starting; nothing written.", file=sys.stderr)
        sys.exit(130)
    sys.exit(main())
