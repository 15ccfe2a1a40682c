"""Noise gains: the per-input-channel error weights ``alpha`` of every eligible layer.

For a classifier with logits ``z(x)``, predicted class ``t = argmax z(x)``, and a layer
with weight ``W`` of shape ``(M, C, Kh, Kw)``, over ``N`` inputs (DESIGN section 4)::

    alpha_c = (1/N) sum_x sum_{j != t} ||d(z_t - z_j)/dW[:, c]||_F^2 / (2 (z_t - z_j)^2 M Kh Kw)

How it is computed (batched over samples, never one sample at a time):

1. one forward pass per chunk of samples (eval mode), with hooks keeping each eligible
   layer's input and output;
2. one backward pass per class ``k`` for the whole chunk, with ``e_t - e_k`` as the
   logits' gradient, taking gradients with respect to the layers' *outputs* only (no
   weight gradients, no per-sample gradients materialised by autograd);
3. per layer, the per-sample, per-input-channel squared norms of the weight gradient
   ``dW[n, :, c] = g[n] X[n, c]^T`` (``g``: output gradient ``(M, P)``, ``X[n, c]``:
   the input patches ``(K2, P)``, ``P`` output positions) in one of two forms, chosen per
   layer by their cost:

   - *materialize*: the per-sample gradient ``g[n] @ X[n]^T`` (a batched GEMM of
     ``M * P * C * K2`` MACs per sample and class), squared and summed per channel;
   - *gram*: ``||dW[n, :, c]||^2 = sum_{p,q} (g^T g)[p, q] (X_c^T X_c)[p, q]``, with the
     patch Gram ``X_c^T X_c`` computed once per chunk and shared by all classes
     (``P^2 * (M + C)`` MACs per sample and class): far cheaper when the output is small
     (deep layers), far dearer when it is large.

The patches are unfolded once per chunk, not once per class.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from gdws_torch.eligibility import LayerPredicate, eligible_convs

__all__ = ["METHODS", "choose_form", "noise_gains", "reference_noise_gains"]

METHODS = ("auto", "gram", "materialize")
# The gram form keeps C patch Gram matrices (P x P) per sample; cap that memory.
GRAM_BYTES = 256 * 2**20


def choose_form(n_out: int, n_in: int, kernel_area: int, n_positions: int, n_classes: int) -> str:
    """``"gram"`` or ``"materialize"``: the faster form for one layer.

    Materialize costs ``K * M * P * C * K2`` MACs per sample in GEMMs that run near the
    CPU's peak. Gram costs ``C * P^2 * K2`` once plus ``K * P^2 * (M + C)``, but its patch
    Gram matrices have an inner dimension of only ``K2`` and ``C * P^2`` entries to write
    and read again: measured 3 to 4 times slower per MAC (PreActResNet-18, 2-core CPU).
    So gram is chosen only when it needs fewer than a quarter of the MACs: in practice
    for small outputs (``P <= 64`` there), where materialize writes ``M * C * K2``
    numbers per sample and class for a product with a tiny inner dimension ``P``.
    """
    m, c, k2, p, k = n_out, n_in, kernel_area, n_positions, n_classes
    materialize = k * m * p * c * k2
    gram = c * p * p * k2 + k * p * p * (m + c)
    return "gram" if 4 * gram < materialize else "materialize"


def _check_arguments(n_samples: Any, chunk_size: Any, method: Any, attack: Any) -> None:
    for name, value in (("n_samples", n_samples), ("chunk_size", chunk_size)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}.")
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}.")
    if attack is not None and not callable(attack):
        raise TypeError(
            f"attack must be None or a callable attack(images, labels) -> images; got "
            f"{type(attack).__name__}."
        )


def _chunks(loader: Iterable, n_samples: int, chunk_size: int) -> Iterator[tuple[Any, Any]]:
    """Exactly ``n_samples`` samples from ``loader``, re-batched into chunks."""
    images, labels, have = [], [], 0
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError(
                f"loader must yield (images, labels) batches; got a {type(batch).__name__}."
            )
        x, y = batch[0], batch[1]
        take = min(len(x), n_samples - have)
        images.append(x[:take])
        labels.append(y[:take])
        have += take
        while sum(len(i) for i in images) >= chunk_size:
            x_all, y_all = torch.cat(images), torch.cat(labels)
            yield x_all[:chunk_size], y_all[:chunk_size]
            images, labels = [x_all[chunk_size:]], [y_all[chunk_size:]]
        if have == n_samples:
            break
    if have < n_samples:
        raise ValueError(
            f"the loader ran out after {have} samples; n_samples={n_samples} asks for more. "
            "Lower n_samples or give a longer loader."
        )
    rest = sum(len(i) for i in images)
    if rest:
        yield torch.cat(images), torch.cat(labels)


def _patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The conv's input patches ``(N, C * K2, P)``, any padding mode or ``"same"``."""
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    return F.unfold(x, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)


