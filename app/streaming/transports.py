"""Where a `StreamRun` (run.py) sends a stream's framed events: an SSE response, a WebSocket, or only the resume log.

A transport knows its protocol's envelope (ASGI messages, text frames and close codes) and nothing of
a stream's life: the run decides what is sent and when, the encoders (encoders.py) frame it. The
per-batch `writer` is the hot path: one encoder call, the resume log's append first, then one send.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from app.errors import WS_NORMAL, GatewayError, NotResumableError
from app.resume.store import EventLog
from app.streaming.encoders import PING, SSE_HEADERS, WebSocketEncoder
from app.streaming.session import StreamRegistry, StreamSession
from app.upstream.base import Batch, batch_texts

HANDED_OVER_REASON = "stream handed over; resume it"


class HTTPTransport:
    """An ASGI HTTP response: SSE events as body messages, or one JSON body; a refusal is a plain error response."""

    answers_before_start = True

    def __init__(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        *,
        session: StreamSession,
        error_response: Callable[[GatewayError], ASGIApp],
        extra_headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self._scope, self._receive, self._send = scope, receive, send
        self.session = session
        self._error_response = error_response
        self._extra_headers = extra_headers or []
        self.ping: Callable[[], Coroutine[Any, Any, None]] | None = self._ping

    async def refuse(self, error: GatewayError) -> None:
        await self._error_response(error)(self._scope, self._receive, self._send)

    async def start(self, opening: bytes) -> None:
        await self._send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS + self._extra_headers})
        await self._send({"type": "http.response.body", "body": opening, "more_body": True})

    def writer(
        self, encode: Callable[[Batch], bytes], log: EventLog | None, log_encode: Callable[[Batch], bytes] | None
    ) -> Callable[[Batch], Awaitable[None]]:
        # Plain functions that return the send's awaitable for the pump to await: no await level of their own.
        send, session = self._send, self.session
        if log is None:

            def write(batch: Batch) -> Awaitable[None]:
                body = encode(batch)
                session.write_bytes = len(body)  # what a blocked write holds (the memory budget, memory.py)
                return send({"type": "http.response.body", "body": body, "more_body": True})

            return write
        append = log.append

        def logged_write(batch: Batch) -> Awaitable[None]:
            body = encode(batch)
            append(body, len(batch))  # before the send: a stalled client must not hold it back
            session.write_bytes = len(body)
            return send({"type": "http.response.body", "body": body, "more_body": True})

        return logged_write

    def replay_writer(self, encode: Callable[[list[bytes]], bytes]) -> Callable[[list[bytes]], Awaitable[None]]:
        send, session = self._send, self.session

        def write(batch: list[bytes]) -> Awaitable[None]:
            body = encode(batch)
            session.write_bytes = len(body)
            return send({"type": "http.response.body", "body": body, "more_body": True})

        return write

    async def _ping(self) -> None:
        await self._send({"type": "http.response.body", "body": PING, "more_body": True})

    async def finish(self, final: bytes, error: GatewayError | None, handed_over: bool) -> None:
        await self._send({"type": "http.response.body", "body": final, "more_body": False})

    async def end_replay(self, final: bytes | None, error: GatewayError | None) -> None:
        await self._send({"type": "http.response.body", "body": final or b"", "more_body": False})

    async def respond(self, body: bytes) -> None:
        """A non-streamed answer: one JSON body."""
        await self._send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    *self._extra_headers,
                ],
            }
        )
        await self._send({"type": "http.response.body", "body": body})


async def close_with_error(websocket: WebSocket, error: GatewayError) -> None:
    """A WebSocket's error: its `error` event (or `server_shutdown`), then the close code it maps to."""
    for text in WebSocketEncoder().error(error):
        await websocket.send_text(text)
    await websocket.close(code=error.ws_close_code, reason=error.ws_reason)


