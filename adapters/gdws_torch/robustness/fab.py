"""FAB, the fast adaptive boundary attack (Croce & Hein, ICML 2020), for Linf and L2.

FAB looks for the smallest perturbation that changes the prediction: at each step it
linearises the model at the current point, projects both the current point and the clean
image onto the linearised decision boundary (inside the pixel box), moves to a convex
combination of the two projections (biased towards the clean image by ``alpha``) with an
overshoot ``eta``, and, once the prediction flips, steps back towards the clean image by
``beta``. As inside AutoAttack, a perturbation found by FAB only counts when it lies within
``eps``; the targeted version (FAB-T, AutoAttack's default) attacks, one after the other,
the ``n_target_classes`` classes with the highest clean logits after the prediction, each
only on the samples that are still correctly classified.

FAB subclasses :class:`~gdws_torch.robustness.attacks.Attack` and has its conventions:
pixels in ``[0, 1]``, the model in eval mode during the attack (its modes restored
afterwards), gradients taken with respect to the input only (parameters and their
``.grad`` untouched), per-sample seeds through ``sample_ids``.
"""

from __future__ import annotations

import torch
from torch import nn

from gdws_approx.checks import check_integer, check_real
from gdws_torch.robustness.attacks import Attack
from gdws_torch.robustness.checks import check_flag, check_labels, check_norm

__all__ = ["FAB", "boundary_projection"]


# -- helpers -------------------------------------------------------------------------------


