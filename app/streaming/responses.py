"""The pure-ASGI responses of the HTTP routes: a live SSE stream (/stream, /v1 stream), a replayed stream, and the
non-streaming completion. Each is one `StreamRun` (run.py) over an `HTTPTransport` (transports.py)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import GatewayError
from app.resume.store import EventLog
from app.streaming.run import Encoder, Relay, ReplayEncoder, StreamLog, StreamRun
from app.streaming.session import StreamSession
from app.streaming.transports import HTTPTransport
from app.upstream.base import Batch, ChatRequest, DeltaBatch, Usage, texts_bytes, utf8_len


@dataclass(kw_only=True)
class _HTTPStreamResponse:
    """What the three responses share: the worker's relay, the stream's session, how a refusal is answered."""

    relay: Relay
    session: StreamSession
    error_response: Callable[[GatewayError], ASGIApp]
    release: Callable[[], Awaitable[None]] | None = None  # the admission ticket's slot(s); a replay holds none
    extra_headers: list[tuple[bytes, bytes]] | None = None

    def _open(self, scope: Scope, receive: Receive, send: Send) -> tuple[HTTPTransport, StreamRun]:
        transport = HTTPTransport(
            scope,
            receive,
            send,
            session=self.session,
            error_response=self.error_response,
            extra_headers=self.extra_headers,
        )
        return transport, self.relay.run(
            self.session, receive=receive, disconnect_type="http.disconnect", release=self.release
        )


@dataclass(kw_only=True)
class SSEStreamResponse(_HTTPStreamResponse):
    """A pure-ASGI streaming response that owns its stream from admission to release."""

    request: ChatRequest
    encoder: Encoder[bytes]
    log: EventLog | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # the seed protocol stores the very events its clients get
        log = None if self.log is None else StreamLog(self.log, self.encoder)
        transport, stream_run = self._open(scope, receive, send)
        async with stream_run as run:
            await run.stream(transport, self.encoder, self.request, log)


@dataclass(kw_only=True)
class ReplayResponse(_HTTPStreamResponse):
    """`GET /stream/{id}`: a resumed stream, replayed from the store, then its live tail."""

    frames: AsyncIterator[list[bytes]]
    encoder: ReplayEncoder[bytes]
    not_resumable: Callable[[], GatewayError]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        transport, stream_run = self._open(scope, receive, send)
        async with stream_run as run:
            await run.replay(transport, self.encoder, self.frames, self.not_resumable)


@dataclass(kw_only=True)
class CompletionResponse(_HTTPStreamResponse):
    """Non-streaming `/v1/chat/completions`: the same run into a `MessageAssembler`, answered as one JSON body."""

    request: ChatRequest
    render: Callable[[dict[str, Any], str | None, Usage | None, int], dict[str, object]]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        session = self.session
        message = MessageAssembler()

        async def collect(batch: Batch) -> None:
            session.held_bytes += message.add(batch)  # the answer is held whole until it is sent

        transport, stream_run = self._open(scope, receive, send)
        async with stream_run as run:
            stream = await run.collect(transport, self.request, collect)
            if stream is None:
                return
            body = json.dumps(
                self.render(message.message(), stream.finish_reason, stream.usage, session.tokens),
                separators=(",", ":"),
            ).encode()
            await transport.respond(body)


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
        call = self._calls.setdefault(
            int(part.get("index", len(self._calls))),
            {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
        )
        if part.get("id"):
            call["id"] = part["id"]
        if part.get("type"):
            call["type"] = part["type"]
        function = part.get("function") or {}
        call["function"]["name"] += function.get("name") or ""
        call["function"]["arguments"] += function.get("arguments") or ""

    def message(self) -> dict[str, Any]:
        text = "".join(self._texts)
        message: dict[str, Any] = {
            "role": "assistant",
            "content": text if text or not self._calls else None,
            "refusal": "".join(self._refusal) or None,
        }
        if self._calls:
            message["tool_calls"] = [self._calls[index] for index in sorted(self._calls)]
        return message
