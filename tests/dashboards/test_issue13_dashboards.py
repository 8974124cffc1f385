"""Issue 13, point 9: saturation, rollout annotations, a `cluster` variable, the 0.3 s SLO bucket, and request
durations measured up to MAX_STREAM_AGE_SECONDS. (That every one of these queries returns data from a real
Prometheus scraping the gateway is test_live_queries.py's job.)"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from app.observability import metrics
from app.settings import Settings
from tests.dashboards.promql import dashboard_panels, dashboard_variables

DASHBOARDS = Path(__file__).resolve().parents[2] / "dashboards"
NAMES = ("overview.json", "slo.json")


def _load(name: str) -> dict[str, Any]:
    board: dict[str, Any] = json.loads((DASHBOARDS / name).read_text())
    return board


def _queries(board: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dashboard_panels(board) for t in p.get("targets", [])]
    return exprs + [a["expr"] for a in board["annotations"]["list"] if "expr" in a]


@pytest.mark.parametrize("name", NAMES)
def test_cluster_variable_scopes_every_query(name: str) -> None:
    board = _load(name)
    variables = [v["name"] for v in dashboard_variables(board)]
    assert variables.index("cluster") < variables.index("namespace")  # the outermost scope comes first
    for variable in dashboard_variables(board):
        if variable["type"] == "query" and variable["name"] != "cluster":
            assert 'cluster=~"$cluster"' in variable["query"]["query"], variable["name"]
    for expr in _queries(board):
        for match in re.finditer(r"(?<![\w:])streaming_\w+(\{[^}]*\})?", expr):
            assert match[1] and 'cluster=~"$cluster"' in match[1], f"{match[0]} in {expr}"


def test_saturation_panel_divides_by_the_exported_limit() -> None:
    panels = {p["title"]: p for p in dashboard_panels(_load("overview.json"))}
    panel = panels["Saturation per pod (streams / MAX_CONNECTIONS)"]
    expr = panel["targets"][0]["expr"]
    assert "streaming_active_connections{" in expr and "streaming_max_connections{" in expr
    assert panel["fieldConfig"]["defaults"]["unit"] == "percentunit"


@pytest.mark.parametrize("name", NAMES)
def test_rollouts_show_as_annotations_from_streaming_draining(name: str) -> None:
    annotations = _load(name)["annotations"]["list"]
    drains = [a for a in annotations if "streaming_draining{" in a.get("expr", "")]
    assert len(drains) == 1 and drains[0]["enable"] is True
    assert drains[0]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_slo_panel_reads_the_300ms_bucket() -> None:
    panels = {p["title"]: p for p in dashboard_panels(_load("slo.json"))}
    stat = panels["First tokens within 300 ms (target >= 50%)"]
    assert 'le="0.3"' in stat["targets"][0]["expr"] and stat["type"] == "stat"
    green = [s["value"] for s in stat["fieldConfig"]["defaults"]["thresholds"]["steps"] if s["color"] == "green"]
    assert green == [0.5]
    share = panels["Share of first tokens within a bound"]["targets"][0]["expr"]
    assert 'le="0.3"' in share
    assert 0.3 in metrics.TTFT_SECONDS._upper_bounds  # the bucket the panels read exists


def test_request_duration_buckets_reach_the_longest_stream() -> None:
    bounds = [b for b in metrics.REQUEST_DURATION_SECONDS._upper_bounds if b != float("inf")]
    settings = Settings()
    assert bounds[-1] >= settings.max_stream_age_seconds  # no stream outlives its slot lease
    assert any(b >= settings.total_timeout_seconds for b in bounds[:-1])  # the total deadline is measured too
