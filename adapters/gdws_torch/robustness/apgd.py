"""Auto-PGD (APGD, APGD-T), torchattacks style: configure once, call on ``(images, labels)``.

Croce & Hein (2020), "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks" (ICML): PGD with momentum whose step size halves at
checkpoints when progress stalls, on the cross-entropy or the DLR loss (:class:`APGD`), or
on the targeted DLR loss against the most likely wrong classes (:class:`APGDT`). For the
L1 threat model, the L1-APGD of Croce & Hein (2021), "Mind the box: L1-APGD for sparse
adversarial attacks on image classifiers" (ICML): sparse steps, the exact projection onto
the intersection of the L1 ball and the pixel box, and a step size and sparsity adapted
at checkpoints.

Same conventions as :mod:`gdws_torch.robustness.attacks`: pixels in ``[0, 1]`` (inputs
outside are refused), the model in eval mode during the attack and its modes restored,
gradients taken with respect to the input only (parameters and their ``.grad`` are never
touched), and per-sample random starts with ``sample_ids=`` so that sharded runs agree.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gdws_approx.checks import check_integer, check_real
from gdws_torch.robustness.attacks import Attack
from gdws_torch.robustness.checks import check_flag, check_labels

__all__ = ["APGD", "APGDT", "dlr_loss", "dlr_loss_targeted", "project_l1_box"]

_MOMENTUM = 0.75  # the paper's alpha
_LOSSES = ("ce", "dlr")


def dlr_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The Difference of Logits Ratio loss, per sample (higher: closer to misclassified).

    ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)`` with ``z_pi1 >= z_pi2 >= ...``
    the sorted logits: invariant to shifting and (positively) rescaling the logits.

    Parameters
    ----------
    logits : torch.Tensor
        ``(N, K)`` logits, ``K >= 3``.
    labels : torch.LongTensor
        ``(N,)`` true classes.

    Raises
    ------
    ValueError
        Fewer than 3 classes.
    """
    _check_class_count(logits.shape[-1], 3, "the DLR loss")
    ordered = logits.sort(dim=1, descending=True).values
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], -torch.inf).amax(1)
    return -(true - others) / (ordered[:, 0] - ordered[:, 2] + 1e-12)


