"""Lazy writes: a connected stream's events wait RESUME_WRITE_DELAY_SECONDS in memory; everything a reader needs
is written on the next flush. On the real backends (a directory, a real redis-server); each `flush()` is one
tick of the flusher, so the delay is counted in flushes and nothing here waits on time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.resume.local import DirectoryBackend
from app.resume.redis_streams import READ_BATCH, RedisStreamsBackend
from app.resume.store import Backend, Generation, HandoverSink, ResumeStore, StreamMeta, split_events
from app.settings import Settings
from app.storage.errors import StorageError
from app.storage.redis import LazyRedis
from app.streaming.encoders import SeedEncoder
from loadtest.harness.redis import RedisServer, started_redis

SID = "0123456789abcdef0123456789abcdef"
OWNER = "owner-a"
INTERVAL_S = 0.1
DELAY_S = 0.5
DELAY_TICKS = 5  # DELAY_S in flushes of INTERVAL_S
TTL_S = 60.0
GUARD_S = 10.0  # guard only: how long a read the test expects to succeed may take

Backends = Callable[[], AbstractAsyncContextManager[Backend]]  # each call: another worker's backend, same storage


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    yield from started_redis(tmp_path)


@pytest.fixture(params=["local", "redis"])
def backends(request: pytest.FixtureRequest, tmp_path: Path) -> Backends:
    if request.param == "local":

        @asynccontextmanager
        async def directory() -> AsyncIterator[Backend]:
            backend = DirectoryBackend(str(tmp_path / "resume"), ttl_s=TTL_S)
            try:
                yield backend
            finally:
                await backend.aclose()

        return directory
    url = request.getfixturevalue("redis_server").url

    @asynccontextmanager
    async def redis() -> AsyncIterator[Backend]:
        client = LazyRedis(url)
        try:
            yield RedisStreamsBackend(client, ttl_s=TTL_S, prefix="test:", max_entries=None)
        finally:
            await client.aclose()

    return redis


class Producer:
    """A generation of the worker as the store sees it (what a stop or a reader mark names)."""

    def __init__(self, stream_id: str) -> None:
        self.id = stream_id
        self.stopped = False

    def reader_seen(self) -> None:
        pass

    def stop(self) -> None:
        self.stopped = True


class Published:
    """A handover sink that takes every stream."""

    def __init__(self) -> None:
        self.streams: list[str] = []

    async def publish(self, meta: StreamMeta) -> bool:
        self.streams.append(meta.stream_id)
        return True


def store_on(
    backend: Backend,
    *,
    delay_s: float = DELAY_S,
    max_events: int = 100,
    handover: HandoverSink | None = None,
    producers: Callable[[], Sequence[Generation]] | None = None,
) -> ResumeStore:
    return ResumeStore(
        backend,
        flush_interval_s=INTERVAL_S,
        write_delay_s=delay_s,
        max_events=max_events,
        handover=handover,
        producers=producers,
        ttl_s=TTL_S,
    )


class Stream:
    """One stream's log and its events, framed as its producer frames them."""

    def __init__(self, store: ResumeStore) -> None:
        self.encoder = SeedEncoder(SID)
        self.log = store.open(StreamMeta(stream_id=SID, model="m", messages=[], max_tokens=10, owner=OWNER))
        self.appended = b""

    def append(self, *texts: str) -> bytes:
        """The opening event (no texts), else one batch of tokens."""
        event = self.encoder.tokens(list(texts)) if texts else self.encoder.opening()
        self.log.append(event, len(texts) or 1)
        self.appended += event
        return event

    def close(self) -> bytes:
        final = self.encoder.done(2, "stop", None)
        self.log.close(final)
        self.appended += final
        return final


async def started(store: ResumeStore) -> Stream:
    """A stream whose opening event was written (a log's first write is at once)."""
    stream = Stream(store)
    stream.append()
    await store.flush()
    return stream


async def stored(backend: Backend) -> bytes | None:
    """What the backend holds of the stream (None: no log of it)."""
    found = await backend.read(SID, "", OWNER)
    return None if found is None else found[0]


