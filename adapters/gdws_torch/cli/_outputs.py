"""The one output policy of every ``gdws`` command.

- Every output file and folder is declared before the work starts, and checked then:
  outputs that collide with each other or with an input, a file where a folder is needed
  (or the reverse), an empty path, and a folder that cannot be written are refused.
- A file the command reads and extends (the latency table) is both: an input that no
  other output may replace, and an output checked with the others. It is extended, never
  replaced, so it needs no ``--overwrite``; a symbolic link to it is written through.
- An existing file is replaced only with ``--overwrite``, or when it lies in a folder that
  gdws created (marked by ``.gdws-outputs.json``) and the same command and option wrote
  it there, unchanged since. So re-running a command into its own results folder just
  works, and nothing a person made is ever replaced without being asked.
- Files are written atomically, with the umask's permissions; a failure leaves the
  previous file and no temporary (:mod:`gdws_approx.files`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gdws_approx.files import (
    atomic_output,
    file_digest,
    same_file,
    why_not_writable,
    write_json_atomic,
)
from gdws_torch.cli._errors import UsageError

MARKER = ".gdws-outputs.json"
_MARKER_FORMAT = "gdws-approx/output-folder"
LOG_HEADER = "epsilon\ttestacc"


def report_beside(path: Path) -> Path:
    """The JSON report beside an output file: ``model.pth`` -> ``model.json``; a file
    itself named ``.json`` gets ``model.report.json``, never its own name."""
    if path.suffix.lower() == ".json":
        return path.with_suffix(".report.json")
    return path.with_suffix(".json")


def _describe(flag: str, path: Path) -> str:
    return f"{flag} {str(path)!r}"


def _declared(flag: str, path: str | os.PathLike) -> Path:
    """``path`` as a ``Path``; an empty one (which would mean the current folder) refused."""
    if not str(path).strip():
        raise UsageError(f"{flag} is empty; give a path.")
    return Path(path)


def _read_marker(folder: Path) -> dict | None:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != _MARKER_FORMAT:
        return None
    return marker if isinstance(marker.get("files"), dict) else None


class Outputs:
    """The files and folders one command writes, checked before its work starts.

    Parameters
    ----------
    command : str
        Recorded in the marker of the folders gdws creates.
    overwrite : bool
        ``--overwrite``: existing files may be replaced.
    """

    def __init__(self, command: str, overwrite: bool = False) -> None:
        self.command = command
        self.overwrite = overwrite
        self.written: list[Path] = []
        self.checked = False  # set once check() passed: the work starts
        self._files: list[tuple[str, Path, bool]] = []
        self._folders: list[tuple[str, Path]] = []
        self._inputs: list[tuple[str, Path]] = []
        self._replace: dict[Path, bool] = {}
        self._new_folders: set[Path] = set()  # output folders missing when checked
        self._exclusive: list[tuple[str, Path]] = []
        self._tables: list[tuple[str, Path, bool]] = []
        # Tables that cannot be written (declared with required=False): why, by path.
        self.unwritable: dict[Path, str] = {}

    # -- declaring ---------------------------------------------------------------------

    def input(self, flag: str, path: str | os.PathLike | None) -> None:
        """An input file or folder that no output may replace."""
        if path is not None:
            self._inputs.append((flag, Path(path)))

    def file(self, flag: str, path: str | os.PathLike, *, append: bool = False) -> Path:
        """An output file; ``append`` for a log that runs add lines to."""
        path = _declared(flag, path)
        self._files.append((flag, path, append))
        return path

    def folder(self, flag: str, path: str | os.PathLike, *, exclusive: bool = False) -> Path:
        """A folder the command writes files into (created if missing); ``exclusive``: a
        folder of its own (a resume folder) that no other output may lie in."""
        path = _declared(flag, path)
        self._folders.append((flag, path))
        if exclusive:
            self._exclusive.append((flag, path))
        return path

    def table(self, flag: str, path: str | os.PathLike, *, required: bool = True) -> Path:
        """A file the command reads and extends (a latency table): an input that no other
        output may be, and an output checked with them. ``required=False``: a table that
        cannot be written is not refused; :attr:`unwritable` says why (the command then
        works without saving it)."""
        path = _declared(flag, path)
        self._tables.append((flag, path, required))
        return path

    # -- checking ------------------------------------------------------------------------

    def check(self) -> None:
        """Refuse every output that would lose or mix data; before any work.

        Raises
        ------
        UsageError
            Naming the flag, the path and what is wrong.
        """
        for flag, path in self._folders:
            if path.exists() and not path.is_dir():
                raise UsageError(f"{_describe(flag, path)} is a file, not a folder.")
        self._check_tables()
        inputs = self._inputs + [(flag, path) for flag, path, _ in self._tables]
        for i, (flag, path, append) in enumerate(self._files):
            for input_flag, source in inputs:
                if same_file(path, source):
                    raise UsageError(
                        f"{_describe(flag, path)} is {_describe(input_flag, source)}, an input "
                        "of this command; not overwriting it."
                    )
            others = [(f, p) for f, p, _ in self._files[:i]] + self._folders
            for other_flag, other in others:
                if same_file(path, other):
                    raise UsageError(
                        f"{_describe(flag, path)} and {other_flag} name the same path; give "
                        "each output its own."
                    )
            for folder_flag, folder in self._exclusive:
                if folder.resolve() in path.resolve().parents:
                    raise UsageError(
                        f"{_describe(flag, path)} lies inside {_describe(folder_flag, folder)}, "
                        "which holds only gdws's saved results; write it elsewhere."
                    )
            if path.is_dir():
                raise UsageError(f"{_describe(flag, path)} is a folder; give a file name.")
            self._check_writable(flag, path)
            if append:
                self._check_log(flag, path)
            elif path.exists() or path.is_symlink():
                self._replace[path] = self._may_replace(flag, path)
            else:
                self._replace[path] = False
            if not path.parent.exists():
                self._new_folders.add(path.parent.absolute())
        for flag, path in self._folders:
            self._check_writable(flag, path, folder=True)
            for input_flag, source in inputs:
                if same_file(path, source):
                    raise UsageError(
                        f"{_describe(flag, path)} is {_describe(input_flag, source)}, an input "
                        "of this command."
                    )
        self.checked = True

    def _check_tables(self) -> None:
        """The extended files: plain files (through links) or new, not an input, not in a
        folder of gdws's saved results, writable (or noted in :attr:`unwritable`)."""
        for flag, path, required in self._tables:
            real = Path(os.path.realpath(path))
            if real.is_dir():
                raise UsageError(f"{_describe(flag, path)} is a folder; give a file name.")
            if real.exists() and not real.is_file():
                raise UsageError(f"{_describe(flag, path)} exists and is not a plain file.")
            for input_flag, source in self._inputs:
                if same_file(path, source):
                    raise UsageError(
                        f"{_describe(flag, path)} is {_describe(input_flag, source)}, another "
                        "input of this command."
                    )
            for folder_flag, folder in self._exclusive:
                if folder.resolve() in real.parents:
                    raise UsageError(
                        f"{_describe(flag, path)} lies inside {_describe(folder_flag, folder)}, "
                        "which holds only gdws's saved results; keep it elsewhere."
                    )
            reason = why_not_writable(real)
            if reason and required:
                raise UsageError(f"{_describe(flag, path)}: {reason}.")
            if reason:
                self.unwritable[path] = reason

    def _check_writable(self, flag: str, path: Path, folder: bool = False) -> None:
        reason = why_not_writable(path, folder=folder)
        if reason:
            raise UsageError(f"{_describe(flag, path)}: {reason}.")

    def _may_replace(self, flag: str, path: Path) -> bool:
        if path.is_symlink() or not path.is_file():
            raise UsageError(
                f"{_describe(flag, path)} exists and is not a plain file; not replacing it."
            )
        if self.overwrite:
            return True
        marker = _read_marker(path.parent)
        recorded = marker["files"].get(path.name) if marker else None
        if (
            isinstance(recorded, dict)
            and recorded.get("writer") == self._writer(flag)
            and recorded.get("sha256") == file_digest(path)
        ):
            return True
        raise UsageError(
            f"{_describe(flag, path)} exists; pass --overwrite to replace it (gdws replaces "
            "on its own only a file that the same command and option wrote, unchanged since, "
            "in a folder gdws created)."
        )

    def _writer(self, flag: str) -> str:
        return f"gdws {self.command} {flag}"

    def _check_log(self, flag: str, path: Path) -> None:
        if not path.exists():
            return
        if path.is_symlink() or not path.is_file():
            raise UsageError(f"{_describe(flag, path)} exists and is not a plain file.")
        with open(path, "rb") as f:
            first = f.readline().decode("utf-8", "replace").rstrip("\r\n")
        if first != LOG_HEADER:
            raise UsageError(
                f"{_describe(flag, path)} exists and is not an accuracy log (its first line is "
                f"not 'epsilon<TAB>testacc'); not appending to it."
            )

    # -- writing -------------------------------------------------------------------------

    def write(self, path: Path, write: Callable[[Path], Any]) -> Path:
        """Write ``path`` (declared and checked) through ``write(temporary path)``.

        Raises
        ------
        FileExistsError
            The file appeared since the check (another process wrote it).
        """
        replace = self._replace.get(path)
        if replace is None:
            raise RuntimeError(f"{str(path)!r} was not declared and checked as an output.")
        existed = path.exists()
        with atomic_output(path, replace=replace) as temporary:
            write(temporary)
            digest = file_digest(temporary)
        flag = next(f for f, p, _ in self._files if p == path)
        self._record(path, {"sha256": digest, "writer": self._writer(flag)})
        self.written.append(path)
        print(f"{'replaced' if existed else 'wrote'} {path}")
        return path

    def write_json(self, path: Path, data: Any, default: Callable | None = None) -> Path:
        text = json.dumps(data, indent=2, default=default) + "\n"  # fails before any write
        return self.write(path, lambda temporary: temporary.write_text(text))

    def append_lines(self, path: Path, lines: list[str]) -> Path:
        """Add ``lines`` to a log (declared with ``append=True``), atomically."""
        old = path.read_bytes() if path.exists() else (LOG_HEADER + "\n").encode()
        if old and not old.endswith(b"\n"):
            old += b"\n"
        new = old + "".join(f"{line}\n" for line in lines).encode()
        self._replace[path] = True  # the log: checked to be one by _check_log
        self.write(path, lambda temporary: temporary.write_bytes(new))
        return path

    def _record(self, path: Path, entry: dict[str, str]) -> None:
        """Note ``path`` in its folder's marker, if gdws created that folder."""
        folder = path.parent
        marker = _read_marker(folder)
        if marker is None and folder.absolute() not in self._new_folders:
            return
        marker = marker or {"format": _MARKER_FORMAT, "version": 1, "files": {}}
        marker.setdefault("created_by", f"gdws {self.command}")
        marker["files"][path.name] = entry
        with contextlib.suppress(OSError):  # the file is written; a lost note only means
            write_json_atomic(folder / MARKER, marker)  # --overwrite is needed next time
