"""Resumable /stream against real gateways (gunicorn, 2 workers) and a real redis-server.

A client that leaves mid-stream and comes back with `Last-Event-ID` through `GET /stream/{id}`
gets exactly the events it missed, in order, then `done`; the text it assembled equals the mock's
uninterrupted answer (`mock_tokens` is deterministic). Same instance with the local store, any
instance with the Redis store. Waits are polled conditions; timeouts are guards.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.resume.progress import Progress, parse_log
from app.resume.redis_streams import RedisStreamsBackend
from app.resume.store import ResumeStore, StreamMeta
from app.storage.errors import StorageError
from app.storage.redis import LazyRedis
from app.streaming.encoders import SeedEncoder
from app.upstream.mock import mock_tokens
from loadtest.harness.redis import RedisServer, started_redis
from tests.conftest import PATIENT_REDIS, Gateway, GatewayFactory
from tests.workers import only_worker, worker_pids

GUARD_S = 30.0  # guard only: how long a polled condition may take before the test fails
RESUMABLE = {"ORPHAN_TIMEOUT_SECONDS": 30, "DRAIN_TIMEOUT_SECONDS": 1, "MOCK_FIRST_TOKEN_MS": 5}


# --- redis-server ---------------------------------------------------------------------------------


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    yield from started_redis(tmp_path)


def wait_for(condition: Callable[[], object], what: str, timeout: float = GUARD_S) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.05)  # polling interval, not an assertion


# --- SSE ------------------------------------------------------------------------------------------


@dataclass
class Event:
    id: str | None
    data: dict[str, Any]

    @property
    def seq(self) -> int:
        assert self.id is not None
        return int(self.id.rsplit("-", 1)[1])


class SSEParser:
    """Line by line, the events of an SSE body as EventSource sees them (comments skipped)."""

    def __init__(self) -> None:
        self.id: str | None = None
        self.data: list[str] = []

    def feed(self, line: str) -> Event | None:
        if line.startswith("id: "):
            self.id = line[4:]
        elif line.startswith("data: "):
            self.data.append(line[6:])
        elif not line and self.data:
            event = Event(self.id, json.loads("\n".join(self.data)))
            self.id, self.data = None, []
            return event
        elif not line:
            self.id = None
        return None


def sse_events(lines: Iterable[str]) -> Iterator[Event]:
    parser = SSEParser()
    for line in lines:
        event = parser.feed(line)
        if event is not None:
            yield event


def tokens_of(events: Iterable[Event]) -> list[str]:
    return [e.data["content"] for e in events if e.data["type"] == "token"]


def expected_text(prompt: str, max_tokens: int) -> str:
    return "".join(mock_tokens(prompt, 0, max_tokens))


def read_until(
    client: httpx.Client, method: str, url: str, stop: Callable[[list[Event]], bool], **kwargs: Any
) -> tuple[list[Event], httpx.Headers]:
    """Open a stream, read events until `stop(events)`, then drop the connection (a client going away)."""
    events: list[Event] = []
    with client.stream(method, url, **kwargs) as r:
        assert r.status_code == 200, r.read()
        for event in sse_events(r.iter_lines()):
            events.append(event)
            if stop(events):
                break
        return events, r.headers


def resume(client: httpx.Client, base: str, stream_id: str, last_event_id: str | None) -> list[Event]:
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    with client.stream("GET", f"{base}/stream/{stream_id}", headers=headers) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["x-stream-id"] == stream_id
        return list(sse_events(r.iter_lines()))


def assert_continues(before: list[Event], after: list[Event], prompt: str, max_tokens: int) -> None:
    """`after` holds exactly the events after `before`'s last one, in order, ending with done; the text is whole."""
    seqs = [e.seq for e in before + after]
    assert seqs == list(range(len(seqs))), seqs  # no gap, no duplicate
    assert after[-1].data == {"type": "done", "tokens": max_tokens}
    assert "".join(tokens_of(before + after)) == expected_text(prompt, max_tokens)


