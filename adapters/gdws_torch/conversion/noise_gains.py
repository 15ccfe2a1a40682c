"""Noise gains: the original work's channel weights (the paper's ``alpha``), per layer.

For a classifier with logits ``z(x)``, predicted class ``t = argmax z(x)``, and a layer
with weight ``W`` of shape ``(M, C, Kh, Kw)``, over ``N`` inputs (docs/noise_gains.md)::

    alpha_c = (1/N) sum_x sum_{j != t} ||d(z_t - z_j)/dW[:, c]||_F^2 / (2 (z_t - z_j)^2 M Kh Kw)

How :func:`noise_gains` computes it, for all layers at once and batched over samples:

1. one forward pass per chunk of samples (eval mode); hooks keep each layer's input and
   output;
2. ``K - 1`` backward passes per chunk (``K`` classes), with respect to the layers'
   *outputs* only (no weight gradients). Pass ``i`` seeds sample ``n`` with
   ``(e_t - e_j) / (sqrt(2) |z_t - z_j|)`` for its ``i``-th class ``j != t``, so every
   pass does useful work for every sample and already carries the weight of the formula;
3. per layer, with ``g`` the output gradient ``(M, P)`` of one sample and pass (``P``
   output positions) and ``X_c`` its input patches of channel ``c`` ``(K2, P)``, the
   weight gradient is ``g X_c^T`` and its squared norm is summed over the passes in one
   of two forms, chosen per layer by their cost (:func:`choose_form`):

   - ``"materialize"``: form ``g X^T`` (a batched GEMM per pass), square
     it and sum per channel: ``(K-1) M P C K2`` multiply-adds per sample;
   - ``"gram"``: ``sum_passes ||g X_c^T||^2 = sum_k X_ck^T A X_ck`` with
     ``A = sum_passes g^T g`` (``P x P``): the classes are summed into ``A`` before it
     meets the patches, ``P^2 ((K-1) M + C K2)`` multiply-adds per sample, far fewer
     when the output is small (deep layers).

The patches are unfolded once per chunk, never once per class.

Over 400 lines because the batched computation, its two forms with their cost model, and
the per-sample reference it is tested against belong together.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from gdws_approx.checks import check_integer
from gdws_torch.common import conv_patches, take_samples
from gdws_torch.conversion.eligibility import LayerPredicate, eligible_convs
from gdws_torch.nn.module_tree import eval_mode

__all__ = [
    "FORMS",
    "METHODS",
    "choose_form",
    "form_costs",
    "noise_gains",
    "plan_noise_gain_forms",
    "reference_noise_gains",
]

METHODS = ("auto", "gram", "materialize")
FORMS = ("gram", "materialize")
# "auto" keeps the gram form's P x P matrices (one per sample of a chunk) under this size.
GRAM_BYTES = 512 * 2**20
# Largest intermediate (per-sample weight gradients, or patches times A) formed at once.
BLOCK_BYTES = 64 * 2**20
# Cost of touching one element in memory-bound steps, in multiply-add equivalents.
ELEMENT_COST = 8

Attack = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def form_costs(
    n_out: int, n_in: int, kernel_area: int, n_positions: int, n_classes: int
) -> dict[str, int]:
    """Estimated work per sample of each form, in multiply-add equivalents.

    Parameters
    ----------
    n_out, n_in, kernel_area : int
        ``M``, ``C`` and ``K2 = Kh * Kw`` of the layer.
    n_positions : int
        ``P``, the layer's output positions ``H' * W'``.
    n_classes : int
        ``K``, the number of logits (``K - 1`` backward passes).

    Returns
    -------
    dict
        ``{"materialize": cost, "gram": cost}``: GEMM multiply-adds plus
        ``ELEMENT_COST`` per element of the memory-bound steps (squaring the
        materialised gradients; unfolding and multiplying the patches).
    """
    m, ck2, p, passes = n_out, n_in * kernel_area, n_positions, max(n_classes - 1, 0)
    materialize = passes * m * p * ck2 + ELEMENT_COST * (passes * m * ck2 + ck2 * p)
    gram = passes * m * p * p + ck2 * p * p + ELEMENT_COST * (3 * ck2 * p + p * p)
    return {"materialize": materialize, "gram": gram}


def choose_form(
    n_out: int,
    n_in: int,
    kernel_area: int,
    n_positions: int,
    n_classes: int,
    chunk_size: int = 32,
    itemsize: int = 4,
) -> str:
    """``"gram"`` or ``"materialize"``: the cheaper form for one layer.

    The cheaper one by :func:`form_costs`, except that the gram form is not chosen
    when its ``chunk_size`` matrices of ``P x P`` elements would exceed ``GRAM_BYTES``.
    With PreActResNet-18 on 32x32 inputs it picks materialize for the 32x32 outputs
    (``P = 1024``) and gram from the 16x16 outputs on.
    """
    costs = form_costs(n_out, n_in, kernel_area, n_positions, n_classes)
    if chunk_size * n_positions**2 * itemsize > GRAM_BYTES:
        return "materialize"
    return "gram" if costs["gram"] < costs["materialize"] else "materialize"


def _check_arguments(n_samples: Any, chunk_size: Any, method: Any, attack: Any) -> None:
    check_integer(n_samples, "n_samples", minimum=1)
    check_integer(chunk_size, "chunk_size", minimum=1)
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}.")
    if attack is not None and not callable(attack):
        raise TypeError(
            "attack must be None or a callable attack(images, labels) -> images; got "
            f"{type(attack).__name__} {attack!r}."
        )


def _chunks(loader: Iterable, n_samples: int, chunk_size: int) -> Iterator[tuple[Any, Any, Any]]:
    """Exactly ``n_samples`` samples from ``loader``, re-batched into chunks.

    Yields ``(images, labels, sample_ids)``; ``sample_ids`` is ``None`` unless the
    loader yields ``(images, labels, sample_ids)`` triples.
    """
    parts: list[list[torch.Tensor]] = [[], [], []]
    buffered = 0
    indexed = None
    hint = "Lower n_samples or give a longer loader."
    for batch in take_samples(loader, n_samples, stage="noise gains", labels=True, hint=hint):
        if indexed is None:
            indexed = len(batch) >= 3
        for part, tensor in zip(parts, batch[: 2 + indexed], strict=False):
            part.append(tensor)
        buffered += len(batch[0])
        while buffered >= chunk_size:
            joined = [torch.cat(p) if p else None for p in parts]
            yield tuple(None if t is None else t[:chunk_size] for t in joined)
            parts = [[] if t is None else [t[chunk_size:]] for t in joined]
            buffered -= chunk_size
    if buffered:
        yield tuple(torch.cat(p) if p else None for p in parts)


def _sample_blocks(n: int, bytes_per_sample: int) -> Iterator[slice]:
    step = max(1, min(n, BLOCK_BYTES // max(1, bytes_per_sample)))
    for start in range(0, n, step):
        yield slice(start, start + step)


class _Materialized:
    """Sums ``||g X_c^T||^2`` over the passes by forming the per-sample gradients."""

    def __init__(self, conv: nn.Conv2d, layer_input: torch.Tensor) -> None:
        self.n_in = conv.in_channels
        self.patches = conv_patches(conv, layer_input)  # (N, C*K2, P), once for all passes
        self.total = layer_input.new_zeros(self.n_in)

    def add(self, grad: torch.Tensor) -> None:
        g = grad.flatten(2)  # (N, M, P)
        n, m, _ = g.shape
        ck2 = self.patches.shape[1]
        for block in _sample_blocks(n, m * ck2 * g.element_size()):
            # Transposed view: the GEMM reads it in place; a contiguous copy costs more.
            weight_grads = torch.bmm(g[block], self.patches[block].transpose(1, 2))
            per_channel = weight_grads.view(-1, self.n_in, ck2 // self.n_in)
            # vector_norm reads the block once; square-then-sum reads it twice.
            self.total += torch.linalg.vector_norm(per_channel, dim=(0, 2)).square()

    def result(self) -> torch.Tensor:
        return self.total


class _Gram:
    """Sums ``||g X_c^T||^2`` over the passes as ``sum_k X_ck^T A X_ck``, ``A = sum g^T g``."""

    def __init__(self, conv: nn.Conv2d, layer_input: torch.Tensor) -> None:
        self.conv = conv
        self.layer_input = layer_input
        self.gram: torch.Tensor | None = None

    def add(self, grad: torch.Tensor) -> None:
        g = grad.flatten(2)  # (N, M, P)
        if self.gram is None:
            self.gram = torch.bmm(g.transpose(1, 2), g)
        else:
            self.gram.baddbmm_(g.transpose(1, 2), g)

    def result(self) -> torch.Tensor:
        c = self.conv.in_channels
        total = self.layer_input.new_zeros(c)
        if self.gram is None:
            return total
        n, p, _ = self.gram.shape
        # The patches are formed here, after the backward passes, to keep memory low.
        kh, kw = self.conv.kernel_size
        per_sample = 2 * c * kh * kw * p * self.gram.element_size()  # patches and product
        for block in _sample_blocks(n, per_sample):
            patches = conv_patches(self.conv, self.layer_input[block])  # (n, C*K2, P)
            quadratic = torch.bmm(patches, self.gram[block]).mul_(patches).sum(2)
            total += quadratic.view(-1, c, quadratic.shape[1] // c).sum((0, 2))
        return total


_ACCUMULATORS = {"materialize": _Materialized, "gram": _Gram}


class _Recorder:
    """Forward hooks keeping each layer's input and output, for one forward pass."""

    def __init__(self, layers: list[tuple[str, nn.Conv2d]]) -> None:
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.active = True  # off while an attack runs the model
        self.handles = [conv.register_forward_hook(self._hook(name)) for name, conv in layers]

    def _hook(self, name: str) -> Callable:
        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if not self.active:
                return None
            if name in self.outputs:
                raise ValueError(
                    f"layer {name!r} runs more than once per forward pass; noise gains are "
                    "defined for layers called once. Leave it out with exclude=[...]."
                )
            # Copies: the model may modify the conv's input or output in place later
            # (``Conv2d`` then ``ReLU(inplace=True)``); the gradient must be the one of the
            # conv's own output, so the rest of the model gets the copy.
            self.inputs[name] = inputs[0].detach().clone()
            self.outputs[name] = output
            return output.clone()

        return record

    def clear(self) -> None:
        self.inputs.clear()
        self.outputs.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _check_all_ran(layers: list[tuple[str, nn.Conv2d]], recorder: _Recorder) -> None:
    missing = [name for name, _ in layers if name not in recorder.outputs]
    if missing:
        raise ValueError(
            f"layers {missing} did not run in the forward pass; leave them out with "
            "exclude=[...] or layers=[...]."
        )