def _materialized_norms(grads: list[torch.Tensor], patches: torch.Tensor, c: int) -> torch.Tensor:
    """``(N, K, C)`` squared weight-gradient norms, per-sample gradients formed per class."""
    n, ck2, p = patches.shape
    patches_t = patches.transpose(1, 2).contiguous()  # (N, P, C*K2), shared by all classes
    norms = []
    for g in grads:
        per_sample = torch.bmm(g.reshape(n, -1, p), patches_t)  # (N, M, C*K2)
        norms.append(per_sample.reshape(n, -1, c, ck2 // c).square().sum((1, 3)))
    return torch.stack(norms, 1)


def _gram_norms(grads: list[torch.Tensor], patches: torch.Tensor, c: int) -> torch.Tensor:
    """``(N, K, C)`` squared weight-gradient norms from output-position Gram matrices."""
    n, ck2, p = patches.shape
    k2 = ck2 // c
    step = max(1, min(n, GRAM_BYTES // max(1, c * p * p * patches.element_size())))
    out = []
    for start in range(0, n, step):
        x = patches[start : start + step]
        m = x.shape[0]
        x = x.reshape(m * c, k2, p)
        patch_gram = torch.bmm(x.transpose(1, 2), x).reshape(m, c, p * p)  # once for all classes
        g = torch.stack([gk[start : start + step].reshape(m, -1, p) for gk in grads], 1)
        g = g.reshape(m * len(grads), -1, p)
        grad_gram = torch.bmm(g.transpose(1, 2), g).reshape(m, len(grads), p * p)
        out.append(torch.bmm(grad_gram, patch_gram.transpose(1, 2)))  # (m, K, C)
    return torch.cat(out)


class _Recorder:
    """Forward hooks keeping each layer's input and output (for one forward pass)."""

    def __init__(self, layers: list[tuple[str, nn.Conv2d]]) -> None:
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [conv.register_forward_hook(self._hook(name)) for name, conv in layers]

    def _hook(self, name: str) -> Callable:
        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if name in self.outputs:
                raise ValueError(
                    f"layer {name!r} runs more than once per forward pass; noise gains are "
                    "defined for layers called once. Exclude it with exclude=[...]."
                )
            self.inputs[name] = inputs[0].detach()
            self.outputs[name] = output

        return record

    def clear(self) -> None:
        self.inputs.clear()
        self.outputs.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _logit_weights(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted classes and ``1 / (2 (z_t - z_k)^2)`` per sample and class (0 at ``k = t``).

    A class tied with the prediction (``z_k = z_t``) has no finite term; it is left out.
    """
    z = logits.detach()
    top = z.argmax(1)
    margin = z.gather(1, top[:, None]) - z
    keep = margin != 0
    weights = torch.where(keep, 1.0 / (2.0 * margin.square().clamp_min(1e-300)), 0.0)
    return top, weights


def _chunk_sums(
    model: nn.Module,
    layers: list[tuple[str, nn.Conv2d]],
    recorder: _Recorder,
    images: torch.Tensor,
    method: str,
) -> dict[str, torch.Tensor]:
    """Sum over the chunk's samples of each layer's un-normalised noise gains, ``(C,)``."""
    recorder.clear()
    with torch.enable_grad():
        x = images.detach().requires_grad_(True)
        logits = model(x)
        if logits.ndim != 2:
            raise ValueError(
                f"the model must return logits of shape (N, classes); got {tuple(logits.shape)}."
            )
        top, weights = _logit_weights(logits)
        n, k = logits.shape
        outputs = [recorder.outputs[name] for name, _ in layers]
        rows = torch.arange(n, device=logits.device)
        grads_per_class: list[list[torch.Tensor]] = [[] for _ in layers]
        for cls in range(k):
            seed = torch.zeros_like(logits)
            seed[rows, top] = 1.0
            seed[:, cls] -= 1.0  # rows with cls == top become zero; their weight is 0
            grads = torch.autograd.grad(
                logits, outputs, seed, retain_graph=cls < k - 1, allow_unused=True
            )
            for i, (g, out) in enumerate(zip(grads, outputs, strict=True)):
                grads_per_class[i].append(torch.zeros_like(out) if g is None else g)
    sums = {}
    for (name, conv), grads in zip(layers, grads_per_class, strict=True):
        patches = _patches(conv, recorder.inputs[name])
        m, c, kh, kw = conv.weight.shape
        form = method
        if form == "auto":
            form = choose_form(m, c, kh * kw, patches.shape[-1], k)
        norms = (_gram_norms if form == "gram" else _materialized_norms)(grads, patches, c)
        sums[name] = (norms * weights[:, :, None].to(norms.dtype)).sum((0, 1)) / (m * kh * kw)
    return sums


def _restoring_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(module, module.training) for module in model.modules()]


def noise_gains(
    model: nn.Module,
    loader: Iterable,
    n_samples: int = 1000,
    *,
    attack: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    layers: Iterable[str] | LayerPredicate | None = None,
    exclude: Iterable[str] = (),
    skip_first: bool = True,
    chunk_size: int = 32,
    method: str = "auto",
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Noise gains (the ``alpha`` of :func:`gdws_torch.convert`) of all eligible layers.

    Parameters
    ----------
    model : torch.nn.Module
        A classifier returning logits ``(N, classes)``; it receives the loader's images
        (normalisation belongs inside the model). Run in eval mode; its mode is restored
        afterwards; its parameters, gradients and flags are not touched.
    loader : iterable of (images, labels)
        For example a ``DataLoader``; the first ``n_samples`` samples are used.
    n_samples : int, default=1000
    attack : callable, optional
        ``attack(images, labels) -> images`` (a torchattacks-style object): the gains are
        computed on the attacked inputs, as the original did with PGD.
    layers, exclude, skip_first
        Which layers; see :func:`gdws_torch.eligible_convs`.
    chunk_size : int, default=32
        Samples per forward pass: bounds memory.
    method : {"auto", "gram", "materialize"}, default="auto"
        How the per-sample weight-gradient norms are computed; ``"auto"`` picks the
        cheaper form per layer (:func:`choose_form`).
    progress : bool, default=True
        Show a progress bar.

    Returns
    -------
    dict of str to torch.Tensor
        ``{"<layer>.weight": tensor(C)}``, on the weight's device and in its dtype, keyed
        as the original's files (save with :func:`gdws_torch.save_alphas`).
    """
    _check_arguments(n_samples, chunk_size, method, attack)
    chosen = eligible_convs(model, layers=layers, exclude=exclude, skip_first=skip_first)
    totals = {name: torch.zeros_like(conv.weight[0, :, 0, 0]) for name, conv in chosen}
    modes = _restoring_modes(model)
    bar = tqdm(total=n_samples, desc="noise gains", unit="sample", disable=not progress)
    try:
        model.eval()
        for images, labels in _chunks(loader, n_samples, chunk_size):
            device = chosen[0][1].weight.device
            images, labels = images.to(device), labels.to(device)
            if attack is not None:
                images = attack(images, labels).detach()
                model.eval()  # an attack may switch modes
            recorder = _Recorder(chosen)
            try:
                sums = _chunk_sums(model, chosen, recorder, images, method)
            finally:
                recorder.remove()
            for name in totals:
                totals[name] += sums[name].to(totals[name].dtype)
            bar.update(len(images))
    finally:
        bar.close()
        for module, training in modes:
            module.training = training
    return {f"{name}.weight": total / n_samples for name, total in totals.items()}


def reference_noise_gains(
    model: nn.Module,
    loader: Iterable,
    n_samples: int = 1000,
    *,
    attack: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    layers: Iterable[str] | LayerPredicate | None = None,
    exclude: Iterable[str] = (),
    skip_first: bool = True,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """The direct computation: one sample at a time, one backward pass per class.

    The original's algorithm (batch size 1; for each class ``j != t`` the weight
    gradient of ``z_t - z_j``, its squared norm per input channel), in eval mode and
    without touching the model's ``.grad``. Slow; the test reference and the benchmark's
    other side. Same parameters and result as :func:`noise_gains`.
    """
    _check_arguments(n_samples, 1, "auto", attack)
    chosen = eligible_convs(model, layers=layers, exclude=exclude, skip_first=skip_first)
    weights = [conv.weight for _, conv in chosen]
    totals = [torch.zeros_like(w[0, :, 0, 0]) for w in weights]
    modes = _restoring_modes(model)
    try:
        model.eval()
        bar = tqdm(total=n_samples, desc="noise gains (loop)", disable=not progress)
        for images, labels in _chunks(loader, n_samples, 1):
            device = weights[0].device
            images, labels = images.to(device), labels.to(device)
            if attack is not None:
                images = attack(images, labels).detach()
                model.eval()
            with torch.enable_grad():
                z = model(images)[0]
                top = int(z.argmax())
                for j in range(z.shape[0]):
                    margin = z[top] - z[j]
                    if j == top or float(margin.detach()) == 0.0:
                        continue
                    grads = torch.autograd.grad(
                        margin, weights, retain_graph=True, allow_unused=True
                    )
                    for total, g, w in zip(totals, grads, weights, strict=True):
                        if g is None:
                            continue
                        m, _, kh, kw = w.shape
                        total += g.square().sum((0, 2, 3)) / (
                            2 * margin.detach() ** 2 * m * kh * kw
                        )
            bar.update(1)
        bar.close()
    finally:
        for module, training in modes:
            module.training = training
    return {f"{name}.weight": t / n_samples for (name, _), t in zip(chosen, totals, strict=True)}