def test_a_connected_stream_is_written_when_its_oldest_event_has_waited_the_delay(backends: Backends) -> None:
    async def scenario() -> None:
        async with backends() as backend:
            store = store_on(backend)
            stream = Stream(store)
            stream.append()
            await store.flush()
            written = stream.appended
            assert await stored(backend) == written  # a new log's first write is at once: a resume finds it
            held = stream.append("a ")
            for tick in range(1, DELAY_TICKS):
                await store.flush()
                assert await stored(backend) == written, tick
                if tick == 2:
                    held += stream.append("b ")  # a later event joins the write its stream waits for
                assert store.buffered_bytes == len(held)  # the memory budget counts what waits
            await store.flush()
            assert await stored(backend) == stream.appended
            assert store.buffered_bytes == 0
            written = stream.appended
            stream.append("c ")  # the next event starts a new wait
            for _ in range(DELAY_TICKS - 1):
                await store.flush()
            assert await stored(backend) == written
            await store.flush()
            assert await stored(backend) == stream.appended

    asyncio.run(scenario())


@pytest.mark.parametrize("delay_s", [0.0, INTERVAL_S / 2, INTERVAL_S])
def test_a_delay_of_at_most_one_interval_writes_every_flush(backends: Backends, delay_s: float) -> None:
    async def scenario() -> None:
        async with backends() as backend:
            store = store_on(backend, delay_s=delay_s)
            stream = Stream(store)
            for texts in ((), ("a ",), ("b ", "c ")):
                stream.append(*texts)
                await store.flush()
                assert await stored(backend) == stream.appended
                assert store.buffered_bytes == 0

    asyncio.run(scenario())


def test_a_finished_stream_is_written_on_the_next_flush(backends: Backends) -> None:
    async def scenario() -> None:
        async with backends() as backend:
            store = store_on(backend)
            stream = await started(store)
            stream.append("a ")
            await store.flush()  # its token waits
            stream.close()
            await store.flush()
            assert await stored(backend) == stream.appended
            assert store.buffered_bytes == 0

    asyncio.run(scenario())


def test_a_stream_whose_client_left_is_written_on_the_next_flush_and_every_one_after(backends: Backends) -> None:
    """`write_eagerly` is what the stream's session calls when its client leaves and the generation runs on."""

    async def scenario() -> None:
        async with backends() as backend:
            store = store_on(backend)
            stream = await started(store)
            stream.append("a ")
            await store.flush()  # its token waits
            stream.log.write_eagerly()
            await store.flush()
            assert await stored(backend) == stream.appended
            stream.append("b ")
            await store.flush()
            assert await stored(backend) == stream.appended

    asyncio.run(scenario())


def test_a_stream_a_resumed_client_tails_is_written_every_flush_once_its_producer_hears_the_bell(
    backends: Backends,
) -> None:
    """The producer's worker and the reader's are two workers (or replicas) on the same storage."""

    async def scenario() -> None:
        async with backends() as producer_backend, backends() as reader_backend:
            producer = store_on(producer_backend, producers=lambda: [Producer(SID)])
            reader = store_on(reader_backend)
            await producer.hear_bell()  # its flusher's first tick: the bells, before the stream's first write
            stream = await started(producer)
            written = stream.appended
            stream.append("a ")
            await producer.hear_bell()  # no reader yet: the stream's client is connected, its token waits
            await producer.flush()
            assert await stored(producer_backend) == written

            frames = reader.replay(SID, -1, owner=OWNER, poll_s=0.01, endpoint=None)
            try:
                async with asyncio.timeout(GUARD_S):
                    assert b"".join(await anext(frames)) == written  # what was stored
                following = asyncio.create_task(anext(frames))  # the reader marks the stream, then polls
                async with asyncio.timeout(GUARD_S):
                    while not await reader_backend.readers_seen([SID]):
                        await asyncio.sleep(0.01)  # polling interval, not an assertion
                await producer.hear_bell()  # one tick of the producer's flusher: the bells, then the flush
                await producer.flush()
                assert await stored(producer_backend) == stream.appended
                async with asyncio.timeout(GUARD_S):
                    assert await following == split_events(stream.appended[len(written) :])
                written = stream.appended
                token = stream.append("b ")
                await producer.hear_bell()
                await producer.flush()  # from now on every flush
                async with asyncio.timeout(GUARD_S):
                    assert await anext(frames) == [token]
                assert await stored(producer_backend) == stream.appended
            finally:
                await frames.aclose()

    asyncio.run(scenario())


