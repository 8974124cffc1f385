"""Per-client stream caps that hold across replicas: one Redis sorted set of leases per client.

Each set maps lease id -> expiry (Redis TIME, ms). A replica that crashes cannot release its leases;
they expire after `lease_ttl_seconds` (the gateway's max stream age), so a crash costs a client slots
for at most that long. Redis or socket errors leave it as `StorageError`; `ResilientClientSlots`
(failover.py) degrades to the instance's own limits while Redis is unreachable.
"""

from __future__ import annotations

import math
import secrets

from redis.asyncio import Redis

from app.policies.concurrency import DEFAULT_LEASE_TTL_SECONDS
from app.storage.errors import wrap_errors
from app.storage.redis import REDIS_ERRORS, LazyRedis, RedisScripts, load_lua

DEFAULT_SLOTS_PREFIX = "gw:conn:"
_SLOT_ACQUIRE = load_lua("slot_acquire")
_SLOTS = "redis client slots"


class RedisClientSlots:
    """`ClientSlots` as one sorted set per client: lease id -> expiry (Redis TIME, ms).

    `try_acquire` sweeps the client's expired leases, compares the count with `limit` and adds a
    lease, atomically in one script; the key expires with its longest-lived lease. Errors raise
    `StorageError`.
    """

    def __init__(self, redis: Redis | LazyRedis, *, prefix: str = DEFAULT_SLOTS_PREFIX) -> None:
        self.prefix = prefix
        self._scripts = RedisScripts(redis, _SLOT_ACQUIRE)

    async def try_acquire(
        self, client: str, limit: int, lease_ttl_seconds: float = DEFAULT_LEASE_TTL_SECONDS
    ) -> str | None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        if not 0 < lease_ttl_seconds < math.inf:
            raise ValueError("lease_ttl_seconds must be positive and finite")
        lease_id = secrets.token_hex(8)
        with wrap_errors(_SLOTS, REDIS_ERRORS):
            _, (acquire,) = self._scripts.scripts()
            ttl_ms = math.ceil(lease_ttl_seconds * 1000)
            granted = await acquire(keys=[self.prefix + client], args=[limit, ttl_ms, lease_id])
        return lease_id if int(granted) else None

    async def release(self, client: str, lease_id: str) -> bool:
        with wrap_errors(_SLOTS, REDIS_ERRORS):
            return bool(await self._scripts.client().zrem(self.prefix + client, lease_id))
