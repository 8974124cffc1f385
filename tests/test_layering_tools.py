"""The tools never depend on the test suite: tests/ may import loadtest/, loadtest/ never imports tests/ (nor
pytest), so the benchmark and the rehearsal run where the tests are not installed."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = ("tests", "pytest", "_pytest")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in a file, nested ones (inside functions) included."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def test_loadtest_never_imports_tests() -> None:
    sources = sorted((ROOT / "loadtest").rglob("*.py"))
    assert sources, "no loadtest sources found"
    offending = [
        f"{path.relative_to(ROOT)}:{line}: import {module}"
        for path in sources
        for line, module in imported_modules(path)
        if module.split(".")[0] in FORBIDDEN
    ]
    assert offending == []