def test_a_handover_writes_what_waits(backends: Backends) -> None:
    async def scenario() -> None:
        async with backends() as backend:
            sink = Published()
            store = store_on(backend, handover=sink)
            stream = await started(store)
            stream.append("a ")
            await store.flush()  # its token waits
            assert await stream.log.hand_over()
            assert sink.streams == [SID]
            assert await stored(backend) == stream.appended  # stored before it was published
            assert store.buffered_bytes == 0

    asyncio.run(scenario())


def test_the_workers_stop_writes_what_waits(backends: Backends) -> None:
    async def scenario() -> None:
        async with backends() as backend:
            store = store_on(backend)
            stream = await started(store)
            stream.append("a ")
            await store.flush()  # its token waits
            await store.stop()
            assert await stored(backend) == stream.appended

    asyncio.run(scenario())


def test_a_stream_too_long_while_its_events_wait_drops_them_and_ends_with_not_resumable(backends: Backends) -> None:
    async def scenario() -> None:
        async with backends() as backend:
            store = store_on(backend, max_events=3)
            stream = await started(store)
            written = stream.appended
            stream.append("a ")
            await store.flush()  # its token waits
            assert store.buffered_bytes > 0
            stream.append("b ", "c ")  # past RESUME_MAX_EVENTS: the log is broken
            assert store.buffered_bytes == 0  # what waited is dropped, not held
            await store.flush()  # its readers learn it: the tombstone, at once
            frames = split_events((await stored(backend)) or b"")
            assert b"".join(frames[:-1]) == written
            assert b'"code": "not_resumable"' in frames[-1]

    asyncio.run(scenario())


def announced(readers: set[str] | None, stream_id: str) -> bool:
    """Did `bells` report a new reader of `stream_id` (None: of some stream, look them all up)?"""
    return readers is None or stream_id in readers


def test_a_new_reader_mark_is_announced_once_and_apart_from_stops(backends: Backends) -> None:
    renewed, lapsing = "a" * 32, "b" * 32

    async def scenario() -> None:
        async with backends() as producer, backends() as reader:
            stops, readers = await producer.bells()
            assert readers is None  # the first call cannot tell what came before it
            assert await producer.bells() == (stops, set())
            await reader.mark_reader(renewed, TTL_S)
            bell, readers = await producer.bells()
            assert bell == stops and announced(readers, renewed)  # a reader does not ring the stop bell
            await reader.mark_reader(renewed, TTL_S)  # the reader's next poll: its mark is still fresh
            assert await producer.bells() == (stops, set())
            await reader.request_stop("c" * 32, TTL_S)
            bell, readers = await producer.bells()
            assert bell != stops and bell == await producer.stop_bell()
            assert readers == set()  # a stop announces no reader

            await reader.mark_reader(lapsing, 0.2)
            assert announced((await producer.bells())[1], lapsing)
            async with asyncio.timeout(GUARD_S):  # the reader stops polling: its mark lapses
                while await reader.readers_seen([lapsing]):
                    await asyncio.sleep(0.05)  # polling interval, not an assertion
            await reader.mark_reader(lapsing, 0.2)  # a reader again
            assert announced((await producer.bells())[1], lapsing)

    asyncio.run(scenario())


