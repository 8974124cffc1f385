"""Fixtures for tests that need a real Prometheus: `prometheus_server(scrape_targets, rule_files)`.

Other test packages reuse it by importing it into their conftest.py:
`from tests.dashboards.conftest import prometheus_server  # noqa: F401`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import pytest

from loadtest.harness.prometheus import Prometheus, ScrapeTarget, start_prometheus


class PrometheusFactory(Protocol):
    def __call__(
        self,
        scrape_targets: Sequence[ScrapeTarget | str] = (),
        rule_files: Iterable[Path | str] = (),
        *,
        interval: str = "1s",
    ) -> Prometheus: ...


@pytest.fixture
def prometheus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusFactory]:
    """Factory: a real Prometheus on loopback scraping `scrape_targets` every `interval` (default 1 s) and
    evaluating `rule_files` as often; its TSDB lives in a temp dir. Every one started stops after the test.

    A target is `ScrapeTarget(address, labels)` (labels as a Kubernetes scrape would add them, e.g. `pod`,
    `namespace`) or a bare "host:port" / URL. The returned `Prometheus` has `query(expr)`, `api(path)`,
    `rules()`, `targets()`, `wait_for_scrapes(n)`, `reload()` and `log()`.
    """
    started: list[Prometheus] = []

    def factory(
        scrape_targets: Sequence[ScrapeTarget | str] = (),
        rule_files: Iterable[Path | str] = (),
        *,
        interval: str = "1s",
    ) -> Prometheus:
        server = start_prometheus(scrape_targets, rule_files, tmp_path_factory.mktemp("prometheus"), interval=interval)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()
