"""Copy the dashboards and alert rules into the Helm chart: `python dashboards/sync.py [--check]`.

dashboards/*.json and dashboards/prometheus-rules.yaml are the source of truth. The chart reads
chart/files/dashboards/*.json (Grafana sidecar ConfigMaps) and chart/files/prometheus-rules.yaml
(PrometheusRule) verbatim, so Helm never templates `{{ $labels }}`. Dashboards are copied byte for
byte (JSON has no comments; chart/files/README.md says where they come from); the rules get a header.
`--check` changes nothing and exits 1 if any generated file is missing, different or stale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "dashboards"
TARGET = ROOT / "chart" / "files"
RULES = "prometheus-rules.yaml"
NOTICE = "Generated from dashboards/ by dashboards/sync.py. Do not change in-place!"
RULES_HEADER = f"# {NOTICE}\n# Source: dashboards/{RULES}\n"
README = f"""# chart/files

{NOTICE}

- `dashboards/*.json`: copies of `dashboards/*.json` (Grafana dashboards, one ConfigMap each).
- `{RULES}`: `dashboards/{RULES}` with this notice as a header (the PrometheusRule's groups).

Edit the sources, then run `python dashboards/sync.py`; CI runs `python dashboards/sync.py --check`.
"""


def expected_files() -> dict[Path, bytes]:
    """Every generated file, by path, with the content it must have."""
    files = {TARGET / "dashboards" / src.name: src.read_bytes() for src in sorted(SOURCE.glob("*.json"))}
    files[TARGET / RULES] = RULES_HEADER.encode() + (SOURCE / RULES).read_bytes()
    files[TARGET / "README.md"] = README.encode()
    return files


def drift() -> list[str]:
    """What --check reports: generated files that are missing, differ, or have no source any more."""
    expected = expected_files()
    problems = [f"{path.relative_to(ROOT)}: missing" for path in expected if not path.is_file()]
    problems += [
        f"{path.relative_to(ROOT)}: differs from its source"
        for path, content in expected.items()
        if path.is_file() and path.read_bytes() != content
    ]
    problems += [
        f"{path.relative_to(ROOT)}: stale (no source in dashboards/)"
        for path in sorted((TARGET / "dashboards").glob("*.json"))
        if path not in expected
    ]
    return problems


def sync() -> list[str]:
    """Write every generated file and remove stale dashboards; returns what changed."""
    changed = drift()
    expected = expected_files()
    for path in sorted((TARGET / "dashboards").glob("*.json")):
        if path not in expected:
            path.unlink()
    for path, content in expected.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or path.read_bytes() != content:
            path.write_bytes(content)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if chart/files is out of date; change nothing")
    args = parser.parse_args(argv)
    if args.check:
        problems = drift()
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print("chart/files is out of date: run `python dashboards/sync.py`", file=sys.stderr)
            return 1
        return 0
    for change in sync():
        print(f"synced {change.split(':')[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