def test_a_redis_worker_far_behind_the_announcements_looks_up_every_mark(redis_server: RedisServer) -> None:
    """A cursor a whole batch behind is not caught up batch by batch: it starts again from the newest entry."""

    async def scenario() -> None:
        client = LazyRedis(redis_server.url)
        try:
            producer = RedisStreamsBackend(client, ttl_s=TTL_S, prefix="test:")
            reader = RedisStreamsBackend(client, ttl_s=TTL_S, prefix="test:")
            assert (await producer.bells())[1] is None
            for n in range(READ_BATCH):
                await reader.mark_reader(f"{n:032x}", TTL_S)
            assert (await producer.bells())[1] is None  # a full batch: maybe more behind it
            assert (await producer.bells())[1] is None  # from the newest entry: what came between is unknown
            await reader.mark_reader(SID, TTL_S)
            assert (await producer.bells())[1] == {SID}
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_a_redis_readers_stream_lost_and_recreated_behind_the_cursor_starts_it_again(
    redis_server: RedisServer,
) -> None:
    """A readers' stream recreated with ids below a worker's cursor (Redis restarted without persistence, its clock
    behind the ids it had given) would hide every new reader behind the cursor: the worker starts again instead."""

    async def scenario() -> None:
        client = LazyRedis(redis_server.url)
        try:
            producer = RedisStreamsBackend(client, ttl_s=TTL_S, prefix="test:")
            reader = RedisStreamsBackend(client, ttl_s=TTL_S, prefix="test:")
            assert (await producer.bells())[1] is None  # the first call
            await client.client().xadd(producer.readers_key, {b"s": b"f" * 32}, id="9999999999999-0")  # a future id
            assert (await producer.bells())[1] == {"f" * 32}  # the cursor is now far ahead of the clock
            await client.client().delete(producer.readers_key)  # lost: the next ids come from the clock again
            await reader.mark_reader(SID, TTL_S)
            assert (await producer.bells())[1] is None  # behind the cursor: every held-back log's mark is looked up
            other = "e" * 32
            await reader.mark_reader(other, TTL_S)
            assert (await producer.bells())[1] == {other}  # and from there on, new readers are named again
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_a_redis_readers_key_that_cannot_be_read_leaves_the_stop_bell_heard(redis_server: RedisServer) -> None:
    """A readers' key of another type (an operator's mistake, a key clash) fails its reads: the same call still
    answers the stop bell, and which readers are new is unknown (None) until the key reads again."""

    async def scenario() -> None:
        client = LazyRedis(redis_server.url)
        try:
            producer = RedisStreamsBackend(client, ttl_s=TTL_S, prefix="test:")
            reader = RedisStreamsBackend(client, ttl_s=TTL_S, prefix="test:")
            assert (await producer.bells())[1] is None  # the first call
            await reader.request_stop(SID, TTL_S)
            await client.client().set(producer.readers_key, b"not a stream")
            bell, readers = await producer.bells()
            assert bell == await producer.stop_bell() == b"1" and readers is None
            await client.client().delete(producer.readers_key)
            await reader.mark_reader(SID, TTL_S)
            assert (await producer.bells())[1] == {SID}  # read again: from its cursor, which the failure left alone
        finally:
            await client.aclose()

    asyncio.run(scenario())


