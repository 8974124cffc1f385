"""The Redis resume backend against a real redis-server: logs written by an earlier version of the gateway."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.resume.progress import read_log
from app.resume.redis_streams import FIELD, RedisStreamsBackend
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
