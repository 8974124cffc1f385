"""Fail open to local limits while Redis is unreachable, and try Redis again once per interval.

`ResilientStorage` (rate limits) and `ResilientClientSlots` (per-client stream caps) wrap a
Redis-backed primary; a `StorageError` of the primary switches them to the instance's own limits,
and the primary is retried once per `retry_after_seconds`, not on every request.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from app.policies.clock import MONOTONIC, Clock
from app.policies.concurrency import DEFAULT_LEASE_TTL_SECONDS, LOCAL_ONLY, ClientSlots
from app.policies.ratelimit import Acquisition, Storage
from app.storage.errors import StorageError

DEFAULT_RETRY_AFTER_SECONDS = 1.0  # a dead Redis costs one failed call per interval


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

    def __init__(
        self, retry_after_seconds: float, clock: Clock, on_state_change: Callable[[bool], None] | None
    ) -> None:
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

    def __init__(
        self,
        primary: Storage,
        fallback: Storage,
        *,
        retry_after_seconds: float = DEFAULT_RETRY_AFTER_SECONDS,
        clock: Clock = MONOTONIC,
        on_state_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.primary = primary
        self.fallback = fallback
        self._failover = _Failover(retry_after_seconds, clock, on_state_change)

    @property
    def using_primary(self) -> bool:
        """False while decisions come from the fallback."""
        return self._failover.up

    async def acquire(self, key: str, capacity: int, refill_per_second: float, cost: float, now: float) -> Acquisition:
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


class ResilientClientSlots:
    """`ClientSlots` over `primary` (Redis) that degrades to "local limits only" while it fails.

    While the primary is down (same retry and `on_state_change` rules as `ResilientStorage`),
    `try_acquire` returns `LOCAL_ONLY`: no cross-replica check was made, the caller's local
    `ConnectionLimiter` still applies, and `release(client, LOCAL_ONLY)` is a no-op. A real lease
    whose release fails (Redis down at the time) stays counted until its TTL lapses.
    """

    def __init__(
        self,
        primary: ClientSlots,
        *,
        retry_after_seconds: float = DEFAULT_RETRY_AFTER_SECONDS,
        clock: Clock = MONOTONIC,
        on_state_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.primary = primary
        self._failover = _Failover(retry_after_seconds, clock, on_state_change)

    @property
    def using_primary(self) -> bool:
        return self._failover.up

    async def try_acquire(
        self, client: str, limit: int, lease_ttl_seconds: float = DEFAULT_LEASE_TTL_SECONDS
    ) -> str | None:
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
