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
`streaming_circuit_breaker_state` gauge read). endpoint_metrics.py reads all of it at scrape time.
"""

from __future__ import annotations

from collections.abc import Sequence

from app.errors import GatewayError, StreamTimeoutError, UpstreamError
from app.policies.breaker import (
    BreakerConfig,
    BreakerState,
    CircuitBreaker,
    Permit,
    advance,
    grantable,
    retry_after,
)
from app.policies.breakers import BreakerTable
from app.policies.clock import MONOTONIC, Clock
from app.policies.inflight import MAX_ENDPOINTS
from app.policies.retry import ErrorKind, error_kind_for_status
from app.upstream.discovery import Discovery, accepting
from app.upstream.failures import CONNECT_DEADLINE, waited_for_pool

EJECTING = frozenset({"connect", "reset", "probe"})  # failures that open an endpoint's breaker at once


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
        return error.kind  # garbled data; an error the model server sent in its stream
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
