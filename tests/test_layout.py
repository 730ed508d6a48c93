"""The ownership rules of DESIGN.md, checked on the imports of the source (one direction only):
models import ops, config and fusion, never runtime; kernels import weight and quant, never
ops; nothing below the runtime imports it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

KILN = Path(__file__).resolve().parents[1] / "kiln"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("models", ("kiln.runtime",)),
        ("ops", ("kiln.runtime", "kiln.models")),
        ("kernels", ("kiln.ops", "kiln.runtime", "kiln.models")),
        ("quant", ("kiln.ops", "kiln.runtime", "kiln.models", "kiln.kernels")),
    ],
)
def test_imports_go_one_way(package, forbidden):
    bad = [
        f"{path.relative_to(KILN.parent)} imports {name}"
        for path in sorted((KILN / package).rglob("*.py"))
        for name in sorted(_imports(path))
        if name.startswith(forbidden)
    ]
    assert not bad, "\n".join(bad)


def test_weight_lives_outside_ops():
    assert (KILN / "weight.py").exists() and not (KILN / "ops" / "weight.py").exists()
