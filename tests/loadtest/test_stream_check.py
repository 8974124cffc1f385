"""The load-test stream checks (loadtest/stream_check.py) on bodies written by hand from the protocol
contract (README "Streaming contract"; OpenAI's chat.completion.chunk stream; RFC 6455 close codes),
not produced by the gateway's own encoders: a change to an encoder that breaks the contract must not
be able to change the oracle with it."""

from __future__ import annotations

import pytest

from loadtest import stream_check as sc

# `/stream`, byte for byte as the README shows it: id lines, one JSON object per data line, blank lines.
SEED_DONE = (
    b'id: 3f9a0c21d8e1-0\ndata: {"type": "status", "message": "Generating..."}\n\n'
    b'id: 3f9a0c21d8e1-1\ndata: {"type": "token", "content": "This "}\n\n'
    b": ping\n\n"
    b'id: 3f9a0c21d8e1-2\ndata: {"type": "token", "content": "is \\u00fcber\\n"}\n\n'
    b'id: 3f9a0c21d8e1-3\ndata: {"type": "done", "tokens": 2}\n\n'
)
SEED_HEAD = SEED_DONE[: SEED_DONE.index(b"id: 3f9a0c21d8e1-3")]
# The seed protocol without any extra field: what a client reading only data lines was written against.
SEED_PLAIN = (
    b'data: {"type": "status", "message": "Generating..."}\n\n'
    b'data: {"type": "token", "content": "a"}\n\n'
    b'data: {"type": "done", "tokens": 1}\n\n'
)


def chunk(delta: str, finish: str = "null") -> bytes:
    return (
        b'data: {"id": "chatcmpl-7", "object": "chat.completion.chunk", "created": 1700000000, "model": "m", '
        b'"choices": [{"index": 0, "delta": ' + delta.encode() + b', "finish_reason": ' + finish.encode() + b"}]}\n\n"
    )


CHAT_HEAD = chunk('{"role": "assistant", "content": ""}') + chunk('{"content": "Hel"}') + chunk('{"content": "lo"}')
CHAT_FINISH = chunk("{}", '"stop"')
CHAT_USAGE = (
    b'data: {"id": "chatcmpl-7", "object": "chat.completion.chunk", "created": 1700000000, "model": "m", '
    b'"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}\n\n'
)
DONE = b"data: [DONE]\n\n"


def openai_error(code: str, kind: str = "server_error") -> bytes:
    return (
        b'data: {"error": {"message": "m", "type": "'
        + kind.encode()
        + b'", "param": null, "code": "'
        + code.encode()
        + b'"}}\n\n'
    )


def judge(body: bytes, check: sc.SeedCheck | sc.ChatCheck, *, lost: bool = False) -> tuple[str, str]:
    decoder = sc.SSEDecoder()
    for line in body.splitlines(keepends=True):
        data = decoder.feed_line(line)
        if data is not None:
            check.feed(data)
    verdict = (
        check.sse_verdict(connection_lost=lost)
        if isinstance(check, sc.SeedCheck)
        else check.verdict(connection_lost=lost)
    )
    return verdict.kind, verdict.detail or verdict.name


@pytest.mark.parametrize(
    ("body", "lost", "expected"),
    [
        (SEED_DONE, False, ("completed", "completed")),
        (SEED_DONE.replace(b"\n", b"\r\n"), False, ("completed", "completed")),
        (SEED_PLAIN, False, ("completed", "completed")),
        (SEED_HEAD, False, ("truncated", "ended without done")),
        (SEED_HEAD, True, ("truncated", "connection lost before done")),
        (
            SEED_HEAD + b'id: 3f9a0c21d8e1-3\ndata: {"type": "done", "tokens": 3}\n\n',
            False,
            ("truncated", "fewer token events than done.tokens"),
        ),
        (SEED_HEAD + b'data: {"type": "server_shutdown"}\n\n', False, ("graceful", "server_shutdown")),
        (
            SEED_HEAD + b'data: {"type": "server_shutdown", "resume": "3f9a0c21d8e1-2"}\n\n',
            False,
            ("graceful", "server_shutdown"),
        ),
        (
            SEED_HEAD + b'id: 3f9a0c21d8e1-3\ndata: {"type": "error", "code": "timeout", "message": "inter-token"}\n\n',
            False,
            ("error", "error event timeout"),
        ),
        (
            SEED_HEAD + b'id: 3f9a0c21d8e1-3\ndata: {"type": "error", "code": "backpressure", "message": "m"}\n\n',
            False,
            ("error", "error event backpressure"),
        ),
    ],
    ids=[
        "done",
        "crlf",
        "no-ids",
        "no-done",
        "reset",
        "fewer-tokens",
        "server-shutdown",
        "shutdown-resume",
        "timeout",
        "backpressure",
    ],
)
def test_seed_sse_bodies_from_the_contract(body: bytes, lost: bool, expected: tuple[str, str]) -> None:
    assert judge(body, sc.SeedCheck(), lost=lost) == expected


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (CHAT_HEAD + CHAT_FINISH + CHAT_USAGE + DONE, ("completed", "completed")),
        (CHAT_HEAD + CHAT_FINISH + DONE, ("completed", "completed")),
        (CHAT_HEAD + CHAT_FINISH + CHAT_USAGE, ("truncated", "ended without [DONE]")),
        (CHAT_HEAD + DONE, ("truncated", "[DONE] without a finish_reason")),
        (
            chunk('{"role": "assistant", "content": ""}')
            + chunk('{"content": "Hello"}')
            + CHAT_FINISH
            + CHAT_USAGE
            + DONE,
            ("truncated", "fewer content chunks than usage.completion_tokens"),
        ),
        (CHAT_HEAD + openai_error("server_shutdown") + DONE, ("graceful", "server_shutdown")),
        (CHAT_HEAD + openai_error("upstream_error") + DONE, ("error", "error chunk upstream_error")),
        (CHAT_HEAD + openai_error("timeout") + DONE, ("error", "error chunk timeout")),
    ],
    ids=[
        "done-usage",
        "done",
        "no-done",
        "no-finish-reason",
        "fewer-chunks",
        "server-shutdown",
        "upstream-error",
        "timeout",
    ],
)
def test_chat_bodies_from_the_contract(body: bytes, expected: tuple[str, str]) -> None:
    assert judge(body, sc.ChatCheck()) == expected


