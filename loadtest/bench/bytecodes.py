"""Bytecodes the relay executes per token: the hot path's cost as a count, the same on every run.

CPU per token (the benchmark's headline) is noisy on a shared machine, and a few dozen bytecodes per token
hide in that noise while they add up: on the 2-core VM, 70 fewer per token cut the gateway's CPU per token
by about a tenth, because under load every stream's objects are cold in the cache when its next token comes.

This drives one `/stream` generation through the real per-token path — the built-in mock (on a virtual clock,
so every batch is one token, the common batch at a model's pace), the upstream guard, the relay's pump, the
SSE transport's writer, the seed encoder with event ids, the resume log's append — and counts the bytecodes
executed in the gateway's own code (`app/`) per token once the stream is relaying. The ASGI `send` below it is
uvicorn's, the same for the raw ASGI app, and is not counted. Run: `python -m loadtest.bench.bytecodes`.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, cast

from starlette.types import Message

import app
from app.errors import GatewayError
from app.policies.breaker import CircuitBreaker
from app.policies.retry import RetryPolicy
from app.resume.store import Backend, ResumeStore, StreamMeta
from app.streaming.encoders import SeedEncoder
from app.streaming.run import pump
from app.streaming.session import StreamSession
from app.streaming.transports import HTTPTransport
from app.upstream.base import ChatRequest
from app.upstream.guard import GuardedUpstream
from app.upstream.mock import MockUpstream

APP_DIR = str(Path(app.__file__).parent) + os.sep
STREAM_ID = "0123456789abcdef0123456789abcdef"
TOKENS = 200
MOCK_PARTS = ("MockStream.", "MockAnswer.")  # the built-in model server's own share of the count
PACE_TOKENS_PER_SECOND = 20.0


class VirtualClock:
    """The mock's clock: a sleep moves it and returns at once (nothing waits, every batch holds one token)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def time(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.now += max(0.0, delay)


def _opcode_counter(counts: Counter[str]) -> Callable[[FrameType, str, Any], Any]:
    """A `sys.settrace` tracer that counts opcodes per function of the gateway's own code."""

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        if not frame.f_code.co_filename.startswith(APP_DIR):
            return None  # neither its lines nor its opcodes
        frame.f_trace_opcodes = True
        if event == "opcode":
            counts[frame.f_code.co_qualname] += 1
        return trace

    return trace


class _NoBackend:
    """The store is never flushed while the count runs: its backend is never called."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the backend was used ({name})")  # pragma: no cover


async def _drop(message: Message) -> None:
    return None


async def _never() -> Message:
    raise AssertionError("the relay does not read the request while it writes")  # pragma: no cover


def _no_error_response(error: GatewayError) -> Any:
    raise AssertionError(f"refused: {error}")  # pragma: no cover


async def _count(tokens: int, resume: bool) -> Counter[str]:
    clock = VirtualClock()
    mock = MockUpstream(tokens_per_second=PACE_TOKENS_PER_SECOND, first_token_ms=0, clock=clock.time, sleep=clock.sleep)
    guard = GuardedUpstream(mock, CircuitBreaker("mock"), RetryPolicy())
    request = ChatRequest("gpt-4o-mini", [{"role": "user", "content": "hello"}], tokens)
    stream = await guard.open(request, max_batch=16)
    session = StreamSession(stream_id=STREAM_ID, endpoint="/stream", model=request.model, client="c", now=clock.now)
    transport = HTTPTransport({"type": "http"}, _never, _drop, session=session, error_response=_no_error_response)
    store = ResumeStore(cast(Backend, _NoBackend()), flush_interval_s=0.1, max_events=tokens + 2)  # never flushed here
    log = store.open(StreamMeta(STREAM_ID, request.model, request.messages, tokens)) if resume else None
    encoder = SeedEncoder(STREAM_ID if resume else None)
    write = transport.writer(encoder.tokens, log, None)
    await write(await stream.__anext__())  # the first batch settles the breaker's permit: not the steady state
    counts: Counter[str] = Counter()
    outer = sys.gettrace()  # a debugger's or coverage's tracer is put back afterwards
    sys.settrace(_opcode_counter(counts))
    try:
        await pump(session, stream, write, clock.time)
    finally:
        sys.settrace(outer)
    return counts


def relay_bytecodes(tokens: int = TOKENS, *, resume: bool = True) -> tuple[float, dict[str, float]]:
    """Bytecodes per token of the gateway's code once a stream relays, total and per function (most first).

    `resume`: the shipped default (event ids and the resume log's append); False as with RESUME_ENABLED=false.
    """
    counts = asyncio.run(_count(tokens, resume))
    relayed = tokens - 1
    per_function = {name: n / relayed for name, n in counts.most_common()}
    return sum(counts.values()) / relayed, per_function


def main() -> None:
    for resume in (True, False):
        total, per_function = relay_bytecodes(resume=resume)
        mock = sum(n for name, n in per_function.items() if name.startswith(MOCK_PARTS))
        print(
            f"resume {'on' if resume else 'off'}: {total:.1f} bytecodes per token in app/, of which the built-in "
            f"mock (not run with a real model server) {mock:.1f}"
        )
        for name, n in per_function.items():
            print(f"  {n:6.1f}  {name}")


if __name__ == "__main__":
    main()
