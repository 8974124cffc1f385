"""`pack_command` and `run_script` against a real redis-server: what is sent arrives as sent, a flushed script
cache is survived, and a connection that failed never carries a stale reply into the next call."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.storage.errors import StorageError, wrap_errors
from app.storage.redis import REDIS_ERRORS, pack_command, redis_from_url, run_script
from loadtest.harness.redis import RedisServer, started_redis

ECHO = "return {KEYS, ARGV}"  # what the server received, as it parsed it
FAIL = "return redis.error_reply('no such luck')"
GUARD_S = 30.0  # guard only, against a hang
CLIENT_TIMEOUT_S = 1.0  # the read timeout the mute-server test waits out once; a live one answers well within


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    yield from started_redis(tmp_path)


@asynccontextmanager
async def _client(url: str) -> AsyncIterator[Redis]:
    client = redis_from_url(url, socket_timeout=CLIENT_TIMEOUT_S)
    try:
        yield client
    finally:
        await client.aclose()


@given(st.lists(st.binary(), max_size=20))
def test_pack_command_is_what_redis_py_packs(args: list[bytes]) -> None:
    command = [b"EVALSHA", *args]  # redis-py splits a first argument at spaces; ours never has one
    assert pack_command(command) == b"".join(Connection().pack_command(*command))


def test_arguments_arrive_as_sent(redis_server: RedisServer) -> None:
    keys = [b"k1", b"key with spaces"]
    args = [b"", b"\r\n", b"$3\r\n*1\r\n", bytes(range(256)), b"x" * 100_000]  # empty, RESP-looking, large

    async def scenario() -> None:
        async with _client(redis_server.url) as client:
            echo = client.register_script(ECHO)
            assert await run_script(client, echo, keys, args) == [keys, args]
            assert await run_script(client, echo, [], []) == [[], []]

    asyncio.run(scenario())


def test_a_flushed_script_cache_is_survived(redis_server: RedisServer) -> None:
    """After a Redis restart or failover the script cache is empty: NOSCRIPT loads the script, the call runs."""

    async def scenario() -> None:
        async with _client(redis_server.url) as client:
            echo = client.register_script(ECHO)
            assert await run_script(client, echo, [b"k"], [b"before"]) == [[b"k"], [b"before"]]
            await client.script_flush()
            assert await client.script_exists(echo.sha) == [False]
            assert await run_script(client, echo, [b"k"], [b"after"]) == [[b"k"], [b"after"]]
            assert await client.script_exists(echo.sha) == [True]

    asyncio.run(scenario())


def test_a_script_error_leaves_the_connection_in_step(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        async with _client(redis_server.url) as client:
            echo, fail = client.register_script(ECHO), client.register_script(FAIL)
            for attempt in (b"1", b"2"):
                with pytest.raises(ResponseError, match="no such luck"):
                    await run_script(client, fail, [], [])
                assert await run_script(client, echo, [], [attempt]) == [[], [attempt]]

    asyncio.run(scenario())


def test_a_reply_that_timed_out_never_reaches_the_next_call(redis_server: RedisServer) -> None:
    """Redis stops answering (SIGSTOP) mid-call: the read timeout ends the call, and once Redis answers again
    the next call gets its own reply, not the late one of the call that gave up."""
    assert redis_server.proc is not None
    pid = redis_server.proc.pid

    async def scenario() -> None:
        async with _client(redis_server.url) as client:
            echo = client.register_script(ECHO)
            assert await run_script(client, echo, [], [b"first"]) == [[], [b"first"]]
            os.kill(pid, signal.SIGSTOP)
            try:
                with pytest.raises(RedisTimeoutError):
                    await asyncio.wait_for(run_script(client, echo, [], [b"late"]), GUARD_S)
            finally:
                os.kill(pid, signal.SIGCONT)
            for n in range(3):
                assert await run_script(client, echo, [], [b"%d" % n]) == [[], [b"%d" % n]]

    asyncio.run(scenario())


def test_a_killed_redis_is_a_storage_error_and_the_next_call_reconnects(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        async with _client(redis_server.url) as client:
            echo = client.register_script(ECHO)
            assert await run_script(client, echo, [], [b"up"]) == [[], [b"up"]]
            redis_server.kill()
            with pytest.raises(StorageError, match="redis"), wrap_errors("redis", REDIS_ERRORS):
                await asyncio.wait_for(run_script(client, echo, [], [b"down"]), GUARD_S)
            redis_server.start()  # the same port, an empty script cache
            assert await run_script(client, echo, [], [b"back"]) == [[], [b"back"]]

    asyncio.run(scenario())