def metric_total(gateway: Gateway, name: str, labels: str = "") -> float:
    text = httpx.get(gateway.metrics_url + "/metrics").text
    pattern = re.compile(rf"^{re.escape(name)}(\{{.*\}})? (\S+)$", re.M)
    return sum(float(value) for found, value in pattern.findall(text) if labels in found)


def interrupted_stream(
    client: httpx.Client, gateway: Gateway, prompt: str, max_tokens: int, keep: int
) -> tuple[str, list[Event]]:
    """Start a stream, read its status and `keep` tokens, then leave."""
    events, headers = read_until(
        client,
        "POST",
        gateway.url + "/stream",
        lambda evs: len(tokens_of(evs)) >= keep,
        json={"prompt": prompt, "max_tokens": max_tokens},
    )
    return headers["x-stream-id"], events


def assert_refused(client: httpx.Client, gateway: Gateway, stream_id: str) -> None:
    """Unknown streams are 404 not_resumable; an event id of another stream is 422."""
    r = client.get(f"{gateway.url}/stream/{'0' * 32}")
    assert r.status_code == 404
    assert r.json()["code"] == "not_resumable"
    r = client.get(f"{gateway.url}/stream/{stream_id}", headers={"Last-Event-ID": "someoneelse-3"})
    assert r.status_code == 422
    assert r.json()["code"] == "invalid_request"


# --- tests ----------------------------------------------------------------------------------------