def dlr_loss_targeted(
    logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """The targeted DLR loss, per sample (higher: the target's logit closer to the true one's).

    ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)``.

    Parameters
    ----------
    logits : torch.Tensor
        ``(N, K)`` logits, ``K >= 4``.
    labels, targets : torch.LongTensor
        ``(N,)`` true and target classes.

    Raises
    ------
    ValueError
        Fewer than 4 classes.
    """
    _check_class_count(logits.shape[-1], 4, "the targeted DLR loss")
    ordered = logits.sort(dim=1, descending=True).values
    true = logits.gather(1, labels[:, None]).squeeze(1)
    target = logits.gather(1, targets[:, None]).squeeze(1)
    return -(true - target) / (ordered[:, 0] - 0.5 * (ordered[:, 2] + ordered[:, 3]) + 1e-12)


def _check_class_count(n_classes: int, needed: int, what: str) -> None:
    if n_classes < needed:
        raise ValueError(
            f"{what} needs at least {needed} classes (it uses the {needed - 1} largest logits "
            f"besides the top one); the model returns {n_classes} logits."
        )


def project_l1_box(x: torch.Tensor, delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Euclidean projection of each ``delta`` onto ``{d : ||d||_1 <= eps, 0 <= x + d <= 1}``.

    The exact projection onto the L1 ball intersected with the pixel box (Croce & Hein,
    2021): ``d_i = sign(delta_i) * min(max(|delta_i| - lam, 0), b_i)``, with ``b_i`` the room
    to the box in the direction of ``delta_i`` and ``lam >= 0`` the smallest threshold
    meeting the L1 budget, found exactly from the sorted breakpoints of the piecewise
    linear L1 norm as a function of ``lam`` (batched over samples, no iterations).

    Parameters
    ----------
    x : torch.Tensor
        ``(N, ...)`` centres, pixels in ``[0, 1]``.
    delta : torch.Tensor
        ``(N, ...)`` perturbations to project.
    eps : float
        Radius of the L1 ball, ``> 0``.

    Returns
    -------
    torch.Tensor
        The projected perturbations, shaped like ``delta``.
    """
    flat = delta.flatten(1)
    centre = x.flatten(1).to(flat.dtype)
    size = flat.abs()
    room = torch.where(flat >= 0, 1 - centre, centre).clamp_min(0)
    clipped = torch.minimum(size, room)
    # f(lam) = sum_i min(max(size_i - lam, 0), room_i) falls from sum(room) to 0: linearly
    # between its breakpoints size_i - room_i (coordinate i leaves the box bound) and size_i
    # (coordinate i reaches 0). Its value at each sorted breakpoint, then the segment where
    # it crosses eps, give lam exactly.
    points = torch.cat((size - room, size), 1)
    kinds = torch.cat((torch.ones_like(size), -torch.ones_like(size)), 1)
    points, order = points.sort(1)
    slopes = kinds.gather(1, order).cumsum(1)  # coordinates in their linear part after a point
    drops = (slopes[:, :-1] * points.diff(dim=1)).double().cumsum(1)
    start = room.double().sum(1, keepdim=True)
    values = torch.cat((start, start - drops), 1)  # f at each point, non-increasing
    last = ((values >= eps).sum(1, keepdim=True) - 1).clamp(0, values.shape[1] - 2)
    excess = values.gather(1, last) - eps
    lam = points.gather(1, last).double() + excess / slopes.gather(1, last).double().clamp_min(1)
    lam = lam.clamp_min(0).to(flat.dtype)
    shrunk = torch.minimum((size - lam).clamp_min(0), room)
    inside = clipped.sum(1, keepdim=True) <= eps
    result = flat.sign() * torch.where(inside, clipped, shrunk)
    # Rounding may leave the L1 norm a hair above eps: scaling towards 0 stays in the box.
    norm = result.abs().sum(1, keepdim=True)
    result = result * (eps / norm.clamp_min(1e-30)).clamp(max=1.0)
    return result.view_as(delta)


def _checkpoints(steps: int) -> list[int]:
    """The paper's checkpoints ``w_j = ceil(p_j * steps)``, ``p_1 = 0.22``,
    ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``; in hundredths, so exact."""
    marks: list[int] = []
    previous, current = 0, 22
    while True:
        mark = -(-current * steps // 100)
        if mark > steps:
            return marks
        if not marks or mark > marks[-1]:
            marks.append(mark)
        previous, current = current, current + max(current - previous - 3, 6)


def _per_sample(t: torch.Tensor, reduce) -> torch.Tensor:
    return reduce(t.flatten(1)).view(-1, *([1] * (t.ndim - 1)))


class APGD(Attack):
    """Untargeted Auto-PGD (Croce & Hein, 2020), Linf, L2 or L1.

    Parameters
    ----------
    model : torch.nn.Module
        A classifier taking pixels in ``[0, 1]`` and returning logits.
    norm : {"Linf", "L2", "L1"}, default="Linf"
        The threat model.
    eps : float, default=8/255
        Radius of the perturbation ball, in pixel units: ``<= 1`` for Linf, at most the
        pixel box's diameter for L2 and L1 (:func:`gdws_torch.robustness.checks.check_eps`).
    steps : int, default=100
        Iterations per run (the step-size schedule scales with it), ``>= 1``.
    n_restarts : int, default=1
        Runs from fresh random starts; each runs only on the samples no earlier run broke.
    loss : {"ce", "dlr"}, default="ce"
        Cross-entropy, or the Difference of Logits Ratio (needs ``>= 3`` classes).
    seed : int, default=0
        Seed of the random starts; with ``sample_ids``, each sample's start comes from its
        own generator (run ``r`` counts restarts, and targets for :class:`APGDT`), as
        :class:`~gdws_torch.robustness.attacks.Attack` says.
    rho : float in [0, 1], default=0.75
        Condition 1 of the schedule: the step size halves at a checkpoint when fewer than
        ``rho`` times the steps since the previous checkpoint increased the loss.
    eot_iter : int, default=1
        Gradients averaged per step (Expectation over Transformation, for randomised
        models; the loss is averaged too, the prediction is the last draw's).
    use_largereps : bool, default=False
        L1 only, as AutoAttack's L1 evaluation: run 30% of the steps at ``3 * eps``,
        30% at ``2 * eps`` and the rest at ``eps``, each stage starting from the previous
        stage's best point projected onto its ball.

    Notes
    -----
    Linf and L2, as the paper: random start on the sphere of radius ``eps`` (uniform
    noise rescaled to Linf norm ``eps``; a Gaussian direction for L2), then clipped to
    ``[0, 1]``; step size ``2 * eps``; momentum 0.75 (the first step without); checkpoints
    ``w_j = ceil(p_j * steps)`` with ``p_0 = 0``, ``p_1 = 0.22``,
    ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``. At a checkpoint the step size of
    a sample halves, and it restarts from its best (highest-loss) point, when (1) fewer
    than ``rho * (w_j - w_{j-1})`` of the steps since the previous checkpoint increased its
    loss, or (2) its step size did not halve at the previous checkpoint and its best loss
    has not changed since then.

    L1, as the reference implementation of L1-APGD: random start ``P(N(0, I))`` (a
    Gaussian projected onto the L1 ball in the box); each step moves the coordinates whose
    gradient magnitude is in the top ``k`` by ``step / k`` each along the gradient's sign
    (no momentum), then projects exactly onto the L1 ball intersected with the box
    (:func:`project_l1_box`); the step size starts at ``eps``; every
    ``max(int(0.04 * steps), 1)`` steps ``k`` becomes the best point's sparsity / 1.5 and,
    where that sparsity fell by 5% or more since the previous checkpoint, the step size
    goes back to ``eps`` and the sample restarts from its best point, else the step size
    is divided by 1.5 (kept in ``[eps / 10, eps]``); ``k`` starts at 20% of the
    coordinates. ``rho`` plays no part.

    Per sample, a run keeps its highest-loss point and its last misclassifying one; the
    result is a misclassifying point where a run found one (samples misclassified
    unperturbed are returned unchanged), else the highest-loss point of all runs.

    Where this differs from the reference code (AutoAttack's ``autopgd_base.py``, which
    torchattacks copies): condition 1 is the paper's strict "fewer than" (the code's
    ``<=`` differs only when ``rho * (w_j - w_{j-1})`` is an integer, e.g. the interval of
    16 at ``steps=100``); the first checkpoint compares ``f(x^(1))`` with ``f(x^(0))`` (the
    code compares with an unfilled zero entry), and after a restart the next step's loss is
    compared with the best point's loss, where the walk resumes; checkpoints are the
    paper's ``ceil(p_j * steps)`` (the code rounds each interval down: the same at
    ``steps=100``, not for every ``steps``); condition 2 is not tested at the first
    checkpoint, as in the code; the DLR loss takes ``max_{i != y} z_i`` exactly (the code
    picks it by sort order, which differs on ties); samples left unbroken come back at
    their highest-loss point (the code returns them unperturbed); with ``eot_iter > 1``
    the loss is averaged over the draws (the code keeps the last draw's).
    """

    def __init__(
        self,
        model: nn.Module,
        norm: str = "Linf",
        eps: float = 8 / 255,
        steps: int = 100,
        n_restarts: int = 1,
        loss: str = "ce",
        seed: int = 0,
        rho: float = 0.75,
        eot_iter: int = 1,
        use_largereps: bool = False,
    ) -> None:
        super().__init__(model, norm=norm, eps=eps, seed=seed)
        self.steps = check_integer(steps, "steps", minimum=1)
        self.n_restarts = check_integer(n_restarts, "n_restarts", minimum=1)
        self._set_loss(loss)
        self.rho = check_real(rho, "rho", minimum=0, maximum=1)
        self.eot_iter = check_integer(eot_iter, "eot_iter", minimum=1)
        self.use_largereps = check_flag(use_largereps, "use_largereps")
        if use_largereps and self.norm != "L1":
            raise ValueError(
                f"use_largereps is for the L1 threat model (norm='L1'); got norm={norm!r}."
            )

    def _set_loss(self, loss: Any) -> None:
        if not isinstance(loss, str):
            raise TypeError(f"loss must be 'ce' or 'dlr'; got {type(loss).__name__}.")
        if loss not in _LOSSES:
            raise ValueError(f"loss must be 'ce' or 'dlr'; got {loss!r}.")
        self.loss = loss

    # -- what the targeted attack changes ---------------------------------------------

    def _check_classes(self, n_classes: int) -> None:
        if self.loss == "dlr":
            _check_class_count(n_classes, 3, "loss='dlr'")

    def _schedule(self, n_classes: int) -> list[int | None]:
        """One entry per run: the rank (in the clean logits) of its target, or ``None``."""
        return [None] * self.n_restarts

    def _loss(self, logits, labels, targets):
        if self.loss == "ce":
            return F.cross_entropy(logits, labels, reduction="none")
        return dlr_loss(logits, labels)

    # -- one run ---------------------------------------------------------------------

    def _random_delta(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        radius = 3 * self.eps if self.use_largereps else self.eps
        if self.norm == "Linf":
            noise = 2 * torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            noise = noise - 1
            return radius * noise / _per_sample(noise.abs(), lambda t: t.amax(1)).clamp_min(1e-12)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if self.norm == "L2":
            return radius * noise / (_per_sample(noise, lambda t: t.norm(dim=1)) + 1e-12)
        return project_l1_box(x, noise, radius)

    def _project(self, x: torch.Tensor, point: torch.Tensor, eps: float) -> torch.Tensor:
        if self.norm == "Linf":
            return torch.minimum(torch.maximum(point, x - eps), x + eps).clamp(0, 1)
        delta = point - x
        if self.norm == "L2":
            norm = _per_sample(delta, lambda t: t.norm(dim=1))
            return (x + delta * (eps / (norm + 1e-12)).clamp(max=1.0)).clamp(0, 1)
        return (x + project_l1_box(x, delta, eps)).clamp(0, 1)  # clamping only shrinks it

    def _loss_and_grad_input(self, point, labels, targets):
        grad = torch.zeros_like(point)
        total = torch.zeros(point.shape[0], dtype=point.dtype, device=point.device)
        for _ in range(self.eot_iter):
            with torch.enable_grad():
                leaf = point.detach().requires_grad_(True)
                logits = self.model(leaf)
                loss = self._loss(logits, labels, targets)
                (g,) = torch.autograd.grad(loss.sum(), leaf)
            grad += g
            total += loss.detach()
        return logits.detach(), total / self.eot_iter, grad / self.eot_iter

    def _sparse_step(self, x_adv, grad, step, topk):
        flat = grad.flatten(1)
        size = flat.abs()
        n_features = flat.shape[1]
        index = ((1 - topk) * n_features).clamp(0, n_features - 1).long()
        threshold = size.sort(1).values.gather(1, index[:, None])
        direction = torch.where(size >= threshold, flat.sign(), torch.zeros_like(flat))
        count = direction.abs().sum(1, keepdim=True)
        return x_adv + step * (direction / (count + 1e-10)).view_as(x_adv)

    def _single_run(self, x, labels, targets, x_adv, eps: float, steps: int, warm: bool):
        """One APGD run from ``x_adv``: (best point, its loss, broken, misclassifying point)."""
        n = x.shape[0]
        shape = (-1, *([1] * (x.ndim - 1)))
        logits, loss, grad = self._loss_and_grad_input(x_adv, labels, targets)
        wrong = logits.argmax(1) != labels
        adversarial = x_adv.clone()
        best, best_loss, best_grad = x_adv.clone(), loss.clone(), grad.clone()
        sparse = self.norm == "L1"
        if sparse:
            step = torch.full((n,), eps, dtype=x.dtype, device=x.device)
            n_features = x[0].numel()
            if warm:
                sparsity = (x_adv != x).flatten(1).sum(1).to(x.dtype)
                topk = sparsity / n_features / 1.5
            else:
                sparsity = torch.full((n,), float(n_features), dtype=x.dtype, device=x.device)
                topk = torch.full((n,), 0.2, dtype=x.dtype, device=x.device)
            interval = max(int(0.04 * steps), 1)
            marks = set(range(interval, steps + 1, interval))
        else:
            step = torch.full((n,), 2 * eps, dtype=x.dtype, device=x.device)
            marks = set(_checkpoints(steps))
            increases = torch.zeros(n, dtype=torch.long, device=x.device)
            last_loss = loss
            loss_at_mark = best_loss.clone()
            halved_at_mark = torch.ones(n, dtype=torch.bool, device=x.device)
        previous = x_adv
        last_mark = 0
        for i in range(1, steps + 1):
            with torch.no_grad():
                size = step.view(shape)
                if sparse:
                    moved = self._project(x, self._sparse_step(x_adv, grad, size, topk), eps)
                else:
                    direction = grad.sign()
                    if self.norm == "L2":
                        direction = grad / (_per_sample(grad, lambda t: t.norm(dim=1)) + 1e-12)
                    moved = self._project(x, x_adv + size * direction, eps)
                    if i > 1:
                        moved = (
                            x_adv
                            + _MOMENTUM * (moved - x_adv)
                            + (1 - _MOMENTUM) * (x_adv - previous)
                        )
                        moved = self._project(x, moved, eps)
            previous, x_adv = x_adv, moved
            logits, loss, grad = self._loss_and_grad_input(x_adv, labels, targets)
            with torch.no_grad():
                now_wrong = logits.argmax(1) != labels
                adversarial = torch.where(now_wrong.view(shape), x_adv, adversarial)
                wrong = wrong | now_wrong
                improved = loss > best_loss
                best = torch.where(improved.view(shape), x_adv, best)
                best_grad = torch.where(improved.view(shape), grad, best_grad)
                best_loss = torch.where(improved, loss, best_loss)
                if not sparse:
                    increases += (loss > last_loss).long()
                    last_loss = loss
                if i not in marks:
                    continue
                if sparse:
                    new_sparsity = (best != x).flatten(1).sum(1).to(x.dtype)
                    restart = new_sparsity < 0.95 * sparsity
                    topk = new_sparsity / n_features / 1.5
                    step = torch.where(restart, torch.full_like(step, eps), step / 1.5)
                    step = step.clamp(eps / 10, eps)
                    sparsity = new_sparsity
                else:
                    stalled = increases.to(x.dtype) < self.rho * (i - last_mark)
                    unchanged = ~halved_at_mark & (best_loss <= loss_at_mark)
                    restart = stalled | unchanged
                    step = torch.where(restart, step / 2, step)
                    halved_at_mark = restart
                    loss_at_mark = best_loss.clone()
                    last_loss = torch.where(restart, best_loss, last_loss)
                    increases.zero_()
                x_adv = torch.where(restart.view(shape), best, x_adv)
                grad = torch.where(restart.view(shape), best_grad, grad)
                last_mark = i
        return best, best_loss, wrong, adversarial

    def _attack(self, x, labels, targets, start):
        if not self.use_largereps:
            return self._single_run(x, labels, targets, start, self.eps, self.steps, False)
        first = -(-3 * self.steps // 10)  # ceil(0.3 * steps), exactly
        stages = ((3.0, first), (2.0, first), (1.0, max(self.steps - 2 * first, 0)))
        point = start
        for factor, steps in stages:
            eps = factor * self.eps
            point = self._project(x, point, eps)
            result = self._single_run(x, labels, targets, point, eps, steps, True)
            point = result[0]
        return result

    # -- the call --------------------------------------------------------------------

    def forward(self, images, labels, *, sample_ids=None, top_label=None) -> torch.Tensor:
        x = images
        n = x.shape[0]
        with torch.no_grad():
            clean = self.model(x)
        n_classes = clean.shape[-1]
        check_labels(labels, n_classes, top_label)
        self._check_classes(n_classes)
        generator = self._batch_generator(x.device)
        result = x.clone()
        broken = clean.argmax(1) != labels
        best_loss = torch.full((n,), -torch.inf, dtype=x.dtype, device=x.device)
        ranking = None
        for run, rank in enumerate(self._schedule(n_classes)):
            todo = (~broken).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            xs, ys = x[todo], labels[todo]
            targets = None
            if rank is not None:
                if ranking is None:
                    ranking = clean.argsort(dim=1, descending=True)
                targets = ranking[todo, rank]
            own = None if sample_ids is None else sample_ids[todo.cpu()]
            start = self._random_draw(self._random_delta, xs, generator, own, run)
            start = (xs + start).clamp(0, 1)
            best, loss, wrong, adversarial = self._attack(xs, ys, targets, start)
            with torch.no_grad():
                shape = (-1, *([1] * (x.ndim - 1)))
                higher = ~wrong & (loss > best_loss[todo])
                chosen = torch.where(wrong.view(shape), adversarial, result[todo])
                chosen = torch.where(higher.view(shape), best, chosen)
                result[todo] = chosen
                best_loss[todo] = torch.where(higher, loss, best_loss[todo])
                broken[todo] = wrong
        return result


class APGDT(APGD):
    """Targeted Auto-PGD on the targeted DLR loss (APGD-T, Croce & Hein, 2020).

    For each of the ``n_target_classes`` most likely wrong classes (ranked by the clean
    logits: the 2nd, 3rd, ... largest), ``n_restarts`` runs of APGD maximise
    ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)``, each only on the samples no
    earlier run broke. Success means misclassified (not necessarily as the target). Needs
    ``>= 4`` classes.

    Parameters
    ----------
    model, norm, eps, steps, n_restarts, seed, rho, eot_iter, use_largereps
        As :class:`APGD`.
    n_target_classes : int, default=9
        Target classes tried, ``>= 1``; a model with ``K`` classes has ``K - 1`` of them,
        so at most that many are tried.
    """

    def __init__(
        self,
        model: nn.Module,
        norm: str = "Linf",
        eps: float = 8 / 255,
        steps: int = 100,
        n_restarts: int = 1,
        n_target_classes: int = 9,
        seed: int = 0,
        rho: float = 0.75,
        eot_iter: int = 1,
        use_largereps: bool = False,
    ) -> None:
        super().__init__(
            model,
            norm=norm,
            eps=eps,
            steps=steps,
            n_restarts=n_restarts,
            seed=seed,
            rho=rho,
            eot_iter=eot_iter,
            use_largereps=use_largereps,
        )
        self.n_target_classes = check_integer(n_target_classes, "n_target_classes", minimum=1)

    def _set_loss(self, loss: Any) -> None:
        self.loss = "dlr-targeted"

    def _check_classes(self, n_classes: int) -> None:
        _check_class_count(n_classes, 4, "APGDT (the targeted DLR loss)")

    def _schedule(self, n_classes: int) -> list[int | None]:
        count = min(self.n_target_classes, n_classes - 1)
        return [rank for rank in range(1, count + 1) for _ in range(self.n_restarts)]

    def _loss(self, logits, labels, targets):
        return dlr_loss_targeted(logits, labels, targets)
