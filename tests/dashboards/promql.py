"""PromQL and dashboard helpers the query tests share: the parts of an alert condition, a dashboard query as
Grafana would send it, a dashboard's panels and variables. (The Prometheus server itself:
loadtest/harness/prometheus.py.)"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

_COMPARISON = re.compile(r"==|!=|>=|<=|>|<")
_SET_OPERATOR = re.compile(r"(?<![\w:])(and|or|unless)(?![\w:])", re.IGNORECASE)
_OPEN, _CLOSE = "([{", ")]}"


def _top_level_spans(expr: str) -> list[tuple[int, int]]:
    """(start, end) of the parts of `expr` outside any brackets and string literals."""
    spans: list[tuple[int, int]] = []
    depth, quote, start, i = 0, "", 0, 0
    while i < len(expr):
        char = expr[i]
        if quote:
            if char == "\\" and quote != "`":
                i += 1
            elif char == quote:
                quote = ""
        elif char in "\"'`":
            quote = char
        elif char in _OPEN:
            if depth == 0:
                spans.append((start, i))
            depth += 1
        elif char in _CLOSE:
            depth -= 1
            if depth == 0:
                start = i + 1
        elif char == "#" and depth == 0:  # a comment runs to the end of the line
            spans.append((start, i))
            i = expr.find("\n", i)
            if i == -1:
                return spans
            start = i
            continue
        i += 1
    if depth == 0:
        spans.append((start, len(expr)))
    return spans


def _first_top_level(pattern: re.Pattern[str], expr: str) -> re.Match[str] | None:
    matches = [m for s, e in _top_level_spans(expr) if (m := pattern.search(expr, s, e))]
    return min(matches, key=lambda m: m.start()) if matches else None


def split_set_operations(expr: str) -> list[str]:
    """The operands of the top-level `and` / `or` / `unless` operators (the expression itself if none)."""
    parts: list[str] = []
    rest = expr
    while (match := _first_top_level(_SET_OPERATOR, rest)) is not None:
        parts.append(rest[: match.start()].strip())
        rest = rest[match.end() :]
        rest = re.sub(r"^\s*(on|ignoring)\s*\([^)]*\)", "", rest)  # vector matching belongs to the operator
    parts.append(rest.strip())
    return parts


def comparison_lhs(expr: str) -> str:
    """The left side of the top-level comparison (`signal > threshold` -> `signal`), or `expr` if none."""
    match = _first_top_level(_COMPARISON, expr)
    return expr if match is None else expr[: match.start()].strip()


def signals(expr: str) -> list[str]:
    """What an alert condition measures: each set-operation operand without its comparison.

    An alert expression here is `signal OP threshold`, or such conditions joined by `and`/`unless`/`or`;
    a healthy system keeps every condition false (no result), but every signal must still have data.
    """
    return [comparison_lhs(part) for part in split_set_operations(expr)]


GRAFANA_INTERVALS = ("__rate_interval", "__interval", "__range")


def instantiate(expr: str, variables: Iterable[str], *, window: str = "30s", match_all: str = ".*") -> str:
    """A dashboard query as Grafana would send it: intervals become `window`, template variables `match_all`."""
    for name in GRAFANA_INTERVALS:
        expr = expr.replace("${" + name + "}", window).replace("$" + name, window)
    for name in sorted(variables, key=len, reverse=True):
        expr = re.sub(
            r"\$\{" + re.escape(name) + r"(:\w+)?\}|\[\[" + re.escape(name) + r"\]\]|\$" + re.escape(name) + r"(?!\w)",
            match_all,
            expr,
        )
    return expr


def dashboard_panels(dashboard: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    panels: list[dict[str, Any]] = []
    for panel in dashboard.get("panels", []):
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def dashboard_variables(dashboard: Mapping[str, Any]) -> list[dict[str, Any]]:
    variables: list[dict[str, Any]] = dashboard.get("templating", {}).get("list", [])
    return variables


def variable_query(variable: Mapping[str, Any]) -> str:
    query = variable.get("query")
    return str(query.get("query", "") if isinstance(query, Mapping) else query or "")


_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?P<selector>.+?)\s*,\s*(?P<label>\w+)\s*\)\s*$", re.S)


def label_values_query(query: str) -> tuple[str, str] | None:
    """`label_values(selector, label)` -> (selector, label); None for any other variable query."""
    match = _LABEL_VALUES.match(query)
    return (match["selector"], match["label"]) if match else None
