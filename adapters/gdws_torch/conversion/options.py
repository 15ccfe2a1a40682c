"""The settings of a compression, each a small immutable object, and the error weights.

- :class:`Weighting` (the *setting*: a strategy and how many inputs it averages over)
  computes :class:`ErrorWeights` (the per-layer weights :func:`gdws_torch.convert` takes);
- :class:`Recovery` composes the training-free recovery steps, each ``None`` when off:
  :class:`Refit` (least squares on calibration inputs), then
  :class:`BatchNormStatistics` (re-estimated on training inputs);
- :class:`Latency`: where and how layers are timed.

Settings hold no data: loaders and crafted inputs are arguments of the stages
(:func:`gdws_torch.recipe_inputs`, :func:`gdws_torch.recover`). Build one, keep it, copy
it with a change (``dataclasses.replace(refit, samples=500)``). A :class:`gdws_torch.Recipe`
composes a weighting, an allocation and a recovery.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from gdws_approx.checks import check_integer, check_real
from gdws_approx.latency_planning import DEFAULT_FORMS, FORMS
from gdws_torch.conversion.weightings import DATA_STRATEGIES, STRATEGIES, strategy_weights
from gdws_torch.recovery.refit import DEFAULT_TOLERANCE

__all__ = [
    "ALLOCATIONS",
    "BatchNormStatistics",
    "ErrorWeights",
    "Latency",
    "Recovery",
    "Refit",
    "Weighting",
    "check_allocation",
]

#: How a ``target_mac_reduction`` is shared between layers (:func:`gdws_approx.plan_network`).
ALLOCATIONS = ("common_beta", "global")


def check_allocation(allocation: Any) -> str:
    """``allocation`` if it is one of :data:`ALLOCATIONS`; a clear error otherwise."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}; got {allocation!r}.")
    return allocation


def _check_flag(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {value!r}.")


@dataclass(frozen=True)
class ErrorWeights:
    """Each layer's weights of the approximation error: what :func:`gdws_torch.convert`
    minimises, ``sum_c alpha_c ||A (W_c - What_c) B_c||_F^2`` (MEGO and LEGO stay exact).

    Every mapping is keyed by layer: module name (``"layer1.0.conv1"``) or parameter name
    (``"layer1.0.conv1.weight"``, as :func:`gdws_torch.noise_gains` and the original's
    files), with or without a ``"module."`` prefix
    (:func:`gdws_approx.layer_names.find_entry`). ``None``: ones (identities).

    Parameters
    ----------
    channel_weights : mapping, optional
        ``alpha`` per input channel, ``{layer: tensor(C)}``: the paper's alpha (e.g. the
        noise gains). When given, every converted layer must have an entry.
    output_weights : mapping, optional
        ``A`` as ``{layer: tensor(M)}``.
    input_transforms : mapping, optional
        ``B_c`` as ``{layer: tensor(C, Kh*Kw, Kh*Kw)}``.
    input_moments : mapping, optional
        ``Sigma`` as ``{layer: tensor(C*Kh*Kw, C*Kh*Kw)}``, the second moment of the
        layer's input patches on calibration inputs
        (:func:`gdws_torch.conversion.weightings.input_patch_moments`). A
        ``target_speedup`` plan then compares every form of every layer by its response
        error ``tr((W - What) Sigma (W - What)^T)`` (:class:`gdws_approx.ResponseErrors`);
        without it, by the error under the other weights. Every converted layer needs one;
        the other budgets do not use them.

    See Also
    --------
    Weighting.compute : the weights of a named strategy, computed on a model.
    """

    channel_weights: Mapping[str, Any] | None = None
    output_weights: Mapping[str, Any] | None = None
    input_transforms: Mapping[str, Any] | None = None
    input_moments: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        for field in ("channel_weights", "output_weights", "input_transforms", "input_moments"):
            value = getattr(self, field)
            if value is not None and not isinstance(value, Mapping):
                raise TypeError(
                    f"{field} must be a mapping {{layer name: tensor}} or None; "
                    f"got {type(value).__name__}."
                )

    def summary(self) -> str:
        """What is weighted: ``"unit"`` or the kinds of weights given, with their layers."""
        given = [
            f"{field.replace('_', ' ')} ({len(value)} layers)"
            for field in ("channel_weights", "output_weights", "input_transforms", "input_moments")
            if (value := getattr(self, field)) is not None
        ]
        return ", ".join(given) if given else "unit"


@dataclass(frozen=True)
class Weighting:
    """How each layer's approximation error is weighted: a strategy, computed on a model.

    Parameters
    ----------
    strategy : {"unit", "noise_gains", "output", "data", "output+data"}, default="unit"
        See :mod:`gdws_torch.conversion.weightings`: ``"unit"`` weighs nothing,
        ``"noise_gains"`` gives channel weights (the original work's), ``"output"`` output
        weights from the BatchNorm after each conv, ``"data"`` input transforms from the
        inputs' patch moments.
    samples : int, default=256
        Training inputs the data-driven strategies average over.
    """

    strategy: str = "unit"
    samples: int = 256

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}; got {self.strategy!r}.")
        check_integer(self.samples, "samples", minimum=1)

    @property
    def needs_data(self) -> bool:
        """Whether the strategy reads training inputs."""
        return self.strategy in DATA_STRATEGIES

    def compute(
        self,
        model: nn.Module,
        data: Iterable | None = None,
        input_size: Sequence[int] = (3, 32, 32),
        *,
        attack: Any = None,
        progress: bool = False,
    ) -> ErrorWeights:
        """The error weights of this strategy for ``model``.

        Parameters
        ----------
        model : torch.nn.Module
            The dense network (not modified).
        data : iterable of (images, labels), optional
            Training data, for the strategies that read it (:attr:`needs_data`): its
            first :attr:`samples` inputs.
        input_size : sequence of int, default=(3, 32, 32)
            One input sample's shape (no batch dimension).
        attack : callable, optional
            ``attack(images, labels) -> images``: the noise gains are computed on these
            inputs (:func:`gdws_torch.noise_gains`); the other strategies ignore it.
        progress : bool, default=False

        Returns
        -------
        ErrorWeights
        """
        if self.needs_data and data is None:
            raise ValueError(f"the {self.strategy!r} weighting reads training data: give data.")
        weights = strategy_weights(
            self.strategy,
            model,
            input_size,
            data=data,
            n_samples=self.samples,
            attack=attack,
            progress=progress,
        )
        return ErrorWeights(**weights)

    def summary(self) -> str:
        """``"data weighting on 256 inputs"``, ``"unit weighting"``, ..."""
        on = f" on {self.samples} inputs" if self.needs_data else ""
        return f"{self.strategy} weighting{on}"


