"""The only place that frames a stream's events: seed SSE (`/stream`), OpenAI chunks (`/v1`), WebSocket text.

Per token we JSON-escape the text (the C escaper json.dumps itself uses) and splice it between
constant pieces; a whole batch becomes one `bytes` (or one list of text frames) with one join.
`/stream` frames are byte-for-byte what the seed emits (`json.dumps` default separators, ASCII
escaping); WebSocket frames are the same JSON objects without the SSE lines around them.
"""

from __future__ import annotations

import json
from json.encoder import encode_basestring_ascii

from app.errors import GatewayError
from app.upstream.base import Batch, DeltaBatch, Usage, batch_texts

escape = encode_basestring_ascii  # str -> JSON string literal, identical to json.dumps(str)

PING = b": ping\n\n"
DONE_SENTINEL = b"data: [DONE]\n\n"
DELTA_TAIL = ',"logprobs":null,"finish_reason":null}]}\n\n'  # after a whole delta object
CHUNK_TAIL = '},"logprobs":null,"finish_reason":null}]}\n\n'  # after a text delta's content
SEED_STATUS = b'data: {"type": "status", "message": "Generating..."}\n\n'
SEED_TOKEN_HEAD = 'data: {"type": "token", "content": '
SEED_TOKEN_TAIL = "}\n\n"
AFTER_ID_TOKEN_HEAD = "\n" + SEED_TOKEN_HEAD  # ends the `id: <stream id>-<seq>` line: one piece less per token
SEED_SHUTDOWN = b'data: {"type": "server_shutdown"}\n\n'
WS_STATUS = json.dumps({"type": "status", "message": "Generating..."})
WS_SHUTDOWN = json.dumps({"type": "server_shutdown"})
WS_TOKEN_HEAD = '{"type": "token", "content": '

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class SeedEncoder:
    """`POST /stream` events: status, token..., done | error | server_shutdown.

    With a stream id every event but `server_shutdown` carries `id: <stream id>-<seq>` (status 0,
    tokens 1..n, the final event n+1), so a client can resume with `Last-Event-ID`; clients that
    read only `data:` lines see exactly the seed's bytes. `server_shutdown` belongs to one
    connection, not to the stream, so it has no id: EventSource keeps the last one it saw.
    """

    __slots__ = ("_id_prefix", "seq")

    def __init__(self, stream_id: str | None = None, *, seq: int = 0) -> None:
        self._id_prefix = f"id: {stream_id}-" if stream_id else None
        self.seq = seq  # the seq of the next event (a handed-over stream continues after its last one)

    def _framed(self, data: bytes) -> bytes:
        seq, self.seq = self.seq, self.seq + 1
        return self._with_id(seq, data)

    def _final(self, data: bytes) -> bytes:
        # A stream has one final event, encoded for the client and for the resume log: both copies
        # carry the same id, so the seq does not move.
        return self._with_id(self.seq, data)

    def _with_id(self, seq: int, data: bytes) -> bytes:
        return data if self._id_prefix is None else f"{self._id_prefix}{seq}\n".encode() + data

    def opening(self) -> bytes:
        return self._framed(SEED_STATUS)

    def tokens(self, batch: Batch) -> bytes:
        if len(batch) != 1 or batch.__class__ is not list:  # not one text (a DeltaBatch is a list subclass)
            return self._many(batch)
        # The common batch at a model's pace: one text, no list, no join, no closure.
        text: str = batch[0]  # type: ignore[assignment]  # a plain list is texts (cast() would cost a call per token)
        seq = self.seq
        self.seq = seq + 1
        prefix = self._id_prefix
        if prefix is None:
            return f"{SEED_TOKEN_HEAD}{escape(text)}{SEED_TOKEN_TAIL}".encode()
        return f"{prefix}{seq}{AFTER_ID_TOKEN_HEAD}{escape(text)}{SEED_TOKEN_TAIL}".encode()

    def _many(self, batch: Batch) -> bytes:
        if isinstance(batch, DeltaBatch):
            batch = batch_texts(batch)  # the seed protocol carries text only
        n, seq, prefix = len(batch), self.seq, self._id_prefix
        self.seq = seq + n
        head, tail = SEED_TOKEN_HEAD, SEED_TOKEN_TAIL
        if prefix is None:
            return "".join([f"{head}{escape(text)}{tail}" for text in batch]).encode()
        return "".join([f"{prefix}{i}\n{head}{escape(text)}{tail}" for i, text in enumerate(batch, seq)]).encode()

    def done(self, tokens: int, finish_reason: str | None, usage: Usage | None) -> bytes:
        return self._final(f'data: {{"type": "done", "tokens": {tokens}}}\n\n'.encode())

    def error(self, error: GatewayError) -> bytes:
        return SEED_SHUTDOWN if error.code == "server_shutdown" else self._final(error.event_bytes())

    @staticmethod
    def shutdown_resume(event_id: str) -> bytes:
        """`server_shutdown` for a stream handed to the fleet: reconnect with Last-Event-ID `resume`."""
        return f'data: {{"type": "server_shutdown", "resume": {escape(event_id)}}}\n\n'.encode()

    @staticmethod
    def stored(batch: list[bytes]) -> bytes:
        """Frames replayed from the resume store: they are seed frames already."""
        return b"".join(batch)


