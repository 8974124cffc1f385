"""Linters on the image and the scripts: hadolint (Dockerfile), shellcheck (k8s/*.sh, .ci/*), ruff (k8s/*.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (the test extra installs it)")
    return path


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, cwd=ROOT)


def test_hadolint_dockerfile() -> None:
    done = _run(_tool("hadolint"), "--failure-threshold", "info", "Dockerfile")
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_shape() -> None:
    text = (ROOT / "Dockerfile").read_text()
    froms = [line.split()[1] for line in text.splitlines() if line.startswith("FROM ")]
    assert len(froms) == 2 and len(set(froms)) == 1, froms  # multi-stage, one pinned base
    assert froms[0].startswith("python:3.11.") and froms[0].endswith("-slim-bookworm") and froms[0].count(".") == 2
    assert 'ENTRYPOINT ["python", "-m", "app"]' in text  # exec form: gunicorn gets SIGTERM directly
    assert "USER 10001:10001" in text and "EXPOSE 8000" in text
    assert "PROMETHEUS_MULTIPROC_DIR=/tmp/" in text and "TMPDIR=/tmp" in text
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignored[ignored.index("**") + 1 : ignored.index("**") + 3] == ["!requirements.lock", "!app/"]


def _shell_scripts() -> list[Path]:
    scripts = sorted((ROOT / "k8s").glob("*.sh"))
    scripts += [p for p in sorted((ROOT / ".ci").iterdir()) if p.is_file() and p.read_text().startswith("#!")]
    return scripts


def test_shellcheck_scripts() -> None:
    scripts = _shell_scripts()
    assert any(p.parent.name == "k8s" for p in scripts) and any(p.parent.name == ".ci" for p in scripts)
    for script in scripts:
        done = _run(_tool("shellcheck"), "--severity", "style", "--external-sources", str(script))
        assert done.returncode == 0, done.stdout


def test_ruff_on_k8s_and_chart_scripts() -> None:
    done = _run(_tool("ruff"), "check", "k8s", "chart/hack", ".ci")
    assert done.returncode == 0, done.stdout