@dataclass(frozen=True)
class Refit:
    """The least-squares refit of every compressed layer on calibration inputs.

    Every GDWS layer's pointwise weights (and, with ``depthwise``, its depthwise kernels)
    and every low-rank layer's two convs are re-solved to match the dense convolution's
    output on the inputs the converted network feeds them
    (:func:`gdws_torch.recovery.refit_gdws`). The forms and the MACs do not change.

    Parameters
    ----------
    samples : int, default=1000
        Calibration inputs: the first ``samples`` training inputs.
    adversarial : bool, default=True
        Calibrate on PGD inputs crafted against the dense model (the calibration attack of
        :func:`gdws_torch.recipe_inputs`), not on the natural ones.
    depthwise : bool, default=True
        Refit the depthwise kernels too, by alternating least squares (the joint refit);
        ``False``: the pointwise weights only.
    iterations : int, default=3
        Alternations of the joint refit, at most.
    tolerance : float, default=DEFAULT_TOLERANCE (1e-3)
        A layer stops alternating when one alternation lowers its output error by less
        than this fraction of it; ``0``: always ``iterations``.
    """

    samples: int = 1000
    adversarial: bool = True
    depthwise: bool = True
    iterations: int = 3
    tolerance: float = DEFAULT_TOLERANCE

    def __post_init__(self) -> None:
        check_integer(self.samples, "samples", minimum=1)
        check_integer(self.iterations, "iterations", minimum=0)
        check_real(self.tolerance, "tolerance", minimum=0)
        _check_flag(self.adversarial, "adversarial")
        _check_flag(self.depthwise, "depthwise")

    def summary(self, attack_name: str = "PGD", inputs: str = "inputs") -> str:
        """``"pointwise and depthwise weights (3 alternations) refitted on 1000 PGD inputs"``."""
        n = self.iterations
        what = (
            f"pointwise and depthwise weights ({n} alternation{'s' * (n != 1)})"
            if self.depthwise
            else "pointwise weights"
        )
        kind = attack_name if self.adversarial else "natural"
        return f"{what} refitted on {self.samples} {kind} {inputs}"


@dataclass(frozen=True)
class BatchNormStatistics:
    """The BatchNorm running statistics re-estimated on training inputs, no weight changed
    (:func:`gdws_torch.recalibrate_batchnorm`).

    Parameters
    ----------
    samples : int, default=1000
        Training inputs (the first ``samples``).
    adversarial : bool, default=False
        Also on adversarial inputs crafted against the converted model by the calibration
        attack (statistics over the natural and the adversarial inputs).
    """

    samples: int = 1000
    adversarial: bool = False

    def __post_init__(self) -> None:
        check_integer(self.samples, "samples", minimum=1)
        _check_flag(self.adversarial, "adversarial")

    def summary(self, attack_name: str = "PGD", inputs: str = "inputs") -> str:
        """``"BatchNorm statistics re-estimated on 1000 natural inputs"``."""
        kind = f"natural and {attack_name}" if self.adversarial else "natural"
        return f"BatchNorm statistics re-estimated on {self.samples} {kind} {inputs}"


