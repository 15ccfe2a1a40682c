"""One spelling of each attack term in the packages, the benches and the docs.

The norms are ``Linf``, ``L2`` and ``L1`` (torchattacks'); the original work's ``l_inf``,
``l_2``, ``l_1`` survive only in the CLI's table of ``--norm`` aliases and where the CLI
docs name them as the original's spellings. The attacks' restart count is ``n_restarts``.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SEARCHED = ("gdws_approx", "adapters", "bench", "docs", "examples", "README.md")
OLD_NORM = re.compile(r"\bl_(inf|1|2)\b")
OLD_RESTARTS = re.compile(r"(?<![\w-])restarts=")  # n_restarts= and --restarts are fine
ALIAS_TABLE = "ORIGINAL_NORMS = {"
DOCUMENTED_ALIASES = "the original's spellings"


def text_files() -> list[Path]:
    files = []
    for name in SEARCHED:
        path = ROOT / name
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += [p for p in path.rglob("*") if p.suffix in (".py", ".md", ".toml", ".json")]
    return sorted(files)


def offending(pattern: re.Pattern, allowed=lambda path, line: False) -> list[str]:
    found = []
    for path in text_files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if pattern.search(line) and not allowed(path, line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    return found


def norm_alias_line(path: Path, line: str) -> bool:
    in_cli = path.is_relative_to(ROOT / "adapters" / "gdws_torch" / "cli")
    return (in_cli and line.startswith(ALIAS_TABLE)) or (
        path.suffix == ".md" and DOCUMENTED_ALIASES in line
    )


def test_the_norms_are_spelled_linf_l2_l1_outside_the_cli_alias_table():
    assert text_files(), "nothing searched"
    assert offending(OLD_NORM, norm_alias_line) == []


def test_the_alias_table_and_its_documentation_exist():
    # The exceptions above are real: the CLI still takes the original's spellings.
    cli = ROOT / "adapters" / "gdws_torch" / "cli"
    tables = [
        line.removeprefix("ORIGINAL_NORMS = ")
        for path in cli.glob("*.py")
        for line in path.read_text().splitlines()
        if line.startswith(ALIAS_TABLE)
    ]
    assert [ast.literal_eval(table) for table in tables] == [
        {"l_inf": "Linf", "l_2": "L2", "l_1": "L1"}
    ]
    cli_docs = (ROOT / "docs" / "cli.md").read_text()
    assert any(
        OLD_NORM.search(line) and DOCUMENTED_ALIASES in line for line in cli_docs.splitlines()
    )


def test_the_restart_count_is_n_restarts():
    assert offending(OLD_RESTARTS) == []


@pytest.mark.parametrize(
    ("line", "old"),
    [
        ('PGD(model, norm="l_inf")', True),
        ("an l_2 ball", True),
        ("eps for L1, Linf", False),
        ("l1_sparsity and an_l_inf_name", False),
    ],
)
def test_the_pattern_finds_the_old_spellings(line, old):
    assert bool(OLD_NORM.search(line)) is old


# -- the pipeline's terms: channel weights (not alphas), eps (not epsilon) ---------------

LIBRARY = ("adapters/gdws_torch", "adapters/gdws_onnx")
#: Parameter names the Python API no longer uses, and the name that replaced each.
RETIRED_PARAMETERS = {
    "alphas": "channel_weights",
    "alpha_samples": "noise_gain_samples",
    "epsilon": "eps",
    "convert_options": "real keywords",
}


def parameters(source: str) -> list[tuple[str, str]]:
    """``(function, parameter)`` of every function defined in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            every = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            found += [(node.name, a.arg) for a in every]
            found += [(node.name, f"**{node.args.kwarg.arg}")] if node.args.kwarg else []
    return found


@pytest.mark.parametrize("retired", sorted(RETIRED_PARAMETERS))
def test_no_function_of_the_library_takes_a_retired_parameter(retired):
    found = [
        f"{path.relative_to(ROOT)}: {function}({name})"
        for folder in LIBRARY
        for path in sorted((ROOT / folder).rglob("*.py"))
        for function, name in parameters(path.read_text())
        if name == retired
    ]
    assert found == [], f"use {RETIRED_PARAMETERS[retired]}: {found}"


def test_the_pipelines_public_functions_take_no_keyword_catch_all():
    import gdws_torch

    stages = ("compress", "convert", "recipe_inputs", "recover")
    for name in stages:
        source = ast.parse(inspect.getsource(getattr(gdws_torch, name)))
        assert not [n for n in ast.walk(source) if isinstance(n, ast.arguments) and n.kwarg]


def test_the_parameters_finder_sees_keyword_catch_alls():
    assert parameters("def f(a, *, alphas=None, **deprecated): pass") == [
        ("f", "a"),
        ("f", "alphas"),
        ("f", "**deprecated"),
    ]
