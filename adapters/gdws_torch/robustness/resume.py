"""Per-sample results saved as an evaluation goes, so a killed run continues where it stopped.

A results folder belongs to the project: it is created by :class:`ResultStore` (or was
empty when first used) and marked by a manifest, ``gdws-resume.json``, naming the run
and its *fingerprint* (model weights digest, data digest, attacks with their seeds,
sample count). It holds one file per process and run, ``part-<run>-<rank>.pt``, each a
plain dict (loaded with ``weights_only=True``) of the sample indices done, their
outcomes, the fingerprint and a checksum of all three. Files are replaced atomically,
so a kill leaves the previous complete file.

Resuming reads every part whose fingerprint and checksum match, and refuses a folder
that holds another evaluation's results, a damaged or edited part, or any file the
project did not write. Removing results removes only the manifest and the parts, and
the folder itself only if the project created it and nothing else is left in it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import numbers
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gdws_approx.files import atomic_output, is_temporary, write_json_atomic

__all__ = [
    "MANIFEST",
    "ResultStore",
    "check_results_folder",
    "dataset_digest",
    "describe_attack",
    "model_digest",
]

MANIFEST = "gdws-resume.json"
_MANIFEST_FORMAT = "gdws-approx/resume"
_PART = re.compile(r"^part-[0-9a-zA-Z]+-\d+\.pt$")


def model_digest(model: nn.Module) -> str:
    """SHA-256 of a model's state (names, dtypes, shapes and values of every entry)."""
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        _update(digest, name, value)
    return digest.hexdigest()


def dataset_digest(dataset: Any) -> str:
    """SHA-256 identifying a dataset's samples.

    In-memory datasets (``TensorDataset``, or any with ``tensors``) are hashed by
    content; image folders (any with ``samples``: ``(path, label)`` pairs) by each file's
    path, size, modification time and label, since reading every image would take
    longer than many evaluations; anything else by the content of every sample.
    """
    digest = hashlib.sha256(f"{len(dataset)}|".encode())
    tensors = getattr(dataset, "tensors", None)
    samples = getattr(dataset, "samples", None)
    if isinstance(tensors, tuple) and all(isinstance(t, torch.Tensor) for t in tensors):
        for i, tensor in enumerate(tensors):
            _update(digest, str(i), tensor)
    elif isinstance(samples, list):
        for path, label in samples:
            try:
                stat = os.stat(path)
                where = f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}"
            except OSError:
                where = f"{path}|missing"
            digest.update(f"{where}|{label}\n".encode())
    else:
        for i in range(len(dataset)):
            for j, item in enumerate(dataset[i]):
                _update(digest, f"{i}.{j}", torch.as_tensor(item))
    return digest.hexdigest()


def _update(digest: Any, name: str, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().cpu().contiguous()
    digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


def describe_attack(attack: Callable) -> dict[str, Any]:
    """The class and plain settings of an attack: what must match for results to mix.

    An ensemble (an attack with a ``describe()`` method, e.g.
    :class:`~gdws_torch.robustness.autoattack.AutoAttack`) adds what that returns: its
    attacks' settings.
    """
    settings = {
        key: value
        for key, value in sorted(vars(attack).items())
        if key != "model" and isinstance(value, (bool, numbers.Number, str, type(None)))
    }
    describe = getattr(attack, "describe", None)
    if callable(describe):
        settings.update(describe())
    kind = type(attack)
    return {"class": f"{kind.__module__}.{kind.__qualname__}", **settings}


def _ours(name: str) -> bool:
    return name == MANIFEST or bool(_PART.match(name)) or is_temporary(name)


def _read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"resume folder: {str(path)!r} is not readable ({exc}).") from None
    if not isinstance(manifest, dict) or manifest.get("format") != _MANIFEST_FORMAT:
        raise ValueError(f"resume folder: {str(path)!r} is not a gdws results manifest.")
    return manifest


