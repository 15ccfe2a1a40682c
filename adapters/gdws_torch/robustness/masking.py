"""Checks that a robust accuracy is not inflated by gradient masking.

A model can look robust because gradient-based attacks fail on it, not because it is
robust: its gradients are zero or useless (a quantiser, a saturated softmax), its outputs
are probabilities rather than logits, or it answers differently on every call (a
randomised defence). :func:`check_gradient_masking` runs four cheap checks, each with a
threshold and a one-line verdict:

``black_box``
    The black-box attack (Square, which never uses gradients) breaks samples that the
    white-box attacks before it (APGD, FAB) left unbroken: in a sound evaluation it adds
    almost nothing. Read from the per-attack robust accuracies of an AutoAttack run
    (:class:`~gdws_torch.robustness.autoattack.AutoAttackReport`); flagged when Square
    removes more than ``square_threshold`` points of robust accuracy (0.2 by default).
``zero_gradients``
    The share of correctly classified samples whose input gradient of the cross-entropy
    loss is exactly zero: gradient-based attacks cannot move them. Flagged above
    ``zero_gradient_threshold`` (0 by default: any such sample).
``probabilities``
    The model's outputs look like probabilities (every row non-negative, summing to 1
    within ``probability_tolerance``) instead of logits: the attacks' losses then saturate.
    Flagged when more than half the rows do (:class:`~gdws_torch.robustness.autoattack.
    AutoAttack` refuses such a model outright).
``nondeterminism``
    Two forward passes of the same inputs in eval mode differ by more than
    ``determinism_tolerance`` (relative to the largest output) or predict differently: a
    randomised model, which needs Expectation over Transformation to be attacked.

The checks are heuristics: a flag says where to look (an adaptive attack, more Square
queries, EOT), not that the evaluation is wrong; no flag does not prove it is right.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gdws_approx.checks import check_real
from gdws_torch.nn.module_tree import eval_mode
from gdws_torch.robustness.checks import (
    autograd_tensors,
    check_autograd,
    check_batch,
    check_input_dtype,
    check_labels,
    check_model,
)

__all__ = [
    "MaskingCheck",
    "MaskingReport",
    "check_gradient_masking",
    "looks_like_probabilities",
]

BLACK_BOX = ("square",)  # stage names (lower case prefixes) of black-box attacks


@dataclass(frozen=True)
class MaskingCheck:
    """One check: its measured ``value``, ``threshold``, whether it fired, and why.

    ``flagged`` is ``None`` when the check could not run (``verdict`` says why).
    """

    name: str
    value: float | None
    threshold: float
    flagged: bool | None
    verdict: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "threshold": self.threshold,
            "flagged": self.flagged,
            "verdict": self.verdict,
        }


_CHECK_FIELDS = ("name", "value", "threshold", "flagged", "verdict")


@dataclass(frozen=True)
class MaskingReport:
    """The checks of :func:`check_gradient_masking`, in order; ``report[name]`` picks one."""

    checks: tuple[MaskingCheck, ...]
    n_samples: int

    @property
    def flagged(self) -> bool:
        """Whether any check fired."""
        return any(check.flagged for check in self.checks)

    def __getitem__(self, name: str) -> MaskingCheck:
        for check in self.checks:
            if check.name == name:
                return check
        raise KeyError(f"no check named {name!r}; the checks are {[c.name for c in self.checks]}.")

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> MaskingReport:
        """The report :meth:`to_dict` wrote (e.g. read back from a results file)."""
        checks = tuple(
            MaskingCheck(**{k: v for k, v in check.items() if k in _CHECK_FIELDS})
            for check in record["checks"]
        )
        return cls(checks=checks, n_samples=int(record["n_samples"]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_samples": self.n_samples,
            "flagged": self.flagged,
            "checks": [check.to_dict() for check in self.checks],
        }

    def format(self) -> str:
        """A heading and one line per check: ``[ok]``, ``[FLAG]`` or ``[--]`` (not run)."""
        lines = [f"gradient-masking checks ({self.n_samples} samples):"]
        for check in self.checks:
            mark = {True: "[FLAG]", False: "[ok]  ", None: "[--]  "}[check.flagged]
            lines.append(f"  {mark} {check.name}: {check.verdict}")
        return "\n".join(lines)


def looks_like_probabilities(outputs: torch.Tensor, tolerance: float = 1e-5) -> torch.Tensor:
    """Per row of ``outputs`` (``(N, K)``), whether it is non-negative and sums to 1.

    Rows of logits practically never do; rows after a softmax always do.
    """
    outputs = outputs.detach().flatten(1).double()
    non_negative = (outputs >= -tolerance).all(1)
    return non_negative & ((outputs.sum(1) - 1).abs() <= tolerance * max(1, outputs.shape[1]))


def check_gradient_masking(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    by_attack: Any = None,
    square_threshold: float = 0.2,
    zero_gradient_threshold: float = 0.0,
    probability_tolerance: float = 1e-5,
    determinism_tolerance: float = 1e-4,
) -> MaskingReport:
    """Four checks for gradient masking on a sample of inputs (see the module notes).

    Parameters
    ----------
    model : torch.nn.Module
        Pixels in ``[0, 1]`` to logits; run in eval mode, its modes restored, its
        parameters and their ``.grad`` untouched.
    images : torch.Tensor
        ``(N, ...)`` pixels in ``[0, 1]``, ``N >= 1`` (a few hundred test inputs suffice).
    labels : torch.LongTensor
        ``(N,)`` class indices.
    by_attack : optional
        For the ``black_box`` check, the cumulative robust accuracy (%) after each attack
        of an ensemble, in the order they ran: an
        :class:`~gdws_torch.robustness.autoattack.AutoAttackReport`, a mapping
        ``{attack: %}``, or a mapping ``{ensemble label: such a report or mapping}`` (the
        check then reports the worst ensemble). Without it, or without a black-box stage
        (Square), that check does not run.
    square_threshold : float, default=0.2
        Points of robust accuracy Square may remove after the white-box attacks.
    zero_gradient_threshold : float in [0, 1], default=0
        Share of correctly classified samples allowed an all-zero input gradient.
    probability_tolerance : float, default=1e-5
        How close to non-negative and to a sum of 1 a row must be to count as probabilities.
    determinism_tolerance : float, default=1e-4
        Largest difference between two forward passes, relative to the largest output.

    Returns
    -------
    MaskingReport
        ``report.flagged`` when any check fired; ``report.format()`` prints it,
        ``report.to_dict()`` stores it.

    Raises
    ------
    TypeError, ValueError
        A model that is not a module, images that are not pixels in ``[0, 1]``, labels out
        of range, no samples, or a negative threshold; the message names the argument.
    """
    check_model(model)
    top = check_batch(images, labels)
    check_autograd("check_gradient_masking")
    check_input_dtype(model, images)
    images, labels = autograd_tensors(images, labels)
    if images.shape[0] == 0:
        raise ValueError("images must hold at least one sample to check; got an empty batch.")
    square_threshold = check_real(square_threshold, "square_threshold", minimum=0)
    zero_gradient_threshold = check_real(
        zero_gradient_threshold, "zero_gradient_threshold", minimum=0, maximum=1
    )
    probability_tolerance = check_real(probability_tolerance, "probability_tolerance", minimum=0)
    determinism_tolerance = check_real(determinism_tolerance, "determinism_tolerance", minimum=0)
    x = images.detach()
    with eval_mode(model):
        with torch.no_grad():
            first = model(x)
            second = model(x)
        check_labels(labels, first.shape[-1], top)
        correct = first.argmax(1) == labels
        checks = (
            _black_box_check(by_attack, square_threshold),
            _zero_gradient_check(model, x, labels, correct, zero_gradient_threshold),
            _probability_check(first, probability_tolerance),
            _determinism_check(first, second, determinism_tolerance),
        )
    return MaskingReport(checks=checks, n_samples=int(x.shape[0]))


# -- the checks ----------------------------------------------------------------------------


def _accuracies(report: Any) -> Mapping[str, float] | None:
    """``{attack: cumulative robust %}`` of an AutoAttackReport or a plain mapping."""
    if report is None:
        return None
    by_attack = getattr(report, "accuracy_by_attack", report)
    if not isinstance(by_attack, Mapping):
        raise TypeError(
            "by_attack must be an AutoAttackReport or a mapping {attack: robust accuracy %}; "
            f"got {type(report).__name__}."
        )
    return by_attack


def _black_box_gain(by_attack: Mapping[str, Any]) -> tuple[float, str] | None:
    """Points removed by the black-box stages after a white-box one, and their names."""
    names = list(by_attack)
    values = []
    for name in names:
        value = by_attack[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(
                f"by_attack[{name!r}] must be a robust accuracy in percent; got "
                f"{type(value).__name__}."
            )
        values.append(float(value))
    gain, seen = 0.0, []
    for i, name in enumerate(names):
        if i == 0 or not name.lower().startswith(BLACK_BOX):
            continue
        before = values[i - 1]
        if not math.isnan(before) and not math.isnan(values[i]):
            gain += max(before - values[i], 0.0)
        seen.append(name)
    return (gain, "+".join(seen)) if seen else None


def _black_box_check(by_attack: Any, threshold: float) -> MaskingCheck:
    name = "black_box"
    if by_attack is None:
        return MaskingCheck(
            name, None, threshold, None, "not run: no per-attack results of an ensemble"
        )
    groups: dict[str, Mapping[str, Any]]
    plain = _accuracies(by_attack)
    if plain and all(not isinstance(v, (int, float)) for v in plain.values()):
        groups = {label: _accuracies(report) for label, report in plain.items()}
    else:
        groups = {"": plain}
    found = []
    for label, accuracies in groups.items():
        result = _black_box_gain(accuracies or {})
        if result is not None:
            found.append((result[0], result[1], label))
    if not found:
        return MaskingCheck(
            name,
            None,
            threshold,
            None,
            "not run: no black-box attack (Square) after the white-box ones in the ensemble",
        )
    gain, stage, label = max(found)
    where = f" ({label})" if label else ""
    if gain > threshold:
        verdict = (
            f"{stage} broke {gain:.2f} points of robust accuracy the white-box attacks left"
            f"{where} (threshold {threshold:g}): their gradients may be masked; run more "
            "Square queries or an adaptive attack"
        )
    else:
        verdict = (
            f"{stage} broke {gain:.2f} points after the white-box attacks{where} "
            f"(threshold {threshold:g})"
        )
    return MaskingCheck(name, gain, threshold, gain > threshold, verdict)


def _zero_gradient_check(
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    correct: torch.Tensor,
    threshold: float,
) -> MaskingCheck:
    name = "zero_gradients"
    index = correct.nonzero().flatten()
    if index.numel() == 0:
        return MaskingCheck(name, None, threshold, None, "not run: no sample classified correctly")
    with torch.enable_grad():
        point = x[index].clone().requires_grad_(True)
        loss = F.cross_entropy(model(point), labels[index], reduction="sum")
        (grad,) = torch.autograd.grad(loss, point)
    zero = grad.flatten(1).abs().sum(1) == 0
    count, total = int(zero.sum()), int(index.numel())
    share = count / total
    flagged = share > threshold
    verdict = (
        f"{count} of {total} correctly classified samples have an all-zero input gradient "
        f"of the loss ({100 * share:.1f} %, threshold {100 * threshold:g} %)"
    )
    if flagged:
        verdict += ": gradient-based attacks cannot move them"
    return MaskingCheck(name, share, threshold, flagged, verdict)


def _probability_check(outputs: torch.Tensor, tolerance: float) -> MaskingCheck:
    name = "probabilities"
    rows = looks_like_probabilities(outputs, tolerance)
    share = float(rows.double().mean())
    flagged = share > 0.5
    if flagged:
        verdict = (
            f"{100 * share:.0f} % of the output rows are non-negative and sum to 1: the model "
            "returns probabilities, not logits (remove the final softmax)"
        )
    else:
        verdict = f"outputs are logits ({100 * share:.0f} % of the rows look like probabilities)"
    return MaskingCheck(name, share, 0.5, flagged, verdict)


def _determinism_check(first: torch.Tensor, second: torch.Tensor, tolerance: float) -> MaskingCheck:
    name = "nondeterminism"
    scale = float(first.detach().abs().max().clamp_min(1e-12))
    difference = float((first - second).abs().max()) / scale
    changed = int((first.argmax(1) != second.argmax(1)).sum())
    flagged = difference > tolerance or changed > 0
    verdict = (
        f"two forward passes in eval mode differ by {difference:.2g} relative to the largest "
        f"output (threshold {tolerance:g}); {changed} predictions changed"
    )
    if flagged:
        verdict += ": a randomised model (attack it with Expectation over Transformation)"
    return MaskingCheck(name, difference, tolerance, flagged, verdict)
