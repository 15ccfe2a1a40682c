"""Per-sample results saved as an evaluation goes, so a killed run continues where it stopped.

A results folder holds one file per process and run, ``part-<run>-<rank>.pt``, each a
plain dict (loaded with ``weights_only=True``) of the sample indices done, their
outcomes, and the *fingerprint* of the evaluation (model weights digest, attacks,
sample count). Files are replaced atomically, so a kill leaves the previous complete
file. Resuming reads every part whose fingerprint matches and refuses a folder that
holds another evaluation's results.
"""

from __future__ import annotations

import contextlib
import hashlib
import numbers
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["ResultStore", "describe_attack", "model_digest", "remove_results"]

_PART_GLOB = "part-*.pt"


def model_digest(model: nn.Module) -> str:
    """SHA-256 of a model's state (names, dtypes, shapes and values of every entry)."""
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def describe_attack(attack: Callable) -> dict[str, Any]:
    """The class and plain settings of an attack: what must match for results to mix."""
    settings = {
        key: value
        for key, value in sorted(vars(attack).items())
        if key != "model" and isinstance(value, (bool, numbers.Number, str, type(None)))
    }
    kind = type(attack)
    return {"class": f"{kind.__module__}.{kind.__qualname__}", **settings}


class ResultStore:
    """The per-sample results of one evaluation in ``folder``.

    Parameters
    ----------
    folder : path-like
        Created when first written.
    fingerprint : mapping
        Plain values identifying the evaluation; saved with every part and compared on
        loading.
    """

    def __init__(self, folder: str | os.PathLike, fingerprint: Mapping[str, Any]) -> None:
        self.folder = Path(folder)
        self.fingerprint = dict(fingerprint)
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"resume folder {str(self.folder)!r} exists and is not a folder.")

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample indices ``(n,)`` and outcomes ``(n, k)`` saved by earlier runs.

        Raises
        ------
        ValueError
            A part is unreadable, or holds the results of a different evaluation.
        """
        ids, outcomes, seen = [], [], set()
        for path in sorted(self.folder.glob(_PART_GLOB)):
            try:
                part = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise ValueError(
                    f"resume folder: {str(path)!r} is not a readable results file ({exc}); "
                    "remove it to start that part again."
                ) from None
            if not isinstance(part, dict) or part.get("fingerprint") != self.fingerprint:
                theirs = part.get("fingerprint", {}) if isinstance(part, dict) else {}
                keys = set(theirs) | set(self.fingerprint)
                differ = sorted(k for k in keys if theirs.get(k) != self.fingerprint.get(k))
                raise ValueError(
                    f"resume folder {str(self.folder)!r} holds the results of another "
                    f"evaluation (differs in: {', '.join(differ) or 'format'}); remove the "
                    "folder or choose another one to start afresh."
                )
            for sample, outcome in zip(part["ids"].tolist(), part["outcomes"], strict=True):
                if sample not in seen:
                    seen.add(sample)
                    ids.append(sample)
                    outcomes.append(outcome)
        width = len(self.fingerprint.get("columns", ()))
        if not ids:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, width, dtype=torch.bool)
        return torch.tensor(ids, dtype=torch.long), torch.stack(outcomes).to(torch.bool)

    def save(self, run: str, rank: int, ids: torch.Tensor, outcomes: torch.Tensor) -> None:
        """Replace this process's part of this run, atomically."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"part-{run}-{rank}.pt"
        data = {
            "fingerprint": self.fingerprint,
            "ids": ids.to(torch.long).cpu(),
            "outcomes": outcomes.to(torch.bool).cpu(),
        }
        handle, temporary = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as f:
                torch.save(data, f)
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise

    def clear(self) -> None:
        """Remove the folder (after the final results are safely written)."""
        remove_results(self.folder)


def remove_results(folder: str | os.PathLike) -> None:
    """Remove a results folder and everything saved in it; nothing if there is none."""
    folder = Path(folder)
    if folder.is_dir():
        shutil.rmtree(folder)
