"""Square Attack (Andriushchenko et al., ECCV 2020), score-based black box, Linf and L2.

A random search: from a random start on the boundary of the ``eps`` ball, each iteration
proposes a change of one random square window (of a side that shrinks with the schedule of
``p``) and keeps it when the loss (the margin by default) decreases; a sample stops once it is
misclassified. Only the model's outputs are used: everything runs under
:func:`torch.no_grad`, no gradient is ever computed.

Square subclasses :class:`~gdws_torch.robustness.attacks.Attack` and has its
conventions: pixels in ``[0, 1]``, the model in eval mode during the attack (its modes
restored afterwards), parameters and their ``.grad`` untouched, per-sample seeds through
``sample_ids``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gdws_approx.checks import check_integer, check_real
from gdws_torch.robustness.attacks import Attack, sample_seed
from gdws_torch.robustness.checks import check_labels

__all__ = ["LOSSES", "Square", "p_selection"]

LOSSES = ("margin", "ce")

_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64))
_SCHEDULE += ((6000, 128), (8000, 256))


def p_selection(p_init: float, iteration: int, n_queries: int) -> float:
    """The fraction of pixels changed at ``iteration`` (0-based) of ``n_queries``.

    The piecewise-constant schedule of the paper: ``p_init`` halves after iterations 10,
    50, 200, 500, 1000, 2000, 4000, 6000 and 8000 of a 10 000-query budget, rescaled to
    ``n_queries`` as in the original code.
    """
    it = int(iteration / n_queries * 10000)
    divisor = 512
    for bound, value in _SCHEDULE:
        if it <= bound:
            divisor = value
            break
    return p_init / divisor


def _bump_rectangle(rows: int, cols: int) -> torch.Tensor:
    """Nested rectangles with weights ``1 / (k+1)^2`` around the centre, unit L2 norm."""
    bump = torch.zeros(rows, cols, dtype=torch.float64)
    if rows == 0 or cols == 0:
        return bump
    top, left = rows // 2, cols // 2
    for k in range(max(top, left) + 1):
        bump[max(top - k, 0) : top + k + 1, max(left - k, 0) : left + k + 1] += 1.0 / (k + 1) ** 2
    return bump / bump.norm()


def _bump(s: int) -> torch.Tensor:
    """The L2 update's ``s x s`` pattern: two bumps of opposite signs, unit L2 norm."""
    pattern = torch.zeros(s, s, dtype=torch.float64)
    pattern[: s // 2] = _bump_rectangle(s // 2, s)
    pattern[s // 2 :] = -_bump_rectangle(s - s // 2, s)
    return pattern / pattern.norm()


class _Streams:
    """Uniform numbers per iteration, from one generator per sample or one per batch.

    Per-sample mode (``seeds``): every sample draws from its own generator, in blocks of
    ``block`` iterations refilled while it is still attacked, so the numbers a sample sees
    depend on its seed alone. Batch mode: one generator (the attack's, seeded by ``seed``) serves
    the active samples of each iteration.
    """

    def __init__(self, n, width, device, seeds=None, generator=None, block=128):
        self.n, self.width, self.device, self.block = n, width, device, block
        self.generator = generator
        self.generators = None
        if seeds is not None:
            self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
            self.buffer = torch.empty(n, block, width, dtype=torch.float64, device=device)
        self.iteration = 0

    def _rand(self, shape, generator):
        return torch.rand(shape, generator=generator, dtype=torch.float64, device=self.device)

    def initial(self, width: int) -> torch.Tensor:
        """``(n, width)`` numbers for the start."""
        if self.generators is None:
            return self._rand((self.n, width), self.generator)
        return torch.stack([self._rand((width,), g) for g in self.generators])

    def next(self, active: torch.Tensor) -> torch.Tensor:
        """``(len(active), width)`` numbers for this iteration's active samples."""
        position = self.iteration % self.block
        self.iteration += 1
        if self.generators is None:
            return self._rand((active.numel(), self.width), self.generator)
        if position == 0:
            for i in active.tolist():
                self.buffer[i] = self._rand((self.block, self.width), self.generators[i])
        return self.buffer[active, position]


class Square(Attack):
    """Square Attack (Andriushchenko et al., 2020): random search on square windows.

    Parameters
    ----------
    model : torch.nn.Module
        A classifier taking pixels ``(N, C, H, W)`` in ``[0, 1]`` and returning logits.
    norm : {"Linf", "L2"}, default="Linf"
        The threat model.
    eps : float, default=8/255
        Radius of the ball, in pixel units: ``<= 1`` for Linf, at most the pixel box's
        diameter for L2.
    n_queries : int, default=5000
        Model queries per sample and restart, the random start included.
    n_restarts : int, default=1
        Runs, each on the samples still correctly classified.
    p_init : float in (0, 1], default=0.8
        The initial fraction of pixels a square covers (AutoAttack's value); halved along
        the schedule of :func:`p_selection`.
    loss : {"margin", "ce"}, default="margin"
        The loss minimised: the margin ``z_y - max_{k != y} z_k`` or minus the
        cross-entropy. A candidate is kept when it lowers the loss or misclassifies.
    seed : int, default=0
        Seed of the random search.

    Notes
    -----
    Linf (Algorithm 2 of the paper): vertical stripes of ``+-eps`` to start, then each
    iteration sets a random ``s x s`` window, per channel, to ``x +- eps``; a proposal that
    would leave the image unchanged is redrawn, as in the original code. L2 (Algorithm 3):
    a grid of ``+-`` bump pairs to start, then each iteration moves the perturbation's
    mass of a second random window into the first one, as a new bump pair plus the old
    content, and rescales the whole perturbation to the ``eps`` sphere.

    Called as ``attack(images, labels)``, the random numbers of a batch come from one
    generator seeded with ``seed``; with ``sample_ids=ids`` (each sample's index in its
    dataset) every sample draws its start, windows and signs from its own generator seeded
    by ``sample_seed(seed, id, restart)``, so a sample is attacked the same way whatever
    batch or process it lands in.
    """

    norms = ("Linf", "L2")
    uses_gradients = False

    def __init__(
        self,
        model: nn.Module,
        norm: str = "Linf",
        eps: float = 8 / 255,
        n_queries: int = 5000,
        n_restarts: int = 1,
        p_init: float = 0.8,
        loss: str = "margin",
        seed: int = 0,
    ) -> None:
        super().__init__(model, norm=norm, eps=eps, seed=seed)
        self.n_queries = check_integer(n_queries, "n_queries", minimum=1)
        self.n_restarts = check_integer(n_restarts, "n_restarts", minimum=1)
        self.p_init = check_real(p_init, "p_init", minimum=0, strict=True, maximum=1)
        if not isinstance(loss, str):
            raise TypeError(f"loss must be one of {LOSSES}; got {loss!r} ({type(loss).__name__}).")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}; got {loss!r}.")
        self.loss = loss

    # -- the loss ------------------------------------------------------------------------

    def _query(self, x: torch.Tensor, labels: torch.Tensor):
        """Loss to minimise and misclassification of ``x``, from one forward pass."""
        logits = self.model(x)
        rows = torch.arange(x.shape[0], device=x.device)
        true = logits[rows, labels]
        others = logits.clone()
        others[rows, labels] = -torch.inf
        margin = true - others.amax(1)
        if self.loss == "margin":
            loss = margin
        else:
            loss = -F.cross_entropy(logits, labels, reduction="none")
        return loss, logits.argmax(1) != labels

    # -- the runs ------------------------------------------------------------------------

    def _side(self, p: float, h: int, w: int) -> int:
        s = round(math.sqrt(p * h * w))
        if self.norm == "Linf":
            return min(max(s, 1), min(h, w) - 1)
        s = max(s, 3)
        s += 1 - s % 2  # odd
        s = min(s, min(h, w) - 1)
        return max(s - (1 - s % 2), 1)

    def _run(self, x: torch.Tensor, labels: torch.Tensor, streams: _Streams):
        n, c, h, w = x.shape
        if self.norm == "Linf":
            signs = streams.initial(c * w).lt(0.5).to(x.dtype) * 2 - 1
            x_best = (x + self.eps * signs.view(n, c, 1, w)).clamp(0, 1)
        else:
            x_best = self._l2_start(x, streams)
        loss_best, fooled = self._query(x_best, labels)
        for iteration in range(self.n_queries - 1):
            active = (~fooled).nonzero().flatten()
            if active.numel() == 0:
                break
            s = self._side(p_selection(self.p_init, iteration, self.n_queries), h, w)
            numbers = streams.next(active)
            propose = self._linf_proposal if self.norm == "Linf" else self._l2_proposal
            candidate = propose(x[active], x_best[active], s, numbers)
            loss, wrong = self._query(candidate, labels[active])
            better = loss < loss_best[active]
            loss_best[active] = torch.where(better, loss, loss_best[active])
            keep = better | wrong
            x_best[active] = torch.where(keep.view(-1, 1, 1, 1), candidate, x_best[active])
            fooled[active] = wrong
        return x_best, fooled

    def _windows(self, corner_h, corner_w, s, h, w):
        """``(n, 1, h, w)`` masks of the ``s x s`` windows at the given corners."""
        rows = torch.arange(h, device=corner_h.device)
        cols = torch.arange(w, device=corner_h.device)
        in_rows = (rows >= corner_h[:, None]) & (rows < corner_h[:, None] + s)
        in_cols = (cols >= corner_w[:, None]) & (cols < corner_w[:, None] + s)
        return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]

    @staticmethod
    def _corner(u: torch.Tensor, span: int) -> torch.Tensor:
        """Uniform integer in ``[0, span)`` (the original's ``randint(0, h - s)``)."""
        return (u * span).floor().long().clamp_(0, span - 1)

    def _linf_proposal(self, x, x_best, s, numbers):
        c, h, w = x.shape[1:]
        window = self._windows(
            self._corner(numbers[:, 0], h - s), self._corner(numbers[:, 1], w - s), s, h, w
        )
        up = (x + self.eps).clamp(0, 1)
        down = (x - self.eps).clamp(0, 1)
        # A channel's window that already sits at x + sign * eps does not change with that
        # sign; a sign vector that changes no channel is redrawn, uniformly among the others.
        up_same = (((up - x_best).abs() < 1e-7) | ~window).flatten(2).all(2)
        down_same = (((down - x_best).abs() < 1e-7) | ~window).flatten(2).all(2)
        can_be_null = (up_same | down_same).all(1)
        null_up = up_same  # the only sign vector that may be null: up where up changes nothing
        up_sign = numbers[:, 2 : 2 + c] < 0.5
        null = can_be_null & (up_sign == null_up).all(1)
        if bool(null.any()):
            # A uniform nonzero c-bit flip mask: lowest set bit j with P(j) ~ 2^(c-1-j),
            # higher bits fair coins.
            j = torch.arange(c, device=x.device, dtype=torch.float64)
            cdf = (1 - 2.0 ** -(j + 1)) / (1 - 2.0**-c)
            lowest = (cdf[None, :] <= numbers[:, 2 + c, None]).sum(1).clamp_max(c - 1)
            flips = (numbers[:, 3 + c : 3 + 2 * c] < 0.5) & (j[None, :] > lowest[:, None])
            flips |= j[None, :] == lowest[:, None]
            redrawn = null_up ^ flips
            up_sign = torch.where(null[:, None], redrawn, up_sign)
        target = torch.where(up_sign[:, :, None, None], up, down)
        return torch.where(window, target, x_best)

    def _l2_start(self, x: torch.Tensor, streams: _Streams) -> torch.Tensor:
        n, c, h, w = x.shape
        s = min(h, w) // 5
        pattern = _bump(s).to(x.dtype).to(x.device)
        per_row, per_col = h // s, w // s
        numbers = streams.initial(per_row * per_col * (1 + c))
        numbers = numbers.view(n, per_row * per_col, 1 + c)
        delta = torch.zeros_like(x)
        start_h, start_w = (h - 5 * s) // 2, (w - 5 * s) // 2
        square = 0
        for r in range(per_row):
            for q in range(per_col):
                top, left = start_h + r * s, start_w + q * s
                transpose = (numbers[:, square, 0] > 0.5).view(n, 1, 1, 1)
                bump = torch.where(transpose, pattern.T, pattern)
                signs = (numbers[:, square, 1:] < 0.5).to(x.dtype) * 2 - 1
                patch = bump * signs.view(n, c, 1, 1)
                rows, cols = max(min(s, h - top), 0), max(min(s, w - left), 0)
                delta[:, :, top : top + s, left : left + s] += patch[:, :, :rows, :cols]
                square += 1
        scale = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(n, 1, 1, 1)
        return (x + delta / scale * self.eps).clamp(0, 1)

    def _l2_proposal(self, x, x_best, s, numbers):
        n, c, h, w = x.shape
        delta = x_best - x
        top = self._corner(numbers[:, 0], h - s)
        left = self._corner(numbers[:, 1], w - s)
        window = self._windows(top, left, s, h, w)
        emptied = self._windows(
            self._corner(numbers[:, 2], h - s), self._corner(numbers[:, 3], w - s), s, h, w
        )
        # Gather the first window's content, (n, c, s, s).
        offsets = torch.arange(s, device=x.device)
        rows = (top[:, None] + offsets)[:, None, :, None]
        cols = (left[:, None] + offsets)[:, None, None, :]
        samples = torch.arange(n, device=x.device)[:, None, None, None]
        channels = torch.arange(c, device=x.device)[None, :, None, None]
        old = delta[samples, channels, rows, cols]
        old_norm = old.square().sum((2, 3), keepdim=True).sqrt()
        image_norm = delta.flatten(1).norm(dim=1).view(n, 1, 1, 1)
        freed_norm = (delta * (window | emptied)).square().sum((2, 3), keepdim=True).sqrt()
        pattern = _bump(s).to(x.dtype).to(x.device)
        transpose = (numbers[:, 4] > 0.5).view(n, 1, 1, 1)
        signs = (numbers[:, 5 : 5 + c] < 0.5).to(x.dtype) * 2 - 1
        new = torch.where(transpose, pattern.T, pattern) * signs.view(n, c, 1, 1)
        new = new + old / (1e-10 + old_norm)
        budget = ((self.eps**2 - image_norm.square()).clamp_min(0) / c + freed_norm.square()).sqrt()
        new = new / new.square().sum((2, 3), keepdim=True).sqrt().clamp_min(1e-12) * budget
        delta = delta * ~emptied
        delta[samples, channels, rows, cols] = new
        scale = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(n, 1, 1, 1)
        return (x + delta / scale * self.eps).clamp(0, 1)

    # -- the call ------------------------------------------------------------------------

    def _streams(self, n, c, restart, ids, device, generator) -> _Streams:
        width = 3 + 2 * c if self.norm == "Linf" else 5 + c
        if ids is None:
            return _Streams(n, width, device, generator=generator)
        seeds = [sample_seed(self.seed, int(i), restart) for i in ids.tolist()]
        return _Streams(n, width, device, seeds=seeds)

    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4:
            raise ValueError(
                f"images must have shape (N, C, H, W) for the Square attack; got "
                f"{tuple(images.shape)}."
            )
        smallest = 2 if self.norm == "Linf" else 5
        if min(images.shape[2:]) < smallest:
            raise ValueError(
                f"images must be at least {smallest}x{smallest} pixels for the {self.norm} "
                f"Square attack; got {images.shape[2]}x{images.shape[3]}."
            )

    def forward(self, images, labels, *, sample_ids=None, top_label=None) -> torch.Tensor:
        """As :meth:`Attack.__call__`, with images ``(N, C, H, W)``: ``H, W >= 2`` (Linf)
        or ``>= 5`` (L2)."""
        x = images
        adversarial = x.clone()
        with torch.no_grad():
            logits = self.model(x)
            check_labels(labels, logits.shape[-1], top_label)
            robust = logits.argmax(1) == labels
            generator = self._batch_generator(x.device)
            for restart in range(self.n_restarts):
                index = robust.nonzero().flatten()
                if index.numel() == 0:
                    break
                own = None if sample_ids is None else sample_ids[index.cpu()]
                streams = self._streams(
                    index.numel(), x.shape[1], restart, own, x.device, generator
                )
                best, fooled = self._run(x[index], labels[index], streams)
                adversarial[index[fooled]] = best[fooled]
                robust[index[fooled]] = False
        return adversarial
