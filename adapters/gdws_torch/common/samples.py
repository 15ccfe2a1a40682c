"""The batches of a loader, checked where they enter: the structure and finite pixels.

Every stage that reads data (weighting, calibration, refit, BatchNorm, the baselines,
evaluation, training) iterates its loader through :func:`checked_batches` (or
:func:`take_samples`, built on it), so a batch that is not ``images`` or
``(images, labels, ...)``, or one NaN or inf pixel, is refused there with the stage and the
batch named, before any statistic is updated.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from gdws_approx.checks import check_integer

__all__ = ["checked_batches", "take_samples"]

#: What a loader must yield, for the messages.
BATCH_FORM = "a tensor of images or an (images, labels, ...) tuple or list of tensors"


def checked_batches(
    loader: Iterable,
    stage: str,
    *,
    n_samples: int | None = None,
    labels: bool = False,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yield the batches of ``loader`` as ``(images, *rest)``, checked, up to ``n_samples``.

    Parameters
    ----------
    loader : iterable
        Yields image tensors or ``(images, labels, ...)`` tuples (a ``DataLoader``).
    stage : str
        What reads the data (e.g. ``"BatchNorm re-estimation"``), for the messages.
    n_samples : int, optional
        Stop after this many samples in all, the last batch cut to them (every batch when
        ``None``). A loader that runs out earlier simply ends.
    labels : bool, default=False
        Each batch must carry labels: a loader of bare images is refused.

    Yields
    ------
    tuple of torch.Tensor
        ``(images, *rest)``: every element of the batch, cut to the samples still needed
        (a bare tensor batch gives ``(images,)``). Labels become tensors.

    Raises
    ------
    TypeError
        A batch is neither a tensor nor a tuple or list whose first element is a tensor
        (e.g. a dict): the message says what a batch must be.
    ValueError
        ``labels`` is asked for and a batch has none; the images kept from a batch hold a
        NaN or inf: the message names ``stage``, the batch and the sample (from 1).
        Raised before the batch is yielded, so nothing has used it.
    """
    seen = 0
    for number, batch in enumerate(loader, start=1):
        parts = _batch_parts(batch, stage, number, labels)
        if n_samples is not None:
            parts = tuple(part[: n_samples - seen] for part in parts)
        _check_finite(parts[0], stage, number)
        seen += len(parts[0])
        yield parts
        if n_samples is not None and seen >= n_samples:
            return


def take_samples(
    loader: Iterable,
    n_samples: int,
    *,
    stage: str,
    labels: bool = False,
    device: Any = None,
    name: str = "n_samples",
    hint: str = "",
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yield the batches of ``loader`` cut at ``n_samples`` samples in all, checked.

    Parameters
    ----------
    loader : iterable
        Yields image tensors or ``(images, labels, ...)`` tuples (a ``DataLoader``).
    n_samples : int
        How many samples to yield, ``>= 1``.
    stage : str
        What reads the data, for the messages (see :func:`checked_batches`).
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
        ``(images, *rest)`` as :func:`checked_batches` yields them, on ``device``.

    Raises
    ------
    TypeError, ValueError
        As :func:`checked_batches`; also a ``ValueError`` when the loader runs out before
        ``n_samples`` samples (raised once the last batch has been consumed).
    """
    n_samples = check_integer(n_samples, name, minimum=1)
    seen = 0
    for parts in checked_batches(loader, stage, n_samples=n_samples, labels=labels):
        if device is not None:
            parts = tuple(part.to(device) for part in parts)
        seen += len(parts[0])
        yield parts
    if seen < n_samples:
        message = f"the loader ran out after {seen} samples; {name}={n_samples} asks for more."
        raise ValueError(f"{message} {hint}".rstrip())


def _batch_parts(batch: Any, stage: str, number: int, labels: bool) -> tuple[torch.Tensor, ...]:
    parts = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
    if not parts or not isinstance(parts[0], torch.Tensor):
        kind = type(batch).__name__
        if not parts:
            got = f"an empty {kind}"
        elif isinstance(batch, (tuple, list)):
            got = f"a {kind} whose first element is a {type(parts[0]).__name__}"
        else:
            got = f"a {kind}"
        hint = ""
        if isinstance(batch, dict):
            hint = (
                " For a loader of dicts, pass e.g. "
                "((b['image'], b['label']) for b in loader) or set the DataLoader's collate_fn."
            )
        raise TypeError(
            f"{stage}: the loader must yield {BATCH_FORM}; batch {number} is {got}.{hint}"
        )
    if parts[0].ndim == 0:
        raise ValueError(
            f"{stage}: batch {number} of the loader has 0-d images; they must have shape "
            "(N, ...), one sample per row."
        )
    if labels and len(parts) < 2:
        raise ValueError(
            f"{stage}: the loader must yield (images, labels) batches; batch {number} is a "
            f"{type(batch).__name__}."
        )
    return (parts[0], *(torch.as_tensor(part) for part in parts[1:]))


def _check_finite(images: torch.Tensor, stage: str, number: int) -> None:
    if not images.is_floating_point() and not images.is_complex():
        return  # integers are finite
    finite = torch.isfinite(images)
    if bool(finite.all()):
        return
    sample = int((~finite.reshape(len(images), -1).all(1)).nonzero()[0])
    value = images.reshape(-1)[~finite.reshape(-1)][0].item()
    raise ValueError(
        f"{stage}: the loader's batch {number}, sample {sample + 1} (both counted from 1) "
        f"holds {value}; every input must be a finite number (check the data and its "
        "transforms)."
    )
