"""Token buckets in Redis: rate limits that hold across every replica using the same Redis and prefix.

One Lua script per decision (`app/storage/lua/token_bucket.lua`: refill, decide, debit, expire)
run with EVALSHA. Time comes from Redis (`TIME` inside the script), never from the caller:
`time.monotonic()` readings of different hosts cannot be compared, and the wall clocks of replicas
drift. This is why `RedisStorage` ignores the `now` argument of the `Storage` protocol. Redis or
socket errors leave it as `StorageError`; `ResilientStorage` (failover.py) falls back to local limits.
"""

from __future__ import annotations

from redis.asyncio import Redis

from app.policies.ratelimit import TOKEN_EPSILON, Acquisition
from app.storage.errors import wrap_errors
from app.storage.redis import REDIS_ERRORS, LazyRedis, RedisScripts, load_lua

DEFAULT_RATE_LIMIT_PREFIX = "gw:rl:"
_TOKEN_BUCKET = load_lua("token_bucket")


class RedisStorage:
    """Token buckets in Redis hashes, shared by every replica that uses the same Redis and prefix.

    Implements the ratelimit `Storage` protocol. Each bucket is the hash `<prefix><key>` with
    fields `tokens` and `ts` (Redis TIME, microseconds) and expires when it would be full again,
    so idle clients leave nothing behind. The `now` arguments are ignored (module docstring).
    Errors raise `StorageError`.
    """

    def __init__(self, redis: Redis | LazyRedis, *, prefix: str = DEFAULT_RATE_LIMIT_PREFIX) -> None:
        if not prefix:
            raise ValueError("prefix must not be empty: bucket keys would mix with the database's other keys")
        self.prefix = prefix
        self._scripts = RedisScripts(redis, _TOKEN_BUCKET)

    async def acquire(self, key: str, capacity: int, refill_per_second: float, cost: float, now: float) -> Acquisition:
        with wrap_errors("redis rate-limit storage", REDIS_ERRORS):
            _, (script,) = self._scripts.scripts()
            allowed, remaining, wait = await script(
                keys=[self.prefix + key],
                args=[capacity, float(refill_per_second), float(cost), TOKEN_EPSILON],
            )
            return Acquisition(bool(int(allowed)), float(remaining), float(wait))
