"""Framing: `/stream` bytes identical to the seed's `json.dumps` output; `/v1` chunks that parse and reassemble;
WebSocket text frames that are the seed's JSON objects."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.errors import GatewayError, InvalidRequestError, ServiceUnavailableError, ShutdownError, UpstreamError
from app.streaming.encoders import DONE_SENTINEL, PING, ChatChunkEncoder, SeedEncoder, WebSocketEncoder
from app.upstream.base import Usage
from app.upstream.sse_decoder import SSEDecoder

no_deadline = settings(deadline=None)  # run time depends on the machine's load; no test here asserts time

# Pieces a framer must never let through raw, plus characters from every plane.
AWKWARD = [
    "\r",
    "\n",
    "\r\n",
    "\n\n",
    "\r\r",
    '"',
    "\\",
    "\x00",
    "\x1f",
    "\x7f",
    "\u2028",
    "\u2029",
    "\x85",
    "\ufeff",
    "é",
    "日本語",
    "🚀",
    "👩‍💻",
    "data: ",
    "}\n\n",
]


def texts(chars: st.SearchStrategy[str], awkward: list[str]) -> st.SearchStrategy[str]:
    return st.lists(st.one_of(st.text(chars, max_size=8), st.sampled_from(awkward)), max_size=8).map("".join)


# Real text, for round trips.
text = texts(st.characters(codec="utf-8"), AWKWARD)
batch = st.lists(text, max_size=12)
# Byte identity also holds for lone surrogates (a Python str parsed from JSON can hold them; both sides
# escape them); they are left out of round trips, where an adjacent pair would come back as one character.
raw_text = texts(st.characters(exclude_categories=()), [*AWKWARD, "\ud800", "\udfff"])
raw_batch = st.lists(raw_text, max_size=12)


def seed_event(obj: dict[str, Any]) -> bytes:
    """Exactly what the seed yields: `f"data: {json.dumps(obj)}\\n\\n"`, UTF-8 encoded by the response."""
    return f"data: {json.dumps(obj)}\n\n".encode()


def frames(raw: bytes) -> list[bytes]:
    """The `data` payloads of a framed byte string, checking each event is one `data:` line plus a blank line."""
    assert raw.endswith(b"\n\n") or raw == b""
    out = []
    for frame in raw.split(b"\n\n")[:-1]:
        assert frame.startswith(b"data: ")
        assert b"\n" not in frame and b"\r" not in frame  # JSON escaping kept every event on one line
        out.append(frame[len(b"data: ") :])
    return out


# --- /stream: byte-compatible with the seed -----------------------------------------------------------


@no_deadline
@given(raw_batch)
def test_seed_tokens_are_byte_identical_to_json_dumps(tokens: list[str]) -> None:
    expected = b"".join(seed_event({"type": "token", "content": t}) for t in tokens)
    assert SeedEncoder().tokens(tokens) == expected


@no_deadline
@given(batch)
def test_seed_tokens_round_trip_through_a_decoder(tokens: list[str]) -> None:
    decoder = SSEDecoder()
    payloads = decoder.feed(SeedEncoder().tokens(tokens)) + decoder.close()
    assert [json.loads(p) for p in payloads] == [{"type": "token", "content": t} for t in tokens]


def test_seed_status_event() -> None:
    assert SeedEncoder().opening() == seed_event({"type": "status", "message": "Generating..."})


@no_deadline
@given(
    st.integers(0, 10**9),
    st.sampled_from([None, "stop", "length"]),
    st.none() | st.builds(Usage, st.integers(0, 10**6), st.integers(0, 10**6)),
)
def test_seed_done_event(tokens: int, finish_reason: str | None, usage: Usage | None) -> None:
    assert SeedEncoder().done(tokens, finish_reason, usage) == seed_event({"type": "done", "tokens": tokens})


@pytest.mark.parametrize(
    "error",
    [
        UpstreamError("upstream error mid-stream: boom"),
        InvalidRequestError("max_tokens is 99999, above this gateway's limit of 32768"),
        ServiceUnavailableError("server is shutting down; retry the request"),
    ],
)
def test_seed_error_event(error: GatewayError) -> None:
    expected = seed_event({"type": "error", "code": error.code, "message": error.message})
    assert SeedEncoder().error(error) == expected


@no_deadline
@given(raw_text)
def test_seed_error_event_any_message(message: str) -> None:
    error = UpstreamError(message)
    assert SeedEncoder().error(error) == seed_event({"type": "error", "code": "upstream_error", "message": message})


def test_seed_shutdown_event() -> None:
    error = ShutdownError("the drain timeout passed; reconnect")
    assert SeedEncoder().error(error) == seed_event({"type": "server_shutdown"})


def test_ping_is_a_comment_clients_ignore() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(PING) + decoder.close() == []


# --- /v1: chat.completion.chunk objects ----------------------------------------------------------------


def chunks(raw: bytes) -> list[Any]:
    return [p if p == b"[DONE]" else json.loads(p) for p in frames(raw)]


def check_envelope(chunk: dict[str, Any], *, completion_id: str, model: str, created: int) -> None:
    assert chunk["id"] == completion_id
    assert chunk["object"] == "chat.completion.chunk"
    assert chunk["created"] == created
    assert chunk["model"] == model


@no_deadline
@given(
    model=text.filter(bool),
    tokens=batch,
    include_usage=st.booleans(),
    finish_reason=st.sampled_from([None, "stop", "length"]),
    usage=st.none() | st.builds(Usage, st.integers(0, 10**6), st.integers(0, 10**6)),
)
def test_chat_chunks_parse_and_reassemble(
    model: str, tokens: list[str], include_usage: bool, finish_reason: str | None, usage: Usage | None
) -> None:
    ids: dict[str, Any] = {"completion_id": "chatcmpl-abc123", "model": model, "created": 1_700_000_000}
    encoder = ChatChunkEncoder(**ids, include_usage=include_usage)
    half = len(tokens) // 2
    raw = encoder.opening() + encoder.tokens(tokens[:half]) + encoder.tokens(tokens[half:])
    raw += encoder.done(len(tokens), finish_reason, usage)
    parsed = chunks(raw)
    assert parsed[-1] == b"[DONE]"
    objects: list[dict[str, Any]] = parsed[:-1]
    for obj in objects:
        check_envelope(obj, **ids)
    opening, content, finish = objects[0], objects[1 : 1 + len(tokens)], objects[1 + len(tokens) :]

    assert opening["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    ]
    for obj in content:
        (choice,) = obj["choices"]
        assert choice["index"] == 0 and choice["finish_reason"] is None
        assert set(choice["delta"]) == {"content"}
        if include_usage:
            assert "usage" in obj and obj["usage"] is None  # OpenAI: usage is null until the last chunk
    assert [obj["choices"][0]["delta"]["content"] for obj in content] == tokens
    assert "".join(obj["choices"][0]["delta"]["content"] for obj in content) == "".join(tokens)

    reason = finish_reason or "stop"
    assert finish[0]["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}]
    if include_usage:
        assert len(finish) == 2
        assert finish[1]["choices"] == []
        assert finish[1]["usage"] == (usage or Usage(0, len(tokens))).as_dict()
    else:
        assert len(finish) == 1
        assert "usage" not in finish[0] or finish[0]["usage"] is None


@no_deadline
@given(batch)
def test_chat_chunks_round_trip_through_a_decoder(tokens: list[str]) -> None:
    encoder = ChatChunkEncoder(completion_id="chatcmpl-x", model="gpt-4o-mini", created=0, include_usage=False)
    decoder = SSEDecoder()
    payloads = decoder.feed(encoder.tokens(tokens)) + decoder.close()
    assert [json.loads(p)["choices"][0]["delta"]["content"] for p in payloads] == tokens


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_errors_are_openai_errors_then_done(include_usage: bool) -> None:
    encoder = ChatChunkEncoder(completion_id="chatcmpl-x", model="m", created=0, include_usage=include_usage)
    error = UpstreamError("upstream error mid-stream: boom")
    assert chunks(encoder.error(error)) == [
        {
            "error": {
                "message": "upstream error mid-stream: boom",
                "type": "server_error",
                "param": None,
                "code": "upstream_error",
            }
        },
        b"[DONE]",
    ]
    shutdown = encoder.error(ShutdownError("the drain timeout passed; reconnect"))
    assert chunks(shutdown) == [
        {
            "error": {
                "message": "the drain timeout passed; reconnect",
                "type": "server_error",
                "param": None,
                "code": "server_shutdown",
            }
        },
        b"[DONE]",
    ]
    assert shutdown.endswith(DONE_SENTINEL)


@no_deadline
@given(batch)
def test_websocket_frames_are_the_seed_events_json(tokens: list[str]) -> None:
    seed, ws = SeedEncoder("s"), WebSocketEncoder("s")
    stored = [seed.opening(), *(seed.tokens([t]) for t in tokens), seed.done(len(tokens), None, None)]
    frames = [*ws.opening(), *ws.tokens(tokens), *ws.done(len(tokens), None, None)]
    assert [json.loads(f) for f in frames[1:]] == [json.loads(f) for f in WebSocketEncoder.stored(stored[1:])]
    assert json.loads(frames[0]) == {"type": "status", "message": "Generating...", "stream_id": "s"}
    assert WebSocketEncoder.stored(stored) == [s.split(b"data: ", 1)[1].rstrip(b"\n").decode() for s in stored]


def test_websocket_end_frames() -> None:
    ws = WebSocketEncoder()
    assert ws.opening() == ['{"type": "status", "message": "Generating..."}']
    assert ws.error(ShutdownError("bye")) == ['{"type": "server_shutdown"}']
    assert json.loads(ws.error(InvalidRequestError("no"))[0])["type"] == "error"
    assert ws.shutdown_resume("s-3") == ['{"type": "server_shutdown", "resume": "s-3"}']
    assert SeedEncoder.shutdown_resume("s-3") == b"data: " + ws.shutdown_resume("s-3")[0].encode() + b"\n\n"
