"""Every public name is documented: docs/api.md lists each package's __all__."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("package", ["gdws_approx", "gdws_torch", "gdws_onnx"])
def test_every_public_name_is_in_the_api_page(package):
    module = pytest.importorskip(package)
    page = (ROOT / "docs" / "api.md").read_text()
    section = page.split(f"## `{package}`", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `(\w+)` \(", section, flags=re.MULTILINE))
    public = {name for name in module.__all__ if not name.startswith("__")}
    assert public - listed == set(), f"add {sorted(public - listed)} to docs/api.md"
    assert listed - public == set(), f"docs/api.md lists names {package} no longer has"
