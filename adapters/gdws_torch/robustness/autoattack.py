"""AutoAttack: an ensemble of parameter-free attacks, the robust accuracy the field reports.

Croce & Hein (2020), "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks" (ICML). The attacks run one after the other, each only on
the samples that every earlier one left correctly classified (samples misclassified
unperturbed are never attacked); a sample counts as robust only if it survives them all.

Versions (Linf and L2):

- ``"standard"``: APGD-CE (100 steps, no restarts), APGD-T (targeted DLR loss, the 9 most
  likely wrong classes, 100 steps), FAB-T (9 target classes, 100 steps) and Square
  (5000 queries), as the authors' standard evaluation.
- ``"fast"``: APGD-CE and APGD-T only, the two attacks that decide nearly every sample;
  a lower bound on what the standard version breaks, about 2x cheaper.
- ``"custom"``: the attacks you list (names from :data:`ATTACK_NAMES` or attack objects).

For L1 the standard version is, as the authors' L1 evaluation, L1-APGD (Croce & Hein
2021, "Mind the box") with the large-radius warm start (``use_largereps``): APGD-CE with 5
restarts and APGD-T; ``"fast"`` is the same pair (FAB and Square have no L1 version here).

Same conventions as the attacks (:mod:`gdws_torch.robustness.attacks`): pixels in
``[0, 1]``, the model in eval mode during the attack and its modes restored, parameters and
their ``.grad`` untouched, ``sample_ids=`` so that sharded and resumed runs attack every
sample the same way. A model returning probabilities instead of logits is refused.

Where this differs from the reference implementations (the authors' ``autoattack``
package and ``torchattacks.AutoAttack``): the attacks are this library's
(:class:`~gdws_torch.robustness.apgd.APGD`, :class:`~gdws_torch.robustness.apgd.APGDT`,
:class:`~gdws_torch.robustness.fab.FAB`, :class:`~gdws_torch.robustness.square.Square`),
whose module notes list their own small differences; ``torchattacks.AutoAttack`` runs APGD,
APGD-T and FAB-T with 10 steps (its attacks' default), where the standard version (and
this class) runs 100; torchattacks also sends the samples misclassified unperturbed to the
first attack, where the original and this class skip them; random starts come from
per-sample generators with ``sample_ids`` (a batch generator otherwise), not from the
global RNG.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gdws_approx.checks import check_integer
from gdws_torch.robustness.apgd import APGD, APGDT
from gdws_torch.robustness.attacks import Attack
from gdws_torch.robustness.checks import check_labels
from gdws_torch.robustness.fab import FAB
from gdws_torch.robustness.masking import looks_like_probabilities
from gdws_torch.robustness.resume import describe_attack
from gdws_torch.robustness.square import Square

__all__ = ["ATTACK_NAMES", "VERSIONS", "AutoAttack", "AutoAttackReport", "AutoAttackResult"]

VERSIONS = ("standard", "fast", "custom")
#: The attacks ``version="custom"`` builds by name, and their names in reports.
ATTACK_NAMES = {
    "apgd-ce": "APGD-CE",
    "apgd-dlr": "APGD-DLR",
    "apgd-t": "APGD-T",
    "fab": "FAB",
    "fab-t": "FAB-T",
    "square": "Square",
}
_P = {"Linf": math.inf, "L2": 2.0, "L1": 1.0}


@dataclass(frozen=True)
class AutoAttackReport:
    """What an AutoAttack call found, per attack and per sample.

    Attributes
    ----------
    attacks : tuple of str
        The attacks, in the order they ran.
    clean_correct : torch.Tensor
        ``(N,)`` bool: classified correctly unperturbed.
    broken_by : torch.Tensor
        ``(N,)`` long, on the CPU: ``-1`` misclassified unperturbed (never attacked),
        ``i`` broken by ``attacks[i]`` (the first that succeeded: the later ones never saw
        it), ``len(attacks)`` robust.
    seconds : tuple of float
        Time spent in each attack.
    """

    attacks: tuple[str, ...]
    clean_correct: torch.Tensor
    broken_by: torch.Tensor
    seconds: tuple[float, ...]

    @property
    def n_samples(self) -> int:
        return int(self.broken_by.shape[0])

    def _percent(self, count: int) -> float:
        return 100.0 * count / self.n_samples if self.n_samples else math.nan

    @property
    def natural_accuracy(self) -> float:
        """Accuracy (%) on the unperturbed inputs (``nan`` for no samples)."""
        return self._percent(int(self.clean_correct.sum()))

    @property
    def robust_accuracy(self) -> float:
        """Accuracy (%) under the whole ensemble: the per-sample worst case."""
        return self._percent(int((self.broken_by == len(self.attacks)).sum()))

    @property
    def accuracy_by_attack(self) -> dict[str, float]:
        """``{attack: %}``: robust accuracy after each attack and every earlier one."""
        return {
            name: self._percent(int((self.broken_by > i).sum()))
            for i, name in enumerate(self.attacks)
        }

    @property
    def broken_counts(self) -> dict[str, int]:
        """``{attack: samples it broke}`` (each sample counted for the first attack only)."""
        return {name: int((self.broken_by == i).sum()) for i, name in enumerate(self.attacks)}

    def broken_by_names(self) -> list[str | None]:
        """Per sample: ``"natural"``, the attack that broke it, or ``None`` (robust)."""
        names = ["natural", *self.attacks, None]
        return [names[int(code) + 1] for code in self.broken_by.tolist()]

    def to_dict(self) -> dict[str, Any]:
        """Plain values (JSON): accuracies in percent (``None`` for no samples)."""

        def plain(value: float) -> float | None:
            return None if math.isnan(value) else value

        return {
            "attacks": list(self.attacks),
            "n_samples": self.n_samples,
            "natural_accuracy": plain(self.natural_accuracy),
            "robust_accuracy": plain(self.robust_accuracy),
            "accuracy_by_attack": {k: plain(v) for k, v in self.accuracy_by_attack.items()},
            "broken_counts": self.broken_counts,
            "seconds": dict(zip(self.attacks, self.seconds, strict=True)),
            "broken_by": self.broken_by_names(),
        }

    def format(self) -> str:
        """One line: natural accuracy, then the robust accuracy after each attack."""
        steps = " -> ".join(f"{n} {v:.2f} %" for n, v in self.accuracy_by_attack.items())
        return f"{self.n_samples} samples: natural {self.natural_accuracy:.2f} % -> {steps}"


@dataclass(frozen=True)
class AutoAttackResult:
    """:meth:`AutoAttack.run`'s answer: the worst-case adversarial images and the report."""

    adversarial: torch.Tensor
    report: AutoAttackReport


