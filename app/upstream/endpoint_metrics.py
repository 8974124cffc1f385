"""A fleet's per-endpoint Prometheus series, read from the instance-wide tables when scraped (so every worker's
streams count once, and an endpoint that left has no series any more): streams in flight, circuit state,
failures by reason (health.py), and how many endpoints are healthy, unhealthy or not ready.
"""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlsplit

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from app.observability.metrics import (
    endpoint_active_streams,
    endpoint_circuit_state,
    endpoint_failures,
    upstream_endpoints,
)
from app.policies.breaker import BreakerState
from app.policies.breakers import FAILURE_REASONS
from app.policies.inflight import InFlightTable
from app.upstream.discovery import Discovery
from app.upstream.health import EndpointHealth

OTHER_ENDPOINT = "other"  # the label of endpoints beyond UPSTREAM_ENDPOINT_LABELS_MAX


def endpoint_label(url: str) -> str:
    """`host:port` of a base URL (the port its scheme implies when it names none)."""
    parts = urlsplit(url)
    host = f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else parts.hostname
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{host}:{port}"


class EndpointMetrics(Collector):
    """The fleet's per-endpoint series, read from the instance-wide tables when scraped (so every worker's
    streams count once, and an endpoint that left has no series any more). At most `labels_max` endpoints are
    named (the first by label); the rest are summed as `other` (their circuit state: the worst of them)."""

    def __init__(self, discovery: Discovery, health: EndpointHealth, inflight: InFlightTable, labels_max: int) -> None:
        self._discovery = discovery
        self._health = health
        self._inflight = inflight
        self._labels_max = labels_max

    def collect(self) -> Iterator[Metric]:
        endpoints = sorted(self._discovery.endpoints(), key=lambda endpoint: endpoint_label(endpoint.url))
        urls = [endpoint.url for endpoint in endpoints]
        named = {endpoint_label(url) for url in urls[: self._labels_max]}
        labels = [label if (label := endpoint_label(url)) in named else OTHER_ENDPOINT for url in urls]
        states = self._health.states(urls)
        active, circuit, failures, counted = (
            endpoint_active_streams(),
            endpoint_circuit_state(),
            endpoint_failures(),
            upstream_endpoints(),
        )
        streams: dict[str, float] = {}
        worst: dict[str, BreakerState] = {}
        failed: dict[tuple[str, str], float] = {}
        by_state = {"healthy": 0, "unhealthy": 0, "not_ready": 0}
        in_flight = self._inflight.counts(urls)
        for endpoint, label, state, count, reasons in zip(
            endpoints, labels, states, in_flight, self._health.table.failures(urls), strict=True
        ):
            streams[label] = streams.get(label, 0) + count
            seen = worst.get(label, BreakerState.CLOSED)
            worst[label] = state if (state, seen) in _WORSE else seen
            for reason, n in zip(FAILURE_REASONS, reasons, strict=True):
                failed[label, reason] = failed.get((label, reason), 0) + n
            if not endpoint.accepts_new:
                by_state["not_ready"] += 1
            else:
                by_state["unhealthy" if state is BreakerState.OPEN else "healthy"] += 1
        for label, total in streams.items():
            active.add_metric([label], total)
            circuit.add_metric([label], int(worst[label]))
        for (label, reason), times in failed.items():
            failures.add_metric([label, reason], times)
        for state_name, endpoints_in_state in by_state.items():
            counted.add_metric([state_name], endpoints_in_state)
        yield from (active, circuit, failures, counted)


# (state, than): `state` is worse than `than` (open is the worst; half-open is worse than closed)
_WORSE = frozenset(
    {
        (BreakerState.OPEN, BreakerState.CLOSED),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
        (BreakerState.HALF_OPEN, BreakerState.CLOSED),
    }
)
