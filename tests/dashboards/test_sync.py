"""chart/files is generated from dashboards/ by dashboards/sync.py; `--check` catches any drift."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOTICE = "Generated from dashboards/ by dashboards/sync.py. Do not change in-place!"


def _sync(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(root / "dashboards" / "sync.py"), *args],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_the_chart_copies_are_in_sync() -> None:
    result = _sync(ROOT, "--check")
    assert result.returncode == 0, result.stderr


def test_the_copies_match_their_sources() -> None:
    files = ROOT / "chart" / "files"
    for source in (ROOT / "dashboards").glob("*.json"):
        assert (files / "dashboards" / source.name).read_bytes() == source.read_bytes()
    rules = (files / "prometheus-rules.yaml").read_text()
    assert rules.startswith(f"# {NOTICE}\n")
    assert rules.endswith((ROOT / "dashboards" / "prometheus-rules.yaml").read_text())
    assert NOTICE in (files / "README.md").read_text()


def test_check_fails_on_drift_and_sync_repairs_it(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "dashboards", tmp_path / "dashboards")
    shutil.copytree(ROOT / "chart" / "files", tmp_path / "chart" / "files")
    files = tmp_path / "chart" / "files"
    assert _sync(tmp_path, "--check").returncode == 0

    (files / "dashboards" / "overview.json").write_text("{}\n")  # edited in place
    (files / "prometheus-rules.yaml").unlink()  # deleted
    (files / "dashboards" / "retired.json").write_text("{}\n")  # its source is gone
    (tmp_path / "dashboards" / "slo.json").write_bytes((tmp_path / "dashboards" / "slo.json").read_bytes() + b" ")
    result = _sync(tmp_path, "--check")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "chart/files/prometheus-rules.yaml: missing",
        "chart/files/dashboards/overview.json: differs from its source",
        "chart/files/dashboards/slo.json: differs from its source",
        "chart/files/dashboards/retired.json: stale (no source in dashboards/)",
        "chart/files is out of date: run `python dashboards/sync.py`",
    ]
    assert (files / "dashboards" / "retired.json").exists()  # --check changes nothing

    assert _sync(tmp_path).returncode == 0
    assert _sync(tmp_path, "--check").returncode == 0
    assert not (files / "dashboards" / "retired.json").exists()
    assert (files / "dashboards" / "slo.json").read_bytes() == (tmp_path / "dashboards" / "slo.json").read_bytes()
