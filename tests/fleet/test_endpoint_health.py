"""A fleet's endpoint health without servers: the keyed breaker table (one process and shared across processes),
the verdicts the fleet reports, the gateway-level circuit over the endpoints, and the per-endpoint series, on a
fake clock."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from app.errors import StreamTimeoutError, UpstreamError
from app.policies.breaker import BreakerConfig, BreakerState, CircuitBreaker
from app.policies.breakers import FAILURE_REASONS, BreakerTable, MemoryBreakerTable, SharedBreakerTable
from app.policies.inflight import MAX_ENDPOINTS, MemoryInFlightTable
from app.upstream.discovery import Endpoint, StaticDiscovery
from app.upstream.endpoint_metrics import EndpointMetrics, endpoint_label
from app.upstream.health import EndpointHealth, FleetCircuit, failure_reason
from tests.policies.policy_fakes import FakeClock

A, B, C = "http://10.0.0.1:8000/v1", "http://10.0.0.2:8000/v1", "http://10.0.0.3:8000/v1"
CONFIG = BreakerConfig(failure_threshold=3, window_seconds=60, open_seconds=30, success_threshold=1)
REFUSED = UpstreamError("unreachable", kind="connect")
RESET = UpstreamError("broken", kind="broken")
HTTP_500 = UpstreamError("failed", upstream_status=500)


@pytest.fixture(params=["memory", "shared"])
def table(request: pytest.FixtureRequest) -> Iterator[tuple[BreakerTable, FakeClock]]:
    clock = FakeClock()
    if request.param == "memory":
        yield MemoryBreakerTable(clock=clock), clock
        return
    shared = SharedBreakerTable(CONFIG.failure_threshold, 8, clock=clock)
    yield shared, clock
    shared.close()


def test_each_key_has_its_own_breaker(table: tuple[BreakerTable, FakeClock]) -> None:
    cells, clock = table
    a = CircuitBreaker(A, CONFIG, cell=cells.cell(A), clock=clock)
    b = CircuitBreaker(B, CONFIG, cell=cells.cell(B), clock=clock)
    for _ in range(3):
        a.record_failure()
    b.record_failure()
    b.record_failure(client="tenant-1")
    assert a.state is BreakerState.OPEN and b.state is BreakerState.CLOSED
    assert len(b.snapshot().failures) == 2 and len(b.snapshot().charged) == 1  # a cell holds the whole snapshot
    assert [s.state for s in cells.load([A, B, C])] == [BreakerState.OPEN, BreakerState.CLOSED, BreakerState.CLOSED]
    clock.advance(30)
    assert a.snapshot().state is BreakerState.HALF_OPEN
    cells.count_failure(A, "reset")
    cells.count_failure(A, "reset")
    cells.count_failure(B, "probe")
    by_reason = [dict(zip(FAILURE_REASONS, counts, strict=True)) for counts in cells.failures([A, B, C])]
    assert by_reason[0]["reset"] == 2 and sum(by_reason[0].values()) == 2
    assert by_reason[1]["probe"] == 1 and sum(by_reason[2].values()) == 0


def test_the_table_is_bounded_and_forgets_the_least_recently_touched(table: tuple[BreakerTable, FakeClock]) -> None:
    cells, clock = table
    keys = [f"http://10.1.{i // 256}.{i % 256}:8000/v1" for i in range(MAX_ENDPOINTS + 1)]
    for key in keys[:MAX_ENDPOINTS]:
        clock.advance(1)
        CircuitBreaker(key, CONFIG, cell=cells.cell(key), clock=clock).eject()
    CircuitBreaker(keys[0], CONFIG, cell=cells.cell(keys[0]), clock=clock).eject()  # touched again: the newest
    clock.advance(1)
    CircuitBreaker(keys[-1], CONFIG, cell=cells.cell(keys[-1]), clock=clock).eject()  # evicts keys[1]
    states = [s.state for s in cells.load(keys)]
    assert states[1] is BreakerState.CLOSED  # forgotten: a fresh breaker
    assert states.count(BreakerState.OPEN) == MAX_ENDPOINTS


def test_an_ejection_is_seen_by_every_process() -> None:
    """A worker that sees an endpoint die ejects it for the instance: the master's table shows it open."""
    shared = SharedBreakerTable(3, 8)
    health = EndpointHealth(shared, CONFIG)
    pid = os.fork()
    if pid == 0:
        EndpointHealth(SharedBreakerTable.attach(shared.fd), CONFIG).failed(A, RESET, None)
        os._exit(0)
    os.waitpid(pid, 0)
    assert health.states([A, B]) == [BreakerState.OPEN, BreakerState.CLOSED]
    assert health.available([A, B]) == [B]
    assert shared.failures([A])[0][FAILURE_REASONS.index("reset")] == 1
    shared.close()


def test_refused_and_reset_eject_at_once_other_failures_count() -> None:
    clock = FakeClock()
    health = EndpointHealth(MemoryBreakerTable(clock=clock), CONFIG, clock=clock)
    permit = health.permit(A)
    assert permit is not None
    health.failed(A, REFUSED, permit)
    assert health.states([A]) == [BreakerState.OPEN]
    assert health.permit(A) is None
    for _ in range(2):  # below the threshold: still closed
        health.failed(B, HTTP_500, health.permit(B))
    health.record(B, "timeout", None)  # a stall: the third failure opens it
    assert health.states([B]) == [BreakerState.OPEN]
    # content-caused failures are charged per client: one client cannot open it (max 2 per client)
    for _ in range(5):
        health.failed(C, HTTP_500, health.permit(C), "tenant-1")
    assert health.states([C]) == [BreakerState.CLOSED]
    # 429 and 4xx are not health failures
    health.failed(C, UpstreamError("slow down", upstream_status=429), health.permit(C))
    health.failed(C, UpstreamError("bad request", upstream_status=400), health.permit(C))
    assert health.table.failures([C])[0][FAILURE_REASONS.index("status")] == 5


