"""The continuing layer's decisions, over a scripted in-process upstream (the SIGKILL tests with real processes are
tests/fleet/test_continuation.py): what is continued, with which request, and what ends the stream."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest

from app.errors import GatewayError, UpstreamError, UpstreamRejectedError
from app.upstream.base import Batch, ChatRequest, DeltaBatch, Usage
from app.upstream.continuing import COMPACT_TOKENS, ContinuingUpstream

BROKEN = UpstreamError("broken", kind="broken")
REFUSED = UpstreamError("unreachable", kind="connect")


@dataclass
class Script:
    """One upstream answer: its batches, then its end (an error, or finish_reason + usage)."""

    batches: list[Batch]
    error: GatewayError | None = None
    finish_reason: str | None = "length"
    usage: Usage | None = None


@dataclass
class ScriptedStream:
    script: Script
    finish_reason: str | None = None
    usage: Usage | None = None
    closed: int = 0
    dropped_more_than_text: bool = False

    def __aiter__(self) -> ScriptedStream:
        return self

    async def __anext__(self) -> Batch:
        if self.script.batches:
            return self.script.batches.pop(0)
        if self.script.error is not None:
            raise self.script.error
        self.finish_reason, self.usage = self.script.finish_reason, self.script.usage
        raise StopAsyncIteration

    def mark_failed(self) -> None:
        return None

    async def aclose(self) -> None:
        self.closed += 1


@dataclass
class ScriptedUpstream:
    """Each `open` takes the next script: a Script answers, a GatewayError is raised by the open itself."""

    scripts: list[Script | GatewayError]
    name: str = "scripted"
    requests: list[ChatRequest] = field(default_factory=list)
    streams: list[ScriptedStream] = field(default_factory=list)

    async def open(
        self, request: ChatRequest, *, max_batch: int, headers: Mapping[str, str] | None = None
    ) -> ScriptedStream:
        self.requests.append(request)
        script = self.scripts.pop(0)
        if isinstance(script, GatewayError):
            raise script
        self.streams.append(ScriptedStream(script))
        return self.streams[-1]

    async def aclose(self) -> None:
        return None


def _run(upstream: ScriptedUpstream, request: ChatRequest, attempts: int = 2) -> tuple[list[Batch], Exception | None]:
    """Relay the whole stream; what came out, and the error it ended with."""

    async def run() -> tuple[list[Batch], Exception | None]:
        stream = await ContinuingUpstream(upstream, max_attempts=attempts).open(request, max_batch=100)
        out: list[Batch] = []
        try:
            async for batch in stream:
                out.append(batch)
        except GatewayError as error:
            return out, error
        finally:
            await stream.aclose()
        return out, None

    return asyncio.run(run())


def _request(max_tokens: int = 6, **extra: object) -> ChatRequest:
    return ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=max_tokens, **extra)  # type: ignore[arg-type]


def test_a_broken_stream_continues_after_its_last_token() -> None:
    upstream = ScriptedUpstream(
        [Script([["a "], ["b ", "c "]], error=BROKEN), Script([["d ", "e "], ["f "]], usage=Usage(12, 3))]
    )
    out, error = _run(upstream, _request())
    assert error is None
    assert out == [["a "], ["b ", "c "], ["d ", "e "], ["f "]]
    continued = upstream.requests[1]
    assert (continued.continuation_text, continued.continuation_tokens, continued.max_tokens) == ("a b c ", 3, 6)
    assert [s.closed for s in upstream.streams] == [1, 1]  # the broken one closed once, before the continuation


def test_usage_counts_the_whole_answer() -> None:
    async def run() -> Usage | None:
        upstream = ScriptedUpstream([Script([["a "]], error=BROKEN), Script([["b "]], usage=Usage(7 + 1, 1))])
        stream = await ContinuingUpstream(upstream, max_attempts=2).open(_request(2), max_batch=100)
        async for _ in stream:
            pass
        await stream.aclose()
        return stream.usage

    assert asyncio.run(run()) == Usage(7, 2)


def test_a_handed_over_request_keeps_its_own_text_first() -> None:
    upstream = ScriptedUpstream(
        [Script([["c "]], error=BROKEN), Script([["d "]], error=BROKEN), Script([["e "]], finish_reason="stop")]
    )
    _, error = _run(upstream, _request(continuation_text="a b ", continuation_tokens=2), attempts=3)
    assert error is None
    assert [(r.continuation_text, r.continuation_tokens) for r in upstream.requests] == [
        ("a b ", 2),
        ("a b c ", 3),
        ("a b c d ", 4),
    ]


@pytest.mark.parametrize(
    "first",
    [
        Script([], error=BROKEN),  # before the first token: the guard's retry, not ours
        Script([["a "]], error=UpstreamError("error event", kind="error_event")),
        Script([["a "]], error=UpstreamError("garbled", kind="malformed")),
        Script([["a "], DeltaBatch([{"tool_calls": [{"index": 0}]}])], error=BROKEN),
    ],
    ids=["before the first token", "error event", "malformed", "tool calls"],
)
def test_what_is_not_continued(first: Script) -> None:
    error = first.error
    upstream = ScriptedUpstream([first])
    _, ended = _run(upstream, _request())
    assert ended is error
    assert len(upstream.requests) == 1


def test_opens_that_find_no_server_use_the_attempts_then_the_original_error_ends_it() -> None:
    upstream = ScriptedUpstream([Script([["a "]], error=BROKEN), REFUSED, Script([["b "]], error=BROKEN), REFUSED])
    out, ended = _run(upstream, _request(), attempts=3)
    assert out == [["a "], ["b "]]
    assert ended is BROKEN
    assert len(upstream.requests) == 4  # the first open and three attempts


def test_a_server_that_cannot_continue_ends_it_at_once() -> None:
    rejected = UpstreamRejectedError("refused (HTTP 400)", upstream_status=400)
    upstream = ScriptedUpstream([Script([["a "]], error=BROKEN), rejected, Script([["b "]])])
    _, ended = _run(upstream, _request(), attempts=2)
    assert ended is BROKEN
    assert ended.__cause__ is rejected
    assert len(upstream.requests) == 2


def test_an_answer_that_had_ended_is_not_continued() -> None:
    ended_before_break = Script([["a "]], error=BROKEN)
    upstream = ScriptedUpstream([ended_before_break])

    async def run() -> str | None:
        stream = await ContinuingUpstream(upstream, max_attempts=2).open(_request(), max_batch=100)
        upstream.streams[0].finish_reason = "stop"  # the finish chunk came, then the connection broke
        assert [batch async for batch in stream] == [["a "]]
        return stream.finish_reason

    assert asyncio.run(run()) == "stop"
    assert len(upstream.requests) == 1


def test_a_break_after_the_last_token_ends_with_length() -> None:
    upstream = ScriptedUpstream([Script([["a ", "b "]], error=BROKEN)])

    async def run() -> str | None:
        stream = await ContinuingUpstream(upstream, max_attempts=2).open(_request(2), max_batch=100)
        assert [batch async for batch in stream] == [["a ", "b "]]
        return stream.finish_reason

    assert asyncio.run(run()) == "length"
    assert len(upstream.requests) == 1


def test_a_long_answer_is_kept_compacted() -> None:
    tokens = [[f"t{i} "] for i in range(COMPACT_TOKENS * 2 + 5)]
    upstream = ScriptedUpstream([Script(list(tokens), error=BROKEN), Script([["end "]])])
    _, error = _run(upstream, _request(len(tokens) + 1))
    assert error is None
    assert upstream.requests[1].continuation_text == "".join(t[0] for t in tokens)
