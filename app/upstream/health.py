"""A fleet's endpoint health: one circuit breaker per endpoint, instance-wide, fed by stream outcomes.

The fleet (fleet.py) is the only reporter: it picks an endpoint among those whose breaker grants a permit,
takes that endpoint's permit, and tells `EndpointHealth.failed` how an attempt or a stream on it failed:

- connection refused or reset (at opening, before the first token or mid-stream): nothing a request's content
  causes and nothing a healthy server does. The endpoint is ejected at once (its breaker opens for every
  worker), so the very next pick, a retry's or a continuation's, already skips it;
- an HTTP 5xx, an error event or garbled data, a first-token or inter-token stall: counted by its breaker as
  a single upstream's are (policies/breaker.py, with the per-client charging of content-caused failures);
- 429 and other 4xx: not a health failure (429 frees the permit, a 4xx proves the server answers).

An ejected endpoint comes back through its breaker's half-open probe after CIRCUIT_OPEN_SECONDS, or sooner
when the active probe (probe.py) sees its health route pass. The gateway answers "circuit open" only when no
endpoint that accepts new streams would grant a permit (`FleetCircuit`, what admission, /ready and the
`streaming_circuit_breaker_state` gauge read). `EndpointMetrics` reads all of it at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from urllib.parse import urlsplit

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from app.errors import GatewayError, StreamTimeoutError, UpstreamError
from app.observability.metrics import (
    endpoint_active_streams,
    endpoint_circuit_state,
    endpoint_failures,
    upstream_endpoints,
)
from app.policies.breaker import (
    BreakerConfig,
    BreakerState,
    CircuitBreaker,
    Permit,
    advance,
    grantable,
    retry_after,
)
from app.policies.breakers import FAILURE_REASONS, BreakerTable
from app.policies.clock import MONOTONIC, Clock
from app.policies.inflight import MAX_ENDPOINTS, InFlightTable
from app.policies.retry import ErrorKind, error_kind_for_status
from app.upstream.discovery import Discovery, accepting
from app.upstream.failures import CONNECT_DEADLINE, waited_for_pool

EJECTING = frozenset({"connect", "reset", "probe"})  # failures that open an endpoint's breaker at once
OTHER_ENDPOINT = "other"  # the label of endpoints beyond UPSTREAM_ENDPOINT_LABELS_MAX


def failure_reason(error: GatewayError) -> str | None:
    """What an endpoint's failure counts as (a FAILURE_REASONS entry); None: not a health failure."""
    if waited_for_pool(error):
        return None  # this worker's own pool was full: the endpoint was never reached
    if isinstance(error, StreamTimeoutError):
        return "connect" if error.deadline == CONNECT_DEADLINE else "timeout"
    if not isinstance(error, UpstreamError):
        return None
    if error.kind == "connect":
        return "connect"
    if error.kind == "broken":
        return "reset"
    if error.kind in ("malformed", "error_event"):
        return "malformed"
    if error.kind == "status" and error.upstream_status is not None:
        return "status" if error_kind_for_status(error.upstream_status) in (ErrorKind.SERVER, ErrorKind.OTHER) else None
    return None


class EndpointHealth:
    """Per-endpoint breakers over an instance-wide `BreakerTable`, and the verdicts the fleet reports."""

    def __init__(self, table: BreakerTable, config: BreakerConfig, *, clock: Clock = MONOTONIC) -> None:
        self.table = table
        self.config = config
        self._clock = clock
        self._breakers: dict[str, CircuitBreaker] = {}

    def breaker(self, url: str) -> CircuitBreaker:
        found = self._breakers.get(url)
        if found is None:
            if len(self._breakers) >= MAX_ENDPOINTS:  # endpoints came and went: forget the departed ones
                self._breakers.clear()
            found = self._breakers[url] = CircuitBreaker(url, self.config, cell=self.table.cell(url), clock=self._clock)
        return found

    def available(self, urls: Sequence[str]) -> list[str]:
        """The endpoints whose breaker would grant a permit now (one read of the table)."""
        cfg, now = self.config, self._clock()
        return [url for url, s in zip(urls, self.table.load(urls), strict=True) if grantable(advance(cfg, s, now))]

    def states(self, urls: Sequence[str]) -> list[BreakerState]:
        cfg, now = self.config, self._clock()
        return [advance(cfg, s, now).state for s in self.table.load(urls)]

    def retry_after(self, urls: Sequence[str]) -> float:
        """Seconds until one of `urls` would grant a permit (0: one would now)."""
        cfg, now = self.config, self._clock()
        return min((retry_after(cfg, s, now) for s in self.table.load(urls)), default=0.0)

    def permit(self, url: str) -> Permit | None:
        return self.breaker(url).allow()

    def failed(self, url: str, error: GatewayError, permit: Permit | None, client: str | None = None) -> None:
        """An attempt or stream on `url` failed with `error`. `permit`: the attempt's, if not settled yet (None
        mid-stream); `client`: whom a content-caused failure is charged to (upstream/guard.py `charged_client`)."""
        reason = failure_reason(error)
        if reason is None:
            if permit is not None:
                status = error.upstream_status if isinstance(error, UpstreamError) else None
                if status is not None and error_kind_for_status(status) is ErrorKind.CLIENT:
                    permit.record_success()  # it answered sensibly (a 4xx): the request was at fault
                else:
                    permit.release()  # 429 (alive, and said "slow down"), or nothing the endpoint did
            return
        self.record(url, reason, permit, client)

    def record(self, url: str, reason: str, permit: Permit | None, client: str | None = None) -> None:
        """Count a failure of `url` for `reason`: an ejecting one opens its breaker at once."""
        self.table.count_failure(url, reason)
        breaker = self.breaker(url)
        if reason in EJECTING:
            breaker.eject()
            if permit is not None:
                permit.release()  # already stale: the ejection started a new epoch
        elif permit is not None:
            permit.record_failure(client)
        else:
            breaker.record_failure(client=client)

    def now(self) -> float:
        """The breakers' clock (a probe's sending time is read from it)."""
        return self._clock()

    def probe_passed(self, url: str, sent_at: float) -> None:
        """`url`'s health probe, sent at `sent_at` (`now()`), passed."""
        self.breaker(url).probe_passed(sent_at)


class FleetCircuit:
    """The gateway's circuit over a fleet: open only when every endpoint that accepts new streams is open."""

    def __init__(self, name: str, discovery: Discovery, health: EndpointHealth) -> None:
        self.name = name
        self._discovery = discovery
        self._health = health

    def _accepting(self) -> list[str]:
        return list(accepting(self._discovery.endpoints()))

    @property
    def state(self) -> BreakerState:
        """Closed while one endpoint is (or none accepts: that is discovery's answer, not the circuit's)."""
        states = set(self._health.states(self._accepting()))
        if not states or BreakerState.CLOSED in states:
            return BreakerState.CLOSED
        return BreakerState.HALF_OPEN if BreakerState.HALF_OPEN in states else BreakerState.OPEN

    def retry_after_seconds(self) -> float:
        return self._health.retry_after(self._accepting())


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