def test_a_passing_probe_lets_an_ejected_endpoint_back_half_open() -> None:
    clock = FakeClock()
    health = EndpointHealth(MemoryBreakerTable(clock=clock), CONFIG, clock=clock)
    sent_before = clock()
    clock.advance(1)
    health.record(A, "probe", None)
    assert health.states([A]) == [BreakerState.OPEN]
    health.probe_passed(A, sent_before)  # sent before the ejection: older news, it stays open
    assert health.states([A]) == [BreakerState.OPEN]
    health.probe_passed(A, clock())
    assert health.states([A]) == [BreakerState.HALF_OPEN]
    probe = health.permit(A)
    assert probe is not None and probe.probe
    assert health.available([A]) == []  # one probe at a time
    probe.record_success()
    assert health.states([A]) == [BreakerState.CLOSED]
    health.probe_passed(A, clock())  # a healthy endpoint's passing probe changes nothing
    assert health.states([A]) == [BreakerState.CLOSED]


def state_of(circuit: FleetCircuit) -> BreakerState:
    return circuit.state


def test_the_gateway_circuit_opens_only_when_every_accepting_endpoint_is_open() -> None:
    clock = FakeClock()
    health = EndpointHealth(MemoryBreakerTable(clock=clock), CONFIG, clock=clock)
    discovery = StaticDiscovery([A, B])
    circuit = FleetCircuit("fleet", discovery, health)
    health.failed(A, REFUSED, None)
    assert state_of(circuit) is BreakerState.CLOSED and circuit.retry_after_seconds() == 0
    clock.advance(10)
    health.failed(B, RESET, None)
    assert state_of(circuit) is BreakerState.OPEN
    assert circuit.retry_after_seconds() == 20  # A half-opens first
    clock.advance(20)
    assert state_of(circuit) is BreakerState.HALF_OPEN and circuit.retry_after_seconds() == 0


def test_endpoints_not_accepting_new_streams_are_not_the_circuits_concern() -> None:
    clock = FakeClock()
    health = EndpointHealth(MemoryBreakerTable(clock=clock), CONFIG, clock=clock)

    class Terminating(StaticDiscovery):
        def endpoints(self) -> list[Endpoint]:
            return [Endpoint(A), Endpoint(B, terminating=True)]

    circuit = FleetCircuit("fleet", Terminating([]), health)
    health.failed(A, REFUSED, None)
    assert state_of(circuit) is BreakerState.OPEN  # B is on its way out: it does not keep the gateway open


def test_failure_reasons() -> None:
    assert failure_reason(REFUSED) == "connect"
    assert failure_reason(StreamTimeoutError("upstream connect", 10)) == "connect"
    assert failure_reason(StreamTimeoutError("first token", 10)) == "timeout"
    assert failure_reason(RESET) == "reset"
    assert failure_reason(HTTP_500) == "status"
    assert failure_reason(UpstreamError("garbled", kind="malformed")) == "malformed"
    assert failure_reason(UpstreamError("said error", kind="error_event")) == "error_event"
    assert failure_reason(UpstreamError("slow down", upstream_status=429)) is None
    assert failure_reason(UpstreamError("bad request", upstream_status=404)) is None


def test_endpoint_labels() -> None:
    assert endpoint_label("http://10.0.0.1:8000/v1") == "10.0.0.1:8000"
    assert endpoint_label("https://llm.example/v1") == "llm.example:443"
    assert endpoint_label("http://[fd00::7]/v1") == "[fd00::7]:80"


def test_per_endpoint_series_are_capped_and_summed_as_other() -> None:
    clock = FakeClock()
    health = EndpointHealth(MemoryBreakerTable(clock=clock), CONFIG, clock=clock)
    inflight = MemoryInFlightTable()

    class Fleet(StaticDiscovery):
        def endpoints(self) -> list[Endpoint]:
            return [Endpoint(C), Endpoint(A), Endpoint(B), Endpoint("http://10.0.0.4:8000/v1", ready=False)]

    for url in (A, B, B, C, C, C):
        inflight.acquire_least([url])
    health.failed(B, RESET, None)
    health.failed(C, HTTP_500, None)
    registry = CollectorRegistry()
    registry.register(EndpointMetrics(Fleet([]), health, inflight, labels_max=2))
    text = generate_latest(registry).decode()
    assert 'streaming_upstream_endpoint_active_streams{upstream_endpoint="10.0.0.1:8000"} 1.0' in text
    assert 'streaming_upstream_endpoint_active_streams{upstream_endpoint="10.0.0.2:8000"} 2.0' in text
    assert 'streaming_upstream_endpoint_active_streams{upstream_endpoint="other"} 3.0' in text  # C and the 4th
    assert "10.0.0.3:8000" not in text
    assert 'streaming_upstream_endpoint_circuit_state{upstream_endpoint="10.0.0.2:8000"} 1.0' in text
    assert 'streaming_upstream_endpoint_circuit_state{upstream_endpoint="other"} 0.0' in text
    assert 'streaming_upstream_endpoint_failures_total{reason="reset",upstream_endpoint="10.0.0.2:8000"} 1.0' in text
    assert 'streaming_upstream_endpoint_failures_total{reason="status",upstream_endpoint="other"} 1.0' in text
    assert 'streaming_upstream_endpoints{state="healthy"} 2.0' in text
    assert 'streaming_upstream_endpoints{state="unhealthy"} 1.0' in text
    assert 'streaming_upstream_endpoints{state="not_ready"} 1.0' in text