class WebSocketTransport:
    """An accepted WebSocket: one text frame per event; the end is a close with the code the ending maps to.

    `done` closes 1000, an error closes with its mapped code, a handed-over stream closes like the drain
    (1012) with a reason that says to resume. A generation whose client left runs on for it to resume.
    """

    answers_before_start = False  # accepted already: a refusal is an error frame like any other end
    ping: Callable[[], Coroutine[Any, Any, None]] | None = None  # no keepalive

    def __init__(self, websocket: WebSocket, *, session: StreamSession, registry: StreamRegistry) -> None:
        self._websocket = websocket
        self.session = session
        self._registry = registry
        self._last = ""  # the last frame sent: a replay closes by how the stream it replays ended

    async def refuse(self, error: GatewayError) -> None:
        await close_with_error(self._websocket, error)

    async def start(self, opening: list[str]) -> None:
        for text in opening:
            await self._websocket.send_text(text)

    def writer(
        self, encode: Callable[[Batch], list[str]], log: EventLog | None, log_encode: Callable[[Batch], bytes] | None
    ) -> Callable[[Batch], Awaitable[None]]:
        send_text, session, registry = self._websocket.send_text, self.session, self._registry

        async def write(batch: Batch) -> None:
            frames = encode(batch)
            if log is not None and log_encode is not None:
                log.append(log_encode(batch), len(frames))
            if session.orphaned_at:
                return  # the client left; the generation runs on for it to resume
            session.write_bytes = sum(map(len, frames))  # ASCII: characters are bytes (the memory budget)
            try:
                for frame in frames:
                    await send_text(frame)
            except (OSError, WebSocketDisconnect):  # the peer is gone before its close reached the listener
                registry.client_left(session)
                if not session.orphaned_at:
                    raise

        return write

    def replay_writer(self, encode: Callable[[list[bytes]], list[str]]) -> Callable[[list[bytes]], Awaitable[None]]:
        send_text, session = self._websocket.send_text, self.session

        async def write(batch: list[bytes]) -> None:
            session.write_bytes = sum(map(len, batch))
            frames = encode(batch)
            for frame in frames:
                await send_text(frame)
            self._last = frames[-1] if frames else ""

        return write

    async def finish(self, final: list[str], error: GatewayError | None, handed_over: bool) -> None:
        for text in final:
            await self._websocket.send_text(text)
        if error is None:
            await self._websocket.close(code=WS_NORMAL)
        else:
            await self._websocket.close(
                code=error.ws_close_code, reason=HANDED_OVER_REASON if handed_over else error.ws_reason
            )

    async def end_replay(self, final: list[str] | None, error: GatewayError | None) -> None:
        if error is not None:
            await self.finish(final or [], error, False)
        elif '"type": "error"' in self._last:  # the replayed stream ended with its error event
            await self._websocket.close(code=NotResumableError.ws_close_code, reason="stream ended with an error")
        else:
            await self._websocket.close(code=WS_NORMAL)


class LogTransport:
    """No client: a generation that only writes its resume log (a handed-over stream continued here)."""

    answers_before_start = False
    ping: Callable[[], Coroutine[Any, Any, None]] | None = None

    async def refuse(self, error: GatewayError) -> None:
        pass  # the run ends the log itself

    async def start(self, opening: bytes) -> None:  # pragma: no cover - a continued log has its opening already
        raise AssertionError("a continued stream has no opening event")

    def writer(
        self, encode: Callable[[Batch], bytes], log: EventLog | None, log_encode: Callable[[Batch], bytes] | None
    ) -> Callable[[Batch], Awaitable[None]]:
        assert log is not None
        append = log.append

        async def write(batch: Batch) -> None:
            texts = batch_texts(batch)  # the log holds seed events: text only
            append(encode(texts), len(texts))

        return write

    def replay_writer(self, encode: Callable[[list[bytes]], bytes]) -> Callable[[list[bytes]], Awaitable[None]]:
        raise AssertionError("a log is not replayed into a log")  # pragma: no cover - no caller

    async def finish(self, final: bytes, error: GatewayError | None, handed_over: bool) -> None:
        pass  # the log's own final event was written when it ended

    async def end_replay(self, final: bytes | None, error: GatewayError | None) -> None:
        raise AssertionError("a log is not replayed into a log")  # pragma: no cover - no caller
