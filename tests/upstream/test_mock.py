"""The built-in mock's output, pinned: known answers written out here, so a change to its text (or to the
copy of its word function the load test checks against) shows up, instead of moving the oracle that the
relay and resume tests compare with (`mock_tokens`). Its pacing is pinned on virtual time (a sleep moves the
clock, nothing waits): when each batch comes and what it holds. Pacing changes how tokens are batched, never
what they are: the same answers come from a paced gateway and an unpaced one, over every protocol."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from app.upstream.base import ChatRequest
from app.upstream.mock import MockUpstream, mock_tokens
from loadtest.stream_check import mock_text
from tests.conftest import Gateway, launch_gateway, sse_data

HELLO_12 = [
    "This ",
    "is ",
    "a ",
    "streaming ",
    "response ",
    "for: ",
    "hello ",
    "budget ",
    "of ",
    "never ",
    "their ",
    "café ",
]
UTF8_9 = ["This ", "is ", "a ", "streaming ", "response ", "for: ", "日本語のプロンプト ", "while ", "and "]
LONG_10 = ["This ", "is ", "a ", "streaming ", "response ", "for: ", "x" * 40 + " ", "🚀 ", "in ", "through "]


def test_known_answers() -> None:
    assert mock_tokens("hello", 0, 12) == HELLO_12
    assert mock_tokens("日本語のプロンプト", 0, 9) == UTF8_9
    assert mock_tokens("x" * 100, 0, 10) == LONG_10  # the prompt is quoted up to 40 characters
    assert mock_tokens("hello", 9, 14) == ["never ", "their ", "café ", "réseau ", "the "]  # any position, alone


def test_the_load_tests_copy_agrees() -> None:
    assert mock_text("hello", 12) == "".join(HELLO_12)
    assert mock_text("日本語のプロンプト", 9) == "".join(UTF8_9)


class VirtualTime:
    """A clock and sleep for the mock, on virtual time: a sleep moves the clock, nothing waits."""

    def __init__(self, *, oversleep: float = 0.0) -> None:
        self.now = 1000.0
        self.oversleep = oversleep  # how late every sleep wakes (a loop busy with other streams)

    def time(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.now += max(0.0, delay) + (self.oversleep if delay > 0 else 0.0)

    def mock(self, *, tokens_per_second: float, first_token_ms: float) -> MockUpstream:
        return MockUpstream(
            tokens_per_second=tokens_per_second, first_token_ms=first_token_ms, clock=self.time, sleep=self.sleep
        )


@pytest.fixture
def virtual_time() -> VirtualTime:
    return VirtualTime()


def batches(
    clock: VirtualTime,
    upstream: MockUpstream,
    max_tokens: int,
    *,
    max_batch: int = 100,
    reader_pauses: dict[int, float] | None = None,
) -> list[tuple[float, list[str]]]:
    """Each batch the mock returns, with the virtual time it came (relative to the request)."""

    async def run() -> list[tuple[float, list[str]]]:
        start = clock.now
        stream = await upstream.open(
            ChatRequest("m", [{"role": "user", "content": "hello"}], max_tokens), max_batch=max_batch
        )
        got = []
        async for batch in stream:
            got.append((round(clock.now - start, 6), batch))
            clock.now += (reader_pauses or {}).get(len(got), 0.0)  # a reader busy elsewhere before its next read
        return got

    return asyncio.run(run())


def test_pacing_by_schedule(virtual_time: VirtualTime) -> None:
    # 10 tok/s after a 50 ms first token: token i is due at 0.05 + i/10; a late reader gets every due token at once
    paced = batches(
        virtual_time, virtual_time.mock(tokens_per_second=10, first_token_ms=50), 8, reader_pauses={2: 0.33}
    )
    assert paced == [
        (0.05, ["This "]),
        (0.15, ["is "]),
        (0.48, ["a ", "streaming ", "response "]),
        (0.55, ["for: "]),
        (0.65, ["hello "]),
        (0.75, ["budget "]),
    ]


def test_a_late_wake_up_gets_every_due_token_at_once() -> None:
    # every sleep wakes 250 ms late: each wake-up returns the tokens due by then in one batch (one write), as the
    # raw ASGI app the benchmark compares with does
    late = VirtualTime(oversleep=0.25)
    paced = batches(late, late.mock(tokens_per_second=10, first_token_ms=50), 8)
    assert paced == [
        (0.3, ["This ", "is ", "a "]),
        (0.6, ["streaming ", "response ", "for: "]),
        (0.9, ["hello ", "budget "]),
    ]


def test_a_batch_never_exceeds_max_batch(virtual_time: VirtualTime) -> None:
    paced = batches(
        virtual_time,
        virtual_time.mock(tokens_per_second=10, first_token_ms=50),
        6,
        max_batch=2,
        reader_pauses={1: 0.98},
    )
    assert paced == [(0.05, ["This "]), (1.03, ["is ", "a "]), (1.03, ["streaming ", "response "]), (1.03, ["for: "])]


def test_unpaced_after_the_first_token(virtual_time: VirtualTime) -> None:
    unpaced = batches(virtual_time, virtual_time.mock(tokens_per_second=0, first_token_ms=50), 150)
    assert [(at, len(batch)) for at, batch in unpaced] == [(0.05, 64), (0.05, 64), (0.05, 22)]
    assert [token for _, batch in unpaced for token in batch] == mock_tokens("hello", 0, 150)


@pytest.fixture(scope="module", params=[0, 200], ids=["unpaced", "paced"])
def gateway(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = launch_gateway(
        {"MOCK_TOKENS_PER_SECOND": request.param, "MOCK_FIRST_TOKEN_MS": 5},
        tmp_path_factory.mktemp("gateway") / "gateway.log",
    )
    yield gateway
    gateway.stop()


def test_stream_answers(gateway: Gateway) -> None:
    response = httpx.post(gateway.url + "/stream", json={"prompt": "hello", "max_tokens": 12}, timeout=30)
    events = [json.loads(data) for data in sse_data(response.text)]
    assert [e["content"] for e in events if e["type"] == "token"] == HELLO_12
    assert events[-1] == {"type": "done", "tokens": 12}


def test_chat_answers(gateway: Gateway) -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "日本語のプロンプト"}], "max_tokens": 9}
    answer = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=30).json()
    assert answer["choices"][0]["message"]["content"] == "".join(UTF8_9)
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 9


def test_websocket_answers(gateway: Gateway) -> None:
    with connect(gateway.url.replace("http://", "ws://") + "/ws") as ws:
        ws.send(json.dumps({"prompt": "x" * 100, "max_tokens": 10}))
        frames: list[dict[str, Any]] = []
        while not frames or frames[-1]["type"] not in ("done", "error"):
            frames.append(json.loads(ws.recv(timeout=30)))
    assert [f["content"] for f in frames if f["type"] == "token"] == LONG_10
    assert frames[-1] == {"type": "done", "tokens": 10}