WS_STATUS = '{"type": "status", "message": "Generating...", "stream_id": "3f9a0c21d8e1"}'
WS_TOKEN = '{"type": "token", "content": "x "}'


@pytest.mark.parametrize(
    ("frames", "close_code", "expected"),
    [
        ([WS_STATUS, WS_TOKEN, '{"type": "done", "tokens": 1}'], 1000, "completed"),
        ([WS_STATUS, WS_TOKEN, '{"type": "done", "tokens": 1}'], 1006, "truncated"),
        ([WS_STATUS, WS_TOKEN], 1000, "truncated"),
        ([WS_STATUS, '{"type": "done", "tokens": 2}'], 1000, "truncated"),
        ([WS_STATUS, WS_TOKEN, '{"type": "server_shutdown"}'], 1012, "graceful:server_shutdown"),
        (['{"type": "error", "code": "rate_limited", "message": "m"}'], 1013, "refused:1013:rate_limited"),
        (['{"type": "error", "code": "circuit_open", "message": "m"}'], 1013, "refused:1013:circuit_open"),
        (
            ['{"type": "error", "code": "client_connection_limit", "message": "m"}'],
            1013,
            "refused:1013:client_connection_limit",
        ),
        (['{"type": "error", "code": "draining", "message": "m"}'], 1012, "refused:1012:draining"),
        (
            [WS_STATUS, WS_TOKEN, '{"type": "error", "code": "upstream_error", "message": "m"}'],
            1011,
            "error:upstream_error",
        ),
    ],
)
def test_websocket_frames_from_the_contract(frames: list[str], close_code: int, expected: str) -> None:
    check = sc.SeedCheck()
    for frame in frames:
        check.feed(frame)
    assert check.ws_verdict(close_code).name == expected


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (429, b'{"detail": "rate limit exceeded", "code": "rate_limited"}', "refused:429:rate_limited"),
        (503, b'{"detail": "m", "code": "connection_limit"}', "refused:503:connection_limit"),
        (
            503,
            b'{"error": {"message": "m", "type": "server_error", "param": null, "code": "draining"}}',
            "refused:503:draining",
        ),
        (
            503,
            b'{"error": {"message": "m", "type": "server_error", "param": null, "code": "circuit_open"}}',
            "refused:503:circuit_open",
        ),
        (503, b'{"detail": "m", "code": "server_shutdown"}', "graceful:server_shutdown"),
        (502, b'{"detail": "m", "code": "upstream_error"}', "error:http_502:upstream_error"),
        (
            504,
            b'{"error": {"message": "m", "type": "server_error", "param": null, "code": "timeout"}}',
            "error:http_504:timeout",
        ),
        (500, b"<html>bad gateway</html>", "error:http_500:unknown"),
    ],
)
def test_http_refusals_from_the_contract(status: int, body: bytes, expected: str) -> None:
    assert sc.classify_status(status, body).name == expected


def test_fake_text_is_the_fake_model_servers_answer() -> None:
    """A copy (the in-cluster Job ships stream_check alone): it must stay equal to what the fake streams."""
    from loadtest.fake_openai import default_tokens

    assert sc.fake_text(5) == "".join(default_tokens(5)) == "tok0 tok1 tok2 tok3 tok4 "
    fake = sc.expected_text("fake", "any prompt")
    mock = sc.expected_text("mock", "a prompt")
    assert fake is not None and fake(3) == "tok0 tok1 tok2 "
    assert mock is not None and mock(4) == sc.mock_text("a prompt", 4)
    assert sc.expected_text("off", "a prompt") is None
    with pytest.raises(ValueError, match="unknown text source"):
        sc.expected_text("vllm", "a prompt")