def test_resume_on_the_same_instance(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(MOCK_TOKENS_PER_SECOND=100, **RESUMABLE)
    prompt, max_tokens = "resume here", 80
    with httpx.Client(timeout=GUARD_S) as client:
        stream_id, before = interrupted_stream(client, gateway, prompt, max_tokens, keep=10)
        assert before[0].id == f"{stream_id}-0" and before[0].data["type"] == "status"
        after = resume(client, gateway.url, stream_id, before[-1].id)
        assert_continues(before, after, prompt, max_tokens)
    # a second client replays the whole stream from the start (no Last-Event-ID), from each worker
    for pid in worker_pids(gateway):
        with only_worker(gateway, pid), httpx.Client(timeout=GUARD_S) as client:
            assert_continues([], resume(client, gateway.url, stream_id, None), prompt, max_tokens)
    with httpx.Client(timeout=GUARD_S) as client:
        assert_refused(client, gateway, stream_id)
    assert metric_total(gateway, "streaming_resumptions_total", 'route="/stream/{stream_id}"') == 3
    assert metric_total(gateway, "streaming_replayed_events_total") >= 2 * (max_tokens + 2)


def test_resume_on_another_instance(start_gateway: GatewayFactory, redis_server: RedisServer) -> None:
    shared = {
        "RESUME_STORE": "redis",
        "REDIS_URL": redis_server.url,
        **PATIENT_REDIS,
        "MOCK_TOKENS_PER_SECOND": 100,
        **RESUMABLE,
    }
    a, b = start_gateway(**shared), start_gateway(**shared)
    prompt, max_tokens = "resume elsewhere", 80
    with httpx.Client(timeout=GUARD_S) as client:
        stream_id, before = interrupted_stream(client, a, prompt, max_tokens, keep=10)
        after = resume(client, b.url, stream_id, before[-1].id)
        assert_continues(before, after, prompt, max_tokens)
        # a tail: resume at once on B while A still generates a second stream (a long one: 5 s at 100 tok/s)
        long_tokens = 500
        stream_id, before = interrupted_stream(client, a, prompt + " 2", long_tokens, keep=3)
        after = []
        last_id = before[-1].id
        assert last_id is not None
        with client.stream("GET", f"{b.url}/stream/{stream_id}", headers={"Last-Event-ID": last_id}) as r:
            assert r.status_code == 200
            for event in sse_events(r.iter_lines()):
                if not after:  # B has started the tail, and A's generation (the client left it) still runs
                    assert metric_total(a, "streaming_active_connections") == 1
                    assert event.data["type"] == "token"
                after.append(event)
        assert_continues(before, after, prompt + " 2", long_tokens)
        wait_for(lambda: metric_total(a, "streaming_active_connections") == 0, "A's generation ended")
        assert_refused(client, b, stream_id)


def test_orphan_timeout_stops_the_generation(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(
        MOCK_TOKENS_PER_SECOND=20, MOCK_FIRST_TOKEN_MS=5, ORPHAN_TIMEOUT_SECONDS=1, DRAIN_TIMEOUT_SECONDS=1
    )
    prompt, max_tokens = "left alone", 2000
    with httpx.Client(timeout=GUARD_S) as client:
        stream_id, before = interrupted_stream(client, gateway, prompt, max_tokens, keep=3)
        # nobody reads it (a reader would keep it alive: tests/test_resume_orphans.py): it is stopped
        wait_for(lambda: metric_total(gateway, "streaming_active_connections") == 0, "the generation stopped")
        after = resume(client, gateway.url, stream_id, before[-1].id)
    final = after[-1].data
    assert final["type"] == "error" and final["code"] == "orphan_timeout"
    tokens = tokens_of(before + after)
    assert 3 <= len(tokens) < max_tokens
    assert "".join(tokens) == "".join(mock_tokens(prompt, 0, len(tokens)))


def test_redis_down_streams_work_without_resumption(start_gateway: GatewayFactory, redis_server: RedisServer) -> None:
    gateway = start_gateway(RESUME_STORE="redis", REDIS_URL=redis_server.url, MOCK_TOKENS_PER_SECOND=0, **RESUMABLE)
    redis_server.kill()
    prompt = "no redis"
    with httpx.Client(base_url=gateway.url, timeout=GUARD_S) as client:
        ids = []
        for _ in range(6):  # both workers see the outage
            r = client.post("/stream", json={"prompt": prompt, "max_tokens": 20})
            events = list(sse_events(r.text.splitlines()))
            assert events[-1].data == {"type": "done", "tokens": 20}
            assert "".join(tokens_of(events)) == expected_text(prompt, 20)
            ids.append(r.headers["x-stream-id"])
        wait_for(lambda: metric_total(gateway, "streaming_resume_store_errors_total") > 0, "the errors are counted")
        r = client.get(f"/stream/{ids[0]}")
        assert r.status_code == 404
        assert r.json()["code"] == "not_resumable"

        redis_server.start()  # back on the same port: new streams are resumable again

        def resumable_again() -> bool:
            sid = client.post("/stream", json={"prompt": prompt, "max_tokens": 20}).headers["x-stream-id"]
            deadline = time.monotonic() + 1.0  # a few flush intervals
            while time.monotonic() < deadline:
                if client.get(f"/stream/{sid}").status_code == 200:
                    return True
                time.sleep(0.05)  # polling interval, not an assertion
            return False

        wait_for(resumable_again, "streams are resumable again")
    warnings = [json.loads(line) for line in gateway.log().splitlines() if "resume store unavailable" in line]
    pids = [w["pid"] for w in warnings]
    assert warnings and len(pids) == len(set(pids))  # one line per worker per outage, not one per flush


# --- the store and its backends, without a gateway ---------------------------------------------


class FlakyBackend:
    """An in-memory `Backend` whose writes fail while `down`."""

    def __init__(self) -> None:
        self.down = False
        self.data: dict[str, bytes] = {}

    async def write(self, chunks: dict[str, bytes], created: dict[str, str]) -> None:
        if self.down:
            raise StorageError("down")
        for sid, payload in chunks.items():
            self.data[sid] = self.data.get(sid, b"") + payload

    async def read(self, stream_id: str, cursor: str, owner: str) -> tuple[bytes, str] | None:
        if self.down:
            raise StorageError("down")
        if stream_id not in self.data:
            return None
        data = self.data[stream_id][int(cursor or 0) :]
        return data, str(int(cursor or 0) + len(data))

    async def request_stop(self, stream_id: str, ttl_s: float) -> None:
        return None

    async def stop_bell(self) -> object:
        return 0  # never rings: nothing here requests a stop

    async def bells(self) -> tuple[object, set[str] | None]:
        return 0, set()  # nobody here resumes a stream

    async def stops_requested(self, stream_ids: list[str]) -> set[str]:
        return set()

    async def expire(self, stream_id: str) -> None:
        return None

    async def mark_reader(self, stream_id: str, ttl_s: float) -> None:
        return None

    async def readers_seen(self, stream_ids: list[str]) -> set[str]:
        return set()

    async def sweep(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


def test_a_failing_backend_costs_resumption_not_the_stream(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        backend = FlakyBackend()
        store = ResumeStore(backend, flush_interval_s=0.01, max_events=100)
        encoder = SeedEncoder("s1")
        log = store.open(StreamMeta("s1", "m", [], 10))
        log.append(encoder.opening(), 1)
        log.append(encoder.tokens(["a ", "b "]), 2)
        await store.flush()
        backend.down = True
        for _ in range(3):  # one outage, three failed flushes: one warning
            log.append(encoder.tokens(["c "]), 1)
            await store.flush()
        assert not log.resumable
        with pytest.raises(LookupError):
            await anext(store.replay("s1", 0, owner="", poll_s=0.01))
        backend.down = False
        await store.flush()  # back: the stored stream gets its final not_resumable event
        frames = [frame for batch in [b async for b in store.replay("s1", 0, owner="", poll_s=0.01)] for frame in batch]
        events = list(sse_events(b"".join(frames).decode().splitlines()))
        assert tokens_of(events) == ["a ", "b "]
        assert events[-1].data["code"] == "not_resumable" and events[-1].seq == 6  # after every event it had

    caplog.set_level(logging.INFO, logger="app.resume")
    asyncio.run(scenario())
    messages = [r.getMessage() for r in caplog.records if r.name == "app.resume"]
    assert messages == [
        "resume store unavailable: streams continue without resumption",
        "resume store reachable again: new streams are resumable",
    ]


def test_parse_log_keeps_the_first_copy_of_each_seq() -> None:
    encoder = SeedEncoder("s1")
    log = encoder.opening() + encoder.tokens(["a ", "b "])
    again = SeedEncoder("s1", seq=2).tokens(["b ", "c "])  # a claimer that lost its lease wrote seq 2 again
    assert parse_log(log + again, "s1") == Progress("a b c ", 3, 3, False)
    assert parse_log(log + SeedEncoder("s1", seq=5).tokens(["x "]), "s1") is None  # seq 3-4 missing
    assert parse_log(log + SeedEncoder("s1", seq=3).done(2, None, None), "s1") == Progress("a b ", 2, 3, True)


def test_redis_streams_backend(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        redis_client = LazyRedis(redis_server.url)
        backend = RedisStreamsBackend(redis_client, ttl_s=60, prefix="test:", max_entries=100)
        try:
            assert await backend.read("s1", "", "") is None
            await backend.write({"s1": b"one", "s2": b"x"}, {"s1": "owner-a", "s2": ""})
            await backend.write({"s1": b"two"}, {})
            data, cursor = await backend.read("s1", "", "owner-a") or (b"", "")
            assert data == b"onetwo"
            assert await backend.read("s1", "", "owner-b") is None  # someone else's reads as unknown
            assert await backend.read("s1", cursor, "owner-a") == (b"", cursor)  # nothing new after the cursor
            await backend.write({"s1": b"three"}, {})
            assert (await backend.read("s1", cursor, "owner-a") or (b"", ""))[0] == b"three"
            ttl = await redis_client.client().pttl("test:s1")
            assert 0 < ttl <= 60_000
        finally:
            await redis_client.aclose()

    asyncio.run(scenario())
