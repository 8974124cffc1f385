"""ASGI level: the pump runs as a task of its own (run.py `relay_from`), so its end and the run reading it are two
loop turns apart. A cut made in between (a watchdog deadline, the drain) must not replace how the relay ended."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable

from starlette.types import Message

from app.errors import GatewayError, StreamTimeoutError, UpstreamError
from app.policies.breaker import CircuitBreaker
from app.policies.retry import RetryPolicy
from app.streaming.recorder import StreamRecorder
from app.streaming.run import Relay, Relayed
from app.streaming.session import Outcome, StreamRegistry, StreamSession
from app.upstream.guard import GuardedUpstream
from app.upstream.mock import MockUpstream

GUARD_S = 30.0  # guard only


async def _batches_then_cut_in_the_gap(session: StreamSession, end: GatewayError | None) -> AsyncIterator[list[str]]:
    yield ["a "]
    yield ["b "]
    # Scheduled now, this runs after the pump task's last step and before the run's task wakes up on its end.
    asyncio.get_running_loop().call_soon(session.cut_with, StreamTimeoutError("total", 1.0))
    if end is not None:
        raise end


async def _relay(end: GatewayError | None) -> tuple[Relayed, StreamSession]:
    registry = StreamRegistry(
        first_token_s=10, inter_token_s=10, total_s=60, slow_client_s=5, ping_interval_s=15, check_interval_s=5
    )
    upstream = GuardedUpstream(MockUpstream(tokens_per_second=0, first_token_ms=0), CircuitBreaker("m"), RetryPolicy(0))
    relay = Relay(upstream=upstream, registry=registry, observer=StreamRecorder(model_names=("m",)), max_batch=100)
    session = StreamSession(
        stream_id="s", endpoint="/stream", model="m", client="c", now=asyncio.get_running_loop().time()
    )
    written: list[list[str]] = []

    async def receive() -> Message:
        await asyncio.Event().wait()  # the client stays
        raise AssertionError("unreachable")

    async def sent() -> None:
        return None

    def write(batch: list[str]) -> Awaitable[None]:
        written.append(batch)
        return sent()

    async with asyncio.timeout(GUARD_S), relay.run(session, receive=receive, disconnect_type="http.disconnect") as run:
        relayed = await run.relay_from(_batches_then_cut_in_the_gap(session, end), write)
    assert written == [["a "], ["b "]]
    return relayed, session


def test_a_cut_after_the_pump_finished_does_not_replace_its_end() -> None:
    relayed, session = asyncio.run(_relay(None))
    assert relayed == Relayed(Outcome.DONE, None, None)
    assert session.cut_error is None


def test_a_cut_after_the_pump_failed_keeps_the_failure_for_the_breaker() -> None:
    error = UpstreamError("broke mid-stream")
    relayed, session = asyncio.run(_relay(error))
    assert relayed.raised is error and relayed.error is error
    assert session.cut_error is None