class WebSocketEncoder:
    """`WebSocket /ws`: the seed's events as text frames (one per event), without ids.

    With a stream id (resumption on) the status event names the stream, so a client can resume it.
    """

    __slots__ = ("_stream_id",)

    def __init__(self, stream_id: str | None = None) -> None:
        self._stream_id = stream_id

    def opening(self) -> list[str]:
        if self._stream_id is None:
            return [WS_STATUS]
        return [json.dumps({"type": "status", "message": "Generating...", "stream_id": self._stream_id})]

    def tokens(self, batch: Batch) -> list[str]:
        head = WS_TOKEN_HEAD
        # the seed protocol carries text only (batch_texts, inlined: one call less per batch on this path)
        texts = [text for delta in batch if (text := delta.get("content"))] if isinstance(batch, DeltaBatch) else batch
        return [f"{head}{escape(text)}}}" for text in texts]  # ASCII: characters are bytes

    def done(self, tokens: int, finish_reason: str | None, usage: Usage | None) -> list[str]:
        return [json.dumps({"type": "done", "tokens": tokens})]

    def error(self, error: GatewayError) -> list[str]:
        return [WS_SHUTDOWN if error.code == "server_shutdown" else json.dumps(error.sse_event())]

    @staticmethod
    def shutdown_resume(event_id: str) -> list[str]:
        return [json.dumps({"type": "server_shutdown", "resume": event_id})]

    @staticmethod
    def stored(batch: list[bytes]) -> list[str]:
        """Stored seed frames (`id: ...` line, `data: {...}` line) as their JSON objects."""
        return [frame.split(b"data: ", 1)[1].rstrip(b"\n").decode() for frame in batch]


class ChatChunkEncoder:
    """`POST /v1/chat/completions` with `stream: true`: `chat.completion.chunk` objects, then `[DONE]`."""

    __slots__ = ("_head", "_delta_head", "_created", "_id", "_model", "_include_usage")

    def __init__(self, *, completion_id: str, model: str, created: int, include_usage: bool) -> None:
        self._id, self._model, self._created = completion_id, model, created
        self._include_usage = include_usage
        usage = ',"usage":null' if include_usage else ""
        self._delta_head = (
            f'data: {{"id":"{completion_id}","object":"chat.completion.chunk","created":{created},'
            f'"model":{escape(model)},"system_fingerprint":null{usage},"choices":[{{"index":0,"delta":'
        )
        self._head = self._delta_head + '{"content":'

    def _chunk(self, delta: str, finish_reason: str | None) -> str:
        reason = escape(finish_reason) if finish_reason else "null"
        return (
            f'data: {{"id":"{self._id}","object":"chat.completion.chunk","created":{self._created},'
            f'"model":{escape(self._model)},"system_fingerprint":null,'
            f'"choices":[{{"index":0,"delta":{delta},"logprobs":null,"finish_reason":{reason}}}]}}\n\n'
        )

    def opening(self) -> bytes:
        return self._chunk('{"role":"assistant","content":""}', None).encode()

    def tokens(self, batch: Batch) -> bytes:
        if isinstance(batch, DeltaBatch):  # tool calls, a refusal, ...: relayed whole
            head = self._delta_head
            return "".join(
                [f"{head}{json.dumps(delta, separators=(',', ':'), ensure_ascii=False)}{DELTA_TAIL}" for delta in batch]
            ).encode()
        head = self._head
        if len(batch) == 1:
            return f"{head}{escape(batch[0])}{CHUNK_TAIL}".encode()
        return "".join([f"{head}{escape(text)}{CHUNK_TAIL}" for text in batch]).encode()

    def done(self, tokens: int, finish_reason: str | None, usage: Usage | None) -> bytes:
        out = self._chunk("{}", finish_reason or "stop")
        if self._include_usage:
            usage_obj = json.dumps((usage or Usage(0, tokens)).as_dict(), separators=(",", ":"))
            out += (
                f'data: {{"id":"{self._id}","object":"chat.completion.chunk","created":{self._created},'
                f'"model":{escape(self._model)},"system_fingerprint":null,"choices":[],"usage":{usage_obj}}}\n\n'
            )
        return out.encode() + DONE_SENTINEL

    def error(self, error: GatewayError) -> bytes:
        return error.openai_chunk_bytes()

    def shutdown_resume(self, event_id: str) -> bytes:  # pragma: no cover - /v1 keeps no resume log to hand over
        raise AssertionError("a /v1 stream is never handed over")
