"""Alert rules: promtool accepts them, their unit tests pass, and every alert is complete and tested both ways."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Any

from loadtest.harness.process import require_binary
from loadtest.harness.prometheus import PROMTOOL_BIN
from tests.conftest import PrometheusFactory
from tests.dashboards.gateway_metrics import exported_names, referenced_metrics

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "dashboards" / "prometheus-rules.yaml"
RULE_TESTS = ROOT / "dashboards" / "prometheus-rules.test.yaml"
RUNBOOK = ROOT / "dashboards" / "RUNBOOK.md"
RUNBOOK_URL = "https://github.com/your-org/streaming-gateway/blob/main/dashboards/RUNBOOK.md#"
SEVERITIES = {"critical", "warning", "info"}


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_binary(PROMTOOL_BIN), *args], cwd=ROOT / "dashboards", capture_output=True, text=True, timeout=60
    )


def _alert_names() -> list[str]:
    return re.findall(r"^\s*- alert: (\w+)$", RULES.read_text(), re.M)


def test_promtool_checks_the_rules_and_the_chart_copy() -> None:
    result = _promtool("check", "rules", str(RULES), str(ROOT / "chart" / "files" / "prometheus-rules.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == 2


def test_promtool_unit_tests_pass() -> None:
    result = _promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def _unit_test_blocks() -> list[str]:
    text = RULE_TESTS.read_text()
    return re.split(r"^  - interval: ", text, flags=re.M)[1:]


def _series_keys(block: str) -> set[tuple[str, str]]:
    """(namespace, pod) of each input series of a unit test."""
    keys = set()
    for labels in re.findall(r"^\s*- series: '\w[\w:]*\{([^}]*)\}'", block, re.M):
        found = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        keys.add((found.get("namespace", ""), found.get("pod", "")))
    return keys


def _firing(block: str, alert: str) -> set[tuple[str, str]]:
    """(namespace, pod) of every alert `alert` a unit test expects to fire; a pod-less alert matches every pod."""
    fired: set[tuple[str, str]] = set()
    cases = re.split(r"^      - alertname: ", block, flags=re.M)[1:]
    for case in cases:
        if case.split("\n", 1)[0].strip() != alert:
            continue
        for labels in re.findall(r"exp_labels: \{([^}]*)\}", case):
            found = dict(re.findall(r"(\w+): ([\w.-]+)", labels))
            fired.add((found.get("namespace", ""), found.get("pod", "*")))
    return fired


def test_every_alert_fires_on_a_bad_series_and_stays_silent_on_a_good_one() -> None:
    alerts = _alert_names()
    assert len(alerts) == len(set(alerts)) >= 10
    for alert in alerts:
        tested = False
        for block in _unit_test_blocks():
            fired = _firing(block, alert)
            if not fired:
                continue
            series = _series_keys(block)
            silent = {(ns, pod) for ns, pod in series if (ns, pod) not in fired and (ns, "*") not in fired}
            assert silent, f"{alert}: its unit test has no series on which it stays silent"
            tested = True
        assert tested, f"{alert}: no unit test in {RULE_TESTS.name} expects it to fire"


def _loaded_rules(prometheus_server: PrometheusFactory) -> list[dict[str, Any]]:
    """The rules as Prometheus itself parsed them, once every rule has been evaluated."""
    prometheus = prometheus_server([], [RULES])
    deadline = time.monotonic() + 10
    while True:
        rules = prometheus.rules()
        if all(rule.get("health") != "unknown" for rule in rules) or time.monotonic() > deadline:
            return rules
        time.sleep(0.2)  # polling interval, not an assertion


def test_every_alert_has_for_severity_summary_description_and_runbook(prometheus_server: PrometheusFactory) -> None:
    rules = _loaded_rules(prometheus_server)
    for rule in rules:
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"
    alerts = [rule for rule in rules if rule["type"] == "alerting"]
    assert sorted(a["name"] for a in alerts) == sorted(_alert_names())
    runbook_sections = re.findall(r"^## (\w+)$", RUNBOOK.read_text(), re.M)
    for alert in alerts:
        name = alert["name"]
        assert alert["duration"] > 0, f"{name} has no `for`"
        assert alert["labels"].get("severity") in SEVERITIES, name
        annotations = alert["annotations"]
        assert {"summary", "description", "runbook_url"} <= set(annotations), name
        assert annotations["runbook_url"] == RUNBOOK_URL + name.lower(), name
        assert name in runbook_sections, f"RUNBOOK.md has no section for {name}"
    assert sorted(runbook_sections) == sorted(a["name"] for a in alerts), "a runbook section for an unknown alert"


def test_the_rules_read_only_exported_metrics() -> None:
    referenced = referenced_metrics([RULES.read_text()])
    assert len(referenced) >= 5
    unknown = referenced - exported_names()
    assert not unknown, f"the rules read metrics the gateway does not export (renamed?): {sorted(unknown)}"
