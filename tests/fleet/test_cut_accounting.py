"""A deadline cut is charged once, to the endpoint whose attempt or stream was in progress: the guard, the continuing
layer and the fleet in one process, over scripted endpoints (one that resets, one that hangs while opening), on a
fake clock. The relay's part is played by hand: cancel the task that waits, then `mark_failed` (what
streaming/run.py does when a first-token or inter-token deadline cuts a stream)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, cast

import pytest

from app.errors import UpstreamError
from app.policies.breaker import BreakerConfig, BreakerState
from app.policies.breakers import FAILURE_REASONS, MemoryBreakerTable
from app.policies.inflight import MemoryInFlightTable
from app.policies.retry import RetryPolicy
from app.upstream.base import ChatRequest, Upstream
from app.upstream.client import OpenAIUpstream
from app.upstream.continuing import ContinuingUpstream
from app.upstream.discovery import StaticDiscovery
from app.upstream.fleet import FleetUpstream
from app.upstream.guard import GuardedStream, GuardedUpstream
from app.upstream.health import EndpointHealth
from tests.policies.policy_fakes import FakeClock
from tests.upstream.test_continuing import Script, ScriptedStream

A, B = "http://10.0.0.1:8000/v1", "http://10.0.0.2:8000/v1"
CONFIG = BreakerConfig(failure_threshold=3, window_seconds=60, open_seconds=30, success_threshold=1)
RESET = UpstreamError("broken", kind="broken")
HANG = "hang"  # the endpoint accepts the connection and never answers


class Endpoint:
    """One scripted model server: each `open` takes the next script (HANG waits until cancelled)."""

    def __init__(self, url: str, scripts: list[Script | str]) -> None:
        self.name = url
        self.scripts = scripts
        self.opening = asyncio.Event()  # set when an open hangs: the test's moment to cut

    async def open(
        self, request: ChatRequest, *, max_batch: int, headers: Mapping[str, str] | None = None
    ) -> ScriptedStream:
        script = self.scripts.pop(0)
        if isinstance(script, str):
            self.opening.set()
            await asyncio.Event().wait()  # bounded by the test's cancellation
        assert isinstance(script, Script)
        return ScriptedStream(script)


class Pool:
    """What the fleet takes for its shared client: `at(url)` is that endpoint's client."""

    name = "fleet"

    def __init__(self, endpoints: dict[str, Endpoint]) -> None:
        self.endpoints = endpoints

    def at(self, url: str, server_name: str | None) -> Endpoint:
        return self.endpoints[url]

    async def aclose(self) -> None:
        return None


def _stack(
    endpoints: dict[str, Endpoint], *, continuing: bool = False, policy: RetryPolicy | None = None
) -> tuple[GuardedUpstream, EndpointHealth, FakeClock]:
    clock = FakeClock()
    health = EndpointHealth(MemoryBreakerTable(clock=clock), CONFIG, clock=clock)
    fleet = FleetUpstream(
        cast(OpenAIUpstream, Pool(endpoints)),
        StaticDiscovery(list(endpoints)),
        MemoryInFlightTable(),
        health,
        affinity_load_factor=1.25,
    )
    fleet.table.acquire_least([B])  # B busier: the first pick is A (the one in a test that answers first)
    inner: Upstream = ContinuingUpstream(fleet, max_attempts=2) if continuing else fleet
    policy = policy or RetryPolicy(2, 0.001, 0.001)
    return GuardedUpstream(inner, None, policy, failover=fleet), health, clock


def _failures(health: EndpointHealth, url: str) -> dict[str, int]:
    return {reason: n for reason, n in zip(FAILURE_REASONS, health.table.failures([url])[0], strict=True) if n}


async def _cut(waiting: Awaitable[Any], hanging: Endpoint) -> None:
    """A deadline cuts `waiting` while `hanging`'s open hangs (the relay cancels the task it watches)."""
    task = asyncio.ensure_future(waiting)
    await asyncio.wait_for(hanging.opening.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """A test that runs `scenario` on its own event loop."""

    @functools.wraps(scenario)
    def test() -> None:
        asyncio.run(scenario())

    return test


def _request() -> ChatRequest:
    return ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=10)


@run
async def test_a_half_open_endpoint_that_hangs_while_opening_reopens() -> None:
    a = Endpoint(A, [HANG])
    guard, health, clock = _stack({A: a})
    health.record(A, "reset", None)  # ejected
    clock.advance(CONFIG.open_seconds)
    assert health.states([A]) == [BreakerState.HALF_OPEN]
    request = _request()
    await _cut(guard.open(request, max_batch=8, cut_for_upstream_fault=lambda: True), a)
    assert health.states([A]) == [BreakerState.OPEN]  # its probe failed: no more clients sent to it for a while
    assert _failures(health, A) == {"reset": 1, "timeout": 1}


@run
async def test_a_client_leaving_while_opening_is_no_verdict() -> None:
    a = Endpoint(A, [HANG])
    guard, health, clock = _stack({A: a})
    health.record(A, "reset", None)
    clock.advance(CONFIG.open_seconds)
    await _cut(guard.open(_request(), max_batch=8, cut_for_upstream_fault=lambda: False), a)
    assert health.states([A]) == [BreakerState.HALF_OPEN]
    assert health.available([A]) == [A]  # the probe slot is free again
    assert _failures(health, A) == {"reset": 1}


@run
async def test_a_retry_cut_while_opening_is_charged_to_its_endpoint_only() -> None:
    """A resets before its first token; the retry goes to B, which hangs; the first-token deadline cuts it."""
    a, b = Endpoint(A, [Script([], error=RESET)]), Endpoint(B, [HANG])
    guard, health, _ = _stack({A: a, B: b})
    request = _request()
    stream = await guard.open(request, max_batch=8, cut_for_upstream_fault=lambda: True)
    assert isinstance(stream, GuardedStream)
    await _cut(stream.__anext__(), b)
    stream.mark_failed()  # the relay blames the upstream for the deadline
    await stream.aclose()
    assert _failures(health, A) == {"reset": 1}  # once, for the reset: not a second time for B's stall
    assert _failures(health, B) == {"timeout": 1}
    assert request.tried_endpoints == [A, B]


@run
async def test_a_continuation_cut_while_opening_is_charged_to_its_endpoint_only() -> None:
    """A dies mid-stream; the continuation's open on B hangs until the inter-token deadline cuts it."""
    a, b = Endpoint(A, [Script([["one", "two"]], error=RESET)]), Endpoint(B, [HANG])
    guard, health, clock = _stack({A: a, B: b}, continuing=True)
    health.record(B, "reset", None)  # B half-open: its probe is the continuation
    clock.advance(CONFIG.open_seconds)
    request = _request()
    stream = await guard.open(request, max_batch=8, cut_for_upstream_fault=lambda: True)
    assert await stream.__anext__() == ["one", "two"]
    await _cut(stream.__anext__(), b)
    stream.mark_failed()
    await stream.aclose()
    assert _failures(health, A) == {"reset": 1}
    assert _failures(health, B) == {"reset": 1, "timeout": 1}
    assert health.states([B]) == [BreakerState.OPEN]  # the probe that hung reopened it
    assert request.tried_endpoints == [A, B]
