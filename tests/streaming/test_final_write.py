"""ASGI level: a client that stops reading right before a stream's final event does not hold the stream
(and its connection slot) forever; the final write waits SLOW_CLIENT_TIMEOUT_SECONDS at most."""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message

from app.errors import GatewayError
from app.policies.breaker import CircuitBreaker
from app.policies.retry import RetryPolicy
from app.streaming.encoders import SeedEncoder
from app.streaming.recorder import StreamRecorder
from app.streaming.responses import SSEStreamResponse
from app.streaming.run import Relay
from app.streaming.session import StreamRegistry, StreamSession
from app.upstream.base import ChatRequest
from app.upstream.guard import GuardedUpstream
from app.upstream.mock import MockUpstream

GUARD_S = 30.0  # guard only


def _no_error_expected(error: GatewayError) -> ASGIApp:
    raise AssertionError(f"the stream opens without an error, got {error!r}")


def test_final_event_to_a_client_that_stopped_reading_gives_up_and_releases() -> None:
    released: list[bool] = []
    sent: list[Message] = []

    async def scenario() -> None:
        registry = StreamRegistry(
            first_token_s=10, inter_token_s=10, total_s=60, slow_client_s=0.2, ping_interval_s=15, check_interval_s=0.05
        )
        upstream = GuardedUpstream(
            MockUpstream(tokens_per_second=0, first_token_ms=0), CircuitBreaker("mock"), RetryPolicy(0)
        )
        relay = Relay(upstream=upstream, registry=registry, observer=StreamRecorder(model_names=("m",)), max_batch=100)
        loop = asyncio.get_running_loop()
        session = StreamSession(stream_id="s", endpoint="/stream", model="m", client="c", now=loop.time())

        async def release() -> None:
            released.append(True)

        async def receive() -> Message:
            await asyncio.Event().wait()  # the client never disconnects...
            raise AssertionError("unreachable")

        async def send(message: Message) -> None:
            sent.append(message)
            if message.get("more_body") is False:
                await asyncio.Event().wait()  # ...and stops reading right before the final event

        response = SSEStreamResponse(
            relay=relay,
            session=session,
            request=ChatRequest("m", [], max_tokens=3),
            encoder=SeedEncoder(),
            error_response=_no_error_expected,
            release=release,
        )
        async with asyncio.timeout(GUARD_S):
            await response({"type": "http"}, receive, send)
        assert not registry.streams

    asyncio.run(scenario())
    assert released == [True]
    assert sent[-1]["more_body"] is False and b'"type": "done"' in sent[-1]["body"]
