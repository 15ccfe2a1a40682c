"""Calibration inputs: the first training inputs, adversarial when an attack crafts them.

The one crafter of the library: :func:`gdws_torch.recipe_inputs` crafts a recipe's
calibration inputs with it (read then by the refit, the latency planner's input moments
and any later recovery stage), and :func:`gdws_torch.recovery.refit_gdws` and
:func:`gdws_torch.compress_baseline` when given a loader and an attack.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from tqdm.auto import tqdm

from gdws_torch.common import take_samples

__all__ = ["calibration_inputs"]


def calibration_inputs(
    data: Iterable,
    n_samples: int,
    crafter: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    *,
    device: Any = None,
    progress: bool = False,
    stage: str = "calibration",
    name: str = "n_samples",
    hint: str = "",
) -> list[tuple[torch.Tensor, ...]]:
    """The first ``n_samples`` inputs of ``data``, in its batches, crafted by ``crafter``.

    Parameters
    ----------
    data : iterable of images or (images, labels, ...)
        Training data (a ``DataLoader``), read in its order.
    n_samples : int
        How many inputs, ``>= 1``; ``data`` must have that many.
    crafter : callable, optional
        ``crafter(images, labels) -> images``, an attack object built on the model the
        inputs are made adversarial against (``data`` must then carry labels);
        ``None``: the natural inputs.
    device : torch.device or str, optional
        Where the inputs go (where the loader puts them when ``None``).
    progress : bool, default=False
        A progress bar over the inputs.
    stage : str, default="calibration"
        What reads the data, for the messages (:func:`gdws_torch.common.take_samples`).
    name : str, default="n_samples"
        The setting that asked for ``n_samples``, for the message when ``data`` has fewer.
    hint : str, default=""
        Added to that message (how to ask for fewer).

    Returns
    -------
    list of tuple of torch.Tensor
        One ``(images, *rest)`` per batch, as the loader gave it (labels kept when
        present), the images replaced by the crafted ones (detached).

    Raises
    ------
    ValueError
        ``data`` has fewer inputs, or no labels while ``crafter`` needs them; a batch
        that is not ``(images, labels, ...)`` or holds NaN or inf
        (:func:`gdws_torch.common.checked_batches`).
    """
    kind = "adversarial calibration" if crafter is not None else "calibration"
    batches = take_samples(
        data,
        n_samples,
        stage=stage,
        labels=crafter is not None,
        device=device,
        name=name,
        hint=hint,
    )
    inputs = []
    with tqdm(total=n_samples, desc=kind, unit="input", disable=not progress) as bar:
        for images, *rest in batches:
            if crafter is not None:
                images = crafter(images, rest[0]).detach()
            inputs.append((images, *rest))
            bar.update(len(images))
    return inputs
