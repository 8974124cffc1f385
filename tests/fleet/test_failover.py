"""Failover before the first token, as the guard and the fleet do it together: a retry goes to an endpoint the
request has not tried yet without a backoff, and once every endpoint is out the request is refused at once (no
backoff either: it would only delay the 503). Scripted endpoints on a fake clock; the retry policy's sleeps are
recorded instead of slept."""

from __future__ import annotations

from typing import cast

import pytest

from app.errors import CircuitOpenError
from app.policies.breaker import BreakerState
from app.policies.breakers import MemoryBreakerTable
from app.policies.inflight import MemoryInFlightTable
from app.policies.retry import RetryPolicy
from app.upstream.client import OpenAIUpstream
from app.upstream.discovery import StaticDiscovery
from app.upstream.fleet import FleetUpstream
from app.upstream.guard import GuardedUpstream
from app.upstream.health import EndpointHealth
from tests.fleet.test_cut_accounting import CONFIG, RESET, Endpoint, Pool, _request, run
from tests.policies.policy_fakes import FakeClock
from tests.upstream.test_continuing import Script

A, B = "http://10.0.0.1:8000/v1", "http://10.0.0.2:8000/v1"


def _guard(endpoints: dict[str, Endpoint]) -> tuple[GuardedUpstream, EndpointHealth, list[float]]:
    clock = FakeClock()
    health = EndpointHealth(MemoryBreakerTable(clock=clock), CONFIG, clock=clock)
    fleet = FleetUpstream(
        cast(OpenAIUpstream, Pool(endpoints)),
        StaticDiscovery(list(endpoints)),
        MemoryInFlightTable(),
        health,
        affinity_load_factor=1.25,
    )
    fleet.table.acquire_least([B])  # B busier: the first pick is A
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    # backoffs of 5-10 s: any wait at all shows in `slept`
    return GuardedUpstream(fleet, None, RetryPolicy(3, 5.0, 10.0, sleep=sleep), failover=fleet), health, slept


@run
async def test_a_retry_goes_to_an_untried_endpoint_without_a_backoff() -> None:
    a, b = Endpoint(A, [Script([], error=RESET)]), Endpoint(B, [Script([["one"]])])
    guard, health, slept = _guard({A: a, B: b})
    request = _request()
    stream = await guard.open(request, max_batch=8)
    assert await stream.__anext__() == ["one"]
    await stream.aclose()
    assert request.tried_endpoints == [A, B]
    assert slept == []
    assert health.states([A, B]) == [BreakerState.OPEN, BreakerState.CLOSED]  # the reset ejected A


@run
async def test_once_every_endpoint_is_out_the_request_is_refused_without_a_backoff() -> None:
    a, b = Endpoint(A, [Script([], error=RESET)]), Endpoint(B, [Script([], error=RESET)])
    guard, health, slept = _guard({A: a, B: b})
    request = _request()
    stream = await guard.open(request, max_batch=8)  # A resets, then B: both ejected, retries left
    with pytest.raises(CircuitOpenError) as refused:
        await stream.__anext__()
    assert request.tried_endpoints == [A, B]
    assert health.states([A, B]) == [BreakerState.OPEN, BreakerState.OPEN]
    assert slept == []  # the refusal came at once, not after a backoff
    assert refused.value.headers["Retry-After"] == str(int(CONFIG.open_seconds))  # when the first comes back
