"""Standard and PGD adversarial training (Madry et al.), used to build the demo model."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from gdws_approx.checks import check_integer, check_real
from gdws_torch.common import checked_batches
from gdws_torch.nn.module_tree import eval_mode

__all__ = ["accuracy", "random_crop_flip", "train"]


def accuracy(model: nn.Module, loader: Iterable, device: Any = None) -> float:
    """Natural accuracy in percent (eval mode, restored afterwards)."""
    if device is None:
        device = next(iter(model.parameters())).device
    correct = total = 0
    with eval_mode(model), torch.no_grad():
        for images, labels, *_ in checked_batches(loader, "accuracy", labels=True):
            images, labels = images.to(device), labels.to(device)
            correct += int((model(images).argmax(1) == labels).sum())
            total += len(labels)
    if total == 0:
        raise ValueError("the loader yielded no samples.")
    return 100.0 * correct / total


def random_crop_flip(
    images: torch.Tensor,
    padding: int = 4,
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The usual CIFAR augmentation on a batch: random crop after zero padding, and flip.

    ``generator`` is a CPU generator (the random offsets are drawn on the CPU).
    """
    check_integer(padding, "padding", minimum=0)
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError("images must be a 4-D tensor (N, C, H, W).")
    n, c, h, w = images.shape
    padded = F.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    device = images.device
    rows = (dy[:, None] + torch.arange(h)).to(device)[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w)).to(device)[:, None, None, :]
    batch = torch.arange(n, device=device)[:, None, None, None]
    out = padded[batch, torch.arange(c, device=device)[None, :, None, None], rows, cols]
    if flip:
        mirrored = (torch.rand(n, generator=generator) < 0.5).to(device)
        out = torch.where(mirrored[:, None, None, None], out.flip(3), out)
    return out


def train(
    model: nn.Module,
    loader: Iterable,
    *,
    epochs: int,
    lr: float = 0.05,
    weight_decay: float = 5e-4,
    attack: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    test_loader: Iterable | None = None,
    device: Any = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` in place with SGD (momentum 0.9, Nesterov) and a one-cycle schedule.

    With ``attack`` this is PGD adversarial training: every batch is replaced by its
    adversarial version (crafted in eval mode, as our attacks do), then trained on in
    train mode.

    Parameters
    ----------
    model : torch.nn.Module
        Takes pixels in ``[0, 1]``. Trained in place and left in eval mode.
    loader : sized iterable of (images, labels)
        Training batches (shuffle them), e.g. a ``DataLoader``; iterated once per epoch.
    epochs : int
    lr : float, default=0.05
        Peak learning rate.
    weight_decay : float, default=5e-4
    attack : callable, optional
        ``attack(images, labels) -> images``, e.g. ``PGD(model, ...)``.
    augment : callable, optional
        ``augment(images) -> images``, applied before the attack (e.g.
        :func:`random_crop_flip`).
    test_loader : iterable, optional
        Natural test accuracy after every epoch.
    device, progress, log
        Where to run, whether to show a progress bar, and a function receiving one
        summary line per epoch.

    Returns
    -------
    list of dict
        Per epoch: ``epoch``, ``loss``, ``train_accuracy`` (on the inputs trained on), and
        ``test_accuracy`` when ``test_loader`` is given.

    Raises
    ------
    FloatingPointError
        The loss (or, after the last step, a weight) became NaN or inf: training stops at
        once, naming the epoch and batch (typically the learning rate is too high). The
        model is left with the weights of that step.
    """
    check_integer(epochs, "epochs", minimum=1)
    check_real(lr, "lr", minimum=0, strict=True)
    try:
        steps_per_epoch = len(loader)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            "loader must have a length (e.g. a torch DataLoader): the learning-rate schedule "
            f"needs the number of batches per epoch; got a {type(loader).__name__}."
        ) from None
    if steps_per_epoch == 0:
        raise ValueError("loader yields no batches.")
    if device is None:
        device = next(iter(model.parameters())).device
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch
    )
    history = []
    for epoch in range(1, epochs + 1):
        total_loss = correct = seen = 0.0
        bar = tqdm(loader, desc=f"epoch {epoch}/{epochs}", unit="batch", disable=not progress)
        batches = checked_batches(bar, "training", labels=True)
        for batch, (images, labels, *_) in enumerate(batches, start=1):
            if augment is not None:
                images = augment(images)
            images, labels = images.to(device), labels.to(device)
            if attack is not None:
                images = attack(images, labels)
            model.train()
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
            value = float(loss.detach())
            if not math.isfinite(value):
                bar.close()
                raise FloatingPointError(
                    f"training diverged: the loss became {value} at epoch {epoch}, batch "
                    f"{batch}; lower the learning rate (lr={lr!r})."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += value * len(labels)
            correct += float((logits.argmax(1) == labels).sum())
            seen += len(labels)
        bar.close()
        record = {
            "epoch": epoch,
            "loss": total_loss / seen,
            "train_accuracy": 100.0 * correct / seen,
        }
        if test_loader is not None:
            record["test_accuracy"] = accuracy(model, test_loader, device)
        history.append(record)
        if log is not None:
            log(
                f"epoch {epoch}: loss {record['loss']:.4f}, train acc "
                f"{record['train_accuracy']:.2f} %"
                + (f", test acc {record['test_accuracy']:.2f} %" if test_loader else "")
            )
    model.eval()
    model.zero_grad(set_to_none=True)
    broken = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if broken:
        raise FloatingPointError(
            f"training diverged: the weights became NaN or inf in the last step (e.g. "
            f"{broken[:3]}); lower the learning rate (lr={lr!r})."
        )
    return history
