"""The Redis client: one per worker process, created lazily inside its event loop, failing fast.

`LazyRedis(url)` may be built anywhere (app factory, gunicorn master); it creates its
`redis.asyncio.Redis` (`redis_from_url`) on first use, inside the worker's running loop, so every
worker gets its own connections and no socket crosses a fork or an event loop.

Socket timeouts are short (`DEFAULT_SOCKET_TIMEOUT_SECONDS`) and redis-py's retries are off, because
admission waits on these calls: an unreachable Redis must fail in one timeout. Code that calls Redis
wraps the calls in `wrap_errors(..., REDIS_ERRORS)`, so only `StorageError` leaves it.

Lua scripts live in `lua/*.lua` beside this module (`load_lua`) and run with EVALSHA through
`RedisScripts`; redis-py's `register_script` falls back to SCRIPT LOAD on NOSCRIPT (after a Redis
restart or failover the script cache is empty). A script called with hundreds of arguments per call
(the resume store's append, once per flush) goes through `run_script` instead: one request packed by
`pack_command`, because redis-py encodes and packs every argument in Python, one call each.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from importlib.resources import files

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError, ResponseError

DEFAULT_SOCKET_TIMEOUT_SECONDS = 0.25  # bounds the connect and each reply: what admission may wait on Redis
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError)  # what a Redis call may raise


def load_lua(name: str) -> str:
    """The source of `lua/<name>.lua` (shipped as package data; read once, at import of its user)."""
    return files(__package__).joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


def redis_from_url(url: str, *, socket_timeout: float = DEFAULT_SOCKET_TIMEOUT_SECONDS) -> Redis:
    """A `redis.asyncio.Redis` for `url` (`redis://`, `rediss://`, `unix://`) that fails fast.

    `socket_timeout` bounds both connecting and each reply, and redis-py's own retries are off
    (its default retries ten times with backoff): the caller decides what a failure means.
    Query options in the URL (`?socket_timeout=...`) override the arguments. Call it inside the
    running loop of the process that will use the client (`LazyRedis` does): connections belong
    to one event loop and must not be inherited through fork.
    """
    asyncio.get_running_loop()  # RuntimeError outside a loop: no client at import time or in the master
    return Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        retry=Retry(NoBackoff(), 0),
    )


class LazyRedis:
    """One `redis.asyncio.Redis` per process, created on first use inside the running loop.

    Build it in the app factory; close it with `aclose()` at shutdown (lifespan). Using it from a
    second event loop is a bug and raises RuntimeError.
    """

    def __init__(self, url: str, *, socket_timeout: float = DEFAULT_SOCKET_TIMEOUT_SECONDS) -> None:
        if not socket_timeout > 0:
            raise ValueError("socket_timeout must be positive")
        self.url = url
        self.socket_timeout = socket_timeout
        self._client: Redis | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def client(self) -> Redis:
        loop = asyncio.get_running_loop()
        if self._client is None:
            self._client, self._loop = redis_from_url(self.url, socket_timeout=self.socket_timeout), loop
        elif loop is not self._loop:
            raise RuntimeError("LazyRedis used from a second event loop; make one per process and loop")
        return self._client

    async def aclose(self) -> None:
        """Close the connections (if any were made); the next use creates a new client."""
        client, self._client, self._loop = self._client, None, None
        if client is not None:
            await client.aclose()


class RedisScripts:
    """Lua scripts registered on whichever client a `LazyRedis` currently holds."""

    def __init__(self, redis: Redis | LazyRedis, *sources: str) -> None:
        self._redis = redis
        self._sources = sources
        self._bound: tuple[Redis, tuple[AsyncScript, ...]] | None = None

    def client(self) -> Redis:
        return self._redis.client() if isinstance(self._redis, LazyRedis) else self._redis

    def scripts(self) -> tuple[Redis, tuple[AsyncScript, ...]]:
        client = self.client()
        if self._bound is None or self._bound[0] is not client:
            self._bound = client, tuple(client.register_script(source) for source in self._sources)
        return self._bound


def pack_command(args: Sequence[bytes]) -> bytes:
    """`args` as one RESP request (an array of bulk strings), built by one join.

    The caller encodes: every argument is bytes already (redis-py's `pack_command` encodes each one through
    its `Encoder` and concatenates piecewise, about 3x the cost for a command of hundreds of arguments).
    """
    pieces = [b"*%d\r\n" % len(args)]
    for arg in args:  # each argument is copied once, by the join
        pieces += (b"$%d\r\n" % len(arg), arg, b"\r\n")
    return b"".join(pieces)


async def run_script(client: Redis, script: AsyncScript, keys: Sequence[bytes], args: Sequence[bytes]) -> object:
    """EVALSHA of `script` (registered on `client`) as one request packed by `pack_command`.

    It runs on a connection of the client's pool, as redis-py's pipeline does: the socket timeout bounds the
    write and the reply, and a connection that failed is disconnected before it returns to the pool, so no
    half-written request or unread reply meets the next command. NOSCRIPT (a restarted or flushed Redis has
    an empty script cache) loads the script on the same connection and runs it once more, as redis-py's
    `AsyncScript` does. The client must return raw replies (bytes): the gateway's clients do (redis_from_url).
    """
    command = [b"EVALSHA", script.sha.encode(), b"%d" % len(keys), *keys, *args]
    pool = client.connection_pool
    connection: AbstractConnection = await pool.get_connection()  # type: ignore[no-untyped-call]  # untyped library
    try:
        try:
            return await _request(connection, command)
        except NoScriptError:  # loaded on this connection: a second one would be opened while this one is held
            source = script.script.encode() if isinstance(script.script, str) else bytes(script.script)
            loaded = await _request(connection, [b"SCRIPT", b"LOAD", source])
            sha = loaded if isinstance(loaded, bytes) else str(loaded).encode()
            script.sha, command[1] = sha.decode(), sha
            return await _request(connection, command)
    finally:
        await pool.release(connection)


async def _request(connection: AbstractConnection, command: Sequence[bytes]) -> object:
    try:
        await connection.send_packed_command(pack_command(command))
        return await connection.read_response()
    except ResponseError:
        raise  # Redis answered (the whole reply was read): the connection is in step
    except BaseException:  # defensive: redis-py's send and read already disconnect on their own errors
        await connection.disconnect(nowait=True)
        raise