def check_results_folder(folder: str | os.PathLike) -> None:
    """Refuse a results folder that is not the project's own to write and remove.

    Accepted: a path that does not exist yet, an empty folder, or a folder holding only
    a manifest, parts and temporaries written by :class:`ResultStore`.

    Raises
    ------
    ValueError
        ``folder`` is a file, holds files the project did not write, or has a damaged
        manifest; nothing is changed.
    """
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return
    if not folder.is_dir() or folder.is_symlink():
        raise ValueError(f"resume folder {str(folder)!r} exists and is not a folder.")
    foreign = sorted(entry.name for entry in folder.iterdir() if not _ours(entry.name))
    if foreign:
        raise ValueError(
            f"resume folder {str(folder)!r} holds files gdws did not write ({foreign[:3]}"
            f"{' ...' if len(foreign) > 3 else ''}); it is never emptied: choose a new or "
            "empty folder."
        )
    if any(folder.iterdir()) and _read_manifest(folder) is None:
        raise ValueError(
            f"resume folder {str(folder)!r} holds results files but no {MANIFEST}: not "
            "written by this version of gdws; choose a new or empty folder."
        )


def _differences(theirs: Mapping, ours: Mapping) -> str:
    keys = set(theirs) | set(ours)
    return ", ".join(sorted(k for k in keys if theirs.get(k) != ours.get(k))) or "format"


def _checksum(fingerprint: Mapping, ids: torch.Tensor, outcomes: torch.Tensor) -> str:
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode())
    _update(digest, "ids", ids)
    _update(digest, "outcomes", outcomes)
    return digest.hexdigest()