class Lookups:
    """`readers_seen` of a backend, recorded, and failing while `failing` says so."""

    def __init__(self, backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[list[str]] = []
        self.failing = 0
        seen = backend.readers_seen

        async def readers_seen(stream_ids: list[str]) -> set[str]:
            self.calls.append(list(stream_ids))
            if self.failing:
                self.failing -= 1
                raise StorageError("down")
            return await seen(stream_ids)

        monkeypatch.setattr(backend, "readers_seen", readers_seen)


class Unpublished:
    """A handover sink that fails."""

    async def publish(self, meta: StreamMeta) -> bool:
        return False


async def _ended(how: str, store: ResumeStore, stream: Stream) -> None:
    if how == "closed":
        stream.close()
    elif how == "abandoned":
        stream.log.abandon()
    elif how == "handed over":
        assert await stream.log.hand_over()
    elif how == "handover failed":
        assert not await stream.log.hand_over()
        stream.close()  # what its relay does then (streaming/run.py)
    else:
        stream.append("b ", "c ", "d ")  # past RESUME_MAX_EVENTS: broken
        assert not stream.log.resumable
    await store.flush()


@pytest.mark.parametrize("how", ["closed", "abandoned", "handed over", "handover failed", "broken"])
def test_a_log_that_ended_is_no_longer_held_back_for_readers(
    backends: Backends, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """A reader announced after a log's end costs its worker nothing (the generation may still be listed while
    it winds down)."""

    async def scenario() -> None:
        async with backends() as backend, backends() as reader:
            lookups = Lookups(backend, monkeypatch)
            sink = Unpublished() if how == "handover failed" else Published()
            store = store_on(backend, max_events=4, handover=sink, producers=lambda: [Producer(SID)])
            await store.hear_bell()
            stream = await started(store)
            stream.append("a ")
            await store.flush()  # its token waits
            assert SID in store.held_back
            await _ended(how, store, stream)
            assert not store.held_back
            await reader.mark_reader(SID, TTL_S)
            lookups.calls.clear()
            await store.hear_bell()
            assert not [ids for ids in lookups.calls if SID in ids]

    asyncio.run(scenario())


def test_an_abandoned_log_drops_what_waits(backends: Backends) -> None:
    """A claimer that lost its lease: the log is someone else's, what it held is never written."""

    async def scenario() -> None:
        async with backends() as backend:
            store = store_on(backend)
            stream = await started(store)
            written = stream.appended
            stream.append("a ")
            await store.flush()  # its token waits
            assert store.buffered_bytes > 0
            stream.log.abandon()
            assert store.buffered_bytes == 0
            for _ in range(DELAY_TICKS + 1):
                await store.flush()
            assert await stored(backend) == written
            await store.stop()  # the worker's stop writes everything held: nothing of it
            assert await stored(backend) == written

    asyncio.run(scenario())


def test_a_reader_lookup_that_fails_is_tried_again_on_the_next_tick(
    backends: Backends, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        async with backends() as backend, backends() as reader:
            lookups = Lookups(backend, monkeypatch)
            store = store_on(backend, producers=lambda: [Producer(SID)])
            stream = await started(store)  # written before the first bells: what a failed first call leaves
            written = stream.appended
            stream.append("a ")
            await reader.mark_reader(SID, TTL_S)
            lookups.failing = 1
            await store.hear_bell()  # the first call cannot tell which streams: every held log's mark, failed
            await store.flush()
            assert lookups.calls == [[SID]]
            assert await stored(backend) == written  # not heard: its token still waits
            await store.hear_bell()  # the bells say nothing new, the lookup is tried again
            await store.flush()
            assert lookups.calls == [[SID], [SID]]
            assert await stored(backend) == stream.appended
            token = stream.append("b ")
            await store.hear_bell()
            await store.flush()  # every flush from now on
            assert await stored(backend) == stream.appended and stream.appended.endswith(token)

    asyncio.run(scenario())


def test_the_delay_stays_under_half_the_ttl() -> None:
    """A connected stream's log goes unwritten for the delay; its Redis key (or, for the other workers' sweep, its
    file) expires RESUME_TTL_SECONDS after its last write."""
    assert Settings(resume_write_delay_seconds=149, resume_ttl_seconds=300).resume_write_delay_seconds == 149
    assert Settings(resume_write_delay_seconds=0, resume_ttl_seconds=0.1).resume_write_delay_seconds == 0
    for delay_s, ttl_s in ((150, 300), (1.0, 2.0)):
        with pytest.raises(ValidationError, match="RESUME_WRITE_DELAY_SECONDS must be less than half"):
            Settings(resume_write_delay_seconds=delay_s, resume_ttl_seconds=ttl_s)
    off = Settings(resume_enabled=False, resume_write_delay_seconds=150, resume_ttl_seconds=300)
    assert not off.resume_enabled  # without resumption nothing is written lazily: the rule does not apply
