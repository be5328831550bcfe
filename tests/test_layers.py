"""The layers of DESIGN.md: imports point down only (cluster <- partitioners <- splitlearn).

Every import in a package's modules, at module level or inside a function, is read from the
source (no import runs), so a lazy import that points up is caught too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["cluster", "partitioners", "splitlearn"]  # each may import only those before it


def imported_packages(path: Path) -> set[tuple[int, str]]:
    """(line, top-level package) of every absolute import in ``path``."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {(node.lineno, a.name.split(".")[0]) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add((node.lineno, node.module.split(".")[0]))
    return out


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_point_down(layer: str) -> None:
    above = set(LAYERS[LAYERS.index(layer) + 1 :])
    files = sorted((ROOT / layer).rglob("*.py"))
    assert files, f"no modules under {layer}/"
    upward = [
        f"{path.relative_to(ROOT)}:{line} imports {pkg}"
        for path in files
        for line, pkg in sorted(imported_packages(path))
        if pkg in above
    ]
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from splitlearn.config import RunConfig\n    import partitioners.plan\n")
    assert {pkg for _, pkg in imported_packages(bad)} == {"splitlearn", "partitioners"}
