"""The optional extras of pyproject.toml that some tests need (`load`: Locust and the reports' tools, `cluster`:
the Kubernetes client). A missing one fails the test with the command that installs it, never skips it: CI
installs every extra (.ci/bootstrap.sh)."""

from __future__ import annotations

import importlib.util

import pytest


def require(extra: str, *modules: str) -> None:
    missing = [module for module in modules if importlib.util.find_spec(module) is None]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not installed: this test needs the `{extra}` extra "
            f"(pip install -e '.[{extra}]'; .ci/bootstrap.sh installs every extra)",
            pytrace=False,
        )
