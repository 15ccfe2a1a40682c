"""Training-free recovery after the approximation.

- :func:`recalibrate_batchnorm`: replacing convolutions by GDWS ones shifts the
  distribution of every later layer's inputs, while the BatchNorm layers still normalise
  with the statistics of the dense network; re-estimating those running statistics on a
  few hundred unlabelled inputs, with no weight changed, recovers much of what was lost.
- :func:`refit_pointwise`: each GDWS layer's ``1 x 1`` weights are re-solved, layer after
  layer, by least squares so that its output matches the dense convolution's on the
  inputs the converted network really feeds it (natural or adversarial calibration
  inputs); the depthwise kernels, hence the MACs, stay as they are.
"""

from __future__ import annotations

import copy
import numbers
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["batchnorm_layers", "calibration_inputs", "recalibrate_batchnorm", "refit_pointwise"]

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
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    if isinstance(n_samples, bool) or not isinstance(n_samples, numbers.Integral) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer; got {n_samples!r}.")
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
        seen = 0
        for batch in loader:
            images, labels = (
                (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
            )
            images = images[: n_samples - seen].to(device)
            if labels is not None:
                labels = torch.as_tensor(labels)[: n_samples - seen].to(device)
            inputs = []
            if natural:
                inputs.append(images)
            if crafter is not None:
                if labels is None:
                    raise ValueError("adversarial recalibration needs (images, labels) batches.")
                inputs.append(crafter(images, labels).detach())
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
            seen += len(images)
            if seen >= n_samples:
                break
        if seen < n_samples:
            raise ValueError(
                f"the loader ran out after {seen} samples; n_samples={n_samples} asks for more."
            )
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


def calibration_inputs(
    loader: Iterable, n_samples: int, dense: nn.Module, attack: Any, device: Any
) -> list[torch.Tensor]:
    """``n_samples`` inputs of ``loader`` in batches; adversarial against ``dense`` if asked."""
    batches, seen = [], 0
    crafter = None if attack is None else attack(copy.deepcopy(dense).eval())
    for batch in loader:
        images, labels = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
        images = images[: n_samples - seen].to(device)
        if crafter is not None:
            if labels is None:
                raise ValueError("adversarial calibration needs (images, labels) batches.")
            labels = torch.as_tensor(labels)[: n_samples - seen].to(device)
            images = crafter(images, labels).detach()
        batches.append(images)
        seen += len(images)
        if seen >= n_samples:
            return batches
    raise ValueError(
        f"the loader ran out after {seen} samples; n_samples={n_samples} asks for more."
    )


def refit_pointwise(
    dense: nn.Module,
    converted: nn.Module,
    loader: Iterable,
    n_samples: int = 1000,
    *,
    attack: Callable[[nn.Module], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
    | None = None,
    ridge: float = 1e-4,
    inplace: bool = False,
    progress: bool = True,
) -> nn.Module:
    """Re-solve the pointwise weights of every GDWS layer to match the dense conv's output.

    In execution order, for each :class:`~gdws_torch.GDWSConv2d` ``L`` of ``converted``
    (replacing the conv ``W`` of ``dense`` with the same name): with ``x`` the inputs
    ``converted`` feeds ``L`` (earlier layers already refitted) and ``d(x)`` its depthwise
    outputs, ``P = argmin ||W * x - P d(x)||^2 + ridge * mean(diag) * ||P||^2`` over all
    calibration inputs and positions (normal equations accumulated batch by batch, solved
    in float64). Biases, depthwise kernels and MACs are unchanged.

    Parameters
    ----------
    dense : torch.nn.Module
        The original network (read only): the target of each layer.
    converted : torch.nn.Module
        Its GDWS version (from :func:`gdws_torch.convert`); copied unless ``inplace``.
    loader : iterable of images or (images, labels)
        Calibration inputs (training data; labels only for ``attack``).
    n_samples : int, default=1000
    attack : callable, optional
        ``attack(model) -> attack(images, labels)``: calibrate on adversarial inputs
        crafted against ``dense`` instead (measured best for robust accuracy).
    ridge : float, default=1e-4
        Relative Tikhonov regularisation of the least squares.
    inplace, progress : bool

    Returns
    -------
    torch.nn.Module
        The refitted model, in ``converted``'s train/eval modes.
    """
    from gdws_torch.layers import GDWSConv2d

    if isinstance(n_samples, bool) or not isinstance(n_samples, numbers.Integral) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer; got {n_samples!r}.")
    if not (isinstance(ridge, numbers.Real) and ridge >= 0):
        raise ValueError(f"ridge must be a non-negative number; got {ridge!r}.")
    target = copy.deepcopy(converted)
    dense_modules = dict(dense.named_modules())
    layers = [(n, m) for n, m in target.named_modules() if isinstance(m, GDWSConv2d)]
    if not layers:
        raise ValueError("converted has no GDWSConv2d layer: nothing to refit.")
    for name, layer in layers:
        conv = dense_modules.get(name)
        if not isinstance(conv, nn.Conv2d) or conv.weight.shape[:2] != (
            layer.out_channels,
            layer.in_channels,
        ):
            raise ValueError(
                f"dense has no conv {name!r} matching the GDWS layer ({layer.out_channels}x"
                f"{layer.in_channels}); pass the model converted was made from."
            )
    device = next(iter(target.parameters())).device
    batches = calibration_inputs(loader, n_samples, dense, attack, device)
    modes = [(module, module.training) for module in target.modules()]
    bar = tqdm(total=len(layers), desc="refit pointwise", unit="layer", disable=not progress)
    try:
        target.eval()
        for name, layer in layers:
            conv = dense_modules[name]
            weight = conv.weight.detach().to(device=device, dtype=torch.float64)
            g = layer.n_kernels
            gram = torch.zeros(g, g, dtype=torch.float64, device=device)
            cross = torch.zeros(layer.out_channels, g, dtype=torch.float64, device=device)
            captured: dict[str, torch.Tensor] = {}

            def capture(module, inputs, captured=captured):
                captured["x"] = inputs[0].detach()

            handle = layer.register_forward_pre_hook(capture)
            try:
                for images in batches:
                    with torch.no_grad():
                        target(images)
                        x = captured["x"].to(torch.float64)
                        # The layers' own forward (every padding mode), in float64.
                        depthwise = layer.depthwise
                        features = depthwise._conv_forward(
                            x.index_select(1, layer.kernel_channels),
                            depthwise.weight.to(torch.float64),
                            None,
                        )
                        wanted = conv._conv_forward(x, weight, None)
                        f = features.transpose(0, 1).reshape(g, -1)
                        y = wanted.transpose(0, 1).reshape(layer.out_channels, -1)
                        gram += f @ f.T
                        cross += y @ f.T
            finally:
                handle.remove()
            scale = torch.diagonal(gram).mean().clamp_min(1e-30)
            regular = gram + ridge * scale * torch.eye(g, dtype=torch.float64, device=device)
            try:
                solution = torch.linalg.solve(regular, cross.T).T  # (M, G)
            except RuntimeError:  # singular (e.g. ridge=0 and collinear features)
                solution = (torch.linalg.pinv(regular, hermitian=True) @ cross.T).T
            with torch.no_grad():
                pointwise = layer.pointwise.weight
                pointwise.copy_(solution.to(pointwise.dtype).view_as(pointwise))
            bar.update()
    finally:
        bar.close()
        for module, training in modes:
            module.training = training
    if inplace:
        converted.load_state_dict(target.state_dict())
        return converted
    return target