def _norm(t: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample norm of ``t`` (``(N, ...)``), shape ``(N,)``."""
    flat = t.flatten(1)
    if norm == "Linf":
        return flat.abs().amax(1) if flat.shape[1] else flat.new_zeros(flat.shape[0])
    return flat.norm(p=2, dim=1)


def _view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.view(-1, *([1] * (ndim - 1)))


# -- the projection onto the linearised boundary -------------------------------------------


def boundary_projection(
    points: torch.Tensor, w: torch.Tensor, b: torch.Tensor, norm: str
) -> torch.Tensor:
    """Smallest step onto a hyperplane that stays in the pixel box, one per row.

    For each row, the ``d`` of smallest ``norm`` with ``w . (points + d) = b`` and
    ``0 <= points + d <= 1`` (the projection problem at the core of FAB). When the
    box does not reach the hyperplane, the box point closest to it: every coordinate moved
    to its bound in the direction that brings ``w . x`` towards ``b``.

    Parameters
    ----------
    points : torch.Tensor
        ``(M, D)`` points in ``[0, 1]``.
    w : torch.Tensor
        ``(M, D)`` normals of the hyperplanes.
    b : torch.Tensor
        ``(M,)`` offsets.
    norm : {"Linf", "L2"}

    Returns
    -------
    torch.Tensor
        ``(M, D)`` steps ``d``.

    Notes
    -----
    Both norms reduce to one piecewise-linear equation. Orient the hyperplane so that
    ``c = w . points - b >= 0``; coordinate ``i`` can then move by at most
    ``room_i`` (to 0 when ``w_i > 0``, to 1 when ``w_i < 0``). The optimum moves it by
    ``min(lam, room_i)`` (Linf) or ``min(lam |w_i|, room_i)`` (L2, the KKT conditions),
    and ``lam`` solves ``sum_i min(lam a_i, |w_i| room_i) = c`` with ``a_i = |w_i|`` or
    ``w_i^2``: a sort of the breakpoints ``|w_i| room_i / a_i`` and cumulative sums find it
    exactly, in ``O(D log D)`` per row.
    """
    norm = check_norm(norm, FAB.norms)
    c = (w * points).sum(1) - b
    orient = torch.where(c >= 0, 1.0, -1.0).to(w.dtype)
    w = w * orient[:, None]
    c = c * orient
    magnitude = w.abs()
    moving = magnitude > 0
    room = torch.where(w > 0, points, 1 - points).clamp_min(0)
    slope = magnitude if norm == "Linf" else magnitude**2
    cap = magnitude * room  # the decrease of w . x when coordinate i moves to its bound
    one = torch.ones_like(slope)
    breakpoint = torch.where(moving, cap / torch.where(moving, slope, one), torch.inf)
    order = breakpoint.argsort(1)
    sorted_break = breakpoint.gather(1, order)
    sorted_slope = slope.gather(1, order)
    sorted_cap = cap.gather(1, order)
    zero = torch.zeros_like(c)[:, None]
    cap_before = torch.cat([zero, sorted_cap.cumsum(1)], 1)  # sum over the k smallest
    slope_before = torch.cat([zero, sorted_slope.cumsum(1)], 1)
    total_cap, total_slope = cap_before[:, -1], slope_before[:, -1]
    # Decrease reached at each breakpoint: the k+1 smallest saturated, the rest linear.
    finite = torch.isfinite(sorted_break)
    at_break = cap_before[:, 1:] + torch.where(
        finite, sorted_break * (total_slope[:, None] - slope_before[:, 1:]), 0.0
    )
    saturated = ((at_break <= c[:, None]) & finite).sum(1, keepdim=True)
    remaining = (total_slope[:, None] - slope_before.gather(1, saturated)).squeeze(1)
    lam = (c - cap_before.gather(1, saturated).squeeze(1)) / remaining.clamp_min(1e-30)
    lam = torch.where((c >= total_cap) | (remaining <= 0), torch.inf, lam.clamp_min(0))
    lam = lam[:, None]
    step = lam if norm == "Linf" else lam * magnitude
    move = torch.where(moving, torch.minimum(step, room), 0.0)
    return -torch.sign(w) * move


# -- the attack ----------------------------------------------------------------------------


class FAB(Attack):
    """FAB (Croce & Hein, 2020): minimal-norm attack, kept when within ``eps``.

    Parameters
    ----------
    model : torch.nn.Module
        A classifier taking pixels in ``[0, 1]`` and returning logits ``(N, K)``.
    norm : {"Linf", "L2"}, default="Linf"
        The norm of the perturbation.
    eps : float, default=8/255
        Radius of the threat model, in pixel units: a perturbation found is returned only
        when its ``norm`` is at most ``eps``; also the scale of the random starts. ``<= 1``
        for Linf, at most the pixel box's diameter for L2 (``sqrt(D)``: every perturbation
        found is kept).
    steps : int, default=100
        Iterations per run, ``>= 1``.
    n_restarts : int, default=1
        Runs per target class; the first starts at the clean image, the others at a random
        point at distance ``eps / 2`` (as the original).
    targeted : bool, default=True
        FAB-T: attack, one after the other, the ``n_target_classes`` classes with the
        highest clean logits after the predicted one, linearising only the logit
        difference to the target (one gradient per step). ``False``: the untargeted FAB,
        which linearises every logit difference (a Jacobian per step) and goes for the
        closest boundary.
    n_target_classes : int, default=9
        Target classes of FAB-T, ``>= 1`` and at most the number of classes minus one.
    alpha_max : float in [0, 1], default=0.1
        The largest weight of the clean image's projection in the step.
    eta : float >= 1, default=1.05
        Overshoot of the projections.
    beta : float in (0, 1), default=0.9
        Backward step towards the clean image once misclassified: FAB's step-bias factor
        (torchattacks' name), unrelated to LEGO's error budget ``beta``.
    final_search_steps : int, default=3
        Steps of FAB's final search (``las`` in the authors' first implementation, 3 steps
        there): on the segment from the clean image to the best adversarial, the point
        where the linearly interpolated logit margin vanishes is tried and the segment
        shrunk, which only reduces the norm. AutoAttack's FAB does not run it: ``0``
        reproduces that implementation.
    seed : int, default=0
        Seed of the random starts (restarts only: with ``n_restarts=1`` FAB is
        deterministic).

    Notes
    -----
    Called as ``attack(images, labels)``, the random starts of a batch come from one
    generator seeded with ``seed``; with ``sample_ids=ids`` (each sample's index in its
    dataset) every sample's start comes from its own generator seeded by
    ``sample_seed(seed, id, k * n_restarts + restart)`` for target ``k``, so a sample is
    attacked the same way whatever batch or process it lands in.

    Each step costs one forward and one backward pass (``K`` backward passes untargeted)
    plus one forward pass to check the prediction, as the reference implementation.
    """

    norms = ("Linf", "L2")

    def __init__(
        self,
        model: nn.Module,
        norm: str = "Linf",
        eps: float = 8 / 255,
        steps: int = 100,
        n_restarts: int = 1,
        targeted: bool = True,
        n_target_classes: int = 9,
        alpha_max: float = 0.1,
        eta: float = 1.05,
        beta: float = 0.9,
        seed: int = 0,
        *,
        final_search_steps: int = 3,
    ) -> None:
        super().__init__(model, norm=norm, eps=eps, seed=seed)
        self.steps = check_integer(steps, "steps", minimum=1)
        self.n_restarts = check_integer(n_restarts, "n_restarts", minimum=1)
        self.targeted = check_flag(targeted, "targeted")
        self.n_target_classes = check_integer(n_target_classes, "n_target_classes", minimum=1)
        self.alpha_max = check_real(alpha_max, "alpha_max", minimum=0, maximum=1)
        self.eta = check_real(eta, "eta", minimum=1)
        self.beta = check_real(beta, "beta", minimum=0, strict=True)
        if self.beta >= 1:
            raise ValueError(f"beta must be a finite real number in (0, 1); got {beta!r}.")
        self.final_search_steps = check_integer(final_search_steps, "final_search_steps", minimum=0)

    # -- one linearisation ---------------------------------------------------------------

    def _linearise(
        self, x: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logit differences ``(n, J)`` and their input gradients ``(n, J, D)``."""
        rows = torch.arange(x.shape[0], device=x.device)
        with torch.enable_grad():
            point = x.detach().requires_grad_(True)
            logits = self.model(point)
            if targets is not None:
                diff = logits[rows, targets] - logits[rows, labels]
                (grad,) = torch.autograd.grad(diff.sum(), point)
                return diff.detach()[:, None], grad.flatten(1)[:, None]
            grads = []
            for k in range(logits.shape[1]):
                (grad,) = torch.autograd.grad(
                    logits[:, k].sum(), point, retain_graph=k + 1 < logits.shape[1]
                )
                grads.append(grad.flatten(1))
        jacobian = torch.stack(grads, 1)
        logits = logits.detach()
        diff = logits - logits[rows, labels][:, None]
        dgrad = jacobian - jacobian[rows, labels][:, None]
        diff[rows, labels] = 1e10  # never the boundary to cross
        return diff, dgrad

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x).argmax(1)

    # -- one run -------------------------------------------------------------------------

    def _noise(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """A random start at distance ``eps / 2`` from ``x`` (as the original)."""
        if self.norm == "Linf":
            u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            noise = 2 * u - 1
        else:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        scale = _norm(noise, self.norm).clamp_min(1e-12)
        return (x + 0.5 * self.eps * noise / _view(scale, x.ndim)).clamp(0, 1)

    def _run(
        self,
        x: torch.Tensor,
        labels: torch.Tensor,
        targets: torch.Tensor | None,
        start: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Best adversarial of one run and its norm (``inf`` where none was found)."""
        n = x.shape[0]
        rows = torch.arange(n, device=x.device)
        flat0 = x.flatten(1)
        current = x.clone() if start is None else start
        best = x.clone()
        best_norm = torch.full((n,), torch.inf, dtype=x.dtype, device=x.device)
        for _ in range(self.steps):
            diff, dgrad = self._linearise(current, labels, targets)
            with torch.no_grad():
                dual = dgrad.abs().sum(2) if self.norm == "Linf" else dgrad.norm(dim=2)
                closest = (diff.abs() / (1e-12 + dual)).argmin(1)
                w = dgrad[rows, closest]
                flat = current.flatten(1)
                b = -diff[rows, closest] + (w * flat).sum(1)
                steps = boundary_projection(
                    torch.cat([flat, flat0]), torch.cat([w, w]), torch.cat([b, b]), self.norm
                )
                d_current, d_clean = steps[:n].view_as(x), steps[n:].view_as(x)
                a_current = _norm(d_current, self.norm).clamp_min(1e-8)
                a_clean = _norm(d_clean, self.norm).clamp_min(1e-8)
                alpha = (a_current / (a_current + a_clean)).clamp(0, self.alpha_max)
                alpha = _view(alpha, x.ndim)
                current = (
                    (current + self.eta * d_current) * (1 - alpha)
                    + (x + self.eta * d_clean) * alpha
                ).clamp(0, 1)
                fooled = self._predict(current) != labels
                size = _norm(current - x, self.norm)
                better = fooled & (size < best_norm)
                best = torch.where(_view(better, x.ndim), current, best)
                best_norm = torch.where(better, size, best_norm)
                back = x + (current - x) * self.beta
                current = torch.where(_view(fooled, x.ndim), back, current)
        found = torch.isfinite(best_norm)
        if self.final_search_steps and bool(found.any()):
            index = found.nonzero().flatten()
            best[index] = self._final_search(x[index], labels[index], best[index])
            best_norm[index] = _norm(best[index] - x[index], self.norm)
        return best, best_norm

    def _final_search(
        self, x: torch.Tensor, labels: torch.Tensor, adversarial: torch.Tensor
    ) -> torch.Tensor:
        """Shrink the segment ``[x, adversarial]`` around the boundary (the original ``las``).

        ``inner`` stays correctly classified, ``outer`` misclassified; each step tries the
        point where the linear interpolation of the logit margin between them vanishes.
        """
        rows = torch.arange(x.shape[0], device=x.device)
        with torch.no_grad():
            inner, outer = x.clone(), adversarial.clone()
            inner_logits, outer_logits = self.model(inner), self.model(outer)
            other = outer_logits.argmax(1)
            for _ in range(self.final_search_steps):
                margin_in = inner_logits[rows, labels] - inner_logits[rows, other]
                margin_out = outer_logits[rows, other] - outer_logits[rows, labels]
                t = margin_in / (margin_in + margin_out + 1e-10)
                t = torch.where((t >= 0) & (t <= 1), t, torch.ones_like(t))
                t = _view(t, x.ndim)
                point = inner * (1 - t) + outer * t
                logits = self.model(point)
                predicted = logits.argmax(1)
                correct = predicted == labels
                mask = _view(correct, x.ndim)
                inner = torch.where(mask, point, inner)
                inner_logits = torch.where(correct[:, None], logits, inner_logits)
                outer = torch.where(mask, outer, point)
                outer_logits = torch.where(correct[:, None], outer_logits, logits)
                other = torch.where(correct, other, predicted)
        return outer

    # -- the attack ----------------------------------------------------------------------

    def forward(self, images, labels, *, sample_ids=None, top_label=None) -> torch.Tensor:
        x = images
        adversarial = x.clone()
        with torch.no_grad():
            logits = self.model(x)
        n_classes = logits.shape[-1]
        check_labels(labels, n_classes, top_label)
        if self.targeted and self.n_target_classes > n_classes - 1:
            raise ValueError(
                f"n_target_classes must be at most the number of classes minus one "
                f"({n_classes - 1}: the model returns {n_classes} logits); got "
                f"{self.n_target_classes}."
            )
        robust = logits.argmax(1) == labels
        ranking = logits.argsort(1, descending=True)
        generator = self._batch_generator(x.device)
        rounds = self.n_target_classes if self.targeted else 1
        for k in range(rounds):
            for restart in range(self.n_restarts):
                index = robust.nonzero().flatten()
                if index.numel() == 0:
                    return adversarial
                xs, ys = x[index], labels[index]
                targets = ranking[index, k + 1] if self.targeted else None
                start = None
                if restart > 0:
                    own = None if sample_ids is None else sample_ids[index.cpu()]
                    run = k * self.n_restarts + restart
                    start = self._random_draw(self._noise, xs, generator, own, run)
                best, _ = self._run(xs, ys, targets, start)
                with torch.no_grad():
                    fooled = self.model(best).argmax(1) != ys
                fooled &= _norm(best - xs, self.norm) <= self.eps
                adversarial[index[fooled]] = best[fooled]
                robust[index[fooled]] = False
        return adversarial
