"""A real Prometheus (Debian's `prometheus` binary) for tests, and the PromQL helpers the query tests share.

`start_prometheus(targets, rule_files, workdir)` runs one on a loopback port with a config written for the
test: one scrape job over the given targets (each with its own labels, e.g. the `pod` and `namespace` a
Kubernetes scrape would add), 1 s scrape and rule evaluation, storage in `workdir`. The fixture
`prometheus_server` in conftest.py wraps it and stops every server after the test.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

PROMETHEUS_BIN = "prometheus"
PROMTOOL_BIN = "promtool"
START_TIMEOUT_S = 30.0  # guard only: how long Prometheus may take to become ready
JOB = "streaming-gateway"


class PromQLError(AssertionError):
    """Prometheus refused or failed a query (bad syntax, bad types, ...)."""


def require_binary(name: str) -> str:
    """The path of a binary CI installs (.ci/bootstrap.sh); a missing one fails the test, never skips it."""
    path = shutil.which(name)
    if path is None:
        raise AssertionError(f"`{name}` is not on PATH: install Debian's prometheus package (.ci/bootstrap.sh)")
    return path


@dataclass(frozen=True)
class ScrapeTarget:
    """One instance to scrape: `host:port` (or a URL), and the target labels to attach to its series."""

    address: str
    labels: Mapping[str, str] = field(default_factory=dict)
    metrics_path: str = "/metrics"

    @property
    def host_port(self) -> str:
        return re.sub(r"^https?://", "", self.address).rstrip("/")


@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen[bytes]
    config_path: Path
    log_path: Path
    job: str = JOB
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=self.url, timeout=10)

    def api(self, path: str, **params: Any) -> Any:
        """GET /api/v1/<path>; returns `data`, raises PromQLError when Prometheus answers with an error."""
        response = self.client.get(f"/api/v1/{path}", params=params)
        body = response.json()
        if body.get("status") != "success":
            raise PromQLError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query at now: the result's samples (a scalar or string comes back as one sample)."""
        data = self.api("query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def rules(self) -> list[dict[str, Any]]:
        """Every loaded rule (recording and alerting) with its group name, health and last error."""
        return [{**rule, "group": group["name"]} for group in self.api("rules")["groups"] for rule in group["rules"]]

    def targets(self) -> list[dict[str, Any]]:
        active: list[dict[str, Any]] = self.api("targets")["activeTargets"]
        return active

    def successful_scrapes(self) -> int:
        """Successful scrapes of the least-scraped target so far (0 before the first)."""
        samples = self.query(f'min(sum_over_time(up{{job="{self.job}"}}[1h]))')
        return int(float(samples[0]["value"][1])) if samples else 0

    def wait_for_scrapes(self, count: int, timeout: float = 20.0) -> int:
        """Wait until every target had `count` more successful scrapes than now; returns the new total."""
        goal = self.successful_scrapes() + count
        deadline = time.monotonic() + timeout
        while (done := self.successful_scrapes()) < goal:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {done} of {goal} scrapes after {timeout}s: {self.targets()}")
            time.sleep(0.2)  # polling interval, not an assertion
        return done

    def reload(self) -> None:
        """Re-read the config and rule files (POST /-/reload, enabled by --web.enable-lifecycle)."""
        self.client.post("/-/reload").raise_for_status()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def prometheus_config(targets: Sequence[ScrapeTarget], rule_files: Iterable[Path], *, interval: str = "1s",
                      job: str = JOB) -> dict[str, Any]:
    """The config (JSON is YAML): one job, one static_config per target so each carries its own labels."""
    by_path: dict[str, list[ScrapeTarget]] = {}
    for target in targets:
        by_path.setdefault(target.metrics_path, []).append(target)
    scrape_configs = [
        {
            "job_name": job if len(by_path) == 1 else f"{job}{path.replace('/', '-')}",
            "metrics_path": path,
            # as prometheus-operator scrapes (ServiceMonitor `honorLabels: false`): a target label wins over a
            # scraped label of the same name, which would be kept as `exported_<name>`
            "honor_labels": False,
            "static_configs": [{"targets": [t.host_port], "labels": dict(t.labels)} for t in group],
        }
        for path, group in by_path.items()
    ]
    return {
        "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
        "rule_files": [str(Path(path).resolve()) for path in rule_files],
        "scrape_configs": scrape_configs,
    }


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_prometheus(targets: Sequence[ScrapeTarget | str], rule_files: Iterable[Path | str], workdir: Path, *,
                     interval: str = "1s") -> Prometheus:
    """Start Prometheus on a free loopback port and wait until it is ready (rules loaded, scraping)."""
    binary = require_binary(PROMETHEUS_BIN)
    scrape = [t if isinstance(t, ScrapeTarget) else ScrapeTarget(t) for t in targets]
    config_path = workdir / "prometheus.yml"
    config_path.write_text(json.dumps(prometheus_config(scrape, [Path(p) for p in rule_files], interval=interval),
                                      indent=2))
    log_path = workdir / "prometheus.log"
    for _attempt in range(3):  # the port is free when picked; another process may take it before Prometheus binds
        port = _free_loopback_port()
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [binary, f"--config.file={config_path}", f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT,
            )
        server = Prometheus(url=f"http://127.0.0.1:{port}", proc=proc, config_path=config_path, log_path=log_path)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if server.client.get("/-/ready").status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            time.sleep(0.05)  # polling interval, not an assertion
        server.stop()
        if "address already in use" not in server.log():
            break
    raise AssertionError(f"prometheus did not become ready:\n{log_path.read_text(errors='replace')}")


# --- PromQL helpers -------------------------------------------------------------------------------

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
        rest = rest[match.end():]
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
        expr = re.sub(r"\$\{" + re.escape(name) + r"(:\w+)?\}|\[\[" + re.escape(name) + r"\]\]|\$" + re.escape(name)
                      + r"(?!\w)", match_all, expr)
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
