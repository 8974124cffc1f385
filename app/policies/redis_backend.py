"""Redis backends: rate-limit buckets and per-client stream slots that hold across replicas.

- `RedisStorage`: the ratelimit `Storage` protocol as one Lua script (refill, decide, debit,
  expire) run with EVALSHA; redis-py's `register_script` falls back to SCRIPT LOAD on NOSCRIPT
  (after a Redis restart or failover the script cache is empty).
- `RedisClientSlots`: per-client concurrent-stream caps as a sorted set of leases per client,
  scored by their expiry. A replica that crashes cannot release its leases; they expire after
  `lease_ttl_seconds` (the gateway's max stream age), so a crash costs a client slots for at
  most that long.
- `ResilientStorage` / `ResilientClientSlots`: fail open to local limits while Redis is
  unreachable, and try Redis again once per `retry_after_seconds`, not on every request.

Time comes from Redis (`TIME` inside the scripts), never from the caller: `time.monotonic()`
readings of different hosts cannot be compared, and the wall clocks of replicas drift. This is
why `RedisStorage` ignores the `now` argument of the `Storage` protocol.

Every Redis or socket error leaves these classes as `StorageError` (the ratelimit boundary
type). Socket timeouts are short (`DEFAULT_SOCKET_TIMEOUT_SECONDS`) and redis-py's retries are
off, because admission waits on these calls: an unreachable Redis must fail in one timeout.

The client: `LazyRedis(url)` may be built anywhere (app factory, gunicorn master); it creates
its `redis.asyncio.Redis` (`redis_from_url`) on first use, inside the worker's running loop,
so every worker gets its own connections and no socket crosses a fork or an event loop.
"""

from __future__ import annotations

import asyncio
import math
import re
import secrets
from collections.abc import Callable
from typing import Protocol

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.policies.clock import MONOTONIC, Clock
from app.policies.ratelimit import TOKEN_EPSILON, Acquisition, Storage, StorageError, _wrap_errors

DEFAULT_SOCKET_TIMEOUT_SECONDS = 0.25  # bounds the connect and each reply: what admission may wait on Redis
DEFAULT_RATE_LIMIT_PREFIX = "gw:rl:"
DEFAULT_SLOTS_PREFIX = "gw:conn:"
DEFAULT_LEASE_TTL_SECONDS = 300.0  # the max stream age: a crashed replica's leases are gone after it
DEFAULT_RETRY_AFTER_SECONDS = 1.0  # ResilientStorage: a dead Redis costs one failed call per interval
SCAN_BATCH = 500  # keys per SCAN / UNLINK round in `RedisStorage.clear()`
LOCAL_ONLY = "local-only"
"""The lease id `ResilientClientSlots.try_acquire` returns while Redis is unreachable: no
cross-replica check was made, only the local limits apply; releasing it does nothing. Real lease
ids are hex, so they never equal it."""

_REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError, RedisError, OSError)
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")

# KEYS[1]: bucket hash {tokens, ts}; ARGV: capacity, refill per second, cost, consume (1/0), epsilon.
# The same step as `ratelimit.take`, on Redis TIME in integer microseconds (exact in a double).
# A refusal writes nothing: refilling is linear, so the stored state stays equivalent, and a
# client hammering a refused key costs no writes. The key expires when the bucket would be full
# again, since a full bucket equals a missing one. Floats go back as strings: a Lua number
# would be truncated to an integer reply.
_BUCKET_LUA = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local epsilon = tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local last = tonumber(state[2])
if tokens == nil or last == nil then
  tokens, last = capacity, now
elseif now > last then
  tokens = math.min(capacity, tokens + (now - last) / 1000000 * rate)
  last = now
end
local allowed, wait = 0, 0
if tokens + epsilon >= cost then
  allowed = 1
  tokens = math.max(0, tokens - cost)
  if ARGV[4] == '1' then
    redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'ts', string.format('%.17g', last))
    local ttl = math.ceil((last - now) / 1000 + (capacity - tokens) / rate * 1000)
    redis.call('PEXPIRE', KEYS[1], math.max(1, ttl))
  end
else
  wait = (cost - tokens) / rate + math.max(0, last - now) / 1000000
