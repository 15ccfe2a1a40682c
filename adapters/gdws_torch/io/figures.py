"""Saving matplotlib figures like every other output: atomically, nothing left behind."""

from __future__ import annotations

import os
from pathlib import Path

from gdws_approx.files import atomic_output

__all__ = ["save_figure"]


def save_figure(figure, path: str | os.PathLike, *, dpi: int = 110) -> Path:
    """Save ``figure`` to ``path`` (format from its extension, PNG without one) and close it.

    The figure is closed whether or not the write succeeds.
    """
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        with atomic_output(path) as temporary:
            figure.savefig(temporary, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(figure)
    return path
