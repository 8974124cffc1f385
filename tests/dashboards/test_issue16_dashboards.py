"""Issue 16, point 5: the overview's Model servers row, and its panels computing what the alerts read.

promtool evaluates the panels' queries (as Grafana sends them, every variable All) next to the rules on the same
series, so a panel that drifts from its alert, or counts the `other` endpoint in the balance, fails here.
(That the queries return data from a real gateway running a fleet: test_live_queries.py.)
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from loadtest.harness.process import require_binary
from loadtest.harness.prometheus import PROMTOOL_BIN
from tests.dashboards.gateway_metrics import referenced_metrics
from tests.dashboards.promql import dashboard_panels, dashboard_variables, instantiate

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "dashboards" / "prometheus-rules.yaml"
FLEET_METRICS = {
    "streaming_upstream_endpoint_active_streams",
    "streaming_upstream_endpoint_circuit_state",
    "streaming_upstream_endpoint_failures_total",
    "streaming_upstream_endpoints",
    "streaming_upstream_continuations_total",
}
RATIO = "namespace_job_pod:streaming_upstream_endpoints_healthy:ratio"
# (pod, healthy, unhealthy, not_ready); None: the series is absent. -> the healthy share the panel and rule show
PODS = [
    ("gw-down", 1, 3, 0, 0.25),
    ("gw-half", 2, 2, 0, 0.5),
    ("gw-rollout", 1, 0, 3, 1.0),
    ("gw-failing", None, 2, None, 0.0),
]
# streams in flight per endpoint on one pod; `other` sums the endpoints past UPSTREAM_ENDPOINT_LABELS_MAX
ACTIVE = {"10.0.0.1:8000": 4, "10.0.0.2:8000": 2, "other": 30}
# circuit state (0 closed, 1 open, 2 half-open) of each endpoint on two gateway pods -> what the panel shows:
# open on any pod wins, then half-open (as the gateway's own `other` endpoint ranks them)
CIRCUITS = {"10.0.0.1:8000": (1, 2, 1), "10.0.0.2:8000": (2, 0, 2), "10.0.0.3:8000": (0, 0, 0)}


def _board() -> dict[str, Any]:
    board: dict[str, Any] = json.loads((ROOT / "dashboards" / "overview.json").read_text())
    return board


def _row(board: dict[str, Any], title: str) -> list[dict[str, Any]]:
    """The panels under a row: from its y to the next row's."""
    panels = dashboard_panels(board)
    rows = sorted(p["gridPos"]["y"] for p in panels if p["type"] == "row")
    top = next(p["gridPos"]["y"] for p in panels if p["type"] == "row" and p["title"] == title)
    bottom = min([y for y in rows if y > top], default=10**6)
    return [p for p in panels if p["type"] != "row" and top < p["gridPos"]["y"] < bottom]


def _query(board: dict[str, Any], title: str) -> str:
    panel = next(p for p in dashboard_panels(board) if p["title"] == title)
    names = [v["name"] for v in dashboard_variables(board)]
    return instantiate(panel["targets"][0]["expr"], names, window="1m")


def _alert_threshold(alert: str) -> float:
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    expr = next(r["expr"] for r in rules if r.get("alert") == alert)
    match = re.fullmatch(rf"{re.escape(RATIO)}\{{[^}}]*\}} < ([0-9.]+)", expr.strip())
    assert match, expr
    return float(match[1])


def test_model_servers_row_reads_every_fleet_metric() -> None:
    panels = _row(_board(), "Model servers")
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    assert FLEET_METRICS <= referenced_metrics(exprs), sorted(FLEET_METRICS - referenced_metrics(exprs))


def test_healthy_share_panel_draws_the_alert_threshold() -> None:
    panel = next(p for p in dashboard_panels(_board()) if p["title"].startswith("Healthy share of model servers"))
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert [s["value"] for s in steps if s["color"] == "green"] == [
        _alert_threshold("StreamingUpstreamEndpointsUnhealthy")
    ]


def test_panels_compute_what_the_rules_record(tmp_path: Path) -> None:
    base = 'namespace="prod", job="streaming-gateway"'
    series = []
    for pod, *counts, _share in PODS:
        for state, count in zip(("healthy", "unhealthy", "not_ready"), counts, strict=True):
            if count is not None:
                labels = f'{base}, pod="{pod}", state="{state}"'
                series.append({"series": f"streaming_upstream_endpoints{{{labels}}}", "values": f"{count}x5"})
    for endpoint, streams in ACTIVE.items():
        labels = f'{base}, pod="gw-down", upstream_endpoint="{endpoint}"'
        series.append({"series": f"streaming_upstream_endpoint_active_streams{{{labels}}}", "values": f"{streams}x5"})
    for endpoint, (on_a, on_b, _shown) in CIRCUITS.items():
        for pod, circuit in (("gw-a", on_a), ("gw-b", on_b)):
            labels = f'{base}, pod="{pod}", upstream_endpoint="{endpoint}"'
            series.append(
                {"series": f"streaming_upstream_endpoint_circuit_state{{{labels}}}", "values": f"{circuit}x5"}
            )
    board = _board()
    shares = [(pod, share) for pod, *_counts, share in PODS]
    panel_share = _query(board, "Healthy share of model servers per gateway pod")
    tests = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "promql_expr_test": [
                    {
                        "expr": RATIO,
                        "eval_time": "3m",
                        "exp_samples": [
                            {"labels": f'{RATIO}{{{base}, pod="{pod}"}}', "value": share} for pod, share in shares
                        ],
                    },
                    {
                        "expr": panel_share,
                        "eval_time": "3m",
                        "exp_samples": [
                            {"labels": f'{{namespace="prod", pod="{pod}"}}', "value": share} for pod, share in shares
                        ],
                    },
                    {  # the busiest named endpoint over the mean of the named ones: 4 / 3
                        "expr": f"{_query(board, 'Model server balance (max / mean streams in flight)')} * 3",
                        "eval_time": "3m",
                        "exp_samples": [{"labels": "{}", "value": 4}],
                    },
                    {
                        "expr": _query(board, "Model server circuit state"),
                        "eval_time": "3m",
                        "exp_samples": [
                            {"labels": f'{{upstream_endpoint="{endpoint}"}}', "value": shown}
                            for endpoint, (_a, _b, shown) in CIRCUITS.items()
                        ],
                    },
                ],
            }
        ],
    }
    path = tmp_path / "panels.test.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    done = subprocess.run(
        [require_binary(PROMTOOL_BIN), "test", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
