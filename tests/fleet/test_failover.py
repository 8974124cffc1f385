"""Failover before the first token, as the guard and the fleet do it together: a retry goes to an endpoint the
request has not tried yet without a backoff; once every endpoint stays open for longer than the backoff could last,
the request is refused at once (a wait would only delay the 503); an endpoint half-open with another request's probe
out is worth the wait. Scripted endpoints on a fake clock; the retry policy's sleeps are recorded, not slept."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from app.errors import CircuitOpenError
from app.policies.breaker import BreakerState, Permit
from app.policies.retry import RetryPolicy
from app.upstream.guard import GuardedUpstream
from app.upstream.health import EndpointHealth
from tests.fleet.test_cut_accounting import CONFIG, RESET, A, B, Endpoint, _request, _stack, run
from tests.policies.policy_fakes import FakeClock
from tests.upstream.test_continuing import Script


def _guard(
    endpoints: dict[str, Endpoint], during_backoff: Callable[[], object] = lambda: None
) -> tuple[GuardedUpstream, EndpointHealth, FakeClock, list[float]]:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        during_backoff()

    # backoffs of up to 5-10 s, far shorter than the breaker's 30 s open period: any wait at all shows in `slept`
    guard, health, clock = _stack(endpoints, policy=RetryPolicy(3, 5.0, 10.0, sleep=sleep))
    return guard, health, clock, slept


@run
async def test_a_retry_goes_to_an_untried_endpoint_without_a_backoff() -> None:
    a, b = Endpoint(A, [Script([], error=RESET)]), Endpoint(B, [Script([["one"]])])
    guard, health, _, slept = _guard({A: a, B: b})
    request = _request()
    stream = await guard.open(request, max_batch=8)
    assert await stream.__anext__() == ["one"]
    await stream.aclose()
    assert request.tried_endpoints == [A, B]
    assert slept == []
    assert health.states([A, B]) == [BreakerState.OPEN, BreakerState.CLOSED]  # the reset ejected A


@run
async def test_once_every_endpoint_stays_open_the_request_is_refused_without_a_backoff() -> None:
    a, b = Endpoint(A, [Script([], error=RESET)]), Endpoint(B, [Script([], error=RESET)])
    guard, health, _, slept = _guard({A: a, B: b})
    request = _request()
    stream = await guard.open(request, max_batch=8)  # A resets, then B: both ejected, retries left
    with pytest.raises(CircuitOpenError) as refused:
        await stream.__anext__()
    assert request.tried_endpoints == [A, B]
    assert health.states([A, B]) == [BreakerState.OPEN, BreakerState.OPEN]
    assert slept == []  # the refusal came at once, not after a backoff
    assert refused.value.headers["Retry-After"] == str(int(CONFIG.open_seconds))  # when the first comes back


@run
async def test_an_endpoint_half_open_with_another_requests_probe_out_is_worth_the_backoff() -> None:
    a, b = Endpoint(A, [Script([], error=RESET)]), Endpoint(B, [Script([["one"]])])
    probes: list[Permit] = []
    guard, health, clock, slept = _guard({A: a, B: b}, during_backoff=lambda: probes[0].record_success())
    health.record(B, "reset", None)
    clock.advance(CONFIG.open_seconds)
    probe = health.permit(B)  # another request's probe: B half-open, its one probe out
    assert probe is not None and probe.probe
    probes.append(probe)
    request = _request()
    stream = await guard.open(request, max_batch=8)  # A resets; B has no permit to give until its probe answers
    assert await stream.__anext__() == ["one"]  # the probe passed during the backoff: the retry went to B
    await stream.aclose()
    assert len(slept) == 1
    assert request.tried_endpoints == [A, B]
