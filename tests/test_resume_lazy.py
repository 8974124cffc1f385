"""Lazy resume writes against the real gateway: a stream whose client is connected keeps its events in memory for
RESUME_WRITE_DELAY_SECONDS (here far longer than the stream), yet whoever reads the store gets them as they come.

- A second client resuming a live stream while the original client is still connected (a half-open connection,
  as the producer sees it) gets its tokens while the stream runs, not in one burst at its end: its new reader
  mark is announced (on a channel of its own, apart from stops), and the producer writes that stream every flush
  from then on. Local store (any worker of the instance) and Redis (another instance).
- A stream whose client left is written every flush, with nobody reading it yet.

The order of events is what is asserted (the resumed client is ahead before the original one ends), never a time.
Once it is, the stream is stopped by its owner (`DELETE /stream/{id}`): nothing more is learnt from its end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loadtest.harness.redis import RedisServer, started_redis
from tests.conftest import PATIENT_REDIS, Gateway, GatewayFactory
from tests.test_resume import GUARD_S, Event, SSEParser, expected_text, tokens_of, wait_for

TOKENS = 60  # 6 s at 10 tok/s
CURSOR = 5  # tokens the original client has when the second one resumes after them
AHEAD = 3  # tokens beyond its cursor the resumed client gets while the original stream still runs
LAZY = {
    "RESUME_WRITE_DELAY_SECONDS": 120,  # longer than the stream: without a reader's ring, nothing would come early
    "MOCK_TOKENS_PER_SECOND": 10,
    "MOCK_FIRST_TOKEN_MS": 0,
    "ORPHAN_TIMEOUT_SECONDS": 30,
}
CANCELLED = {"type": "error", "code": "cancelled", "message": "the stream's owner stopped this generation"}


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    yield from started_redis(tmp_path)


async def _read(response: httpx.Response, into: list[Event]) -> None:
    """The response's events, appended to `into` as they arrive (the caller reads the list meanwhile)."""
    assert response.status_code == 200, await response.aread()
    parser = SSEParser()
    async for line in response.aiter_lines():
        event = parser.feed(line)
        if event is not None:
            into.append(event)


def _ended(events: list[Event]) -> bool:
    return any(e.data["type"] in ("done", "error") for e in events)


async def _read_twice(
    origin: Gateway, resumer: Gateway, prompt: str
) -> tuple[list[Event], list[Event], list[Event], bool]:
    """The original stream and, once it has CURSOR tokens, a resume of it after them by a second client while
    the first stays connected; once the resumed client has AHEAD tokens beyond its cursor, the stream is stopped
    (through `resumer`). Returns (original's events, those it had at the resume, resumed events, did the original
    end before the resumed client had AHEAD tokens beyond its cursor)."""
    original: list[Event] = []
    resumed: list[Event] = []
    async with httpx.AsyncClient(timeout=GUARD_S) as client:
        async with client.stream("POST", f"{origin.url}/stream", json={"prompt": prompt, "max_tokens": TOKENS}) as r:
            stream_id = r.headers["x-stream-id"]
            reading = asyncio.create_task(_read(r, original))
            async with asyncio.timeout(GUARD_S):
                while len(tokens_of(original)) < CURSOR:
                    await asyncio.sleep(0.01)  # polling interval, not an assertion
            before, cursor = list(original), original[-1].id
            assert cursor is not None and not _ended(original)
            ended_first: bool | None = None
            async with client.stream(
                "GET", f"{resumer.url}/stream/{stream_id}", headers={"Last-Event-ID": cursor}
            ) as resume:
                assert resume.status_code == 200
                parser = SSEParser()
                async for line in resume.aiter_lines():
                    event = parser.feed(line)
                    if event is None:
                        continue
                    resumed.append(event)
                    if ended_first is None and len(tokens_of(resumed)) == AHEAD:
                        ended_first = _ended(original)
                        stop = await client.delete(f"{resumer.url}/stream/{stream_id}")
                        assert stop.status_code == 200, stop.text
                        assert stop.json() == {"stream_id": stream_id, "final": CANCELLED}
            async with asyncio.timeout(GUARD_S):
                await reading
    assert ended_first is not None, resumed
    return original, before, resumed, ended_first


def _check(original: list[Event], before: list[Event], after: list[Event], ended_first: bool, prompt: str) -> None:
    assert not ended_first  # the resumed client got tokens as they came, not in one burst at the end
    # `after` holds exactly the events after `before`'s last one, in order, up to the stop; the text is whole
    seqs = [e.seq for e in before + after]
    assert seqs == list(range(len(seqs))), seqs  # no gap, no duplicate
    assert after[-1].data == CANCELLED
    tokens = tokens_of(before + after)
    assert len(tokens) < TOKENS and "".join(tokens) == expected_text(prompt, len(tokens))
    assert [(e.id, e.data) for e in original] == [(e.id, e.data) for e in before + after]  # what the first one got


def test_a_resumed_tail_of_a_stream_whose_client_is_still_connected_gets_its_tokens_as_they_come(
    start_gateway: GatewayFactory,
) -> None:
    gateway = start_gateway(**LAZY)
    prompt = "read twice at once"
    _check(*asyncio.run(_read_twice(gateway, gateway, prompt)), prompt)


def test_the_same_on_another_instance_with_the_redis_store(
    start_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    shared = {"RESUME_STORE": "redis", "REDIS_URL": redis_server.url, **PATIENT_REDIS, **LAZY}
    a, b = start_gateway(**shared), start_gateway(**shared)
    prompt = "read twice at once, on two instances"
    _check(*asyncio.run(_read_twice(a, b, prompt)), prompt)


def test_a_stream_whose_client_left_is_written_every_flush_before_anyone_reads_it(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    directory = tmp_path / "resume"
    gateway = start_gateway(RESUME_DIR=str(directory), **LAZY)
    with httpx.Client(timeout=GUARD_S) as client:
        with client.stream("POST", f"{gateway.url}/stream", json={"prompt": "left", "max_tokens": TOKENS}) as r:
            stream_id = r.headers["x-stream-id"]
            next(line for line in r.iter_lines() if line.endswith(f"-{CURSOR}"))
        # the client is gone: its generation runs on, and its log is what a returning client will read
        log = directory / f"{stream_id}.sse"

        def written_tokens() -> bytes | None:
            data = log.read_bytes() if log.exists() else b""
            return data if data.count(b'"type": "token"') >= CURSOR + AHEAD else None

        data = wait_for(written_tokens, "the orphan's tokens reached its log")
        stop = client.delete(f"{gateway.url}/stream/{stream_id}")  # nothing more to learn from its end
        assert stop.status_code == 200, stop.text
    assert b'"type": "done"' not in data  # written while it ran, not at its end
