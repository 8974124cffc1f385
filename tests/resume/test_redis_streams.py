"""The Redis resume backend against a real redis-server: logs written by an earlier version of the gateway."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from unittest.mock import ANY

import pytest

from app.resume.progress import read_log
from app.resume.redis_streams import FIELD, OWNER_FIELD, WRITE_BATCH, RedisStreamsBackend
from app.resume.store import ResumeStore, StreamMeta
from app.storage.errors import StorageError
from app.storage.redis import LazyRedis
from loadtest.harness.redis import RedisServer, started_redis

PREFIX = "test:"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    yield from started_redis(tmp_path)


def test_a_log_written_before_owners_were_recorded_is_a_keyless_streams(redis_server: RedisServer) -> None:
    """Rolling upgrade: the old version's entries carry no owner field; they read as the keyless owner's."""

    async def scenario() -> None:
        redis = LazyRedis(redis_server.url)
        backend = RedisStreamsBackend(redis, ttl_s=60, prefix=PREFIX, max_entries=100)
        try:
            for payload in (b"id: old-0\ndata: a\n\n", b"id: old-1\ndata: b\n\n"):  # as the old version wrote them
                await redis.client().xadd(PREFIX + "old", {FIELD: payload})
            found = await backend.read("old", "", "")
            assert found is not None
            assert found[0] == b"id: old-0\ndata: a\n\nid: old-1\ndata: b\n\n"
            assert await backend.read("old", found[1], "") == (b"", found[1])
            assert await backend.read("old", "", "owner-a") is None  # a keyed owner is not the keyless one
            assert await read_log(backend, "old", "") == found[0]  # what a claimer continues from
        finally:
            await redis.aclose()

    asyncio.run(scenario())


def test_one_flush_appends_every_stream_with_its_owner_and_ttl(redis_server: RedisServer) -> None:
    """A flush is one call for all of a worker's streams (more than one call's worth here): each stream gets
    its frames as one entry, the owner on its first entry only, and its TTL renewed."""

    async def scenario() -> None:
        redis = LazyRedis(redis_server.url)
        backend = RedisStreamsBackend(redis, ttl_s=60, prefix=PREFIX, max_entries=None)
        ids = [f"s{i}" for i in range(WRITE_BATCH + 1)]
        try:
            await backend.write({sid: f"id: {sid}-0\n\n".encode() for sid in ids}, {sid: "owner-a" for sid in ids})
            await backend.write({ids[0]: b"id: s0-1\n\n", ids[-1]: b"id: last-1\n\n"}, {})
            found = await backend.read(ids[0], "", "owner-a")
            assert found is not None and found[0] == b"id: s0-0\n\nid: s0-1\n\n"
            assert await backend.read(ids[-1], "", "owner-b") is None  # its owner came with the first write's 2nd call
            last = await backend.read(ids[-1], "", "owner-a")
            assert last is not None and last[0] == f"id: {ids[-1]}-0\n\nid: last-1\n\n".encode()
            client = redis.client()
            entries = await client.xrange(PREFIX + ids[0])
            assert [sorted(fields or {}) for _, fields in entries or []] == [[FIELD, OWNER_FIELD], [FIELD]]
            for sid in (ids[0], ids[WRITE_BATCH]):
                assert 0 < await client.pttl(PREFIX + sid) <= 60_000
        finally:
            await redis.aclose()

    asyncio.run(scenario())


def test_a_flush_survives_a_flushed_script_cache_and_fails_as_storage_error_while_redis_is_down(
    redis_server: RedisServer,
) -> None:
    async def scenario() -> None:
        redis = LazyRedis(redis_server.url)
        backend = RedisStreamsBackend(redis, ttl_s=60, prefix=PREFIX, max_entries=100)
        try:
            await backend.write({"a": b"id: a-0\n\n"}, {"a": "owner-a"})
            await redis.client().script_flush()  # what a Redis restart or failover leaves
            await backend.write({"a": b"id: a-1\n\n"}, {})
            assert await backend.read("a", "", "owner-a") == (b"id: a-0\n\nid: a-1\n\n", ANY)
            redis_server.kill()
            with pytest.raises(StorageError, match="redis resume store"):
                await backend.write({"a": b"id: a-2\n\n"}, {})
            redis_server.start()  # empty: the log went with the old process
            await backend.write({"b": b"id: b-0\n\n"}, {"b": "owner-b"})
            assert await backend.read("b", "", "owner-b") == (b"id: b-0\n\n", ANY)
        finally:
            await redis.aclose()

    asyncio.run(scenario())


def test_the_flush_that_ends_a_stream_renews_its_ttl_with_the_final_event(redis_server: RedisServer) -> None:
    """`expire` sends nothing with Redis: the flush that ends a stream writes its final event first, and that write
    sets the key's TTL, so the stream lives RESUME_TTL_SECONDS after its end (held back or not before it)."""

    async def scenario() -> None:
        redis = LazyRedis(redis_server.url)
        backend = RedisStreamsBackend(redis, ttl_s=60, prefix=PREFIX, max_entries=100)
        store = ResumeStore(backend, flush_interval_s=0.1, write_delay_s=1.0, max_events=100)
        try:
            log = store.open(StreamMeta("ended", "m", [], 10))
            log.append(b"id: ended-0\n\n", 1)
            await store.flush()  # its first write
            log.append(b"id: ended-1\n\n", 1)  # held back: its client is connected
            client = redis.client()
            await client.pexpire(PREFIX + "ended", 1_000)  # what is left of an older write's TTL, made visible
            log.close(b"id: ended-2\n\n")
            await store.flush()  # the one that ends it
            assert 1_000 < await client.pttl(PREFIX + "ended") <= 60_000
            found = await backend.read("ended", "", "")
            assert found is not None and found[0] == b"id: ended-0\n\nid: ended-1\n\nid: ended-2\n\n"
        finally:
            await redis.aclose()

    asyncio.run(scenario())
