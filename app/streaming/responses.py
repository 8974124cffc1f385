"""The pure-ASGI responses that run a stream: SSE (/stream, /v1 stream), a replayed stream, and the
non-streaming completion. Each is one `StreamRun` (relay.py) around its own framing."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.types import Receive, Scope, Send

from app.errors import GatewayError
from app.resume.store import EventLog
from app.streaming.relay import (
    BACKPRESSURE_FINAL_WRITE_S,
    ASGIApp,
    Encoder,
    Relay,
    end_log,
)
from app.streaming.session import Outcome, StreamSession
from app.streaming.sse import PING, SSE_HEADERS, SeedEncoder
from app.upstream.base import Batch, ChatRequest, DeltaBatch, Usage, texts_bytes, utf8_len


class SSEStreamResponse:
    """A pure-ASGI streaming response that owns its stream from admission to release."""

    def __init__(
        self,
        *,
        relay: Relay,
        session: StreamSession,
        request: ChatRequest,
        encoder: Encoder,
        error_response: Callable[[GatewayError], ASGIApp],
        release: Callable[[], Awaitable[None]] | None = None,
        extra_headers: list[tuple[bytes, bytes]] | None = None,
        log: EventLog | None = None,
    ) -> None:
        self.relay = relay
        self.session = session
        self.request = request
        self.encoder = encoder
        self.error_response = error_response
        self.release = release
        self.headers = SSE_HEADERS + (extra_headers or [])
        self.log = log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        session, encoder, log = self.session, self.encoder, self.log
        async with self.relay.run(session, receive=receive, disconnect_type="http.disconnect",
                                  release=self.release) as run:
            stream = await run.open_or_refuse(self.request, lambda exc: self.error_response(exc)(scope, receive, send))
            if stream is None:
                return

            async def opening() -> None:
                await send({"type": "http.response.start", "status": 200, "headers": self.headers})
                body = encoder.opening()
                if log is not None:
                    log.append(body, 1)
                await send({"type": "http.response.body", "body": body, "more_body": True})
                session.ping = ping

            async def write(batch: Batch) -> None:
                body = encoder.tokens(batch)
                if log is not None:
                    log.append(body, len(batch))  # before the send: a stalled client must not hold it back
                session.write_bytes = len(body)  # what a blocked write holds (the memory budget, memory.py)
                await send({"type": "http.response.body", "body": body, "more_body": True})

            async def ping() -> None:
                await send({"type": "http.response.body", "body": PING, "more_body": True})

            outcome, error = await run.relay(write, opening)
            handed_over = log is not None and await end_log(log, encoder, session, stream, error)
            if outcome is Outcome.CLIENT_GONE:
                return
            if handed_over:
                assert log is not None
                final = SeedEncoder.shutdown_resume(log.last_event_id)
            elif error is None:
                final = encoder.done(session.tokens, stream.finish_reason, stream.usage)
            else:
                final = encoder.error(error)
            last = {"type": "http.response.body", "body": final, "more_body": False}
            # A client cut for not reading gets its final event only if its socket takes it now. Any other
            # client that stops reading right before the end is waited for as long as a slow client, not
            # forever: the watchdog no longer watches a finishing stream, and it still holds its slot.
            stalled = outcome is Outcome.BACKPRESSURE
            wait_s = BACKPRESSURE_FINAL_WRITE_S if stalled else self.relay.registry.slow_client_s
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await send(last)


class ReplayResponse:
    """`GET /stream/{id}`: a resumed stream, replayed from the store, then its live tail."""

    def __init__(self, *, relay: Relay, session: StreamSession, frames: AsyncIterator[list[bytes]],
                 error_response: Callable[[GatewayError], ASGIApp], not_resumable: Callable[[], GatewayError],
                 extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.relay = relay
        self.session = session
        self.frames = frames
        self.error_response = error_response
        self.not_resumable = not_resumable
        self.headers = SSE_HEADERS + (extra_headers or [])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        session = self.session
        async with self.relay.run(session, receive=receive, disconnect_type="http.disconnect") as run:
            try:
                first = await anext(self.frames)
            except LookupError:
                refusal = self.not_resumable()
                run.report(Outcome.ERROR, refusal)
                await self.error_response(refusal)(scope, receive, send)
                return
            except StopAsyncIteration:
                first = []

            async def opening() -> None:
                await send({"type": "http.response.start", "status": 200, "headers": self.headers})
                await send({"type": "http.response.body", "body": b"".join(first), "more_body": True})
                session.ping = ping

            async def write(batch: list[bytes]) -> None:
                body = b"".join(batch)
                session.write_bytes = len(body)
                await send({"type": "http.response.body", "body": body, "more_body": True})

            async def ping() -> None:
                await send({"type": "http.response.body", "body": PING, "more_body": True})

            outcome, error = await run.relay_from(not_resumable_on_lookup(self.frames, self.not_resumable),
                                                  write, opening)
            if outcome is Outcome.CLIENT_GONE:
                return
            final = b"" if error is None else SeedEncoder().error(error)
            await send({"type": "http.response.body", "body": final, "more_body": False})


async def not_resumable_on_lookup(frames: AsyncIterator[list[bytes]],
                                   error: Callable[[], GatewayError]) -> AsyncIterator[list[bytes]]:
    try:
        async for batch in frames:
            yield batch
    except LookupError:
        raise error() from None


class CompletionResponse:
    """Non-streaming `/v1/chat/completions`: the same relay into a list, answered as one JSON body."""

    def __init__(
        self,
        *,
        relay: Relay,
        session: StreamSession,
        request: ChatRequest,
        error_response: Callable[[GatewayError], ASGIApp],
        render: Callable[[dict[str, Any], str | None, Usage | None, int], dict[str, object]],
        release: Callable[[], Awaitable[None]] | None = None,
        extra_headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.relay = relay
        self.session = session
        self.request = request
        self.error_response = error_response
        self.render = render
        self.release = release
        self.extra_headers = extra_headers or []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        session = self.session
        message = MessageAssembler()

        async def collect(batch: Batch) -> None:
            session.held_bytes += message.add(batch)  # the answer is held whole until it is sent

        async with self.relay.run(session, receive=receive, disconnect_type="http.disconnect",
                                  release=self.release) as run:
            stream = await run.open_or_refuse(self.request, lambda exc: self.error_response(exc)(scope, receive, send))
            if stream is None:
                return
            outcome, error = await run.relay(collect)
            if outcome is Outcome.CLIENT_GONE:
                return
            if error is not None:
                await self.error_response(error)(scope, receive, send)
                return
            body = json.dumps(
                self.render(message.message(), stream.finish_reason, stream.usage, session.tokens),
                separators=(",", ":"),
            ).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode()), *self.extra_headers]})
            await send({"type": "http.response.body", "body": body})


class MessageAssembler:
    """A non-streamed answer's `message` from its deltas: text joined, tool calls merged by index."""

    def __init__(self) -> None:
        self._texts: list[str] = []
        self._refusal: list[str] = []
        self._calls: dict[int, dict[str, Any]] = {}

    def add(self, batch: Batch) -> int:
        """Take a batch; returns the UTF-8 bytes it added (what the answer holds until it is sent)."""
        if not isinstance(batch, DeltaBatch):
            self._texts.extend(batch)
            return texts_bytes(batch)
        added = 0
        for delta in batch:
            if text := delta.get("content"):
                self._texts.append(text)
                added += utf8_len(text)
            if refusal := delta.get("refusal"):
                self._refusal.append(refusal)
                added += utf8_len(refusal)
            for part in delta.get("tool_calls") or ():
                function = part.get("function") or {}
                added += utf8_len(function.get("name") or "") + utf8_len(function.get("arguments") or "")
                self._merge_call(part)
        return added

    def _merge_call(self, part: dict[str, Any]) -> None:
        call = self._calls.setdefault(int(part.get("index", len(self._calls))),
                                      {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
        if part.get("id"):
            call["id"] = part["id"]
        if part.get("type"):
            call["type"] = part["type"]
        function = part.get("function") or {}
        call["function"]["name"] += function.get("name") or ""
        call["function"]["arguments"] += function.get("arguments") or ""

    def message(self) -> dict[str, Any]:
        text = "".join(self._texts)
        message: dict[str, Any] = {"role": "assistant", "content": text if text or not self._calls else None,
                                   "refusal": "".join(self._refusal) or None}
        if self._calls:
            message["tool_calls"] = [self._calls[index] for index in sorted(self._calls)]
        return message
