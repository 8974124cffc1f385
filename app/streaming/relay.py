"""The upstream-to-client pump, and the pure-ASGI responses that run it.

One stream is one task (the ASGI request task) plus a disconnect listener:

    open upstream ─► headers + opening event ─► pump: batch ─► one write ─► ... ─► final event
      │ GatewayError before headers:                    ▲ cut from outside (watchdog deadline, slow
      ▼ plain HTTP error, nothing taken                 │ client, drain, client gone): task.cancel()
                                                         with the reason stored on the session

The pump takes every event already waiting upstream (at most STREAM_BUFFER_SIZE) as one batch and
writes it with one `send`. While a write waits on a slow client the upstream is not read, so what
a stream holds is bounded by one batch plus socket buffers, and the watchdog cuts a client that
accepts nothing for SLOW_CLIENT_TIMEOUT_SECONDS. Every exit path goes through `run_relay`'s
`finally`, so the registry entry, the active gauge and the upstream are released exactly once.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from starlette.types import Receive, Scope, Send

from app.errors import GatewayError, InternalError
from app.streaming.session import Outcome, Phase, StreamRegistry, StreamSession
from app.streaming.sse import PING, SSE_HEADERS
from app.upstream.base import ChatRequest, Upstream, UpstreamStream, Usage

logger = logging.getLogger("app.streaming")

ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
BACKPRESSURE_FINAL_WRITE_S = 0.05  # a cut slow client gets its error event only if its socket takes it now


class Encoder(Protocol):
    def opening(self) -> bytes: ...
    def tokens(self, batch: list[str]) -> bytes: ...
    def done(self, tokens: int, finish_reason: str | None, usage: Usage | None) -> bytes: ...
    def error(self, error: GatewayError) -> bytes: ...
    def shutdown(self) -> bytes: ...


class StreamObserver(Protocol):
    """Told once when a stream starts relaying and once when it ends (metrics, logs)."""

    def started(self, session: StreamSession) -> None: ...
    def finished(self, session: StreamSession, error: GatewayError | None) -> None: ...


async def pump(session: StreamSession, stream: UpstreamStream, write: Callable[[list[str]], Awaitable[None]],
               clock: Callable[[], float]) -> None:
    """Relay every upstream batch to `write`. The only per-token work: a timestamp and a count."""
    async for batch in stream:
        now = clock()
        if not session.first_token_at:
            session.first_token_at = now
        session.last_token_at = now
        session.tokens += len(batch)
        session.writing_since = now
        await write(batch)
        session.writing_since = 0.0
        session.last_write_at = now


def end_reason(session: StreamSession, exc: BaseException | None) -> tuple[Outcome, GatewayError | None]:
    """Classify how a relay ended; `exc` is what escaped the pump (None: the upstream finished)."""
    if session.client_gone:
        return Outcome.CLIENT_GONE, None
    error = session.cut_error
    if error is None and isinstance(exc, GatewayError):
        error = exc
    elif error is None and exc is not None:
        error = InternalError("the gateway failed while relaying this stream")
    if error is None:
        return Outcome.DONE, None
    return {"timeout": Outcome.TIMEOUT, "backpressure": Outcome.BACKPRESSURE,
            "server_shutdown": Outcome.SHUTDOWN}.get(error.code, Outcome.ERROR), error


def watch_disconnect(receive: Receive, session: StreamSession, disconnect_type: str) -> asyncio.Task[None]:
    async def listen() -> None:
        while (await receive())["type"] != disconnect_type:
            pass
        session.client_disconnected()

    return asyncio.get_running_loop().create_task(listen())


async def run_relay(
    session: StreamSession,
    stream: UpstreamStream,
    write: Callable[[list[str]], Awaitable[None]],
    *,
    registry: StreamRegistry,
    observer: StreamObserver,
    opening: Callable[[], Awaitable[None]] | None = None,
) -> tuple[Outcome, GatewayError | None]:
    """Run one stream's relay phase in the current task; return how it ended.

    Cuts (session.cut / client_disconnected) arrive as cancellation and are absorbed here;
    a cancellation from anyone else (the server tearing down) propagates after cleanup.
    """
    task = asyncio.current_task()
    assert task is not None
    session.task = task
    exc: BaseException | None = None
    registry.add(session)
    observer.started(session)
    session.phase = Phase.RELAYING
    try:
        if opening is not None:
            await opening()
        await pump(session, stream, write, asyncio.get_running_loop().time)
    except asyncio.CancelledError:
        if not (session.client_gone or session.cut_error) or task.uncancel() > 0:
            session.outcome = Outcome.SHUTDOWN
            observer.finished(session, None)
            raise
    except Exception as e:  # a GatewayError from upstream, or a bug: the stream ends with an error event
        exc = e
        if not isinstance(e, GatewayError) and not session.client_gone:
            logger.exception("relay failed", extra={"stream_id": session.id})
    finally:
        session.phase = Phase.FINISHING
        session.ping = None
        registry.discard(session)
    session.outcome, error = end_reason(session, exc)
    observer.finished(session, error)
    return session.outcome, error


class SSEStreamResponse:
    """A pure-ASGI streaming response that owns its stream from upstream open to release."""

    def __init__(
        self,
        *,
        session: StreamSession,
        request: ChatRequest,
        upstream: Upstream,
        encoder: Encoder,
        registry: StreamRegistry,
        observer: StreamObserver,
        max_batch: int,
        error_response: Callable[[GatewayError], ASGIApp],
        extra_headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.session = session
        self.request = request
        self.upstream = upstream
        self.encoder = encoder
        self.registry = registry
        self.observer = observer
        self.max_batch = max_batch
        self.error_response = error_response
        self.headers = SSE_HEADERS + (extra_headers or [])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        session, encoder = self.session, self.encoder
        try:
            stream = await self.upstream.open(self.request, max_batch=self.max_batch)
        except GatewayError as exc:
            session.outcome = Outcome.ERROR
            self.observer.finished(session, exc)
            await self.error_response(exc)(scope, receive, send)
            return
        listener = watch_disconnect(receive, session, "http.disconnect")
        try:
            async def opening() -> None:
                await send({"type": "http.response.start", "status": 200, "headers": self.headers})
                await send({"type": "http.response.body", "body": encoder.opening(), "more_body": True})
                session.ping = ping

            async def write(batch: list[str]) -> None:
                await send({"type": "http.response.body", "body": encoder.tokens(batch), "more_body": True})

            async def ping() -> None:
                await send({"type": "http.response.body", "body": PING, "more_body": True})

            outcome, error = await run_relay(
                session, stream, write, registry=self.registry, observer=self.observer, opening=opening
            )
            if outcome is Outcome.CLIENT_GONE:
                return
            if outcome is Outcome.DONE:
                final = encoder.done(session.tokens, stream.finish_reason, stream.usage)
            elif outcome is Outcome.SHUTDOWN:
                final = encoder.shutdown()
            else:
                assert error is not None
                final = encoder.error(error)
            last = {"type": "http.response.body", "body": final, "more_body": False}
            if outcome is Outcome.BACKPRESSURE:
                try:
                    async with asyncio.timeout(BACKPRESSURE_FINAL_WRITE_S):
                        await send(last)
                except TimeoutError:
                    pass
            else:
                await send(last)
        finally:
            listener.cancel()
            await stream.aclose()


class CompletionResponse:
    """Non-streaming `/v1/chat/completions`: the same relay into a list, answered as one JSON body."""

    def __init__(
        self,
        *,
        session: StreamSession,
        request: ChatRequest,
        upstream: Upstream,
        registry: StreamRegistry,
        observer: StreamObserver,
        max_batch: int,
        error_response: Callable[[GatewayError], ASGIApp],
        render: Callable[[str, str | None, Usage | None, int], dict[str, object]],
    ) -> None:
        self.session = session
        self.request = request
        self.upstream = upstream
        self.registry = registry
        self.observer = observer
        self.max_batch = max_batch
        self.error_response = error_response
        self.render = render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        session = self.session
        try:
            stream = await self.upstream.open(self.request, max_batch=self.max_batch)
        except GatewayError as exc:
            session.outcome = Outcome.ERROR
            self.observer.finished(session, exc)
            await self.error_response(exc)(scope, receive, send)
            return
        listener = watch_disconnect(receive, session, "http.disconnect")
        parts: list[str] = []

        async def collect(batch: list[str]) -> None:
            parts.extend(batch)

        try:
            outcome, error = await run_relay(session, stream, collect, registry=self.registry, observer=self.observer)
            if outcome is Outcome.CLIENT_GONE:
                return
            if error is not None:
                await self.error_response(error)(scope, receive, send)
                return
            body = json.dumps(
                self.render("".join(parts), stream.finish_reason, stream.usage, session.tokens),
                separators=(",", ":"),
            ).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
        finally:
            listener.cancel()
            await stream.aclose()
