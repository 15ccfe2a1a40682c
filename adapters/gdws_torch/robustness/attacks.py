"""Adversarial attacks, torchattacks style: configure once, call on ``(images, labels)``.

The model receives pixels in ``[0, 1]`` (normalisation belongs inside the model); inputs
outside that range are refused. The model runs in eval mode during an attack and its
train/eval mode is restored afterwards; gradients are taken with respect to the
perturbation only, so the model's parameters and ``.grad`` are never touched.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gdws_approx.checks import check_integer, check_real
from gdws_torch.nn.module_tree import eval_mode

__all__ = ["PGD", "PGDL1", "PGDL2", "Attack", "check_labels", "sample_seed", "seeds_per_sample"]


class Attack:
    """Base of the PGD attacks: validation, restarts, early stop, mode handling.

    Parameters
    ----------
    model : torch.nn.Module
        A classifier taking pixels in ``[0, 1]`` and returning logits.
    eps : float
        Radius of the perturbation ball, in pixel units (``8/255`` for l_inf CIFAR-10):
        ``<= 1`` for l_inf, at most the pixel box's diameter for l_2 and l_1
        (:func:`check_eps`, :func:`check_call`).
    alpha : float
        Step size.
    steps : int
        Iterations per restart, ``>= 1``.
    random_start : bool, default=True
        Start from a random point of the ball (uniform for l_inf, as the original).
    restarts : int, default=1
        Independent runs; per sample the worst case is kept (a misclassifying
        perturbation first, then the highest loss).
    early_stop : bool, default=False
        Stop updating a sample once it is misclassified.
    seed : int or None, default=None
        Seed of the random starts (a private generator: reproducible, and the global
        RNG is not consumed). ``None``: the global RNG.

    Notes
    -----
    Called as ``attack(images, labels)``, the random starts of a batch come from one
    generator seeded with ``seed``: they depend on how the data is batched. Called as
    ``attack(images, labels, sample_ids=ids)`` with each sample's index in its dataset,
    every sample's start comes from its own generator seeded by ``(seed, id, restart)``,
    so a sample is attacked the same way whatever batch or process it lands in (the
    distributed evaluation relies on this).
    """

    norm = ""

    def __init__(
        self,
        model: nn.Module,
        eps: float,
        alpha: float,
        steps: int = 10,
        random_start: bool = True,
        restarts: int = 1,
        early_stop: bool = False,
        seed: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        self.model = model
        self.eps = check_eps(eps, self.norm)
        self.alpha = check_real(alpha, "alpha", minimum=0, strict=True, unit="pixel units")
        self.steps = check_integer(steps, "steps", minimum=1)
        self.restarts = check_integer(restarts, "restarts", minimum=1)
        self.random_start = bool(random_start)
        self.early_stop = bool(early_stop)
        self.seed = seed

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(eps={self.eps:g}, alpha={self.alpha:g}, steps={self.steps}, "
            f"random_start={self.random_start}, restarts={self.restarts}, "
            f"early_stop={self.early_stop}, seed={self.seed})"
        )

    # -- the parts each norm defines -------------------------------------------------

    def _random_delta(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    def _step(self, x: torch.Tensor, delta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- shared machinery -------------------------------------------------------------

    def _check(self, images: torch.Tensor, labels: torch.Tensor) -> int:
        """Validate a call (:func:`check_call`); return the largest label (``-1`` if empty)."""
        return check_call(self, images, labels)

    def _check_sample_ids(self, sample_ids: Any, n: int) -> torch.Tensor | None:
        return check_sample_ids(sample_ids, n, self.seed)

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)

    def _loss_and_grad(
        self, x: torch.Tensor, delta: torch.Tensor, labels: torch.Tensor, top_label: int
    ):
        delta = delta.detach().requires_grad_(True)
        logits = self.model(x + delta)
        check_labels(labels, logits.shape[-1], top_label)
        loss = F.cross_entropy(logits, labels, reduction="none")
        (grad,) = torch.autograd.grad(loss.sum(), delta)
        return logits.detach(), loss.detach(), grad

    def _start(self, x: torch.Tensor, generator, sample_ids, restart: int) -> torch.Tensor:
        if sample_ids is None:
            return self._random_delta(x, generator)
        starts = []
        for i, sample in enumerate(sample_ids.tolist()):
            own = torch.Generator(device=x.device).manual_seed(
                sample_seed(self.seed, sample, restart)
            )
            starts.append(self._random_delta(x[i : i + 1], own))
        return torch.cat(starts)

    def _run(
        self,
        x: torch.Tensor,
        labels: torch.Tensor,
        generator,
        sample_ids=None,
        restart: int = 0,
        top_label: int = -1,
    ) -> torch.Tensor:
        if self.random_start:
            delta = self._start(x, generator, sample_ids, restart)
            delta = (x + delta).clamp(0, 1) - x
        else:
            delta = torch.zeros_like(x)
        active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        for _ in range(self.steps):
            with torch.enable_grad():
                logits, _, grad = self._loss_and_grad(x, delta, labels, top_label)
            if self.early_stop:
                active = logits.argmax(1) == labels
                if not bool(active.any()):
                    break
            with torch.no_grad():
                stepped = self._step(x, delta, grad)
                stepped = (x + stepped).clamp(0, 1) - x
                if self.early_stop:
                    mask = active.view(-1, *([1] * (x.ndim - 1)))
                    stepped = torch.where(mask, stepped, delta)
                delta = stepped
        return delta.detach()

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, *, sample_ids: Any = None
    ) -> torch.Tensor:
        """Adversarial images: ``images + delta``, in the ball and in ``[0, 1]``.

        Parameters
        ----------
        images : torch.Tensor
            ``(N, ...)`` pixels in ``[0, 1]``.
        labels : torch.LongTensor
            ``(N,)`` class indices.
        sample_ids : sequence of int, optional
            Each sample's index in its dataset: seeds its random start on its own (see
            the class notes). Needs ``seed``.
        """
        top_label = self._check(images, labels)
        images, labels = autograd_tensors(images, labels)
        sample_ids = self._check_sample_ids(sample_ids, images.shape[0])
        x = images.detach()
        if x.shape[0] == 0:  # nothing to attack
            return x.clone()
        with eval_mode(self.model):
            generator = self._generator(x.device)
            best_delta = torch.zeros_like(x)
            best_wrong = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
            best_loss = torch.full((x.shape[0],), -torch.inf, dtype=x.dtype, device=x.device)
            for restart in range(self.restarts):
                delta = self._run(x, labels, generator, sample_ids, restart, top_label)
                if self.restarts == 1:  # nothing to choose from: skip the extra forward
                    best_delta = delta
                    break
                with torch.no_grad():
                    logits = self.model(x + delta)
                    loss = F.cross_entropy(logits, labels, reduction="none")
                    wrong = logits.argmax(1) != labels
                better = (wrong & ~best_wrong) | ((wrong == best_wrong) & (loss >= best_loss))
                mask = better.view(-1, *([1] * (x.ndim - 1)))
                best_delta = torch.where(mask, delta, best_delta)
                best_wrong = best_wrong | wrong
                best_loss = torch.where(better, loss, best_loss)
        return (x + best_delta).clamp(0, 1).detach()


#: The accepted spellings of the norms (torchattacks' and the library's) and the library's
#: name of each (``Attack.norm``).
NORM_NAMES = {
    "Linf": "l_inf",
    "L2": "l_2",
    "L1": "l_1",
    "l_inf": "l_inf",
    "l_2": "l_2",
    "l_1": "l_1",
}


def check_eps(eps: Any, norm: str) -> float:
    """``eps`` as a float: a radius in pixel units, ``> 0``, and ``<= 1`` for l_inf.

    An l_inf radius above 1 covers the whole pixel box ``[0, 1]``: it is refused here, with
    the message of every ``epsilon`` of the library (``8`` for ``8/255`` is the usual slip).
    An l_2 or l_1 radius can exceed 1 (``0.5`` and ``12`` are common on CIFAR-10); its
    bound, the pixel box's diameter, depends on the image size and is checked at the call
    (:func:`check_call`).

    Parameters
    ----------
    eps : float
    norm : str
        ``"Linf"``, ``"L2"``, ``"L1"`` or the library's ``"l_inf"``, ``"l_2"``, ``"l_1"``;
        another value (a custom attack's) checks only ``eps > 0``.
    """
    maximum = 1 if NORM_NAMES.get(norm) == "l_inf" else None
    return check_real(eps, "eps", minimum=0, strict=True, maximum=maximum, unit="pixel units")


def check_call(attack: Any, images: Any, labels: Any, *, gradients: bool = True) -> int:
    """Everything an attack checks when called; return the largest label (``-1`` if empty).

    The batch (:func:`check_batch`); that the call can take gradients (``gradients``: not
    under ``torch.inference_mode()``); that the images have the dtype of the model's
    floating parameters; and that ``attack.eps`` is at most the diameter of the pixel box
    in ``attack.norm`` (``sqrt(D)`` for l_2 and ``D`` for l_1, ``D`` values per image: a
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
    norm = NORM_NAMES.get(getattr(attack, "norm", ""))
    values = math.prod(images.shape[1:])
    diameter = {"l_2": math.sqrt(values), "l_1": float(values)}.get(norm)
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


def check_sample_ids(sample_ids: Any, n: int, seed: int | None) -> torch.Tensor | None:
    """``sample_ids`` as ``n`` non-negative indices on the CPU (``None`` stays ``None``);
    they seed each sample's randomness, so the attack needs a ``seed``."""
    if sample_ids is None:
        return None
    if seed is None:
        raise ValueError(
            "sample_ids seeds each sample's randomness from the attack's seed; construct the "
            "attack with seed=<int>."
        )
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


def seeds_per_sample(attack: Any) -> bool:
    """Whether ``attack`` seeds each sample on its own: it has an integer ``seed`` and its
    call takes ``sample_ids=`` (the library's attacks and ensembles, built with a seed)."""
    if getattr(attack, "seed", None) is None or not callable(attack):
        return False
    try:
        parameters = inspect.signature(attack).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    return "sample_ids" in parameters


def sample_seed(seed: int, sample_id: int, restart: int = 0) -> int:
    """A 63-bit seed for one sample and restart, well mixed (SplitMix64 finaliser)."""
    mask = (1 << 64) - 1
    value = (seed * 0x9E3779B97F4A7C15 + sample_id * 0xBF58476D1CE4E5B9 + restart) & mask
    for shift, factor in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        value = ((value ^ (value >> shift)) * factor) & mask
    return (value ^ (value >> 31)) >> 1


def _per_sample_norm(t: torch.Tensor, p: float) -> torch.Tensor:
    return t.flatten(1).norm(p=p, dim=1).view(-1, *([1] * (t.ndim - 1)))


class PGD(Attack):
    """l_inf PGD (Madry et al.): signed-gradient steps, clipped to the ``eps`` box.

    Same parameters and defaults as :class:`Attack`. As in the original evaluation,
    ``PGD(model, eps=8/255, alpha=2/255, steps=10)``.
    """

    norm = "l_inf"

    def _random_delta(self, x, generator):
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return (2 * noise - 1) * self.eps

    def _step(self, x, delta, grad):
        return (delta + self.alpha * grad.sign()).clamp(-self.eps, self.eps)


class PGDL2(Attack):
    """l_2 PGD: normalised-gradient steps, projection onto the l_2 ball of radius ``eps``.

    The random start is a uniform direction scaled by ``U(0, 1) * eps``, as the original.
    """

    norm = "l_2"

    def _random_delta(self, x, generator):
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        radius = torch.rand((x.shape[0],), generator=generator, device=x.device, dtype=x.dtype)
        radius = radius.view(-1, *([1] * (x.ndim - 1)))
        return noise / _per_sample_norm(noise, 2).clamp_min(1e-12) * radius * self.eps

    def _step(self, x, delta, grad):
        delta = delta + self.alpha * grad / _per_sample_norm(grad, 2).clamp_min(1e-12)
        scale = (self.eps / _per_sample_norm(delta, 2).clamp_min(1e-12)).clamp(max=1.0)
        return delta * scale


def project_l1_ball(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Euclidean projection of each sample of ``delta`` onto the l_1 ball of radius ``eps``.

    The sort-based algorithm of Duchi et al. (2008), batched over samples.
    """
    flat = delta.flatten(1)
    magnitude = flat.abs()
    inside = magnitude.sum(1) <= eps
    sorted_desc, _ = magnitude.sort(dim=1, descending=True)
    cumulative = sorted_desc.cumsum(1) - eps
    index = torch.arange(1, flat.shape[1] + 1, device=flat.device, dtype=flat.dtype)
    condition = sorted_desc - cumulative / index > 0
    rho = condition.to(flat.dtype).cumsum(1).argmax(1, keepdim=True)  # last True
    theta = (cumulative.gather(1, rho) / (rho + 1).to(flat.dtype)).clamp_min(0)
    projected = flat.sign() * (magnitude - theta).clamp_min(0)
    projected = torch.where(inside[:, None], flat, projected)
    return projected.view_as(delta)


class PGDL1(Attack):
    """l_1 attack: sparse l_1 descent (Tramèr & Boneh, 2019) in the l_1 ball and the pixel box.

    Each step moves only the coordinates whose gradient magnitude is in the top
    ``1 - sparsity`` fraction (ignoring coordinates at a pixel bound that the gradient
    pushes outward), by ``alpha`` in l_1 norm in total, then projects onto the l_1 ball
    (the pixel clip after it only shrinks the perturbation, so it stays inside both).

    Parameters
    ----------
    sparsity : float in [0, 1), default=0.99
        Percentile of ``|grad|`` below which coordinates are not moved.
    **kwargs
        As :class:`Attack` (``eps=12``, ``alpha=1`` are typical for CIFAR-10 in pixel units).
    """

    norm = "l_1"

    def __init__(
        self, model: nn.Module, eps: float, alpha: float, *args, sparsity: float = 0.99, **kwargs
    ):
        super().__init__(model, eps, alpha, *args, **kwargs)
        value = check_real(sparsity, "sparsity")
        if not 0 <= value < 1:
            raise ValueError(f"sparsity must be a number in [0, 1); got {sparsity!r}.")
        self.sparsity = value

    def _random_delta(self, x, generator):
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        laplace = -torch.log1p(-noise * (1 - 1e-7)) * (2 * (noise > 0.5).to(x.dtype) - 1)
        radius = torch.rand((x.shape[0],), generator=generator, device=x.device, dtype=x.dtype)
        radius = radius.view(-1, *([1] * (x.ndim - 1)))
        return laplace / _per_sample_norm(laplace, 1).clamp_min(1e-12) * radius * self.eps

    def _step(self, x, delta, grad):
        position = x + delta
        blocked = ((position >= 1) & (grad > 0)) | ((position <= 0) & (grad < 0))
        magnitude = torch.where(blocked, torch.zeros_like(grad), grad.abs()).flatten(1)
        threshold = torch.quantile(magnitude, self.sparsity, dim=1, keepdim=True)
        chosen = (magnitude >= threshold) & (magnitude > 0)
        count = chosen.sum(1, keepdim=True).clamp_min(1).to(grad.dtype)
        direction = torch.where(chosen, grad.flatten(1).sign(), torch.zeros_like(magnitude)) / count
        delta = delta + self.alpha * direction.view_as(delta)
        return project_l1_ball(delta, self.eps)
