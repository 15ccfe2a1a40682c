"""The attacks' base class, torchattacks style, and PGD for the Linf, L2 and L1 norms.

An attack is configured once and called on ``(images, labels)``: the model receives pixels
in ``[0, 1]`` (normalisation belongs inside the model; inputs outside that range are
refused), runs in eval mode during the attack and gets its train/eval mode back
afterwards; gradients are taken with respect to the input only, so the model's parameters
and their ``.grad`` are never touched. Every attack of the library (PGD here, APGD, APGD-T,
FAB, Square and AutoAttack in their modules) subclasses :class:`Attack`. PGD lives beside
the base class (the module is longer than most, half of it docstrings): it is the simplest
subclass, the one to read first.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from gdws_approx.checks import check_integer, check_real
from gdws_torch.nn.module_tree import eval_mode
from gdws_torch.robustness.checks import (
    NORMS,
    autograd_tensors,
    check_call,
    check_eps,
    check_flag,
    check_labels,
    check_model,
    check_norm,
    check_sample_ids,
    check_seed,
)

__all__ = ["PGD", "PGDL1", "PGDL2", "Attack", "project_l1_ball", "sample_seed"]


def sample_seed(seed: int, sample_id: int, run: int = 0) -> int:
    """A 63-bit seed for one sample and run, well mixed (SplitMix64 finaliser)."""
    mask = (1 << 64) - 1
    value = (seed * 0x9E3779B97F4A7C15 + sample_id * 0xBF58476D1CE4E5B9 + run) & mask
    for shift, factor in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        value = ((value ^ (value >> shift)) * factor) & mask
    return (value ^ (value >> 31)) >> 1


class Attack:
    """Base of the library's attacks (torchattacks' ``Attack``): checks, seeds, modes.

    A subclass validates its own settings after calling ``super().__init__`` and
    implements :meth:`forward`; calling the attack checks the batch, puts the model in
    eval mode and calls :meth:`forward`, then restores the model's modes.

    Parameters
    ----------
    model : torch.nn.Module
        A classifier taking pixels in ``[0, 1]`` and returning logits.
    norm : {"Linf", "L2", "L1"}
        The threat model; a subclass supports those of its :attr:`norms`.
    eps : float
        Radius of the perturbation ball, in pixel units (``8/255`` for Linf on CIFAR-10):
        ``<= 1`` for Linf, at most the pixel box's diameter for L2 and L1 (checked at the
        call: :func:`~gdws_torch.robustness.checks.check_call`).
    seed : int, default=0
        Seed of the attack's random numbers (private generators: reproducible, and the
        global RNG is not consumed).

    Attributes
    ----------
    norms : tuple of str
        Class attribute: the norms the attack supports.
    seeds_per_sample : bool
        Class attribute: the call takes ``sample_ids=`` and draws each sample's random
        numbers from a generator of its own (every attack of the library). Callers
        holding any attack read it with ``getattr(attack, "seeds_per_sample", False)``.
    uses_gradients : bool
        Whether a call takes input gradients (and so refuses ``torch.inference_mode()``);
        ``False`` for a black-box attack.

    Notes
    -----
    Called as ``attack(images, labels)``, the random numbers of a batch come from one
    generator seeded with ``seed``: they depend on how the data is batched. Called as
    ``attack(images, labels, sample_ids=ids)`` with each sample's index in its dataset,
    every sample's random numbers come from its own generator, seeded by
    ``sample_seed(seed, id, run)`` (``run`` counts restarts, and targets for targeted
    attacks), so a sample is attacked the same way whatever batch or process it lands
    in (the distributed and resumed evaluations rely on this).
    """

    norms: ClassVar[tuple[str, ...]] = NORMS
    seeds_per_sample: ClassVar[bool] = True
    uses_gradients: ClassVar[bool] = True

    def __init__(self, model: nn.Module, *, norm: str, eps: float, seed: int = 0) -> None:
        self.model = check_model(model)
        self.norm = check_norm(norm, self.norms)
        self.eps = check_eps(eps, self.norm)
        self.seed = check_seed(seed)

    def __repr__(self) -> str:
        settings = {k: v for k, v in vars(self).items() if k not in ("model", "seed")}
        settings["seed"] = self.seed
        shown = ", ".join(
            f"{key}={value:g}" if isinstance(value, float) else f"{key}={value!r}"
            for key, value in settings.items()
            if isinstance(value, (bool, int, float, str))
        )
        return f"{type(self).__name__}({shown})"

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, *, sample_ids: Any = None
    ) -> torch.Tensor:
        """Adversarial images: in the ``eps`` ball around ``images`` and in ``[0, 1]``.

        Parameters
        ----------
        images : torch.Tensor
            ``(N, ...)`` pixels in ``[0, 1]``, of the model's dtype.
        labels : torch.LongTensor
            ``(N,)`` class indices, in ``[0, number of logits)``.
        sample_ids : sequence of int, optional
            Each sample's index in its dataset: seeds its random numbers on its own (see
            the class notes), so a sample is attacked the same way whatever batch or
            process it lands in.

        Returns
        -------
        torch.Tensor
            The adversarial images, shaped like ``images``; where an attack keeps only
            what misclassifies (FAB, Square, AutoAttack), ``images`` where it failed.

        Raises
        ------
        TypeError
            Images that are not a floating-point tensor or not of the model's dtype;
            labels that are not a ``LongTensor``.
        ValueError
            Images outside ``[0, 1]``, labels out of range or of the wrong shape, bad
            ``sample_ids``, or ``eps`` above the pixel box's diameter for these images.
        RuntimeError
            Called under ``torch.inference_mode()`` by an attack that takes gradients.
        """
        top_label = check_call(self, images, labels, gradients=self.uses_gradients)
        self._check_images(images)
        images, labels = autograd_tensors(images, labels)
        ids = check_sample_ids(sample_ids, images.shape[0])
        x = images.detach()
        if x.shape[0] == 0:
            return self._nothing_to_attack(x)
        with eval_mode(self.model):
            return self.forward(x, labels, sample_ids=ids, top_label=top_label).detach()

    def forward(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        sample_ids: torch.Tensor | None = None,
        top_label: int | None = None,
    ) -> torch.Tensor:
        """The attack itself, on a checked, non-empty batch with the model in eval mode.

        Parameters
        ----------
        images, labels : torch.Tensor
            The batch, detached.
        sample_ids : torch.Tensor, optional
            Checked sample indices on the CPU (see :meth:`__call__`).
        top_label : int, optional
            The largest label, when already known (saves a device sync).
        """
        raise NotImplementedError

    # -- what a subclass may refine ---------------------------------------------------

    def _check_images(self, images: torch.Tensor) -> None:
        """Checks of the images' shape beyond ``(N, ...)`` (none by default)."""

    def _nothing_to_attack(self, images: torch.Tensor) -> torch.Tensor:
        """The answer for an empty batch (the model is not called)."""
        return images.clone()

    # -- random numbers ---------------------------------------------------------------

    def _batch_generator(self, device: torch.device) -> torch.Generator:
        """The generator of a call without ``sample_ids``."""
        return torch.Generator(device=device).manual_seed(self.seed)

    def _random_draw(
        self,
        draw,
        x: torch.Tensor,
        generator: torch.Generator | None,
        sample_ids: torch.Tensor | None,
        run: int,
    ) -> torch.Tensor:
        """``draw(x, generator)`` for the batch, or, with ``sample_ids``, per sample from
        its own generator seeded by ``sample_seed(seed, id, run)``."""
        if sample_ids is None:
            return draw(x, generator)
        own = [
            torch.Generator(device=x.device).manual_seed(sample_seed(self.seed, sample, run))
            for sample in sample_ids.tolist()
        ]
        return torch.cat([draw(x[i : i + 1], g) for i, g in enumerate(own)])


