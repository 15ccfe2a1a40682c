"""Per-layer entries of a mapping, looked up by layer name the same way everywhere.

Per-layer settings (channel weights, output weights, input transforms, input moments)
come keyed by whatever named the layer where they were computed: a module name
(``"layer1.0.conv1"``), its weight's parameter name (``"layer1.0.conv1.weight"``, as the
original work's noise-gain files), either one with the ``"module."`` prefix a
``DataParallel`` or normalisation wrapper adds, or, in an ONNX graph, a node or
initializer name. Both adapters find a layer's entry with :func:`find_entry`, one key
priority and one error message. Plain Python: no array library is needed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["entry_keys", "find_entry"]


def entry_keys(name: str) -> tuple[str, ...]:
    """The keys layer ``name``'s entry may be stored under, in the order they are tried.

    The name itself without a ``"module."`` prefix, its parameter name (``".weight"``
    appended), then both with the prefix.

    Examples
    --------
    >>> entry_keys("module.conv1")
    ('conv1', 'conv1.weight', 'module.conv1', 'module.conv1.weight')
    """
    bare = name.removeprefix("module.")
    return (bare, f"{bare}.weight", f"module.{bare}", f"module.{bare}.weight")


def find_entry(
    mapping: Mapping[str, Any] | None,
    names: str | Iterable[str],
    *,
    what: str,
    required: bool = False,
) -> tuple[str, Any] | None:
    """The ``(key, value)`` of a layer's entry in ``mapping``, or ``None``.

    Parameters
    ----------
    mapping : mapping of str to object, or None
        ``None``: no entries (the result is ``None``, even when ``required``).
    names : str or iterable of str
        The layer's names, most specific first (an ONNX conv: its name, its node's name,
        its weight's name). Each is tried under every key of :func:`entry_keys`.
    what : str
        The mapping's argument name (``"channel_weights"``), for the messages.
    required : bool, default=False
        A missing entry raises instead of returning ``None``.

    Returns
    -------
    tuple of (str, object) or None
        The key found and its value.

    Raises
    ------
    TypeError
        ``mapping`` is not a mapping.
    ValueError
        ``required`` and no key matches: the message lists every key looked for and a few
        of those the mapping has.
    """
    if mapping is None:
        return None
    if not isinstance(mapping, Mapping):
        raise TypeError(
            f"{what} must be a mapping {{layer name: value}}; got {type(mapping).__name__}."
        )
    names = [names] if isinstance(names, str) else [n for n in names if n]
    tried: list[str] = []
    for name in names:
        for key in entry_keys(name):
            if key in tried:
                continue
            tried.append(key)
            if key in mapping:
                return key, mapping[key]
    if required:
        raise ValueError(
            f"{what} has no entry for layer {names[0]!r} (looked for "
            f"{', '.join(map(repr, tried))}); it has {len(mapping)} entries, for example "
            f"{sorted(mapping)[:3]}."
        )
    return None