def _pair_seeds(logits: torch.Tensor) -> torch.Tensor:
    """Gradient seeds of the ``K - 1`` backward passes, ``(K - 1, N, K)``.

    Pass ``i`` gives sample ``n`` the seed ``(e_t - e_j) / (sqrt(2) |z_t - z_j|)`` with
    ``j`` the ``i``-th class other than ``t``, so the squared gradient norms come out
    divided by ``2 (z_t - z_j)^2``. A class tied with the prediction has no finite term
    and is left out (zero seed).
    """
    z = logits.detach()
    n, k = z.shape
    if not torch.isfinite(z).all():
        raise ValueError("the model returned non-finite logits; noise gains are undefined.")
    top = z.argmax(1)
    index = torch.arange(k - 1, device=z.device).expand(n, k - 1)
    others = index + (index >= top[:, None])  # (N, K-1): every class but t, in order
    margin = z.gather(1, top[:, None]) - z.gather(1, others)
    scale = torch.where(margin > 0, 1.0 / (math.sqrt(2.0) * margin.clamp_min(1e-300)), 0.0)
    seeds = z.new_zeros(n, k - 1, k)
    seeds.scatter_(2, top[:, None, None].expand(n, k - 1, 1), scale[..., None])
    seeds.scatter_(2, others[..., None], -scale[..., None])
    return seeds.transpose(0, 1)


