"""Writing files safely: atomically, with the user's umask, never leaving a temporary.

Every file the project writes goes through :func:`atomic_output`: the content is written
to a temporary file beside the destination, flushed to disk, given the permissions a
plain ``open(path, "w")`` would give (``0o666`` less the umask), and renamed over the
destination in one step. A reader never sees half a file; an exception or Ctrl-C removes
the temporary; a killed process leaves at most one temporary, named
``.<name>.<pid>-<random>.gdws-tmp<suffix>``, which the next write into that folder
removes. The temporary keeps the destination's suffix, so writers that choose the format
by extension (matplotlib, ONNX) write the right one.

A file that several processes extend (a cache) is rewritten by :func:`update_json_atomic`:
under an exclusive lock (:func:`locked`), read, merged, written atomically, so that
concurrent writers lose nothing; a symbolic link is written through, and the file keeps
its permissions.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "TEMPORARY_SUFFIX",
    "atomic_output",
    "file_digest",
    "is_temporary",
    "locked",
    "remove_stale_temporaries",
    "same_file",
    "update_json_atomic",
    "user_umask",
    "why_not_writable",
    "write_bytes_atomic",
    "write_json_atomic",
]

TEMPORARY_SUFFIX = ".gdws-tmp"
_TEMPORARY = re.compile(r"^\..+\.(\d+)-[0-9a-f]+" + re.escape(TEMPORARY_SUFFIX) + r"(\.[^.]*)?$")


def user_umask() -> int:
    """The process's umask, read without changing it where the system allows."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def is_temporary(name: str) -> bool:
    """Whether a file name is one of :func:`atomic_output`'s temporaries."""
    return _TEMPORARY.match(name) is not None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that killed processes left in ``folder``; return them.

    Only files named like this module's temporaries whose process no longer runs are
    removed; nothing else is touched.
    """
    folder = Path(folder)
    removed = []
    with contextlib.suppress(OSError):
        for entry in folder.iterdir():
            match = _TEMPORARY.match(entry.name)
            if match and entry.is_file() and not _alive(int(match.group(1))):
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
                    removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike, *, replace: bool = True, mode: int | None = None
) -> Iterator[Path]:
    """A temporary path to write ``path``'s content to; it becomes ``path`` on success.

    Parameters
    ----------
    path : path-like
        The destination. Its folder is created if missing.
    replace : bool, default=True
        Replace an existing ``path``. With ``False`` the final step fails with
        :class:`FileExistsError` if ``path`` exists by then (also when another process
        created it meanwhile), and the temporary is removed.
    mode : int, optional
        The file's permissions; default ``0o666`` less the umask, as ``open(path, "w")``
        gives a new file.

    Yields
    ------
    pathlib.Path
        An empty file in ``path``'s folder, created with the umask's permissions.

    Raises
    ------
    FileExistsError
        ``replace=False`` and ``path`` exists.
    OSError
        The folder cannot be created or written (read-only, full, a file in the way).
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    if not replace and path.exists():
        raise FileExistsError(errno.EEXIST, "exists; not replacing it", str(path))
    name = f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TEMPORARY_SUFFIX}{path.suffix}"
    temporary = path.parent / name
    try:
        handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        os.close(handle)
    except OSError as exc:
        raise _naming(exc, path, temporary) from exc
    try:
        yield temporary
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(temporary, 0o666 & ~user_umask() if mode is None else mode)
        if replace:
            os.replace(temporary, path)
        else:
            _create_exclusively(temporary, path)
    except OSError as exc:
        raise _naming(exc, path, temporary) from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def _naming(exc: OSError, path: Path, temporary: Path) -> OSError:
    """``exc`` naming the destination (not the temporary, nor nothing) as its file."""
    if exc.filename not in (None, str(temporary), temporary):
        return exc
    reason = exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
    if exc.errno is None:
        return type(exc)(f"{path}: {reason}")
    return type(exc)(exc.errno, reason, str(path))


