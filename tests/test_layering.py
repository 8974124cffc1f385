"""The parts of app/ import one way: a part imports only parts on its own tier or below, so no cycle can form.

Every `import` counts, wherever it stands (module level, inside a function, under TYPE_CHECKING): a
type-only import still ties the parts together. A new part must be given a tier here.
"""

from __future__ import annotations

import ast
from pathlib import Path

APP = Path(__file__).resolve().parent.parent / "app"

# bottom to top; a module `app/<name>.py` or a package `app/<name>/` is the part `<name>`
TIERS: list[tuple[str, ...]] = [
    ("settings", "private_dir", "errors"),
    ("observability",),
    ("storage",),  # storage errors and their wrapping, the Redis client, shared-memory tables
    ("policies",),
    ("instance",),  # the instance-wide shared tables the policies keep their state in
    ("upstream",),
    ("resume",),
    ("streaming",),
    ("admission",),
    ("lifecycle", "state", "wiring", "drain"),  # a worker's state, how it is built, how it drains
    ("routes",),
    ("middleware", "protocol"),
    ("main", "gunicorn_conf", "__main__"),
]
TIER = {part: tier for tier, parts in enumerate(TIERS) for part in parts}


def _part(module: str) -> str | None:
    """`app.streaming.run` -> `streaming`; None outside app (and for `app` itself)."""
    names = module.split(".")
    return names[1] if names[0] == "app" and len(names) > 1 else None


def _imports(path: Path) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "app":  # `from app import routes`
                found.extend((node.lineno, f"app.{alias.name}") for alias in node.names)
            else:
                found.append((node.lineno, node.module))
    return found


def test_every_part_has_a_tier() -> None:
    parts = {
        p.stem if p.is_file() else p.name
        for p in APP.iterdir()
        if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())
    }
    assert parts - TIER.keys() == set(), "give each new part of app/ a tier in tests/test_layering.py"


def test_imports_point_down() -> None:
    upward = []
    for path in sorted(APP.rglob("*.py")):
        source = _part("app." + ".".join(path.relative_to(APP).with_suffix("").parts))
        if source is None or source not in TIER:
            continue
        for line, module in _imports(path):
            target = _part(module)
            if target is not None and target != source and TIER.get(target, -1) > TIER[source]:
                upward.append(f"{path.relative_to(APP.parent)}:{line}: {source} imports {module}")
    assert upward == [], "imports from a lower part to a higher one:\n" + "\n".join(upward)
