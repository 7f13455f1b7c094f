"""`docs/security.md`'s attack table names real tests: every one exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "security.md"


def _named_tests() -> list[tuple[str, str]]:
    """(file, test) for every test the table names, `::name` reusing the last file."""
    named = []
    for line in DOC.read_text().splitlines():
        if not line.startswith("| ") or "test_" not in line:
            continue
        cell = line.rstrip(" |").rsplit("|", 1)[-1]
        current = ""
        for path, name in re.findall(r"`((?:tests/[\w/]+\.py)?)::(test_\w+)`", cell):
            current = path or current
            named.append((current, name))
    return named


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    }


def test_every_test_in_the_attack_table_exists() -> None:
    named = _named_tests()
    assert len(named) >= 40
    missing = [(path, name) for path, name in named if name not in _tests_in(ROOT / path)]
    assert not missing, missing