@dataclass(frozen=True)
class Recovery:
    """Training-free recovery after the conversion, in order: refit, then BatchNorm.

    Parameters
    ----------
    refit : Refit or None, default=None
        The least-squares refit; ``None``: none.
    batchnorm : BatchNormStatistics or None, default=None
        The BatchNorm re-estimation (after the refit); ``None``: none.

    ``Recovery()`` recovers nothing.
    """

    refit: Refit | None = None
    batchnorm: BatchNormStatistics | None = None

    def __post_init__(self) -> None:
        for field, cls in (("refit", Refit), ("batchnorm", BatchNormStatistics)):
            value = getattr(self, field)
            if value is not None and not isinstance(value, cls):
                raise TypeError(
                    f"{field} must be a {cls.__name__} or None; got {type(value).__name__}."
                )

    @property
    def needs_data(self) -> bool:
        """Whether a step reads training inputs."""
        return self.refit is not None or self.batchnorm is not None

    @property
    def adversarial(self) -> bool:
        """Whether a step reads adversarial inputs (so the data must carry labels)."""
        return any(step is not None and step.adversarial for step in (self.refit, self.batchnorm))

    def summary(self, attack_name: str = "PGD", inputs: str = "inputs") -> str:
        """One line: the recovery steps, in the order they run.

        Parameters
        ----------
        attack_name : str, default="PGD"
            What the attacked inputs are called.
        inputs : str, default="inputs"
            What the inputs are called (``"training inputs"``).
        """
        steps = [
            step.summary(attack_name, inputs)
            for step in (self.refit, self.batchnorm)
            if step is not None
        ]
        return "recovery: " + ("; ".join(steps) if steps else "none")


@dataclass(frozen=True)
class Latency:
    """Where and how layers are timed, for ``target_speedup`` or ``keep_faster``.

    Parameters
    ----------
    backend : str, default="eager"
        One of :data:`gdws_torch.cost.throughput.BACKENDS` (``"eager"``,
        ``"channels_last"``, ``"onnxruntime"``, ``"openvino"``, ``"tensorrt"``).
    batch_size : int, default=1
        Samples per timed call.
    device : torch.device or str, default="cpu"
    table : LatencyTable, path-like or None, default=None
        The per-layer latency table to use and extend, or its JSON file (refused when it
        fails its checksum or was made for other conditions, naming what differs);
        ``None``: the user's cache (:func:`gdws_torch.cost.latency_tables.default_cache`).
        Used by ``target_speedup``.
    keep_faster : bool, default=False
        With a MAC or error budget: time every planned layer dense against GDWS on its
        own input shape and keep the dense conv wherever GDWS is not faster (the report
        gives ``timings_ms``). Layers kept dense lower the MAC reduction: a
        ``target_mac_reduction`` is then no longer guaranteed (the report says what was
        reached).
    forms : tuple of str, default=("gdws", "grouped", "lowrank")
        The forms a ``target_speedup`` plan may give a layer besides dense
        (:data:`gdws_approx.latency_planning.FORMS`): every form that pays by default;
        ``("gdws", "grouped")`` for GDWS only, ``("lowrank",)`` for low-rank only;
        ``"gdws_lowrank"`` (GDWS with a low-rank pointwise) only when named, which also
        times it in the table.
    """

    backend: str = "eager"
    batch_size: int = 1
    device: Any = "cpu"
    table: Any = None
    keep_faster: bool = False
    forms: tuple[str, ...] = DEFAULT_FORMS

    def __post_init__(self) -> None:
        from gdws_torch.cost.throughput import BACKENDS

        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}; got {self.backend!r}.")
        check_integer(self.batch_size, "batch_size", minimum=1)
        _check_flag(self.keep_faster, "keep_faster")
        if isinstance(self.forms, str) or not isinstance(self.forms, (tuple, list)):
            raise TypeError(f"forms must be a tuple of form names; got {self.forms!r}.")
        if not self.forms or any(form not in FORMS for form in self.forms):
            raise ValueError(
                f"forms must name at least one of {FORMS} (a layer may always stay dense); "
                f"got {tuple(self.forms)!r}."
            )
        object.__setattr__(self, "forms", tuple(dict.fromkeys(self.forms)))
