"""The checks every attack makes: its settings when built, the batch when called.

Public functions shared by the attacks (:class:`~gdws_torch.robustness.attacks.Attack`
and its subclasses), the evaluation and the gradient-masking checks. Each raises
``TypeError`` for a value of the wrong type and ``ValueError`` for a wrong value, and
names the argument and the value received.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from gdws_approx.checks import check_integer, check_real

__all__ = [
    "NORMS",
    "autograd_tensors",
    "check_autograd",
    "check_batch",
    "check_call",
    "check_eps",
    "check_flag",
    "check_input_dtype",
    "check_labels",
    "check_model",
    "check_norm",
    "check_sample_ids",
    "check_seed",
]

#: The threat models, spelled as torchattacks spells them.
NORMS = ("Linf", "L2", "L1")


def check_model(model: Any) -> nn.Module:
    """``model`` if it is a ``torch.nn.Module``, else a ``TypeError``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    return model


def check_norm(norm: Any, allowed: tuple[str, ...] = NORMS) -> str:
    """``norm`` if it is one of ``allowed`` (by default :data:`NORMS`)."""
    names = [repr(n) for n in allowed]
    choices = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    if not isinstance(norm, str):
        raise TypeError(f"norm must be {choices}; got {norm!r} ({type(norm).__name__}).")
    if norm not in allowed:
        raise ValueError(f"norm must be {choices}; got {norm!r}.")
    return norm


def check_seed(seed: Any) -> int:
    """``seed`` as an ``int >= 0`` (an attack's random numbers come from it alone)."""
    return check_integer(seed, "seed", minimum=0)


