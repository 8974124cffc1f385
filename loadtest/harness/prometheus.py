"""Debian's Prometheus on loopback, with a config written for the run, and a small client for its HTTP API.

`start_prometheus(targets, rule_files, workdir)` runs one scrape job over the given targets (each with its own
labels, e.g. the `pod` and `namespace` a Kubernetes scrape would add), scraping and evaluating rules every
`interval`, storage in `workdir`; `/-/reload` is enabled.
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loadtest.harness.errors import HarnessError
from loadtest.harness.ports import free_port
from loadtest.harness.process import Child, require_binary, tail

PROMETHEUS_BIN = "prometheus"
PROMTOOL_BIN = "promtool"
START_TIMEOUT_S = 30.0  # guard only: how long Prometheus may take to become ready
STOP_TIMEOUT_S = 15.0
BIND_ATTEMPTS = 3  # the port is free when picked; another process may take it before Prometheus binds
JOB = "streaming-gateway"


class PromQLError(AssertionError):
    """Prometheus refused or failed a query (bad syntax, bad types, ...)."""


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
    proc: Child
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

    def ready(self) -> bool:
        try:
            return self.client.get("/-/ready").status_code == 200
        except httpx.TransportError:
            return False

    def reload(self) -> None:
        """Re-read the config and rule files (POST /-/reload, enabled by --web.enable-lifecycle)."""
        self.client.post("/-/reload").raise_for_status()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.client.close()
        self.proc.stop(signal.SIGTERM, STOP_TIMEOUT_S)


def prometheus_config(
    targets: Sequence[ScrapeTarget], rule_files: Iterable[Path], *, interval: str = "1s", job: str = JOB
) -> dict[str, Any]:
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


def start_prometheus(
    targets: Sequence[ScrapeTarget | str],
    rule_files: Iterable[Path | str],
    workdir: Path,
    *,
    interval: str = "1s",
    spawn: Callable[..., Child] = Child,
) -> Prometheus:
    """Start Prometheus on a free loopback port and wait until it is ready (rules loaded, scraping)."""
    binary = require_binary(PROMETHEUS_BIN)
    scrape = [t if isinstance(t, ScrapeTarget) else ScrapeTarget(t) for t in targets]
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "prometheus.yml"
    config_path.write_text(
        json.dumps(prometheus_config(scrape, [Path(p) for p in rule_files], interval=interval), indent=2)
    )
    log_path = workdir / "prometheus.log"
    for _attempt in range(BIND_ATTEMPTS):
        port = free_port()
        proc = spawn(
            "prometheus",
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--web.enable-lifecycle",
                "--log.level=warn",
            ],
            log_path=log_path,
            append_log=False,
        )
        server = Prometheus(url=f"http://127.0.0.1:{port}", proc=proc, config_path=config_path, log_path=log_path)
        try:
            proc.wait_ready(server.ready, START_TIMEOUT_S, "prometheus")
            return server
        except HarnessError:
            server.stop()
            if "address already in use" not in tail(log_path).lower():
                break
    raise HarnessError(f"prometheus did not become ready:\n{tail(log_path)}")
