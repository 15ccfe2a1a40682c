"""How ``gdws`` fails: one line on standard error and an exit code, never a traceback.

- ``2``: bad input (arguments, files, data), whenever it is found; the commands look for
  it before their work starts.
- ``1``: a failure during the work (a write that fails, training that diverges, a speed
  target the measured model does not reach without ``--allow-miss``).
- ``130``: interrupted (Ctrl-C or SIGTERM), with a line saying what was kept.

``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import errno

__all__ = [
    "BAD_INPUT",
    "FAILED",
    "INTERRUPTED",
    "UsageError",
    "WorkFailed",
    "exit_code",
    "expected",
    "one_line",
]

BAD_INPUT, FAILED, INTERRUPTED = 2, 1, 130


class UsageError(ValueError):
    """A bad command line: reported as one line, exit code 2."""


class WorkFailed(RuntimeError):
    """The work did not give what was asked (a speed target missed): one line, exit code 1."""


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line; for an ``OSError``, the file and the reason."""
    if isinstance(exc, OSError) and (exc.strerror or exc.filename):
        reason = exc.strerror or errno.errorcode.get(exc.errno or 0, "") or type(exc).__name__
        text = f"{exc.filename!s}: {reason}" if exc.filename else reason
    else:
        text = str(exc)
    return " ".join(text.split()) or type(exc).__name__


def exit_code(exc: BaseException, work_started: bool) -> int:
    """``2`` for bad input (a missing file, or any ``OSError`` before the work), else ``1``."""
    if isinstance(exc, (ValueError, TypeError, FileNotFoundError)):
        return BAD_INPUT
    if isinstance(exc, OSError) and not work_started:
        return BAD_INPUT
    return FAILED


def expected(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure the commands report (not a bug of gdws)."""
    return isinstance(exc, (ValueError, TypeError, OSError, ArithmeticError, WorkFailed))