class AutoAttack(Attack):
    """AutoAttack (Croce & Hein, 2020): APGD-CE, APGD-T, FAB-T and Square in cascade.

    Parameters
    ----------
    model : torch.nn.Module
        A classifier taking pixels in ``[0, 1]`` and returning logits (not probabilities).
    norm : {"Linf", "L2", "L1"}, default="Linf"
        The threat model.
    eps : float, default=8/255
        Radius of the ball, in pixel units, ``> 0``: ``<= 1`` for Linf, at most the pixel
        box's diameter for L2 and L1 (``sqrt(D)`` and ``D``, ``D`` values per image).
    version : {"standard", "fast", "custom"}, default="standard"
        See the module notes.
    attacks : sequence, optional
        ``version="custom"`` only, and required there: the attacks in the order they run,
        each a name of :data:`ATTACK_NAMES` (built with ``steps``, ``n_queries``,
        ``n_target_classes``, ``seed`` and the standard version's other settings), an
        attack object (any ``attack(images, labels) -> images``; its class name labels it),
        or a ``(label, attack object)`` pair.
    seed : int, default=0
        Seed of every attack built here (the reference passes one seed to all of them).
    steps : int, optional
        ``version="custom"``: iterations of the named APGD and FAB attacks (default 100).
    n_queries : int, optional
        ``version="custom"``: queries of a named Square attack (default 5000).
    n_target_classes : int, default=9
        Target classes of APGD-T and FAB-T (at most the number of classes minus one are
        used).

    Attributes
    ----------
    stages : list of (str, attack)
        The attacks, labelled, in the order they run.
    last_report : AutoAttackReport or None
        The report of the latest call.

    Examples
    --------
    >>> attack = AutoAttack(model, norm="Linf", eps=8 / 255)  # doctest: +SKIP
    >>> adversarial = attack(images, labels)                  # doctest: +SKIP
    >>> attack.last_report.accuracy_by_attack                 # doctest: +SKIP
    {'APGD-CE': 53.1, 'APGD-T': 50.2, 'FAB-T': 50.2, 'Square': 50.2}
    """

    def __init__(
        self,
        model: nn.Module,
        norm: str = "Linf",
        eps: float = 8 / 255,
        version: str = "standard",
        attacks: Sequence[Any] | None = None,
        seed: int = 0,
        *,
        steps: int | None = None,
        n_queries: int | None = None,
        n_target_classes: int = 9,
    ) -> None:
        super().__init__(model, norm=norm, eps=eps, seed=seed)
        if not isinstance(version, str) or version not in VERSIONS:
            raise ValueError(f"version must be one of {VERSIONS}; got {version!r}.")
        self.version = version
        self.n_target_classes = check_integer(n_target_classes, "n_target_classes", minimum=1)
        if version != "custom":
            for flag, value in (("attacks", attacks), ("steps", steps), ("n_queries", n_queries)):
                if value is not None:
                    raise ValueError(
                        f"{flag} is for version='custom'; version={version!r} fixes the "
                        "attacks and their settings."
                    )
        self.steps = 100 if steps is None else check_integer(steps, "steps", minimum=1)
        self.n_queries = (
            5000 if n_queries is None else check_integer(n_queries, "n_queries", minimum=1)
        )
        if version == "custom":
            if attacks is None or isinstance(attacks, (str, bytes)) or not len(attacks):
                raise ValueError(
                    "version='custom' needs attacks: a non-empty sequence of names from "
                    f"{tuple(ATTACK_NAMES)} or attack objects; got {attacks!r}."
                )
            names = list(attacks)
        elif self.norm == "L1":
            names = ["apgd-ce", "apgd-t"]
        else:
            names = ["apgd-ce", "apgd-t", "fab-t", "square"][: 2 if version == "fast" else 4]
        self.stages: list[tuple[str, Any]] = [self._stage(entry) for entry in names]
        labels = [label for label, _ in self.stages]
        if len(set(labels)) != len(labels):
            raise ValueError(f"attacks must have distinct labels; got {labels}.")
        self.last_report: AutoAttackReport | None = None

    # -- building the attacks --------------------------------------------------------

    def _stage(self, entry: Any) -> tuple[str, Any]:
        if isinstance(entry, str):
            if entry not in ATTACK_NAMES:
                raise ValueError(
                    f"attacks: unknown attack {entry!r}; the names are {tuple(ATTACK_NAMES)} "
                    "(or pass an attack object)."
                )
            return ATTACK_NAMES[entry], self._build(entry)
        if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str):
            label, attack = entry
        else:
            label, attack = type(entry).__name__, entry
        if not callable(attack):
            raise TypeError(
                f"attacks: {label!r} must be callable as attack(images, labels); got "
                f"{type(attack).__name__}."
            )
        return label, attack

    def _build(self, name: str) -> Any:
        model, norm, eps, seed = self.model, self.norm, self.eps, self.seed
        l1 = norm == "L1"
        if name in ("fab", "fab-t", "square") and l1:
            raise ValueError(f"attacks: {name!r} has no L1 version here; use APGD for norm='L1'.")
        if name in ("apgd-ce", "apgd-dlr"):
            return APGD(
                model,
                norm=norm,
                eps=eps,
                steps=self.steps,
                n_restarts=5 if l1 else 1,
                loss=name.removeprefix("apgd-"),
                seed=seed,
                use_largereps=l1,
            )
        if name == "apgd-t":
            return APGDT(
                model,
                norm=norm,
                eps=eps,
                steps=self.steps,
                n_restarts=1,
                n_target_classes=self.n_target_classes,
                seed=seed,
                use_largereps=l1,
            )
        if name in ("fab", "fab-t"):
            return FAB(
                model,
                norm=norm,
                eps=eps,
                steps=self.steps,
                n_restarts=1,
                targeted=name == "fab-t",
                n_target_classes=self.n_target_classes,
                seed=seed,
                final_search_steps=0,  # as AutoAttack's FAB
            )
        return Square(model, norm=norm, eps=eps, n_queries=self.n_queries, n_restarts=1, seed=seed)

    @property
    def stage_names(self) -> tuple[str, ...]:
        """The attacks' labels, in the order they run."""
        return tuple(label for label, _ in self.stages)

    def __repr__(self) -> str:
        inner = ", ".join(f"{label}: {attack!r}" for label, attack in self.stages)
        return (
            f"AutoAttack(norm={self.norm!r}, eps={self.eps:g}, version={self.version!r}, "
            f"seed={self.seed}, attacks=[{inner}])"
        )

    # -- the call --------------------------------------------------------------------

    @property
    def uses_gradients(self) -> bool:
        """Whether any attack takes gradients (an ensemble of Square attacks does not)."""
        return any(getattr(attack, "uses_gradients", True) for _, attack in self.stages)

    def run(
        self, images: torch.Tensor, labels: torch.Tensor, sample_ids: Any = None
    ) -> AutoAttackResult:
        """As calling the attack, returning the images and the :class:`AutoAttackReport`."""
        adversarial = self(images, labels, sample_ids=sample_ids)
        return AutoAttackResult(adversarial, self.last_report)

    def _nothing_to_attack(self, images: torch.Tensor) -> torch.Tensor:
        empty = (torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.long))
        self.last_report = AutoAttackReport(self.stage_names, *empty, (0.0,) * len(self.stages))
        return images.clone()

    def forward(self, images, labels, *, sample_ids=None, top_label=None) -> torch.Tensor:
        """Per sample, the first attack's misclassifying image (the unperturbed image where
        every attack failed or the sample was misclassified already); the report goes to
        :attr:`last_report`. ``sample_ids`` goes on to every attack that seeds samples on
        their own (``seeds_per_sample``)."""
        x = images
        k = len(self.stages)
        adversarial = x.clone()
        with torch.no_grad():
            logits = self.model(x)
        check_labels(labels, logits.shape[-1], top_label)
        self._refuse_probabilities(logits)
        clean = logits.argmax(1) == labels
        broken_by = torch.where(clean, k, -1).to(torch.long)
        seconds = []
        for i, (label, attack) in enumerate(self.stages):
            start = time.perf_counter()
            todo = (broken_by == k).nonzero().flatten()
            if todo.numel():
                xs, ys = x[todo], labels[todo]
                attack = self._fitted(attack, logits.shape[-1])
                if sample_ids is not None and getattr(attack, "seeds_per_sample", False):
                    out = attack(xs, ys, sample_ids=sample_ids[todo.cpu()])
                else:
                    out = attack(xs, ys)
                self._check_output(label, out, xs)
                with torch.no_grad():
                    wrong = self.model(out).argmax(1) != ys
                hit = todo[wrong]
                adversarial[hit] = out[wrong].to(x.dtype)
                broken_by[hit] = i
            seconds.append(time.perf_counter() - start)
        self.last_report = AutoAttackReport(
            self.stage_names, clean.cpu(), broken_by.cpu(), tuple(seconds)
        )
        return adversarial

    def _refuse_probabilities(self, logits: torch.Tensor) -> None:
        if logits.ndim == 2 and bool(looks_like_probabilities(logits).all()):
            raise ValueError(
                "model returns probabilities, not logits (every output row is non-negative "
                "and sums to 1): AutoAttack's losses need logits; remove the final softmax."
            )

    @staticmethod
    def _fitted(attack: Any, n_classes: int) -> Any:
        """The library's targeted attacks with at most ``n_classes - 1`` targets."""
        wanted = getattr(attack, "n_target_classes", None)
        if isinstance(attack, FAB) and attack.targeted and wanted > n_classes - 1:
            attack = copy.copy(attack)
            attack.n_target_classes = max(n_classes - 1, 1)
        return attack

    def _check_output(self, label: str, out: Any, x: torch.Tensor) -> None:
        """An attack's images must be pixels in the ball: anything else is a bug there."""
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise RuntimeError(
                f"attack {label!r} returned {shape}; expected images of shape {tuple(x.shape)}."
            )
        if not bool(((out >= 0) & (out <= 1)).all()):
            raise RuntimeError(f"attack {label!r} returned images outside the pixel box [0, 1].")
        size = (out.detach() - x).flatten(1).norm(p=_P[self.norm], dim=1)
        if bool((size > self.eps * (1 + 1e-4) + 1e-6).any()):
            raise RuntimeError(
                f"attack {label!r} returned images outside the {self.norm} ball "
                f"of radius {self.eps:g} (largest perturbation {float(size.max()):.6g})."
            )

    def describe(self) -> dict[str, Any]:
        """Plain values naming the ensemble and its attacks' settings (results files)."""
        return {
            "norm": self.norm,
            "eps": self.eps,
            "version": self.version,
            "seed": self.seed,
            "stages": [{"label": label, **describe_attack(a)} for label, a in self.stages],
        }
