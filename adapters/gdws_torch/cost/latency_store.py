"""The latency table's file: one section per key, each checked by its checksum.

A timing is valid only where it was made, so a file holds one *section* per key: the
machine (processor or GPU name), the backend and its version, torch's version and
threads, and the batch size. A section holds its layers (each under the description of
the layer: shape, stride, padding, dilation, padding mode, bias, input size), its whole
networks (the dense network's latency, the plan's starting point), and the SHA-256
checksum of all that and of its key::

    {"format": "gdws-approx/latency-table", "version": 4,
     "tables": [{"key": {...}, "layers": {id: {"layer": {...}, "forms": {...}}},
                 "networks": {id: {"network": {...}, "dense_ms": ...}},
                 "checksum": "..."}]}

A layer's ``forms`` map a form's name to its timings (``"dense": {"ms": ...}``,
``"gdws": {"kernel_counts": [...], "ms": [...]}``, ...): a new form is a new name, and
readers skip the names they do not know.

Reading checks the format, the version and every section's checksum; a file that fails
is refused with what is wrong. Writing is :func:`gdws_approx.files.update_json_atomic`:
under a lock, the file is read again, each section merged entry by entry, checksums
recomputed, and the whole written atomically, so that concurrent writers lose nothing.
Every rule about keys and checksums lives here.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gdws_approx.files import update_json_atomic

__all__ = [
    "FORMAT",
    "KEY_FIELDS",
    "VERSION",
    "entry_id",
    "find_section",
    "key_mismatch",
    "read_sections",
    "same_conditions",
    "sections_of",
    "write_section",
]

FORMAT = "gdws-approx/latency-table"
VERSION = 4
#: What a timing depends on besides the layer, in the order messages name them.
KEY_FIELDS = ("device", "backend", "backend_version", "torch", "threads", "batch_size")


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def entry_id(description: Mapping[str, Any]) -> str:
    """The id of a layer's or a network's entry: a hash of its description."""
    return hashlib.sha256(_canonical(dict(description))).hexdigest()[:24]


def _checksum(section: Mapping[str, Any]) -> str:
    body = {name: section[name] for name in ("key", "layers", "networks")}
    return hashlib.sha256(_canonical(body)).hexdigest()


def _describe_key(key: Mapping[str, Any]) -> str:
    return (
        f"{key.get('backend')} at batch {key.get('batch_size')}, {key.get('threads')} threads, "
        f"{key.get('device')}"
    )


def _rebuild(path: Path) -> str:
    return (
        f"time it again: delete {str(path)!r} or give another file (gdws latency-table builds one)"
    )


def read_sections(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The sections of the table file ``path``, each checked against its checksum.

    Raises
    ------
    ValueError
        Not readable JSON, not a latency table, an older format, a malformed section, or
        a section whose content does not match its checksum (edited or damaged).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"latency table {str(path)!r} is not readable JSON ({exc}).") from None
    return sections_of(data, path)


def sections_of(data: Any, path: Path) -> list[dict[str, Any]]:
    """:func:`read_sections` on the parsed content ``data`` of ``path``."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a gdws latency table (no format entry).")
    if data.get("version") != VERSION:
        raise ValueError(
            f"latency table {str(path)!r} has format version {data.get('version')!r}, not "
            f"{VERSION} (older tables carry no checksums); {_rebuild(path)}."
        )
    sections = data.get("tables")
    if not isinstance(sections, list):
        raise ValueError(f"latency table {str(path)!r} has no list of tables.")
    for index, section in enumerate(sections):
        parts = ("key", "layers", "networks", "checksum")
        if not isinstance(section, dict) or not all(part in section for part in parts):
            raise ValueError(
                f"latency table {str(path)!r}: table {index} lacks one of {parts}; "
                f"{_rebuild(path)}."
            )
        if not all(isinstance(section[p], dict) for p in parts[:3]):
            raise ValueError(f"latency table {str(path)!r}: table {index} is malformed.")
        if section["checksum"] != _checksum(section):
            raise ValueError(
                f"latency table {str(path)!r}: the table for {_describe_key(section['key'])} "
                f"does not match its checksum (edited by hand, or damaged); {_rebuild(path)}."
            )
    return sections


def find_section(sections: Sequence[Mapping], key: Mapping[str, Any]) -> dict | None:
    """The section made for ``key``, or ``None``."""
    return next((dict(s) for s in sections if s["key"] == dict(key)), None)


def same_conditions(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two keys name the same conditions (:data:`KEY_FIELDS`): their tables may
    still differ in what they timed (a key's other fields)."""
    return all(a.get(name) == b.get(name) for name in KEY_FIELDS)


def key_mismatch(path: str | os.PathLike, sections: Sequence[Mapping], key: Mapping) -> str:
    """Why ``path`` has no table for ``key``: what differs from its closest section."""

    def differences(other: Mapping) -> list[str]:
        names = list(KEY_FIELDS) + sorted((set(other) | set(key)) - set(KEY_FIELDS))
        return [
            f"{name}: {other.get(name)!r} there, {key.get(name)!r} here"
            for name in dict.fromkeys(names)
            if other.get(name) != key.get(name)
        ]

    closest = min((differences(s["key"]) for s in sections), key=len)
    more = f" ({len(sections)} tables in the file; the closest differs)" * (len(sections) > 1)
    return (
        f"latency table {str(path)!r} was made for other conditions than these{more}: "
        f"{'; '.join(closest)}. Timings hold only where they were made: build a table here "
        f"(gdws latency-table --out {str(path)!r} with this backend, batch size and "
        "threads), or give another file."
    )


def write_section(
    path: str | os.PathLike,
    key: Mapping[str, Any],
    layers: Mapping[str, Any],
    networks: Mapping[str, Any],
) -> Path:
    """Merge ``layers`` and ``networks`` into ``path``'s section for ``key`` (created if
    missing), under the lock, keeping every other section and entry; returns the file
    written (a link's target)."""
    path = Path(path)

    def merged(content: Any) -> dict[str, Any]:
        sections = [] if content is None else sections_of(content, path)
        section = find_section(sections, key) or {"key": dict(key), "layers": {}, "networks": {}}
        section["layers"] = {**section["layers"], **layers}
        section["networks"] = {**section["networks"], **networks}
        section["checksum"] = _checksum(section)
        others = [s for s in sections if s["key"] != dict(key)]
        return {"format": FORMAT, "version": VERSION, "tables": [*others, section]}

    return update_json_atomic(path, merged)
