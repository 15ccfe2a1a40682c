"""The first ``n`` samples of a loader, batch by batch."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from gdws_approx.checks import check_integer

__all__ = ["take_samples"]


def take_samples(
    loader: Iterable,
    n_samples: int,
    *,
    labels: bool = False,
    device: Any = None,
    name: str = "n_samples",
    hint: str = "",
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yield the batches of ``loader`` cut at ``n_samples`` samples in all.

    Parameters
    ----------
    loader : iterable
        Yields image tensors or ``(images, labels, ...)`` tuples (a ``DataLoader``).
    n_samples : int
        How many samples to yield, ``>= 1``.
    labels : bool, default=False
        Each batch must carry labels: a loader of bare images is refused.
    device : torch.device or str, optional
        Where the yielded tensors go; where they are when ``None``.
    name : str, default="n_samples"
        The argument that set ``n_samples``, for the messages.
    hint : str, default=""
        Added to the error when the loader runs out (how to ask for fewer).

    Yields
    ------
    tuple of torch.Tensor
        ``(images, *rest)``: every element of the batch, cut to the samples still needed
        (a bare tensor batch gives ``(images,)``). Labels become tensors.

    Raises
    ------
    ValueError
        ``labels`` is asked for and a batch has none; the loader runs out before
        ``n_samples`` samples (raised once the last batch has been consumed).
    """
    n_samples = check_integer(n_samples, name, minimum=1)
    seen = 0
    for batch in loader:
        parts = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
        if labels and len(parts) < 2:
            raise ValueError(
                f"the loader must yield (images, labels) batches; got a {type(batch).__name__}."
            )
        take = n_samples - seen
        cut = tuple(
            (part if i == 0 else torch.as_tensor(part))[:take] for i, part in enumerate(parts)
        )
        if device is not None:
            cut = tuple(part.to(device) for part in cut)
        seen += len(cut[0])
        yield cut
        if seen >= n_samples:
            return
    message = f"the loader ran out after {seen} samples; {name}={n_samples} asks for more."
    raise ValueError(f"{message} {hint}".rstrip())
