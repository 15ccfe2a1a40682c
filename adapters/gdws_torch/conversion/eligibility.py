"""Which convolutions of a model GDWS replaces (docs/torch.md, "Eligible by default").

Eligible by default: every ``nn.Conv2d`` with ``groups=1`` and a kernel larger than
``1 x 1``, except the network's first convolution (the first in ``model.named_modules()``
order, the one that reads the image in the usual definitions, as the original skipped
it). Users override the choice with explicit names, names to exclude, or a predicate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

__all__ = ["eligible_convs", "is_approximable"]

LayerPredicate = Callable[[str, nn.Module], bool]


def is_approximable(module: nn.Module) -> bool:
    """Whether GDWS can represent ``module``: a 2-D convolution with ``groups=1``."""
    return isinstance(module, nn.Conv2d) and module.groups == 1


def _default_rule(module: nn.Conv2d) -> bool:
    return tuple(module.kernel_size) != (1, 1)


def eligible_convs(
    model: nn.Module,
    layers: Iterable[str] | LayerPredicate | None = None,
    exclude: Iterable[str] = (),
    skip_first: bool = True,
) -> list[tuple[str, nn.Conv2d]]:
    """The ``(name, conv)`` pairs to approximate, in ``model.named_modules()`` order.

    Parameters
    ----------
    model : torch.nn.Module
    layers : iterable of str, callable or None, default=None
        ``None``: the default rule (``groups=1``, kernel larger than ``1 x 1``, not the
        first conv when ``skip_first``). An iterable of module names: exactly those
        (each must be a ``groups=1`` ``nn.Conv2d``; ``skip_first`` does not apply). A
        callable ``layers(name, module) -> bool``: called on every ``groups=1``
        ``nn.Conv2d`` (``skip_first`` does not apply).
    exclude : iterable of str, default=()
        Module names never approximated (each must exist in the model).
    skip_first : bool, default=True
        With the default rule, leave the model's first convolution dense.

    Returns
    -------
    list of (str, torch.nn.Conv2d)

    Raises
    ------
    ValueError
        A name that is not in the model or not a ``groups=1`` ``nn.Conv2d``, or no
        eligible convolution at all.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    modules = dict(model.named_modules())
    exclude = _check_names(exclude, modules, "exclude")
    if layers is None:
        convs = [(n, m) for n, m in modules.items() if isinstance(m, nn.Conv2d)]
        if skip_first and convs:
            convs = convs[1:]
        chosen = [(n, m) for n, m in convs if is_approximable(m) and _default_rule(m)]
    elif callable(layers):
        chosen = [(n, m) for n, m in modules.items() if is_approximable(m) and layers(n, m)]
    else:
        names = _check_names(layers, modules, "layers")
        for name in names:
            if not is_approximable(modules[name]):
                module = modules[name]
                what = (
                    f"a grouped conv (groups={module.groups})"
                    if isinstance(module, nn.Conv2d)
                    else type(module).__name__
                )
                raise ValueError(
                    f"layers: {name!r} is {what}; GDWS replaces nn.Conv2d layers with groups=1."
                )
        chosen = [(n, m) for n, m in modules.items() if n in names]
    chosen = [(n, m) for n, m in chosen if n not in exclude]
    if not chosen:
        raise ValueError(
            f"model {type(model).__name__} has no eligible convolution (nn.Conv2d with "
            "groups=1, a kernel larger than 1x1, other than the first conv); name the layers "
            "to approximate with layers=[...] or a predicate."
        )
    return chosen


def _check_names(names: Iterable[str], modules: dict, argument: str) -> set[str]:
    if isinstance(names, str):
        raise TypeError(f"{argument} must be an iterable of module names, not a string: {names!r}.")
    names = set(names)
    unknown = sorted(n for n in names if n not in modules or n == "")
    if unknown:
        close = [n for n in modules if n and any(u.split(".")[-1] in n for u in unknown)][:5]
        hint = f" Modules with similar names: {close}." if close else ""
        raise ValueError(f"{argument}: no module named {unknown} in the model.{hint}")
    return names
