"""Splitting per-channel work across threads.

The per-channel linear algebra (small Gram products, 9x9 eigendecompositions, projections)
runs as batched calls that release the GIL in NumPy and torch, so a thread per chunk of
channels uses several cores without copying data between processes.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

# Below this many channels per chunk, thread start-up costs more than it saves.
MIN_CHANNELS_PER_CHUNK = 64


def effective_n_jobs(n_jobs: int | None) -> int:
    """Number of workers for ``n_jobs`` with scikit-learn's convention.

    ``None`` means 1, ``-1`` all cores, ``-2`` all but one, and so on.
    """
    if n_jobs is None:
        return 1
    n_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n_cores = n_cores or 1
    if n_jobs < 0:
        return max(1, n_cores + 1 + n_jobs)
    return n_jobs


def channel_slices(n_channels: int, n_jobs: int | None) -> list[slice]:
    """Contiguous slices of ``range(n_channels)``, one per worker worth starting."""
    n_workers = min(effective_n_jobs(n_jobs), max(1, n_channels // MIN_CHANNELS_PER_CHUNK))
    bounds = [round(i * n_channels / n_workers) for i in range(n_workers + 1)]
    return [slice(lo, hi) for lo, hi in itertools.pairwise(bounds)]


def map_slices(function: Callable[[slice], Any], slices: Sequence[slice]) -> list[Any]:
    """``[function(s) for s in slices]``, run on threads when there is more than one slice."""
    if len(slices) == 1:
        return [function(slices[0])]
    with ThreadPoolExecutor(max_workers=len(slices)) as pool:
        return list(pool.map(function, slices))