def _layer_forms(
    layers: list[tuple[str, nn.Conv2d]],
    outputs: dict[str, torch.Tensor],
    n_classes: int,
    method: str,
    chunk_size: int,
) -> dict[str, str]:
    if method != "auto":
        return {name: method for name, _ in layers}
    forms = {}
    for name, conv in layers:
        out = outputs[name]
        forms[name] = choose_form(
            conv.out_channels,
            conv.in_channels,
            conv.kernel_size[0] * conv.kernel_size[1],
            out.shape[-2] * out.shape[-1],
            n_classes,
            chunk_size,
            out.element_size(),
        )
    return forms


def _chunk_sums(
    model: nn.Module,
    layers: list[tuple[str, nn.Conv2d]],
    recorder: _Recorder,
    images: torch.Tensor,
    method: str,
    chunk_size: int,
) -> dict[str, torch.Tensor]:
    """Sum over a chunk's samples of each layer's noise gains times ``M * K2``, ``(C,)``."""
    recorder.clear()
    with torch.inference_mode(False), torch.enable_grad():
        # The input requires grad so the layers' outputs are in the graph even when the
        # model's parameters do not; the engine computes only what the outputs need.
        x = images.detach().clone().requires_grad_(True)
        logits = model(x)
        if logits.ndim != 2:
            raise ValueError(
                f"the model must return logits of shape (N, classes); got {tuple(logits.shape)}."
            )
        seeds = _pair_seeds(logits)
        _check_all_ran(layers, recorder)
        outputs = [recorder.outputs[name] for name, _ in layers]
        forms = _layer_forms(layers, recorder.outputs, logits.shape[1], method, chunk_size)
        accumulators = [
            _ACCUMULATORS[forms[name]](conv, recorder.inputs[name]) for name, conv in layers
        ]
        for i, seed in enumerate(seeds):
            grads = torch.autograd.grad(
                logits, outputs, seed, retain_graph=i < len(seeds) - 1, allow_unused=True
            )
            for accumulator, grad in zip(accumulators, grads, strict=True):
                if grad is not None:
                    accumulator.add(grad)
        del outputs, logits
    recorder.clear()
    return {name: acc.result() for (name, _), acc in zip(layers, accumulators, strict=True)}


