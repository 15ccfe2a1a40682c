"""torch.distributed plumbing: one process or many (``torchrun``), the same code path.

Under ``torchrun --nproc_per_node=N`` (single or multi-node) the environment holds
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address;
:func:`process_group` joins the group (``nccl`` for CUDA devices, ``gloo`` otherwise)
and leaves it afterwards. Without those variables it is a group of one and every
collective is the identity, so the library never needs two code paths.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

__all__ = ["Group", "WithIndices", "process_group", "shard", "world_from_environment"]


@dataclass(frozen=True)
class Group:
    """The processes of one run: this process's ``rank`` among ``world_size``.

    Attributes
    ----------
    rank, world_size, local_rank : int
        As ``torchrun`` numbers them (``0, 1, 0`` outside ``torchrun``).
    backend : str or None
        ``"gloo"`` or ``"nccl"`` once joined; ``None`` for a group of one.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Whether this process prints and writes the outputs (rank 0)."""
        return self.rank == 0

    @property
    def joined(self) -> bool:
        return self.backend is not None

    def _device(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``tensor`` over all processes (a new tensor)."""
        if not self.joined:
            return tensor.clone()
        work = tensor.detach().to(self._device(), copy=True)
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        return work.to(tensor.device)

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` (any picklable object of plain values), on every process."""
        if not self.joined:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self._device())
        return box[0]

    def all_gather(self, value: Any) -> list[Any]:
        """Every process's ``value``, in rank order."""
        if not self.joined:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        if self.joined:
            dist.barrier()


def _int_variable(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"environment variable {name} must be an integer; got {value!r}."
        ) from None


def world_from_environment() -> Group:
    """The ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` that ``torchrun`` set (not joined yet)."""
    world_size = _int_variable("WORLD_SIZE", 1)
    rank = _int_variable("RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world_size} are inconsistent.")
    return Group(rank, world_size, _int_variable("LOCAL_RANK", 0))


@contextlib.contextmanager
def process_group(
    device: torch.device | str | None = None, timeout_s: float = 1800.0
) -> Iterator[Group]:
    """Join the ``torchrun`` process group for the duration of a ``with`` block.

    Parameters
    ----------
    device : torch.device or str, optional
        Where this process computes: ``nccl`` for CUDA, ``gloo`` otherwise (also for
        CPU runs on GPU machines).
    timeout_s : float, default=1800
        How long a collective waits for a process that stopped responding before the
        run fails.

    Yields
    ------
    Group
        A group of one (nothing joined) when ``WORLD_SIZE`` is unset or 1, or when a
        group is already initialised by the caller (then it is used, not re-joined).
    """
    world = world_from_environment()
    if dist.is_available() and dist.is_initialized():
        yield Group(dist.get_rank(), dist.get_world_size(), world.local_rank, dist.get_backend())
        return
    if world.world_size == 1:
        yield world
        return
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed.")
    device = torch.device(device) if device is not None else torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    try:
        yield Group(world.rank, world.world_size, world.local_rank, backend)
    finally:
        dist.destroy_process_group()


def shard(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """This rank's share of ``indices``: every ``world_size``-th one, from ``rank``.

    Interleaved rather than in blocks, so ranks get equal work even when the samples
    are ordered (by class, by image size). The shares are disjoint and cover
    ``indices``: nothing is padded, repeated or dropped.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}.")
    return list(indices[rank::world_size])


class WithIndices(Dataset):
    """A dataset's ``(image, label)`` samples as ``(image, label, index)``.

    The index is the sample's position in ``dataset``, whatever subset or shard of it a
    loader reads: what per-sample seeded attacks need (``sample_ids``).
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index][:2]
        return image, label, index
