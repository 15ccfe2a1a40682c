"""BatchNorm statistics re-estimated after the approximation (training-free recovery).

Replacing convolutions by GDWS ones shifts the distribution of every later layer's
inputs, while the BatchNorm layers still normalise with the statistics of the dense
network; re-estimating those running statistics on a few hundred unlabelled inputs, with
no weight changed, recovers much of what was lost.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from gdws_approx.checks import check_integer
from gdws_torch.common import take_samples

__all__ = ["batchnorm_layers", "recalibrate_batchnorm"]

_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """The BatchNorm layers of ``model`` that keep running statistics."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, _BATCHNORM) and module.track_running_stats
    ]


def recalibrate_batchnorm(
    model: nn.Module,
    loader: Iterable,
    n_samples: int = 1000,
    *,
    natural: bool = True,
    attack: Callable[[nn.Module], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
    | None = None,
    inplace: bool = False,
    device: Any = None,
    progress: bool = True,
) -> nn.Module:
    """Re-estimate the running mean and variance of every BatchNorm layer of ``model``.

    The statistics are reset and recomputed as plain averages (``momentum=None``) over
    ``n_samples`` inputs of ``loader``: the natural inputs, adversarial ones, or both.
    Weights, biases and every other buffer stay as they are.

    Parameters
    ----------
    model : torch.nn.Module
        Typically a GDWS-converted model. Copied unless ``inplace=True``.
    loader : iterable of images or of (images, labels)
        Labels are needed only for adversarial inputs.
    n_samples : int, default=1000
        Inputs averaged over (of each kind). The loader must have that many.
    natural : bool, default=True
        Use the natural inputs.
    attack : callable, optional
        ``attack(model) -> attack(images, labels)``, e.g.
        ``lambda m: PGD(m, eps=8/255, alpha=2/255, steps=10)``: adversarial inputs are
        crafted against a frozen copy of ``model`` as it was before the recalibration and
        used as well.
    inplace : bool, default=False
    device : optional
        Default: the model's parameters' device.
    progress : bool, default=True

    Returns
    -------
    torch.nn.Module
        The recalibrated model (unchanged, with a ``UserWarning``, when it has no
        BatchNorm layer with running statistics) (``model`` itself when ``inplace``), in ``model``'s
        train/eval modes.

    Raises
    ------
    ValueError
        Bad ``n_samples``, neither ``natural`` nor ``attack``, a loader with fewer samples,
        inputs whose shape the model rejects, or adversarial inputs without labels.
    TypeError
        ``model`` not a module, ``n_samples`` not an integer, ``attack`` not callable.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    check_integer(n_samples, "n_samples", minimum=1)
    if not natural and attack is None:
        raise ValueError("nothing to recalibrate on: natural=False and no attack.")
    if attack is not None and not callable(attack):
        raise TypeError(f"attack must be callable (model -> attack); got {type(attack).__name__}.")
    if not batchnorm_layers(model):
        warnings.warn(
            f"{type(model).__name__} has no BatchNorm layer with running statistics: "
            "nothing to recalibrate; the model is returned unchanged.",
            stacklevel=2,
        )
        return model if inplace else copy.deepcopy(model)
    # Work on a copy even in place, so that a failure half-way leaves ``model`` as it was.
    target = copy.deepcopy(model)
    if device is None:
        device = next(iter(target.parameters())).device
    crafter = None
    if attack is not None:
        frozen = copy.deepcopy(target).eval()
        crafter = attack(frozen)
    layers = batchnorm_layers(target)
    modes = [(module, module.training) for module in target.modules()]
    momenta = [(module, module.momentum) for _, module in layers]
    total = n_samples * (int(natural) + int(crafter is not None))
    bar = tqdm(total=total, desc="BatchNorm statistics", unit="sample", disable=not progress)
    try:
        target.eval()
        for _, module in layers:
            module.reset_running_stats()
            module.momentum = None  # a cumulative average over every batch
            module.train()
        for images, *rest in take_samples(
            loader,
            n_samples,
            stage="BatchNorm re-estimation",
            labels=crafter is not None,
            device=device,
        ):
            inputs = [images] if natural else []
            if crafter is not None:
                inputs.append(crafter(images, rest[0]).detach())
            with torch.no_grad():
                for x in inputs:
                    try:
                        target(x)
                    except RuntimeError as exc:
                        raise ValueError(
                            f"the model rejects the loader's inputs of shape {tuple(x.shape)}: "
                            f"{str(exc).splitlines()[0]}"
                        ) from None
                    bar.update(len(x))
    finally:
        bar.close()
        for module, momentum in momenta:
            module.momentum = momentum
        for module, training in modes:
            module.training = training
    if inplace:
        with torch.no_grad():
            for (_, mine), (_, theirs) in zip(batchnorm_layers(model), layers, strict=True):
                mine.running_mean.copy_(theirs.running_mean)
                mine.running_var.copy_(theirs.running_var)
                mine.num_batches_tracked.copy_(theirs.num_batches_tracked)
        return model
    return target