def noise_gains(
    model: nn.Module,
    loader: Iterable,
    n_samples: int = 1000,
    *,
    attack: Attack | None = None,
    layers: Iterable[str] | LayerPredicate | None = None,
    exclude: Iterable[str] = (),
    skip_first: bool = True,
    chunk_size: int = 32,
    method: str = "auto",
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Noise gains of all eligible layers: channel weights (the paper's alpha) for convert.

    Parameters
    ----------
    model : torch.nn.Module
        A classifier returning logits ``(N, classes)`` for the loader's images
        (normalisation belongs inside the model). It runs in eval mode; its modes are
        restored afterwards, even on error; its parameters, their ``.grad`` and
        ``requires_grad`` flags are not touched.
    loader : iterable of (images, labels) or (images, labels, sample_ids)
        For example a ``DataLoader``; the first ``n_samples`` samples are used. With
        ``sample_ids`` (e.g. from :class:`gdws_torch.robustness.distributed.WithIndices`), they are
        passed on to the attack, which then seeds each sample's random start on its own.
    n_samples : int, default=1000
        Samples averaged over (``N`` in the formula).
    attack : callable, optional
        ``attack(images, labels) -> images`` (a torchattacks-style object), applied per
        chunk: the gains are computed on the attacked inputs, as the original did with
        PGD. It should not leave gradients on the model (torchattacks does not).
    layers, exclude, skip_first
        Which layers; see :func:`gdws_torch.eligible_convs`.
    chunk_size : int, default=32
        Samples per forward pass; bounds memory (about 28 MB per sample for
        PreActResNet-18 on 32x32 inputs, float32).
    method : {"auto", "gram", "materialize"}, default="auto"
        How the per-sample weight-gradient norms are summed (see the module docstring);
        ``"auto"`` picks the cheaper form per layer (:func:`plan_noise_gain_forms` tells
        which). All give the same result up to rounding.
    progress : bool, default=True
        Show a progress bar over samples.

    Returns
    -------
    dict of str to torch.Tensor
        ``{"<layer>.weight": tensor(C)}`` in ``model.named_modules()`` order, on the
        weight's device and in its dtype; keyed as the original's files (save with
        :func:`gdws_torch.save_channel_weights`).

    Raises
    ------
    ValueError
        Bad ``n_samples``, ``chunk_size`` or ``method``; a loader with fewer samples
        than ``n_samples``; a model without eligible layers or returning non-2-D or
        non-finite logits.
    TypeError
        ``n_samples`` or ``chunk_size`` not an integer; ``attack`` neither ``None`` nor
        callable.
    """
    _check_arguments(n_samples, chunk_size, method, attack)
    chosen = eligible_convs(model, layers=layers, exclude=exclude, skip_first=skip_first)
    device = chosen[0][1].weight.device
    totals = {name: torch.zeros_like(conv.weight[0, :, 0, 0]) for name, conv in chosen}
    recorder = None
    bar = tqdm(total=n_samples, desc="noise gains", unit="sample", disable=not progress)
    with eval_mode(model):
        try:
            recorder = _Recorder(chosen)
            for images, labels, sample_ids in _chunks(loader, n_samples, chunk_size):
                images, labels = images.to(device), labels.to(device)
                if attack is not None:
                    recorder.active = False
                    seeded = {} if sample_ids is None else {"sample_ids": sample_ids}
                    images = attack(images, labels, **seeded).detach()
                    recorder.active = True
                    model.eval()  # an attack may switch modes
                sums = _chunk_sums(model, chosen, recorder, images, method, chunk_size)
                for name, total in totals.items():
                    total += sums[name].to(total.dtype)
                bar.update(len(images))
        finally:
            if recorder is not None:
                recorder.remove()
            bar.close()
    gains = {}
    for name, conv in chosen:
        m, _, kh, kw = conv.weight.shape
        gains[f"{name}.weight"] = totals[name] / (n_samples * m * kh * kw)
    return gains


def plan_noise_gain_forms(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    layers: Iterable[str] | LayerPredicate | None = None,
    exclude: Iterable[str] = (),
    skip_first: bool = True,
    chunk_size: int = 32,
    method: str = "auto",
) -> dict[str, str]:
    """The form (``"gram"`` or ``"materialize"``) :func:`noise_gains` uses for each layer.

    Parameters
    ----------
    model : torch.nn.Module
    input_shape : tuple of int
        One sample's shape, e.g. ``(3, 32, 32)``; a zero input of this shape is run
        through the model (eval mode, no gradients; modes restored) to find the layers'
        output sizes and the number of classes.
    layers, exclude, skip_first, chunk_size, method
        As for :func:`noise_gains`.

    Returns
    -------
    dict of str to str
        ``{layer name: form}`` in ``model.named_modules()`` order.
    """
    _check_arguments(1, chunk_size, method, None)
    chosen = eligible_convs(model, layers=layers, exclude=exclude, skip_first=skip_first)
    weight = chosen[0][1].weight
    recorder = _Recorder(chosen)
    with eval_mode(model):
        try:
            with torch.no_grad():
                logits = model(weight.new_zeros((1, *input_shape)))
            _check_all_ran(chosen, recorder)
            return _layer_forms(chosen, recorder.outputs, logits.shape[-1], method, chunk_size)
        finally:
            recorder.remove()


def reference_noise_gains(
    model: nn.Module,
    loader: Iterable,
    n_samples: int = 1000,
    *,
    attack: Attack | None = None,
    layers: Iterable[str] | LayerPredicate | None = None,
    exclude: Iterable[str] = (),
    skip_first: bool = True,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """The direct computation: one sample at a time, one backward pass per class.

    The original's algorithm (batch size 1; for each class ``j != t`` the weight
    gradient of ``z_t - z_j``, its squared norm per input channel, divided as in the
    formula), in eval mode and with ``torch.autograd.grad``, so the model's ``.grad``
    stays untouched. Slow: the test reference and the benchmark's other side. Same
    parameters (without ``chunk_size`` and ``method``) and result as :func:`noise_gains`.
    """
    _check_arguments(n_samples, 1, "auto", attack)
    chosen = eligible_convs(model, layers=layers, exclude=exclude, skip_first=skip_first)
    weights = [conv.weight for _, conv in chosen]
    totals = [torch.zeros_like(w[0, :, 0, 0]) for w in weights]
    bar = tqdm(total=n_samples, desc="noise gains (loop)", unit="sample", disable=not progress)
    with eval_mode(model):
        try:
            for images, labels, sample_ids in _chunks(loader, n_samples, 1):
                images, labels = images.to(weights[0].device), labels.to(weights[0].device)
                if attack is not None:
                    seeded = {} if sample_ids is None else {"sample_ids": sample_ids}
                    images = attack(images, labels, **seeded).detach()
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
                        denominator = 2 * margin.detach() ** 2
                        for total, g, w in zip(totals, grads, weights, strict=True):
                            if g is not None:
                                m, _, kh, kw = w.shape
                                total += g.square().sum((0, 2, 3)) / (denominator * m * kh * kw)
                bar.update(1)
        finally:
            bar.close()
    return {f"{name}.weight": t / n_samples for (name, _), t in zip(chosen, totals, strict=True)}
