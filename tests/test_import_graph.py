"""The packages' imports form no cycle (lazy imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "gdws_approx": ROOT / "gdws_approx",
    "gdws_torch": ROOT / "adapters" / "gdws_torch",
    "gdws_onnx": ROOT / "adapters" / "gdws_onnx",
}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """First-party modules ``name`` imports, anywhere in its code (packages' ``__init__``
    re-exports excluded: importing ``pkg.mod`` runs ``pkg`` first, by design)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            # ``from pkg import mod`` needs ``pkg.mod``; ``from pkg import name``, ``pkg``.
            subs = [f"{base}.{alias.name}" for alias in node.names]
            targets = [t for t in subs if t in known] or [base]
        else:
            continue
        out.update(t for t in targets if t in known and t != name)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_module_imports_itself_back():
    found = modules()
    known = set(found)
    # A package's __init__ only re-exports: edges into it are not real dependencies.
    graph = {
        name: {t for t in imports(name, path, known) if not PACKAGES.get(t)}
        for name, path in found.items()
        if path.name != "__init__.py" or name.count(".") > 0
    }
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_every_package_is_found(package):
    assert any(name.startswith(package) for name in modules())