def check_flag(value: Any, name: str) -> bool:
    """``value`` if it is a ``bool`` (``1`` or ``"yes"`` are refused: a likely slip)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {value!r} ({type(value).__name__}).")
    return value


def check_eps(eps: Any, norm: str) -> float:
    """``eps`` as a float: a radius in pixel units, ``> 0``, and ``<= 1`` for ``"Linf"``.

    An Linf radius above 1 covers the whole pixel box ``[0, 1]``: it is refused here, with
    the message of every ``epsilon`` of the library (``8`` for ``8/255`` is the usual slip).
    An L2 or L1 radius can exceed 1 (``0.5`` and ``12`` are common on CIFAR-10); its
    bound, the pixel box's diameter, depends on the image size and is checked at the call
    (:func:`check_call`).

    Parameters
    ----------
    eps : float
    norm : str
        ``"Linf"``, ``"L2"`` or ``"L1"``; another value (a custom attack's) checks only
        ``eps > 0``.
    """
    maximum = 1 if norm == "Linf" else None
    return check_real(eps, "eps", minimum=0, strict=True, maximum=maximum, unit="pixel units")


def check_call(attack: Any, images: Any, labels: Any, *, gradients: bool = True) -> int:
    """Everything an attack checks when called; return the largest label (``-1`` if empty).

    The batch (:func:`check_batch`); that the call can take gradients (``gradients``: not
    under ``torch.inference_mode()``); that the images have the dtype of the model's
    floating parameters; and that ``attack.eps`` is at most the diameter of the pixel box
    in ``attack.norm`` (``sqrt(D)`` for L2 and ``D`` for L1, ``D`` values per image: a
    larger radius reaches every image, a sign of ``eps`` in ``1/255`` units).

    Parameters
    ----------
    attack : object
        Has ``model``, ``eps`` and ``norm`` (the library's attacks and ensembles).
    images, labels : torch.Tensor
    gradients : bool, default=True
        The attack takes gradients (``False`` for a black-box attack such as Square).

    Raises
    ------
    TypeError
        A bad batch; images whose dtype is not the model's (both dtypes named).
    RuntimeError
        Called under ``torch.inference_mode()`` by an attack that takes gradients.
    ValueError
        A bad batch; ``eps`` larger than the pixel box's diameter.
    """
    top = check_batch(images, labels)
    if gradients:
        check_autograd(type(attack).__name__)
    check_input_dtype(attack.model, images)
    norm = getattr(attack, "norm", "")
    values = math.prod(images.shape[1:])
    diameter = {"L2": math.sqrt(values), "L1": float(values)}.get(norm)
    if diameter is not None and attack.eps > diameter:
        raise ValueError(
            f"eps must be at most the {norm} diameter of the pixel box [0, 1] for images of "
            f"shape {tuple(images.shape[1:])} ({diameter:.4g}: a larger ball holds every "
            f"image); got {attack.eps:g}. eps is in pixel units, not 1/255 units."
        )
    return top


def check_autograd(what: str) -> None:
    """Refuse a call under ``torch.inference_mode()``, which disables autograd: ``what``
    (an attack's name, for the message) takes gradients with respect to its input.

    Raises
    ------
    RuntimeError
        Saying to call ``what`` outside ``torch.inference_mode()``.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{what} needs autograd (the gradient of the loss with respect to the input), "
            f"which torch.inference_mode() disables: call {what} outside "
            "torch.inference_mode() (torch.no_grad() is fine)."
        )


def autograd_tensors(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tensors``, those made under ``torch.inference_mode()`` cloned (outside it, a clone
    is a normal tensor), so that autograd may save them for the backward pass."""
    return tuple(t.clone() if t.is_inference() else t for t in tensors)


def check_input_dtype(model: nn.Module, images: torch.Tensor) -> None:
    """Refuse ``images`` whose dtype is none of the model's floating parameters' dtypes.

    A model without floating parameters accepts any floating dtype.

    Raises
    ------
    TypeError
        The message names both dtypes and how to match them.
    """
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes and images.dtype not in dtypes:
        wanted = " or ".join(sorted(str(d) for d in dtypes))
        example = sorted(str(d) for d in dtypes)[0].removeprefix("torch.")
        raise TypeError(
            f"images have dtype {images.dtype} but the model's parameters are {wanted}: "
            f"convert the images (images.to(torch.{example})) or the model."
        )


def check_batch(images: Any, labels: Any) -> int:
    """Validate a batch of pixels and labels; return the largest label (``-1`` if empty)."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise TypeError("images must be a floating-point torch.Tensor of pixels in [0, 1].")
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.long:
        raise TypeError("labels must be a torch.LongTensor of class indices.")
    if images.ndim < 2:
        raise ValueError(
            f"images must have shape (N, ...) with one sample per row; got {tuple(images.shape)}."
        )
    if labels.shape != images.shape[:1]:
        raise ValueError(
            f"labels must have shape ({images.shape[0]},) to match images; got "
            f"{tuple(labels.shape)}."
        )
    if images.numel():
        low, high = float(images.min()), float(images.max())
        if not (0 <= low and high <= 1):  # NaN fails too
            raise ValueError(
                f"images must be pixels in [0, 1] (normalise inside the model); got values "
                f"in [{low:.4g}, {high:.4g}]."
            )
    return check_labels(labels)


def check_sample_ids(sample_ids: Any, n: int) -> torch.Tensor | None:
    """``sample_ids`` as ``n`` non-negative indices on the CPU (``None`` stays ``None``)."""
    if sample_ids is None:
        return None
    ids = torch.as_tensor(sample_ids)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.shape != (n,):
        raise ValueError(
            f"sample_ids must be {n} integer sample indices, one per image; got "
            f"{ids.dtype} of shape {tuple(ids.shape)}."
        )
    if n and int(ids.min()) < 0:
        raise ValueError(f"sample_ids must be non-negative; got {int(ids.min())}.")
    return ids.cpu()


def check_labels(labels: torch.Tensor, n_classes: int | None = None, top: int | None = None) -> int:
    """Refuse labels that are not class indices in ``[0, n_classes)``; return the largest.

    Parameters
    ----------
    labels : torch.Tensor
        Class indices, an integer tensor (a floating-point one must hold integers).
    n_classes : int, optional
        The number of classes (the model's logits); without it, only ``>= 0`` is checked.
    top : int, optional
        The largest label, when already known: nothing is computed then (no device sync).

    Returns
    -------
    int
        The largest label, ``-1`` when ``labels`` is empty.

    Raises
    ------
    TypeError
        ``labels`` is not a tensor of numbers.
    ValueError
        A label is negative, not an integer, or ``>= n_classes``: the message names it.
    """
    if top is None:
        if (
            not isinstance(labels, torch.Tensor)
            or labels.dtype == torch.bool
            or labels.is_complex()
        ):
            kind = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise TypeError(f"labels must be a tensor of class indices; got {kind}.")
        if labels.is_floating_point():
            wrong = labels != labels.round()  # NaN too
            if bool(wrong.any()):
                value = float(labels[wrong][0])
                raise ValueError(f"labels must be integer class indices; got {value!r}.")
        if labels.numel() == 0:
            return -1
        low, high = (int(v) for v in torch.aminmax(labels))
        if low < 0:
            raise ValueError(f"labels must be class indices >= 0; got {low}.")
        top = high
    if n_classes is not None and top >= n_classes:
        raise ValueError(
            f"labels must be class indices in [0, {n_classes}) (the model returns {n_classes} "
            f"logits); got {top}."
        )
    return top
