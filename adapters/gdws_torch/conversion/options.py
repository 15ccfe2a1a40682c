"""The option groups of :func:`gdws_torch.convert`: weighting, recovery, latency.

Each is a small immutable object: build one, keep it, copy it with a change
(``dataclasses.replace(recovery, refit_samples=500)``). The budget (``beta``,
``n_kernels``, ``target_mac_reduction`` or ``target_speedup``) stays a keyword of its own:
it is the one choice every call makes, and the same keywords as :func:`gdws_torch.compress`
and the ``gdws`` command's flags.

Until the next release, :func:`gdws_torch.convert` also takes the keywords these
replace (``alphas=``, ``refit=``, ``latency_aware=``, ...) with a ``FutureWarning``;
:func:`from_legacy_keywords` translates them, meaning for meaning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from gdws_approx.checks import check_integer, check_real
from gdws_approx.latency_planning import DEFAULT_FORMS, FORMS
from gdws_torch.recovery.refit import DEFAULT_TOLERANCE

__all__ = ["LEGACY_KEYWORDS", "Latency", "Recovery", "Weighting", "from_legacy_keywords"]

ALLOCATIONS = ("common_beta", "global")


@dataclass(frozen=True)
class Weighting:
    """How each layer's approximation error is weighted, and how a MAC target is shared.

    The weighted error of a layer is ``sum_c alpha_c ||A (W_c - What_c) B_c||_F^2``;
    MEGO and LEGO stay exact under it. Layers without an entry get ones (identities).

    Parameters
    ----------
    alphas : mapping, optional
        Per-layer noise gains ``{name: tensor(C)}``, keyed by parameter name
        (``"layer1.0.conv1.weight"``, as :func:`gdws_torch.noise_gains` and the original's
        files) or module name, with or without a ``"module."`` prefix. When given, every
        converted layer must have one.
    output_weights : mapping, optional
        Per-layer ``A`` as ``tensor(M)``, keyed like ``alphas``.
    input_transforms : mapping, optional
        Per-layer ``B_c`` as ``tensor(C, Kh*Kw, Kh*Kw)``, keyed like ``alphas``.
    allocation : {"common_beta", "global"}, default="common_beta"
        How a ``target_mac_reduction`` is met (:func:`gdws_approx.plan_network`): one
        LEGO ``beta`` for all layers, or the least total weighted error for the MACs.
    input_moments : mapping, optional
        Per-layer ``Sigma`` as ``tensor(C*Kh*Kw, C*Kh*Kw)``, the second moment of the
        layer's input patches on calibration inputs
        (:func:`gdws_torch.conversion.weightings.input_patch_moments`), keyed like
        ``alphas``. A ``target_speedup`` plan then compares every form of every layer by
        its response error ``tr((W - What) Sigma (W - What)^T)``
        (:class:`gdws_approx.ResponseErrors`); without it, by the error under the other
        weights. Every converted layer needs one; the other budgets do not use them.

    See Also
    --------
    Weighting.from_strategy : the weights of a named strategy, computed on a model.
    """

    alphas: Mapping[str, Any] | None = None
    output_weights: Mapping[str, Any] | None = None
    input_transforms: Mapping[str, Any] | None = None
    allocation: str = "common_beta"
    input_moments: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        for field in ("alphas", "output_weights", "input_transforms", "input_moments"):
            value = getattr(self, field)
            if value is not None and not isinstance(value, Mapping):
                raise TypeError(
                    f"{field} must be a mapping {{layer name: tensor}} or None; "
                    f"got {type(value).__name__}."
                )
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}; got {self.allocation!r}.")

    @classmethod
    def from_strategy(
        cls,
        strategy: str,
        model: nn.Module,
        input_size: Sequence[int],
        *,
        loader: Iterable | None = None,
        n_samples: int = 256,
        noise_gain_kwargs: Mapping[str, Any] | None = None,
        allocation: str = "common_beta",
    ) -> Weighting:
        """The weights of a named strategy, computed on ``model``.

        Parameters
        ----------
        strategy : {"unit", "noise_gains", "output", "data", "output+data"}
            See :mod:`gdws_torch.conversion.weightings`.
        model : torch.nn.Module
        input_size : sequence of int
            One input sample's shape (no batch dimension).
        loader : iterable, optional
            Training inputs, for ``"noise_gains"``, ``"data"`` and ``"output+data"``.
        n_samples : int, default=256
            How many of them the data-driven strategies average over.
        noise_gain_kwargs : mapping, optional
            Passed to :func:`gdws_torch.noise_gains`.
        allocation : {"common_beta", "global"}, default="common_beta"
        """
        from gdws_torch.conversion.weightings import strategy_weights

        weights = strategy_weights(
            strategy,
            model,
            input_size,
            loader=loader,
            n_samples=n_samples,
            noise_gain_kwargs=noise_gain_kwargs,
        )
        return cls(**weights, allocation=allocation)


@dataclass(frozen=True)
class Recovery:
    """Training-free recovery after the conversion: least-squares refit, then BatchNorm.

    Parameters
    ----------
    refit : iterable, optional
        A loader of calibration inputs: every GDWS layer's pointwise weights (and, with
        ``refit_depthwise``, its depthwise kernels) and every low-rank layer's two convs
        are re-solved by least squares to match the dense network
        (:func:`gdws_torch.recovery.refit_gdws`), before any BatchNorm re-estimation. The
        forms and the MACs do not change. ``None``: no refit.
    refit_samples : int, default=1000
    refit_attack : callable, optional
        ``attack(model) -> attack``: refit on adversarial inputs crafted against the dense
        model (e.g. ``lambda m: PGD(m, eps=8/255, alpha=2/255, steps=10)``).
    refit_depthwise : bool, default=True
        Refit the depthwise kernels too, by alternating least squares (the joint refit,
        as :func:`gdws_torch.recovery.refit_gdws` does by default); ``False``: the
        pointwise weights only.
    refit_iterations : int, default=3
        Alternations of the joint refit, at most.
    refit_tolerance : float, default=DEFAULT_TOLERANCE (1e-3)
        A layer stops alternating when one alternation lowers its output error by less
        than this fraction of it; ``0``: always ``refit_iterations``.
    recalibrate : iterable, optional
        A loader of (training) inputs: the converted model's BatchNorm statistics are
        re-estimated on ``recalibrate_samples`` of them
        (:func:`gdws_torch.recalibrate_batchnorm`). ``None``: none.
    recalibrate_samples : int, default=1000
    recalibrate_attack : callable, optional
        ``attack(model) -> attack``: the statistics are estimated on the natural inputs
        and on adversarial ones crafted against the converted model.
    """

    refit: Iterable | None = None
    refit_samples: int = 1000
    refit_attack: Callable[[nn.Module], Any] | None = None
    refit_depthwise: bool = True
    refit_iterations: int = 3
    refit_tolerance: float = DEFAULT_TOLERANCE
    recalibrate: Iterable | None = None
    recalibrate_samples: int = 1000
    recalibrate_attack: Callable[[nn.Module], Any] | None = None

    def __post_init__(self) -> None:
        check_integer(self.refit_samples, "refit_samples", minimum=1)
        check_integer(self.refit_iterations, "refit_iterations", minimum=0)
        check_real(self.refit_tolerance, "refit_tolerance", minimum=0)
        check_integer(self.recalibrate_samples, "recalibrate_samples", minimum=1)
        if not isinstance(self.refit_depthwise, bool):
            raise TypeError(f"refit_depthwise must be a bool; got {self.refit_depthwise!r}.")
        for field in ("refit_attack", "recalibrate_attack"):
            value = getattr(self, field)
            if value is not None and not callable(value):
                raise TypeError(
                    f"{field} must be a callable attack(model) -> attack or None; "
                    f"got {type(value).__name__}."
                )

    def summary(self, attack_name: str = "adversarial", inputs: str = "inputs") -> str:
        """One line: the recovery steps, in the order they run.

        Parameters
        ----------
        attack_name : str, default="adversarial"
            What the attacked inputs are called (``"PGD"``).
        inputs : str, default="inputs"
            What the inputs are called (``"training inputs"``).
        """
        steps = []
        if self.refit is not None:
            n = self.refit_iterations
            what = (
                f"pointwise and depthwise weights ({n} alternation{'s' * (n != 1)})"
                if self.refit_depthwise
                else "pointwise weights"
            )
            kind = attack_name if self.refit_attack else "natural"
            steps.append(f"{what} refitted on {self.refit_samples} {kind} {inputs}")
        if self.recalibrate is not None:
            kind = f"natural and {attack_name}" if self.recalibrate_attack else "natural"
            steps.append(
                f"BatchNorm statistics re-estimated on {self.recalibrate_samples} {kind} {inputs}"
            )
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
        if not isinstance(self.keep_faster, bool):
            raise TypeError(f"keep_faster must be a bool; got {self.keep_faster!r}.")
        if isinstance(self.forms, str) or not isinstance(self.forms, (tuple, list)):
            raise TypeError(f"forms must be a tuple of form names; got {self.forms!r}.")
        if not self.forms or any(form not in FORMS for form in self.forms):
            raise ValueError(
                f"forms must name at least one of {FORMS} (a layer may always stay dense); "
                f"got {tuple(self.forms)!r}."
            )
        object.__setattr__(self, "forms", tuple(dict.fromkeys(self.forms)))


#: The keywords :func:`gdws_torch.convert` took before the option groups, by group.
LEGACY_KEYWORDS: dict[str, dict[str, str]] = {
    "weighting": {
        "alphas": "alphas",
        "output_weights": "output_weights",
        "input_transforms": "input_transforms",
        "allocation": "allocation",
    },
    "recovery": {
        "refit": "refit",
        "refit_samples": "refit_samples",
        "refit_attack": "refit_attack",
        "refit_depthwise": "refit_depthwise",
        "refit_iterations": "refit_iterations",
        "recalibrate": "recalibrate",
        "recalibrate_samples": "recalibrate_samples",
    },
    "latency": {
        "backend": "backend",
        "latency_batch_size": "batch_size",
        "device": "device",
        "latency_table": "table",
        "latency_aware": "keep_faster",
    },
}
_GROUPS = {"weighting": Weighting, "recovery": Recovery, "latency": Latency}


def from_legacy_keywords(
    keywords: Mapping[str, Any],
    groups: Mapping[str, Any],
    *,
    function: str = "convert",
    stacklevel: int = 3,
) -> dict[str, Any]:
    """The option groups, with the old keywords of ``convert`` translated into them.

    Parameters
    ----------
    keywords : mapping
        The old keywords received (``{"refit": loader, "latency_aware": True, ...}``).
    groups : mapping
        The option groups received (``{"weighting": ..., "recovery": ..., "latency": ...}``,
        ``None`` where not given).
    function : str, default="convert"
        The function that received them, for the messages.
    stacklevel : int, default=3
        Of the ``FutureWarning``, so that it points at the caller of ``function``.

    Returns
    -------
    dict
        ``{"weighting": Weighting, "recovery": Recovery, "latency": Latency}``.

    Raises
    ------
    TypeError
        An unknown keyword, or an old keyword given together with its group.
    """
    known = {old: group for group, table in LEGACY_KEYWORDS.items() for old in table}
    unknown = sorted(set(keywords) - set(known))
    if unknown:
        raise TypeError(f"{function}() got an unexpected keyword argument {unknown[0]!r}.")
    result = {}
    for group, cls in _GROUPS.items():
        given = {old: keywords[old] for old in LEGACY_KEYWORDS[group] if old in keywords}
        if given and groups.get(group) is not None:
            raise TypeError(
                f"{function}() got {group}= and its old keyword(s) {sorted(given)}; give the "
                f"settings in {group}={cls.__name__}(...) only."
            )
        if not given:
            result[group] = cls() if groups.get(group) is None else groups[group]
            continue
        fields = {LEGACY_KEYWORDS[group][old]: value for old, value in given.items()}
        advice = ", ".join(f"{name}=..." for name in fields)
        note = ""
        if group == "recovery" and "refit" in fields and "refit_depthwise" not in fields:
            # The old default: pointwise only. Kept, so that no call changes meaning.
            fields["refit_depthwise"] = False
            note = (
                " Without refit_depthwise these keywords refit the pointwise weights only "
                "(the old default); Recovery refits the depthwise kernels too unless "
                "refit_depthwise=False."
            )
        if group == "recovery" and fields.get("refit_depthwise", False) is None:
            fields["refit_depthwise"] = False
        warnings.warn(
            f"{function}()'s keywords {sorted(given)} are deprecated and will be removed in the "
            f"next release; pass {group}={cls.__name__}({advice}) instead.{note}",
            FutureWarning,
            stacklevel=stacklevel,
        )
        result[group] = cls(**fields)
    return result
