"""What the pipeline's stages report: a dataclass per stage, built once, never changed.

- :class:`ConversionReport` (:func:`gdws_torch.convert`): the core's plan
  (:class:`gdws_approx.NetworkPlan`), the speed measured when the budget was one
  (:class:`SpeedMeasurement`), the seconds;
- :class:`RecoveryReport` (:func:`gdws_torch.recover`): the steps run, their seconds,
  those skipped and why, each refitted layer's error before and after;
- :class:`CompressionReport` (:func:`gdws_torch.compress`): the recipe, what its inputs
  were, the conversion's and the recovery's reports, each stage's seconds.

Each reads the plan's figures directly (``report.mac_reduction``, ``report.layers``,
...), prints as a table (``print(report)``) and gives a JSON-ready ``to_dict()``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from gdws_approx import LatencyPlan, LayerPlan, NetworkPlan

if TYPE_CHECKING:
    from gdws_torch.conversion.options import Recovery
    from gdws_torch.conversion.recipes import Recipe

__all__ = ["CompressionReport", "ConversionReport", "RecoveryReport", "SpeedMeasurement"]


@dataclass(frozen=True)
class SpeedMeasurement:
    """What was measured of a model converted for a speed-up
    (:func:`gdws_torch.conversion.speed_target.convert_for_speedup`).

    Attributes
    ----------
    backend, backend_version, device : str
        Where it was timed.
    threads, batch_size : int
    target_speedup : float
    measured_dense_ms, measured_ms : float
        The dense and the converted network's median latencies, timed interleaved.
    realised_speedup : float
        ``measured_dense_ms / measured_ms``.
    spread : float
        The interquartile range of the per-round speed-ups: a difference timing noise
        alone can make.
    reached : bool
        Whether the target was reached
        (:func:`gdws_torch.conversion.speed_target.reached`).
    tolerance : float
        The fraction below the target still counted as reached.
    attempts : tuple of dict
        Each plan tried: ``planned_target``, ``predicted_speedup``, ``measured_speedup``,
        ``spread``.
    layers_timed : int
        Layers timed for the table now (0 when the table had them all).
    why_not_reached : str or None
        With a miss: what was measured against the prediction.
    table_warning : str or None
        When the measurement is more than
        :data:`gdws_torch.conversion.speed_target.MISPREDICTION` below the table's
        prediction: the table does not describe this machine now.
    """

    backend: str
    backend_version: str
    device: str
    threads: int
    batch_size: int
    target_speedup: float
    measured_dense_ms: float
    measured_ms: float
    realised_speedup: float
    spread: float
    reached: bool
    tolerance: float
    attempts: tuple[dict[str, float], ...]
    layers_timed: int
    why_not_reached: str | None = None
    table_warning: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        record = {
            name: getattr(self, name)
            for name in self.__dataclass_fields__
            if name not in ("attempts", "why_not_reached", "table_warning")
        }
        record["attempts"] = [dict(attempt) for attempt in self.attempts]
        for name in ("why_not_reached", "table_warning"):
            if getattr(self, name) is not None:
                record[name] = getattr(self, name)
        return record

    def summary(self) -> str:
        """One line: where it was timed, the measured speed-up, whether it was reached (and
        the table's warning on a line of its own)."""
        text = (
            f"measured {self.realised_speedup:.3g}x on {self.backend} ({self.device}, batch "
            f"{self.batch_size}; spread {self.spread:.2g}): "
            + ("reached." if self.reached else "NOT reached.")
        )
        if self.table_warning:
            text += f"\nwarning: {self.table_warning}."
        return text


class _PlanFigures:
    """The plan's read-only figures, read through :attr:`plan`."""

    plan: NetworkPlan

    @property
    def layers(self) -> list[LayerPlan]:
        """Per-layer plans (:class:`gdws_approx.LayerPlan`)."""
        return self.plan.layers

    @property
    def solver(self) -> str:
        return self.plan.solver

    @property
    def beta(self) -> float | None:
        """The LEGO budget used (``None`` for MEGO and speed plans)."""
        return self.plan.beta

    @property
    def target_mac_reduction(self) -> float | None:
        return self.plan.target_mac_reduction

    @property
    def macs(self) -> int:
        """Network conv MACs after."""
        return self.plan.macs

    @property
    def dense_macs(self) -> int:
        """Network conv MACs before."""
        return self.plan.dense_macs

    @property
    def other_macs(self) -> int:
        return self.plan.other_macs

    @property
    def padded_macs(self) -> int:
        return self.plan.padded_macs

    @property
    def mac_reduction(self) -> float:
        """``dense_macs / macs``."""
        return self.plan.mac_reduction

    @property
    def error(self) -> float:
        """The planned layers' total error."""
        return self.plan.error

    @property
    def latency(self) -> LatencyPlan | None:
        """The planner's prediction, for a speed budget."""
        return self.plan.latency

    def __getitem__(self, name: str) -> LayerPlan:
        return self.plan[name]

    def __str__(self) -> str:
        return self.format_table()

    def format_table(self) -> str:  # pragma: no cover - every report defines it
        raise NotImplementedError


def _time_line(seconds: Mapping[str, float]) -> str:
    return "time: " + ", ".join(f"{stage} {value:.1f} s" for stage, value in seconds.items())


@dataclass(frozen=True)
class ConversionReport(_PlanFigures):
    """What :func:`gdws_torch.convert` did.

    Attributes
    ----------
    plan : gdws_approx.NetworkPlan
        Per layer: name, shape, form, ``G``, multiplier histogram, error, MACs before and
        after, whether it stays dense and why; the network's totals over all convolutions.
    speed : SpeedMeasurement or None
        With ``target_speedup``: what was measured of the converted model.
    seconds : float
        Wall-clock seconds of the conversion (timing included).
    """

    plan: NetworkPlan
    speed: SpeedMeasurement | None = None
    seconds: float = 0.0

    def renamed(self, rename: Callable[[str], str]) -> ConversionReport:
        """A copy with every layer name ``n`` replaced by ``rename(n)``."""
        return replace(self, plan=self.plan.renamed(rename))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the plan's fields, ``latency`` adding the measurement, ``seconds``."""
        record = self.plan.to_dict()
        if self.speed is not None:
            record["latency"] = {**(record["latency"] or {}), **self.speed.to_dict()}
        record["seconds"] = {"conversion": self.seconds}
        return record

    def table_lines(self) -> list[str]:
        """The plan's table, then the measurement."""
        lines = [self.plan.format_table()]
        if self.speed is not None:
            lines.append(self.speed.summary())
        return lines

    def format_table(self) -> str:
        """The per-layer table with the network totals, the speed measured and the time."""
        return "\n".join([*self.table_lines(), _time_line({"conversion": self.seconds})])


@dataclass(frozen=True)
class RecoveryReport:
    """What :func:`gdws_torch.recover` did.

    Attributes
    ----------
    recovery : Recovery
        The settings.
    seconds : mapping of str to float
        Each step that ran (``"refit"``, ``"batchnorm"``), in order.
    skipped : mapping of str to str
        Each step set but not run, and why (no compressed layer, no BatchNorm layer).
    refit_errors : mapping of str to tuple of float
        Each refitted layer's output error on the calibration inputs before the refit and
        after each step (:func:`gdws_torch.recovery.refit_gdws`).
    """

    recovery: Recovery
    seconds: Mapping[str, float] = field(default_factory=dict)
    skipped: Mapping[str, str] = field(default_factory=dict)
    refit_errors: Mapping[str, tuple[float, ...]] = field(default_factory=dict)

    def renamed(self, rename: Callable[[str], str]) -> RecoveryReport:
        """A copy with every layer name ``n`` replaced by ``rename(n)``."""
        errors = {rename(name): errors for name, errors in self.refit_errors.items()}
        return replace(self, refit_errors=errors)

    def summary(self, inputs: str = "inputs") -> str:
        """One line: the steps that ran, in order, and those skipped.

        Parameters
        ----------
        inputs : str, default="inputs"
            What the inputs are called (``"training inputs"``).
        """
        steps = [
            step.summary("PGD", inputs)
            for name, step in (
                ("refit", self.recovery.refit),
                ("batchnorm", self.recovery.batchnorm),
            )
            if step is not None and name not in self.skipped
        ]
        text = "recovery: " + ("; ".join(steps) if steps else "none")
        for name, why in self.skipped.items():
            text += f" ({name} skipped: {why})"
        return text

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        steps = self.recovery
        return {
            "refit": None if steps.refit is None else _fields(steps.refit),
            "batchnorm": None if steps.batchnorm is None else _fields(steps.batchnorm),
            "seconds": dict(self.seconds),
            "skipped": dict(self.skipped),
            "refit_errors": {name: list(errors) for name, errors in self.refit_errors.items()},
        }

    def format_table(self, inputs: str = "inputs") -> str:
        """The summary, and each refitted layer's error before and after."""
        lines = [self.summary(inputs)]
        if self.refit_errors:
            width = max(len(name) for name in self.refit_errors)
            lines.append(f"{'refitted layer'.ljust(width)}  error before  error after")
            for name, errors in self.refit_errors.items():
                lines.append(f"{name.ljust(width)}  {errors[0]:>12.4g}  {errors[-1]:>11.4g}")
        if self.seconds:
            lines.append(_time_line(self.seconds))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format_table()


@dataclass(frozen=True)
class CompressionReport(_PlanFigures):
    """What :func:`gdws_torch.compress` did: the recipe, then each stage's report.

    Attributes
    ----------
    conversion : ConversionReport
    recipe : Recipe
    inputs : mapping
        What the recipe's inputs were (:meth:`gdws_torch.RecipeInputs.summary`): the error
        weights, the calibration inputs and the attack that crafted them.
    recovery : RecoveryReport
    seconds : mapping of str to float
        Each stage of this call, in the order it ran (``weighting``, ``calibration`` when
        the inputs were computed here, ``conversion``, ``refit``, ``batchnorm``).
    """

    conversion: ConversionReport
    recipe: Recipe
    inputs: Mapping[str, Any]
    recovery: RecoveryReport
    seconds: Mapping[str, float] = field(default_factory=dict)

    @property
    def plan(self) -> NetworkPlan:  # type: ignore[override]
        """The conversion's plan."""
        return self.conversion.plan

    @property
    def speed(self) -> SpeedMeasurement | None:
        """The conversion's speed measurement, for a speed budget."""
        return self.conversion.speed

    def renamed(self, rename: Callable[[str], str]) -> CompressionReport:
        """A copy with every layer name ``n`` replaced by ``rename(n)`` (e.g. the
        ``"module."`` prefix of a normalisation wrapper removed)."""
        return replace(
            self,
            conversion=self.conversion.renamed(rename),
            recovery=self.recovery.renamed(rename),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the conversion's fields, then ``recipe`` (its settings and the
        calibration attack), ``inputs``, ``recovery`` and every stage's ``seconds``."""
        record = self.conversion.to_dict()
        record["recipe"] = {
            **self.recipe.to_dict(),
            "calibration_attack": self.inputs.get("calibration_attack"),
        }
        record["inputs"] = dict(self.inputs)
        record["recovery"] = self.recovery.to_dict()
        record["seconds"] = dict(self.seconds)
        return record

    def format_table(self, inputs: str = "inputs") -> str:
        """The conversion's table, the recipe, the recovery and each stage's time.

        Parameters
        ----------
        inputs : str, default="inputs"
            What the recovery's inputs are called (``"training inputs"``).
        """
        lines = [
            *self.conversion.table_lines(),
            self.recipe.summary(),
            self.recovery.summary(inputs),
        ]
        if self.seconds:
            lines.append(_time_line(self.seconds))
        return "\n".join(lines)


def _fields(settings: Any) -> dict[str, Any]:
    return {name: getattr(settings, name) for name in settings.__dataclass_fields__}
