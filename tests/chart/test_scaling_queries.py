"""The autoscalers' PromQL, run against a real Prometheus scraping the real gateway with streams in flight:
the KEDA trigger's query as the chart renders it, and the prometheus-adapter rule the HPA relies on
(k8s/prometheus-adapter-values.yaml), expanded the way the adapter expands it for one pod."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import httpx
import yaml

from loadtest.harness.prometheus import ScrapeTarget
from tests.conftest import GatewayFactory, PrometheusFactory

from .conftest import NAMESPACE, RELEASE, ROOT, Helm, find

FULLNAME = f"{RELEASE}-streaming-gateway"
POD = f"{FULLNAME}-6d9c7b8f5d-x2x7q"
STREAMS = 3
WAIT_S = 20.0


def _adapter_query(pod: str) -> str:
    rule = yaml.safe_load((ROOT / "k8s" / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"][0]
    series = rule["seriesQuery"].split("{", 1)[0]
    matchers = f'namespace="{NAMESPACE}",pod=~"{pod}"'  # what the adapter asks for one HPA target pod
    return (
        str(rule["metricsQuery"])
        .replace("<<.GroupBy>>", "pod")
        .replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", matchers)
    )


def _wait_for(query: Callable[[], list[dict[str, Any]]], values: list[float]) -> list[dict[str, Any]]:
    """Query until the samples' values are `values` (the streams show up once scraped); the deadline is a guard."""
    deadline = time.monotonic() + WAIT_S
    while True:
        samples = query()
        if [float(sample["value"][1]) for sample in samples] == values or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)  # polling interval, not an assertion


def test_autoscaling_queries_see_streams_in_flight(
    helm: Helm,
    spawn_gateway: GatewayFactory,
    prometheus_server: PrometheusFactory,
) -> None:
    gateway = spawn_gateway(MOCK_TOKENS_PER_SECOND=5, MOCK_FIRST_TOKEN_MS=5)
    # the target labels a ServiceMonitor scrape attaches
    labels = {"namespace": NAMESPACE, "pod": POD, "service": FULLNAME}
    prometheus = prometheus_server([ScrapeTarget(gateway.metrics_url, labels)])  # it starts while the gateway boots
    gateway.wait_up()
    trigger = find(helm.template(keda__enabled=True), "ScaledObject")["spec"]["triggers"][0]["metadata"]
    with httpx.Client(base_url=gateway.url, timeout=30) as client, ExitStack() as streams:
        for _ in range(STREAMS):  # each stays open ~20 s: 100 tokens at 5 tokens/s
            response = streams.enter_context(client.stream("POST", "/stream", json={"prompt": "x", "max_tokens": 100}))
            assert response.status_code == 200
        keda = _wait_for(lambda: prometheus.query(trigger["query"]), [STREAMS])
        adapter = prometheus.query(_adapter_query(POD))
    assert [float(sample["value"][1]) for sample in keda] == [STREAMS], keda
    assert [(s["metric"], float(s["value"][1])) for s in adapter] == [({"pod": POD}, STREAMS)], adapter
