"""The built-in mock model server: deterministic text, exact token counts, realistic pacing.

Token `i` of a prompt is a pure function of (prompt, i), so every worker and every replica
produces the same text for the same prompt, and a stream can be continued from any position.
Pacing is by schedule, not by sleeping a fixed gap per token: token `i` is due at
`start + first_token + i / tokens_per_second`, and every token already due is returned in one
batch. A loaded event loop therefore catches up instead of drifting, and writes are coalesced.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping

from app.policies.clock import ASYNC_SLEEP, Clock, Sleep
from app.upstream.base import ChatRequest, Usage

# Mixed ASCII and multi-byte words, so clients and tests meet 2-, 3- and 4-byte UTF-8.
VOCABULARY = (
    "the",
    "stream",
    "of",
    "tokens",
    "flows",
    "through",
    "a",
    "gateway",
    "that",
    "never",
    "drops",
    "one",
    "while",
    "clients",
    "read",
    "at",
    "their",
    "own",
    "pace",
    "and",
    "servers",
    "roll",
    "over",
    "café",
    "naïve",
    "über",
    "日本語",
    "模型",
    "🚀",
    "données",
    "réseau",
    "latency",
    "budget",
    "is",
    "kept",
    "in",
    "check",
)
WORDS = tuple(word + " " for word in VOCABULARY)
N_WORDS = len(WORDS)
UNPACED_BATCH = 64  # tokens per batch when pacing is off (MOCK_TOKENS_PER_SECOND=0)
# After the intro, token i of a prompt is WORDS[(seed + 7 i) % N_WORDS]: one of N_WORDS cycles, by seed % N_WORDS.
# Laid out once here, so a stream holds a reference to its cycle, not a copy.
_CYCLES = tuple(tuple(WORDS[(offset + i * 7) % N_WORDS] for i in range(N_WORDS)) for offset in range(N_WORDS))


class MockAnswer:
    """The mock's answer to one prompt; the per-prompt work (a hash, the intro) is done once per stream."""

    __slots__ = ("_intro", "_intro_length", "_cycle")

    def __init__(self, prompt: str) -> None:
        self._intro = [word + " " for word in f"This is a streaming response for: {prompt[:40]}".split()]
        self._intro_length = len(self._intro)
        seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big")
        self._cycle = _CYCLES[seed % N_WORDS]

    def token(self, i: int) -> str:
        """Token `i` (a word plus a space)."""
        return self._intro[i] if i < self._intro_length else self._cycle[i % N_WORDS]

    def tokens(self, start: int, stop: int) -> list[str]:
        """Tokens `start..stop-1`."""
        return [self.token(i) for i in range(start, stop)]


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():  # a stream cut while it waited has its waiter cancelled already
        waiter.set_result(None)


def mock_tokens(prompt: str, start: int, stop: int) -> list[str]:
    """Tokens `start..stop-1` of the mock's answer to `prompt` (each a word plus a space)."""
    return MockAnswer(prompt).tokens(start, stop)


class MockStream:
    __slots__ = (
        "_prompt",
        "_answer",
        "_total",
        "_next",
        "_resumed_at",
        "_first_at",
        "_due",
        "_gap",
        "_max_batch",
        "finish_reason",
        "usage",
        "dropped_more_than_text",
        "_clock",
        "_sleep",
        "_loop",
    )

    def __init__(
        self,
        request: ChatRequest,
        *,
        tokens_per_second: float,
        first_token_s: float,
        max_batch: int,
        clock: Clock | None = None,
        sleep: Sleep | None = None,
    ) -> None:
        # On the running loop's own clock, a paced token waits on a timer of its own (see __anext__); a
        # virtual clock (tests, the hot-path measure) waits through the `sleep` it comes with.
        self._loop = asyncio.get_running_loop() if clock is None and sleep is None else None
        self._clock = clock or asyncio.get_running_loop().time
        self._sleep = sleep or ASYNC_SLEEP
        self._prompt = request.prompt_text
        self._answer = MockAnswer(self._prompt)
        self._total = request.max_tokens
        self._next = request.continuation_tokens  # token i depends only on (prompt, i): continuing is exact
        self._resumed_at = self._next
        self._first_at = self._due = self._clock() + first_token_s  # `_due`: when token `_next` is due
        self._gap = 1.0 / tokens_per_second if tokens_per_second > 0 else 0.0
        self._max_batch = max_batch
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.dropped_more_than_text = False  # the mock makes text only

    def __aiter__(self) -> MockStream:
        return self

    async def __anext__(self) -> list[str]:
        start = self._next
        if start >= self._total:
            self.finish_reason = "length"
            self.usage = Usage(len(self._prompt.split()), self._total)
            raise StopAsyncIteration
        gap = self._gap
        if gap:
            due = self._due
            now = self._clock()
            if due > now:
                loop = self._loop
                if loop is None:
                    await self._sleep(due - now)
                else:  # asyncio.sleep(due - now) without its frame and its running-loop lookup (a getpid call)
                    waiter = loop.create_future()
                    timer = loop.call_at(due, _wake, waiter)
                    try:
                        await waiter
                    finally:
                        timer.cancel()
                now = self._clock()  # a loop that woke late returns every token due by now in this batch
            if now < due + gap:  # the next one is not due yet: this token alone (the common case, kept lean)
                self._next, self._due = start + 1, due + gap
                return [self._answer.token(start)]
            count = int((now - self._first_at) / gap) + 1 - (start - self._resumed_at)
        else:
            now = self._clock()
            if start == self._resumed_at and self._first_at > now:
                await self._sleep(self._first_at - now)
            else:
                await self._sleep(0)  # stay cooperative when unpaced
            count = UNPACED_BATCH
        stop = min(self._total, start + max(1, min(count, self._max_batch)))
        self._next = stop
        self._due = self._first_at + (stop - self._resumed_at) * gap
        return self._answer.tokens(start, stop)

    def mark_failed(self) -> None:
        return None

    async def aclose(self) -> None:
        self._next = self._total


class MockUpstream:
    """The default upstream (UPSTREAM_URL unset). `clock` and `sleep` default to the running loop's (tests and the
    hot-path measure pass virtual ones)."""

    name = "mock"

    def __init__(
        self,
        *,
        tokens_per_second: float,
        first_token_ms: float,
        clock: Clock | None = None,
        sleep: Sleep | None = None,
    ) -> None:
        self._tps = tokens_per_second
        self._first_s = first_token_ms / 1000.0
        self._clock, self._sleep = clock, sleep

    async def open(
        self, request: ChatRequest, *, max_batch: int, headers: Mapping[str, str] | None = None
    ) -> MockStream:
        return MockStream(
            request,
            tokens_per_second=self._tps,
            first_token_s=self._first_s,
            max_batch=max_batch,
            clock=self._clock,
            sleep=self._sleep,
        )

    async def aclose(self) -> None:
        return None