class ResultStore:
    """The per-sample results of one evaluation in ``folder``.

    Parameters
    ----------
    folder : path-like
        A new or empty folder, or one this class wrote before (see
        :func:`check_results_folder`).
    fingerprint : mapping
        Plain values identifying the evaluation; saved with every part and in the
        manifest, and compared on loading.
    description : mapping, optional
        Plain values naming the run for a person (command, files); stored in the manifest.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        fingerprint: Mapping[str, Any],
        description: Mapping[str, Any] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.fingerprint = dict(fingerprint)
        self.description = dict(description or {})
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"resume folder {str(self.folder)!r} exists and is not a folder.")

    def open(self) -> None:
        """Check that the folder is ours and of this evaluation; create and mark it.

        Raises
        ------
        ValueError
            As :func:`check_results_folder`, or the manifest names another evaluation.
        """
        check_results_folder(self.folder)
        manifest = _read_manifest(self.folder)
        if manifest is not None and manifest.get("fingerprint") is None:  # discarded
            self._write_manifest(bool(manifest.get("created_folder")))
            return
        if manifest is not None:
            if manifest.get("fingerprint") != self.fingerprint:
                raise ValueError(
                    f"resume folder {str(self.folder)!r} holds the results of another "
                    f"evaluation (differs in: "
                    f"{_differences(manifest.get('fingerprint') or {}, self.fingerprint)}); "
                    "pass --fresh (gdws eval) or choose another folder to start afresh."
                )
            return
        created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write_manifest(created)

    def _write_manifest(self, created: bool, fingerprint: Mapping | None = None) -> None:
        manifest = {
            "format": _MANIFEST_FORMAT,
            "version": 1,
            "created_folder": created,
            "run": self.description,
            "fingerprint": self.fingerprint if fingerprint is None else fingerprint or None,
        }
        write_json_atomic(self.folder / MANIFEST, manifest, default=str)

    def _parts(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if _PART.match(p.name))

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample indices ``(n,)`` and outcomes ``(n, k)`` saved by earlier runs.

        Raises
        ------
        ValueError
            A part is unreadable, fails its checksum, or holds the results of a different
            evaluation.
        """
        ids, outcomes, seen = [], [], set()
        for path in self._parts():
            part_ids, part_outcomes = self._read_part(path)
            for sample, outcome in zip(part_ids.tolist(), part_outcomes, strict=True):
                if sample not in seen:
                    seen.add(sample)
                    ids.append(sample)
                    outcomes.append(outcome)
        width = len(self.fingerprint.get("columns", ()))
        if not ids:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, width, dtype=torch.bool)
        return torch.tensor(ids, dtype=torch.long), torch.stack(outcomes).to(torch.bool)

    def _read_part(self, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            part = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(
                f"resume folder: {str(path)!r} is not a readable results file "
                f"({' '.join(str(exc).split()[:12])}); remove it to start that part again."
            ) from None
        if not isinstance(part, dict) or part.get("fingerprint") != self.fingerprint:
            theirs = part.get("fingerprint", {}) if isinstance(part, dict) else {}
            raise ValueError(
                f"resume folder {str(self.folder)!r} holds the results of another "
                f"evaluation (differs in: {_differences(theirs or {}, self.fingerprint)}); "
                "remove the folder or choose another one to start afresh."
            )
        ids, outcomes = part.get("ids"), part.get("outcomes")
        damaged = not (
            isinstance(ids, torch.Tensor)
            and isinstance(outcomes, torch.Tensor)
            and ids.dtype == torch.long
            and outcomes.dtype == torch.bool
            and ids.ndim == 1
            and outcomes.ndim == 2
            and len(ids) == len(outcomes)
            and part.get("checksum") == _checksum(self.fingerprint, ids, outcomes)
        )
        n_samples = self.fingerprint.get("n_samples")
        columns = self.fingerprint.get("columns")
        if not damaged and n_samples is not None and len(ids):
            damaged = int(ids.min()) < 0 or int(ids.max()) >= n_samples
        if not damaged and columns is not None:
            damaged = outcomes.shape[1] != len(columns)
        if damaged:
            raise ValueError(
                f"resume folder: {str(path)!r} fails its checksum or holds indices or "
                "outcomes of the wrong shape (edited or damaged); remove it to evaluate "
                "its samples again."
            )
        return ids, outcomes

    def save(self, run: str, rank: int, ids: torch.Tensor, outcomes: torch.Tensor) -> None:
        """Replace this process's part of this run, atomically."""
        if not (self.folder / MANIFEST).is_file():
            self.open()
        ids, outcomes = ids.to(torch.long).cpu(), outcomes.to(torch.bool).cpu()
        data = {
            "fingerprint": self.fingerprint,
            "ids": ids,
            "outcomes": outcomes,
            "checksum": _checksum(self.fingerprint, ids, outcomes),
        }
        with atomic_output(self.folder / f"part-{run}-{rank}.pt") as temporary:
            torch.save(data, temporary)

    def discard(self) -> None:
        """Remove the saved parts (of any evaluation); the next :meth:`open` adopts the
        folder for its own evaluation.

        Raises
        ------
        ValueError
            The folder is not the project's own (:func:`check_results_folder`).
        """
        check_results_folder(self.folder)
        manifest = _read_manifest(self.folder)
        for path in self._parts():
            path.unlink()
        if manifest is not None:
            self._write_manifest(bool(manifest.get("created_folder")), fingerprint={})

    def clear(self) -> None:
        """Remove the parts and the manifest, then the folder if the project created it
        and nothing else is in it (after the final results are safely written). Files
        that someone else put there stay, and so does the folder then."""
        if not self.folder.is_dir():
            return
        manifest = _read_manifest(self.folder)
        if manifest is None:
            return  # not marked: nothing here is known to be ours
        for path in self._parts():
            path.unlink()
        with contextlib.suppress(FileNotFoundError):
            (self.folder / MANIFEST).unlink()
        if manifest is not None and manifest.get("created_folder"):
            with contextlib.suppress(OSError):  # not empty: someone put a file there
                self.folder.rmdir()