def _create_exclusively(temporary: Path, path: Path) -> None:
    """Give ``temporary`` the name ``path`` unless ``path`` exists, in one step."""
    try:
        os.link(temporary, path)  # fails if ``path`` exists, atomically
    except FileExistsError:
        raise FileExistsError(
            errno.EEXIST, "was created by another process meanwhile; not replacing it", str(path)
        ) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if path.exists():  # a file system without hard links: check, then rename
            raise FileExistsError(errno.EEXIST, "exists; not replacing it", str(path)) from None
        os.replace(temporary, path)


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, replace: bool = True) -> Path:
    """Write ``data`` to ``path`` through :func:`atomic_output`; return ``path``."""
    path = Path(path)
    with atomic_output(path, replace=replace) as temporary:
        temporary.write_bytes(data)
    return path


def write_json_atomic(
    path: str | os.PathLike,
    data: Any,
    *,
    replace: bool = True,
    default: Callable[[Any], Any] | None = None,
) -> Path:
    """Write ``data`` as indented JSON to ``path`` through :func:`atomic_output`.

    The text is built before anything is written, so data that cannot be serialised
    (``TypeError``) leaves ``path`` and its folder as they were.
    """
    text = json.dumps(data, indent=2, default=default) + "\n"
    return write_bytes_atomic(path, text.encode(), replace=replace)


def why_not_writable(path: str | os.PathLike, *, folder: bool = False) -> str | None:
    """Why the file (or, with ``folder``, the folder) ``path`` cannot be written, or ``None``.

    A missing path is writable when its nearest existing parent is a folder this process
    may write in; an existing file needs its folder to be writable too (files are
    replaced by a rename there). The answer is a clause: ``"'x' is a file, so nothing can
    be written under it"``, ``"cannot write in 'x' (no permission, or a read-only file
    system)"``.
    """
    path = Path(path)
    if folder and path.is_dir():
        existing = path
    else:
        existing = next(
            (p for p in path.absolute().parents if p.exists() or p.is_symlink()),
            Path(path.absolute().anchor),
        )
    if not existing.is_dir():
        return f"{str(existing)!r} is a file, so nothing can be written under it"
    target = existing if folder else path.parent if path.parent.exists() else existing
    if not os.access(target, os.W_OK | os.X_OK):
        return f"cannot write in {str(target)!r} (no permission, or a read-only file system)"
    return None


@contextlib.contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` for the ``with`` block (other processes wait).

    The lock is ``fcntl.flock`` on ``.<name>.lock`` beside ``path`` (created once, left in
    place: removing it would let two processes lock two different files). The system
    releases it when the process ends, even when killed.
    """
    path = Path(path)
    lock = path.parent / f".{path.name}.lock"
    handle = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # closing releases the lock


def update_json_atomic(
    path: str | os.PathLike, update: Callable[[Any], Any], *, default: Any = None
) -> Path:
    """Rewrite the JSON file ``path`` as ``update(its content)``, safely against other
    processes doing the same.

    Under :func:`locked`, the file is read (``default`` when it does not exist),
    ``update`` makes the new content, and it is written through :func:`atomic_output`.
    A symbolic link is followed (the file it names is rewritten, the link stays); an
    existing file keeps its permissions, a new one gets the umask's.

    Returns
    -------
    pathlib.Path
        The file written (the link's target for a link).

    Raises
    ------
    ValueError
        The file holds no valid JSON.
    OSError
        It cannot be read or written.
    """
    real = Path(os.path.realpath(path))
    real.parent.mkdir(parents=True, exist_ok=True)
    with locked(real):
        mode = None
        try:
            text = real.read_text()
            mode = stat.S_IMODE(real.stat().st_mode)
        except FileNotFoundError:
            content = default
        else:
            try:
                content = json.loads(text)
            except ValueError as exc:
                raise ValueError(f"{str(real)!r} is not valid JSON ({exc}).") from None
        text = json.dumps(update(content), indent=2) + "\n"
        with atomic_output(real, mode=mode) as temporary:
            temporary.write_text(text)
    return real


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` name the same file (same path, a link, a hard link)."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's content, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
