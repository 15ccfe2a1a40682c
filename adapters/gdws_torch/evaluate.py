"""Natural, per-attack and union robust accuracy of a classifier over a loader."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["evaluate"]


def evaluate(
    model: nn.Module,
    loader: Iterable,
    attacks: Mapping[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] | None = None,
    *,
    n_samples: int | None = None,
    device: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Accuracy on natural inputs, under each attack, and under their union.

    A sample counts for the union only if it is classified correctly on its natural
    input *and* under every attack of the set (the paper's union of l_inf, l_2, l_1).

    Parameters
    ----------
    model : torch.nn.Module
        Takes pixels in ``[0, 1]`` and returns logits. Evaluated in eval mode; its
        mode is restored afterwards.
    loader : iterable of (images, labels)
    attacks : mapping of str to callable, optional
        ``{name: attack(images, labels) -> images}``, e.g. ``{"l_inf": PGD(model, ...)}``.
    n_samples : int, optional
        Stop after this many samples (all of the loader by default).
    device : optional
        Where to run (default: the model's parameters' device).
    progress : bool, default=True

    Returns
    -------
    dict
        ``{"n_samples": N, "natural": %, "attacks": {name: %}, "union": % or None}``,
        accuracies in percent.
    """
    attacks = dict(attacks or {})
    for name, attack in attacks.items():
        if not callable(attack):
            raise TypeError(f"attacks[{name!r}] must be callable; got {type(attack).__name__}.")
    if n_samples is not None and (
        isinstance(n_samples, bool) or not isinstance(n_samples, numbers.Integral) or n_samples < 1
    ):
        raise ValueError(f"n_samples must be a positive integer or None; got {n_samples!r}.")
    if device is None:
        device = next(iter(model.parameters())).device
    modes = [(module, module.training) for module in model.modules()]
    seen = 0
    natural = torch.zeros((), dtype=torch.long)
    per_attack = {name: torch.zeros((), dtype=torch.long) for name in attacks}
    union = torch.zeros((), dtype=torch.long)
    bar = tqdm(total=n_samples, desc="evaluate", unit="sample", disable=not progress)
    try:
        model.eval()
        for images, labels in loader:
            if n_samples is not None:
                images, labels = images[: n_samples - seen], labels[: n_samples - seen]
            images, labels = images.to(device), labels.to(device)
            with torch.no_grad():
                correct = model(images).argmax(1) == labels
            natural += correct.sum().cpu()
            robust = correct.clone()
            for name, attack in attacks.items():
                adversarial = attack(images, labels)
                model.eval()
                with torch.no_grad():
                    survived = model(adversarial).argmax(1) == labels
                per_attack[name] += survived.sum().cpu()
                robust &= survived
            union += robust.sum().cpu()
            seen += len(labels)
            bar.update(len(labels))
            if n_samples is not None and seen >= n_samples:
                break
    finally:
        bar.close()
        for module, training in modes:
            module.training = training
    if seen == 0:
        raise ValueError("the loader yielded no samples.")

    def percent(count: torch.Tensor) -> float:
        return 100.0 * int(count) / seen

    return {
        "n_samples": seen,
        "natural": percent(natural),
        "attacks": {name: percent(count) for name, count in per_attack.items()},
        "union": percent(union) if attacks else None,
    }