def _per_sample_norm(t: torch.Tensor, p: float) -> torch.Tensor:
    return t.flatten(1).norm(p=p, dim=1).view(-1, *([1] * (t.ndim - 1)))


def project_l1_ball(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Euclidean projection of each sample of ``delta`` onto the L1 ball of radius ``eps``.

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


class PGD(Attack):
    """PGD (Madry et al.): gradient steps projected onto the ``eps`` ball, Linf, L2 or L1.

    As in the original evaluation, ``PGD(model, eps=8/255, alpha=2/255, steps=10)``.

    Parameters
    ----------
    model : torch.nn.Module
        A classifier taking pixels in ``[0, 1]`` and returning logits.
    eps : float, default=8/255
        Radius of the ball, in pixel units (see :class:`Attack`).
    alpha : float, default=2/255
        Step size, in pixel units (the step's norm for L2 and L1).
    steps : int, default=10
        Iterations per restart, ``>= 1``.
    random_start : bool, default=True
        Start from a random point of the ball.
    norm : {"Linf", "L2", "L1"}, default="Linf"
        The threat model (:class:`PGDL2` and :class:`PGDL1` are PGD with ``norm="L2"``
        and ``norm="L1"``, with torchattacks' names).
    n_restarts : int, default=1
        Independent runs; per sample the worst case is kept (a misclassifying
        perturbation first, then the highest loss).
    early_stop : bool, default=False
        Stop updating a sample once it is misclassified.
    seed : int, default=0
        Seed of the random starts (see :class:`Attack`).
    sparsity : float in [0, 1), optional
        L1 only (default 0.99): the percentile of ``|grad|`` below which coordinates are
        not moved.

    Notes
    -----
    Each norm has its step and projection; every step ends with a clip to ``[0, 1]``:

    - Linf: ``alpha * sign(grad)``, clipped to ``[-eps, eps]``; random start uniform in
      the box (as the original).
    - L2: ``alpha * grad / ||grad||_2``, rescaled onto the L2 ball; random start a uniform
      direction scaled by ``U(0, 1) * eps`` (as the original).
    - L1: sparse L1 descent (Tramèr & Boneh, 2019): only the coordinates whose gradient
      magnitude is in the top ``1 - sparsity`` fraction move (ignoring coordinates at a
      pixel bound that the gradient pushes outward), by ``alpha`` in L1 norm in total, then
      the exact projection onto the L1 ball (:func:`project_l1_ball`; the pixel clip after
      it only shrinks the perturbation, so it stays inside both); random start a Laplace
      direction scaled by ``U(0, 1) * eps``.
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8 / 255,
        alpha: float = 2 / 255,
        steps: int = 10,
        random_start: bool = True,
        *,
        norm: str = "Linf",
        n_restarts: int = 1,
        early_stop: bool = False,
        seed: int = 0,
        sparsity: float | None = None,
    ) -> None:
        super().__init__(model, norm=norm, eps=eps, seed=seed)
        self.alpha = check_real(alpha, "alpha", minimum=0, strict=True, unit="pixel units")
        self.steps = check_integer(steps, "steps", minimum=1)
        self.random_start = check_flag(random_start, "random_start")
        self.n_restarts = check_integer(n_restarts, "n_restarts", minimum=1)
        self.early_stop = check_flag(early_stop, "early_stop")
        if sparsity is not None and self.norm != "L1":
            raise ValueError(f"sparsity is for norm='L1' (sparse L1 descent); got norm={norm!r}.")
        if self.norm == "L1":
            value = check_real(0.99 if sparsity is None else sparsity, "sparsity")
            if not 0 <= value < 1:
                raise ValueError(f"sparsity must be a number in [0, 1); got {sparsity!r}.")
            self.sparsity = value

    # -- each norm's random start and step -------------------------------------------

    def _random_delta(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if self.norm == "Linf":
            noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            return (2 * noise - 1) * self.eps
        if self.norm == "L2":
            direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            p = 2
        else:
            noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            direction = -torch.log1p(-noise * (1 - 1e-7)) * (2 * (noise > 0.5).to(x.dtype) - 1)
            p = 1
        radius = torch.rand((x.shape[0],), generator=generator, device=x.device, dtype=x.dtype)
        radius = radius.view(-1, *([1] * (x.ndim - 1)))
        return direction / _per_sample_norm(direction, p).clamp_min(1e-12) * radius * self.eps

    def _step(self, x: torch.Tensor, delta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        if self.norm == "Linf":
            return (delta + self.alpha * grad.sign()).clamp(-self.eps, self.eps)
        if self.norm == "L2":
            delta = delta + self.alpha * grad / _per_sample_norm(grad, 2).clamp_min(1e-12)
            scale = (self.eps / _per_sample_norm(delta, 2).clamp_min(1e-12)).clamp(max=1.0)
            return delta * scale
        position = x + delta
        blocked = ((position >= 1) & (grad > 0)) | ((position <= 0) & (grad < 0))
        magnitude = torch.where(blocked, torch.zeros_like(grad), grad.abs()).flatten(1)
        threshold = torch.quantile(magnitude, self.sparsity, dim=1, keepdim=True)
        chosen = (magnitude >= threshold) & (magnitude > 0)
        count = chosen.sum(1, keepdim=True).clamp_min(1).to(grad.dtype)
        direction = torch.where(chosen, grad.flatten(1).sign(), torch.zeros_like(magnitude)) / count
        delta = delta + self.alpha * direction.view_as(delta)
        return project_l1_ball(delta, self.eps)

    # -- the attack ------------------------------------------------------------------

    def _loss_and_grad(
        self, x: torch.Tensor, delta: torch.Tensor, labels: torch.Tensor, top_label: int | None
    ):
        delta = delta.detach().requires_grad_(True)
        logits = self.model(x + delta)
        check_labels(labels, logits.shape[-1], top_label)
        loss = F.cross_entropy(logits, labels, reduction="none")
        (grad,) = torch.autograd.grad(loss.sum(), delta)
        return logits.detach(), loss.detach(), grad

    def _run(self, x, labels, generator, sample_ids, restart, top_label) -> torch.Tensor:
        """One restart: the perturbation after ``steps`` steps."""
        if self.random_start:
            delta = self._random_draw(self._random_delta, x, generator, sample_ids, restart)
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

    def forward(self, images, labels, *, sample_ids=None, top_label=None) -> torch.Tensor:
        x = images
        generator = self._batch_generator(x.device)
        best_delta = torch.zeros_like(x)
        best_wrong = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        best_loss = torch.full((x.shape[0],), -torch.inf, dtype=x.dtype, device=x.device)
        for restart in range(self.n_restarts):
            delta = self._run(x, labels, generator, sample_ids, restart, top_label)
            if self.n_restarts == 1:  # nothing to choose from: skip the extra forward
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
        return (x + best_delta).clamp(0, 1)


class PGDL2(PGD):
    """PGD with ``norm="L2"`` (torchattacks' name and defaults: ``eps=1.0``, ``alpha=0.2``).

    Parameters as :class:`PGD`, without ``norm`` and ``sparsity``.
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float = 1.0,
        alpha: float = 0.2,
        steps: int = 10,
        random_start: bool = True,
        *,
        n_restarts: int = 1,
        early_stop: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(
            model,
            eps,
            alpha,
            steps,
            random_start,
            norm="L2",
            n_restarts=n_restarts,
            early_stop=early_stop,
            seed=seed,
        )


class PGDL1(PGD):
    """PGD with ``norm="L1"``: sparse L1 descent (Tramèr & Boneh, 2019).

    Parameters as :class:`PGD`, without ``norm``; defaults ``eps=12.0``, ``alpha=1.0``,
    ``sparsity=0.99`` (the usual CIFAR-10 values, in pixel units).
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float = 12.0,
        alpha: float = 1.0,
        steps: int = 10,
        random_start: bool = True,
        *,
        n_restarts: int = 1,
        early_stop: bool = False,
        seed: int = 0,
        sparsity: float = 0.99,
    ) -> None:
        super().__init__(
            model,
            eps,
            alpha,
            steps,
            random_start,
            norm="L1",
            n_restarts=n_restarts,
            early_stop=early_stop,
            seed=seed,
            sparsity=sparsity,
        )
