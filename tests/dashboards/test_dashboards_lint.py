"""Dashboards as code: stable uids, every query on the `${datasource}` variable, nothing hard-wired to one Grafana."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.dashboards.gateway_metrics import exported_names, referenced_metrics
from tests.dashboards.promql import dashboard_panels, dashboard_variables, label_values_query, variable_query

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "dashboards"
# The uid is how links, alerts and bookmarks find a dashboard: changing one breaks them all.
UIDS = {"overview.json": "streaming-gateway-overview", "slo.json": "streaming-gateway-slo"}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# The metrics the panels must cover: every one exported when the dashboards were written, except
# streaming_circuit_breaker_transitions_total (app/upstream/guard.py counts each state change; the panel
# plots streaming_circuit_breaker_state, which shows the same changes; tests/test_ready.py reads the counter).
# A metric added later is not required here; add its panel and its name together.
ON_DASHBOARDS = {
    "streaming_active_connections",
    "streaming_connections_total",
    "streaming_stream_outcomes_total",
    "streaming_ttft_seconds",
    "streaming_inter_token_seconds",
    "streaming_generation_duration_seconds",
    "streaming_request_duration_seconds",
    "streaming_tokens_total",
    "streaming_tokens_per_second",
    "streaming_errors_total",
    "streaming_rejections_total",
    "streaming_circuit_breaker_state",
    "streaming_upstream_retries_total",
    "streaming_drain_duration_seconds",
    "streaming_drain_cut_streams_total",
    "streaming_redis_up",
    "streaming_redis_fallbacks_total",
    # issue 16: a fleet of model servers (exported only when the gateway runs one)
    "streaming_upstream_endpoint_active_streams",
    "streaming_upstream_endpoint_circuit_state",
    "streaming_upstream_endpoint_failures_total",
    "streaming_upstream_endpoints",
    "streaming_upstream_continuations_total",
}


def _load(name: str) -> dict[str, Any]:
    board: dict[str, Any] = json.loads((DASHBOARDS / name).read_text())
    return board


def _exprs(board: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in dashboard_panels(board) for target in panel.get("targets", [])]


def _datasource_refs(node: Any, path: str = "") -> list[tuple[str, Any]]:
    """Every `datasource` value anywhere in the JSON, with where it is."""
    found: list[tuple[str, Any]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                found.append((f"{path}.{key}", value))
            found.extend(_datasource_refs(value, f"{path}.{key}"))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found.extend(_datasource_refs(value, f"{path}[{i}]"))
    return found


def test_the_dashboards_are_the_expected_files() -> None:
    assert sorted(p.name for p in DASHBOARDS.glob("*.json")) == sorted(UIDS)


@pytest.mark.parametrize("name", sorted(UIDS))
def test_dashboard_identity_and_datasource_variable(name: str) -> None:
    board = _load(name)
    assert board["uid"] == UIDS[name]
    assert board["id"] is None  # Grafana assigns ids per instance; a fixed one collides on import
    assert board["title"].startswith("Streaming gateway / ")
    assert board["schemaVersion"] >= 36
    assert "__inputs" not in board and "${DS_" not in json.dumps(board)  # no export-for-sharing placeholders
    datasource_vars = [v for v in dashboard_variables(board) if v["type"] == "datasource"]
    assert [(v["name"], v["query"]) for v in datasource_vars] == [("datasource", "prometheus")]


@pytest.mark.parametrize("name", sorted(UIDS))
def test_every_panel_and_target_uses_the_datasource_variable(name: str) -> None:
    board = _load(name)
    panels = [p for p in dashboard_panels(board) if p["type"] != "row"]  # rows only group panels
    assert panels
    for panel in panels:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel.get("title") and panel.get("description"), panel.get("title")
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            assert target.get("expr", "").strip(), f"{panel['title']} {target['refId']} has no expr"
    # nothing else may point at a concrete data source either (variables, annotations, nested rows)
    for where, value in _datasource_refs(board):
        assert value in (DATASOURCE, "${datasource}"), f"hard-coded datasource at {where}: {value}"


@pytest.mark.parametrize("name", sorted(UIDS))
def test_panel_ids_are_unique_and_panels_do_not_overlap(name: str) -> None:
    panels = dashboard_panels(_load(name))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


@pytest.mark.parametrize("name", sorted(UIDS))
def test_template_variables_are_regex_matched_label_values(name: str) -> None:
    board = _load(name)
    names = [v["name"] for v in dashboard_variables(board) if v["type"] == "query"]
    assert {"namespace", "job"} <= set(names)
    for variable in dashboard_variables(board):
        if variable["type"] != "query":
            continue
        assert variable["datasource"] == DATASOURCE
        parsed = label_values_query(variable_query(variable))
        assert parsed is not None and parsed[1] == variable["name"], variable_query(variable)
        # "All" must match series without the label too (a non-Kubernetes scrape has no pod/namespace)
        assert variable["includeAll"] and variable["allValue"] == ".*"
    # multi-value and All expand to regexes, so a variable may only appear inside a `=~"..."` matcher
    for expr in _exprs(board):
        outside_matchers = re.sub(r'=~\s*"[^"]*"', "", expr)
        for var in names:
            assert not re.search(r"\$\{?" + var + r"\b", outside_matchers), f"${var} outside =~ in {expr}"


def test_dashboards_read_only_exported_metrics_and_cover_the_core_ones() -> None:
    referenced = referenced_metrics(_exprs(_load("overview.json")) + _exprs(_load("slo.json")))
    unknown = referenced - exported_names()
    assert not unknown, f"the dashboards read metrics the gateway does not export (renamed?): {sorted(unknown)}"
    assert ON_DASHBOARDS <= referenced, f"no panel reads: {sorted(ON_DASHBOARDS - referenced)}"


def test_slo_dashboard_shows_the_seed_targets() -> None:
    stats = {p["title"]: p for p in dashboard_panels(_load("slo.json")) if p["type"] == "stat"}
    red_at = {
        title: [s["value"] for s in p["fieldConfig"]["defaults"]["thresholds"]["steps"] if s["color"] == "red"]
        for title, p in stats.items()
    }
    assert red_at["TTFT p50 (target < 300 ms)"] == [0.3]
    assert red_at["TTFT p95 (target < 1 s)"] == [1]
    assert red_at["TTFT p99 (target < 2 s)"] == [2]
    assert red_at["Error ratio (target < 0.1%)"] == [0.001]
    assert "Refusals answered before a stream starts" in stats["Error ratio (target < 0.1%)"]["description"]