end
return {allowed, string.format('%.17g', tokens), string.format('%.17g', wait)}
"""

# KEYS[1]: sorted set lease id -> expiry (Redis TIME, ms); ARGV: limit, ttl ms, lease id.
# The key expires with its longest-lived lease.
_ACQUIRE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
local newest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], math.ceil(tonumber(newest[2])))
return 1
"""

# KEYS[1]: the client's lease set. Live leases only: expired ones may not be swept yet.
_ACTIVE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZCOUNT', KEYS[1], string.format('(%.17g', now), '+inf')
"""


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


class _Scripts:
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


def _glob_escape(text: str) -> str:
    return _GLOB_SPECIAL.sub(r"\\\1", text)


class RedisStorage:
    """Token buckets in Redis hashes, shared by every replica that uses the same Redis and prefix.

    Implements the ratelimit `Storage` protocol. Each bucket is the hash `<prefix><key>` with
    fields `tokens` and `ts` (Redis TIME, microseconds) and expires when it would be full again,
    so idle clients leave nothing behind. The `now` arguments are ignored (module docstring).
    Errors raise `StorageError`, except in `check()`, which answers False.
    """

    def __init__(self, redis: Redis | LazyRedis, *, prefix: str = DEFAULT_RATE_LIMIT_PREFIX) -> None:
        if not prefix:
            raise ValueError("prefix must not be empty: clear() deletes every key under it")
        self.prefix = prefix
        self._scripts = _Scripts(redis, _BUCKET_LUA)

    async def _bucket(self, key: str, capacity: int, refill_per_second: float, cost: float,
                      consume: bool) -> Acquisition:
        with _wrap_errors("redis", _REDIS_ERRORS):
            _, (script,) = self._scripts.scripts()
            allowed, remaining, wait = await script(
                keys=[self.prefix + key],
                args=[capacity, float(refill_per_second), float(cost), 1 if consume else 0, TOKEN_EPSILON],
            )
            return Acquisition(bool(int(allowed)), float(remaining), float(wait))

    async def acquire(self, key: str, capacity: int, refill_per_second: float, cost: float,
                      now: float) -> Acquisition:
        return await self._bucket(key, capacity, refill_per_second, cost, consume=True)

    async def peek(self, key: str, capacity: int, refill_per_second: float, cost: float,
                   now: float) -> Acquisition:
        return await self._bucket(key, capacity, refill_per_second, cost, consume=False)

    async def clear(self, key: str | None = None) -> None:
        """Forget one bucket, or every bucket under this prefix (SCAN + UNLINK; other keys stay)."""
        with _wrap_errors("redis", _REDIS_ERRORS):
            client = self._scripts.client()
            if key is not None:
                await client.unlink(self.prefix + key)
                return
            batch: list[bytes | str] = []
            async for found in client.scan_iter(match=_glob_escape(self.prefix) + "*", count=SCAN_BATCH):
                batch.append(found)
                if len(batch) >= SCAN_BATCH:
                    await client.unlink(*batch)
                    batch.clear()
            if batch:
                await client.unlink(*batch)

    async def check(self) -> bool:
        """True when Redis answers PING within the socket timeout."""
        try:
            with _wrap_errors("redis", _REDIS_ERRORS):
                return bool(await self._scripts.client().ping())
        except StorageError:
            return False


class ClientSlots(Protocol):
    """Concurrent streams per client, counted across replicas. Methods may raise `StorageError`."""

    async def try_acquire(self, client: str, limit: int,
                          lease_ttl_seconds: float = DEFAULT_LEASE_TTL_SECONDS) -> str | None:
        """A lease id when `client` holds fewer than `limit` live leases, else None.

        The lease lapses by itself after `lease_ttl_seconds` if nobody releases it.
        """
        ...

    async def release(self, client: str, lease_id: str) -> bool:
        """Give the lease back; True if it was still held (so repeated calls are harmless)."""
        ...

    async def active(self, client: str) -> int:
        """Live (unexpired, unreleased) leases of `client`."""
        ...


class RedisClientSlots:
    """Per-client stream caps as one sorted set per client: lease id -> expiry (Redis TIME, ms).

    `try_acquire` sweeps the client's expired leases, compares the count with `limit` and adds a
    lease, atomically in one script; the key expires with its longest-lived lease. Errors raise
    `StorageError`.
    """

    def __init__(self, redis: Redis | LazyRedis, *, prefix: str = DEFAULT_SLOTS_PREFIX) -> None:
        self.prefix = prefix
        self._scripts = _Scripts(redis, _ACQUIRE_LUA, _ACTIVE_LUA)

    async def try_acquire(self, client: str, limit: int,
                          lease_ttl_seconds: float = DEFAULT_LEASE_TTL_SECONDS) -> str | None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        if not 0 < lease_ttl_seconds < math.inf:
            raise ValueError("lease_ttl_seconds must be positive and finite")
        lease_id = secrets.token_hex(8)
        with _wrap_errors("redis", _REDIS_ERRORS):
            _, (acquire, _active) = self._scripts.scripts()
            ttl_ms = math.ceil(lease_ttl_seconds * 1000)
            granted = await acquire(keys=[self.prefix + client], args=[limit, ttl_ms, lease_id])
        return lease_id if int(granted) else None

    async def release(self, client: str, lease_id: str) -> bool:
        with _wrap_errors("redis", _REDIS_ERRORS):
            return bool(await self._scripts.client().zrem(self.prefix + client, lease_id))

    async def active(self, client: str) -> int:
        with _wrap_errors("redis", _REDIS_ERRORS):
            _, (_acquire, active) = self._scripts.scripts()
            return int(await active(keys=[self.prefix + client]))


class _Failover:
    """Primary-or-fallback state shared by the resilient wrappers.

    Up: every call goes to the primary. A `StorageError` marks it down; from then on the primary
    gets one probe call per `retry_after_seconds` (the probe time is taken before the probe
    awaits, so concurrent callers do not all probe) and everything else goes to the fallback.
    A probe that succeeds marks it up. `on_state_change` hears each transition once.

    An outcome only moves the state if no transition happened while its call was in flight
    (`epoch`): a slow success that started before an outage, or a slow failure that started
    before the recovery, describes the past, and would otherwise make the state flap.
    """

    def __init__(self, retry_after_seconds: float, clock: Clock,
                 on_state_change: Callable[[bool], None] | None) -> None:
        if not 0 < retry_after_seconds < math.inf:
            raise ValueError("retry_after_seconds must be positive and finite")
        self.retry_after_seconds = retry_after_seconds
        self.up = True
        self.epoch = 0
        self._clock = clock
        self._on_state_change = on_state_change
        self._next_probe = -math.inf

    def admit(self) -> int | None:
        """The epoch to report back with, when this call should try the primary; else None."""
        if self.up:
            return self.epoch
        now = self._clock()
        if now < self._next_probe:
            return None
        self._next_probe = now + self.retry_after_seconds
        return self.epoch

    def _transition(self, up: bool) -> None:
        self.up = up
        self.epoch += 1
        if not up:
            self._next_probe = self._clock() + self.retry_after_seconds
        if self._on_state_change is not None:
            self._on_state_change(up)

    def failed(self, epoch: int) -> None:
        if self.up and epoch == self.epoch:
            self._transition(False)

    def succeeded(self, epoch: int) -> None:
        if not self.up and epoch == self.epoch:
            self._transition(True)


class ResilientStorage:
    """A `Storage` that uses `primary` (Redis) and fails open to `fallback` (local limits).

    While the primary fails, decisions come from the fallback: a client then gets the local
    limit per fallback scope (per process for `MemoryStorage`, per instance for
    `SharedMemoryStorage`), which is looser than the shared limit but never refuses everyone.
    The primary is retried once per `retry_after_seconds` of `clock` (a dead Redis costs one
    fast failure per interval, not one per request). `on_state_change(False)` is called once
    when the primary is given up, `on_state_change(True)` once when it answers again; they run
    inline, so keep them to a log line and a metric. Errors of the fallback propagate, and the
    `RateLimiter` applies its fail-open/fail-closed choice to them.
    """

    def __init__(self, primary: Storage, fallback: Storage, *,
                 retry_after_seconds: float = DEFAULT_RETRY_AFTER_SECONDS, clock: Clock = MONOTONIC,
                 on_state_change: Callable[[bool], None] | None = None) -> None:
        self.primary = primary
        self.fallback = fallback
        self._failover = _Failover(retry_after_seconds, clock, on_state_change)

    @property
    def using_primary(self) -> bool:
        """False while decisions come from the fallback."""
        return self._failover.up

    async def acquire(self, key: str, capacity: int, refill_per_second: float, cost: float,
                      now: float) -> Acquisition:
        epoch = self._failover.admit()
        if epoch is not None:
            try:
                result = await self.primary.acquire(key, capacity, refill_per_second, cost, now)
            except StorageError:
                self._failover.failed(epoch)
            else:
                self._failover.succeeded(epoch)
                return result
        return await self.fallback.acquire(key, capacity, refill_per_second, cost, now)

    async def peek(self, key: str, capacity: int, refill_per_second: float, cost: float,
                   now: float) -> Acquisition:
        epoch = self._failover.admit()
        if epoch is not None:
            try:
                result = await self.primary.peek(key, capacity, refill_per_second, cost, now)
            except StorageError:
                self._failover.failed(epoch)
            else:
                self._failover.succeeded(epoch)
                return result
        return await self.fallback.peek(key, capacity, refill_per_second, cost, now)

    async def clear(self, key: str | None = None) -> None:
        """Clear the fallback, and the primary when it is reachable (its failure is not raised)."""
        await self.fallback.clear(key)
        epoch = self._failover.admit()
        if epoch is not None:
            try:
                await self.primary.clear(key)
            except StorageError:
                self._failover.failed(epoch)
            else:
                self._failover.succeeded(epoch)

    async def check(self) -> bool:
        """True when decisions can be made: the primary answers, or else the fallback does.

        A readiness probe must not take every replica out because Redis is down; read
        `using_primary` to see whether limits are currently shared.
        """
        epoch = self._failover.admit()
        if epoch is not None:
            if await self.primary.check():
                self._failover.succeeded(epoch)
                return True
            self._failover.failed(epoch)
        return await self.fallback.check()


class ResilientClientSlots:
    """`ClientSlots` over `primary` (Redis) that degrades to "local limits only" while it fails.

    While the primary is down (same retry and `on_state_change` rules as `ResilientStorage`),
    `try_acquire` returns `LOCAL_ONLY`: no cross-replica check was made, the caller's local
    `ConnectionLimiter` still applies, and `release(client, LOCAL_ONLY)` is a no-op. A real lease
    whose release fails (Redis down at the time) stays counted until its TTL lapses. `active`
    raises `StorageError` while the primary is down, since no count is known.
    """

    def __init__(self, primary: ClientSlots, *, retry_after_seconds: float = DEFAULT_RETRY_AFTER_SECONDS,
                 clock: Clock = MONOTONIC, on_state_change: Callable[[bool], None] | None = None) -> None:
        self.primary = primary
        self._failover = _Failover(retry_after_seconds, clock, on_state_change)

    @property
    def using_primary(self) -> bool:
        return self._failover.up

    async def try_acquire(self, client: str, limit: int,
                          lease_ttl_seconds: float = DEFAULT_LEASE_TTL_SECONDS) -> str | None:
        epoch = self._failover.admit()
        if epoch is None:
            return LOCAL_ONLY
        try:
            lease_id = await self.primary.try_acquire(client, limit, lease_ttl_seconds)
        except StorageError:
            self._failover.failed(epoch)
            return LOCAL_ONLY
        self._failover.succeeded(epoch)
        return lease_id

    async def release(self, client: str, lease_id: str) -> bool:
        if lease_id == LOCAL_ONLY:
            return False
        epoch = self._failover.admit()
        if epoch is None:
            return False  # the lease lapses after its TTL
        try:
            released = await self.primary.release(client, lease_id)
        except StorageError:
            self._failover.failed(epoch)
            return False
        self._failover.succeeded(epoch)
        return released

    async def active(self, client: str) -> int:
        epoch = self._failover.admit()
        if epoch is None:
            raise StorageError("redis client slots unavailable: local limits only")
        try:
            count = await self.primary.active(client)
        except StorageError:
            self._failover.failed(epoch)
            raise
        self._failover.succeeded(epoch)
        return count
