"""Token-bucket rate limiting: a `RateLimiter` strategy over a `Storage`.

The shape follows alisaifee/limits (strategy over a storage, backend errors translated at the
boundary: `app/storage/errors.py`) with two deliberate differences:

- Time is an argument. The limiter reads its injected clock and passes `now` to the storage, so
  tests step a fake clock instead of sleeping (limits reads `time.time()` inside its storages).
- One storage call per decision: `acquire` refills, decides and debits atomically and returns
  everything the caller needs.

Storages:

- `MemoryStorage`: one process. Under gunicorn with W workers each worker has its own buckets, so a
  client gets W bursts: use it for single-worker runs and tests.
- `SharedMemoryStorage`: one table in shared memory for all the workers of one instance; create it in
  the gunicorn master before the workers fork (the workers inherit it, or re-open it by descriptor
  with `SharedMemoryStorage.attach(fd)`).
- `RedisStorage` (ratelimit_redis.py): buckets shared by several replicas, one Lua script per
  decision on the Redis server's `TIME` (readings of `time.monotonic()` from different hosts cannot
  be compared); `ResilientStorage` (failover.py) falls back to the instance's storage while Redis is
  unreachable.
"""

from __future__ import annotations

import math
import re
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from app.policies.clock import MONOTONIC, Clock
from app.storage.errors import StorageError, wrap_errors
from app.storage.shm import DATA_OFFSET, DEFAULT_PROBE, SharedRegion, SharedTable, window_start

DEFAULT_REQUESTS_PER_MINUTE = 20
DEFAULT_BURST = 5
DEFAULT_MAX_KEYS = 100_000  # MemoryStorage: buckets kept before the least recently used is dropped
DEFAULT_SHARED_SLOTS = 16_384  # SharedMemoryStorage: 32 bytes each, 512 KiB
# Float refill arithmetic (3 s x 1/3 token/s = 0.9999999999999998) must not refuse a client that
# comes back exactly when Retry-After told it to.
TOKEN_EPSILON = 1e-9

_POLICY_NAME = re.compile(r"[A-Za-z0-9_.:/-]+")  # safe inside an RFC 8941 sf-string without escaping


class Acquisition(NamedTuple):
    """One storage decision: the shape a Redis Lua script returns as an array."""

    allowed: bool
    remaining: float  # tokens left in the bucket after this call
    retry_after_seconds: float  # 0 when allowed; else until `cost` tokens are available


def refill(tokens: float, last: float, capacity: float, refill_per_second: float, now: float) -> tuple[float, float]:
    """Tokens and refill time at `now`. A reading older than `last` (another worker got the lock
    first with a later reading) mints nothing and keeps the newer time."""
    if now > last:
        return min(float(capacity), tokens + (now - last) * refill_per_second), now
    return tokens, last


def take(
    tokens: float, last: float, capacity: float, refill_per_second: float, cost: float, now: float
) -> tuple[float, float, Acquisition]:
    """The token-bucket step every backend runs: refill, then debit `cost` if it is there.

    Returns the new (tokens, last) to store and the decision.
    """
    tokens, last = refill(tokens, last, capacity, refill_per_second, now)
    if tokens + TOKEN_EPSILON >= cost:
        tokens = max(0.0, tokens - cost)
        return tokens, last, Acquisition(True, tokens, 0.0)
    wait = (cost - tokens) / refill_per_second + max(0.0, last - now)
    return tokens, last, Acquisition(False, tokens, wait)


def full_at(tokens: float, last: float, capacity: float, refill_per_second: float) -> float:
    """When the bucket is full again: from then on it equals a fresh bucket and can be forgotten."""
    return last + (capacity - tokens) / refill_per_second


class Storage(Protocol):
    """Where token buckets live. Every method may raise `StorageError` and nothing else."""

    async def acquire(self, key: str, capacity: int, refill_per_second: float, cost: float, now: float) -> Acquisition:
        """Atomically refill the bucket `key` to `now`, take `cost` tokens if available, report.

        A missing bucket starts full (`capacity` tokens). `now` is the caller's monotonic clock;
        a backend shared across hosts substitutes its own clock.
        """
        ...


class _Bucket:
    __slots__ = ("tokens", "last", "full_at")

    def __init__(self, tokens: float, last: float, full_at: float) -> None:
        self.tokens, self.last, self.full_at = tokens, last, full_at


class MemoryStorage:
    """Buckets in a dict of this process, bounded two ways.

    Lazy sweep: the dict is kept in least-recently-used order, and each call drops buckets from
    the old end while they are full again (forgetting a full bucket changes nothing). Cap: past
    `max_keys` the least recently used bucket is dropped even if not full, which hands that
    client a fresh burst; `evictions` counts those.
    """

    def __init__(self, *, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.max_keys = max_keys
        self.evictions = 0
        # OrderedDict, not dict: popping from the front of a plain dict rescans deleted entries.
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def _sweep(self, now: float) -> None:
        buckets = self._buckets
        while buckets:
            oldest = next(iter(buckets.values()))
            if oldest.full_at > now:
                # Stop at the first bucket still refilling: with one policy per storage, every
                # bucket idle for longer than capacity/rate sits before it and is already gone.
                return
            buckets.popitem(last=False)

    async def acquire(self, key: str, capacity: int, refill_per_second: float, cost: float, now: float) -> Acquisition:
        bucket = self._buckets.pop(key, None)
        self._sweep(now)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._buckets.popitem(last=False)
                self.evictions += 1
            bucket = _Bucket(float(capacity), now, now)
        bucket.tokens, bucket.last, result = take(bucket.tokens, bucket.last, capacity, refill_per_second, cost, now)
        bucket.full_at = full_at(bucket.tokens, bucket.last, capacity, refill_per_second)
        self._buckets[key] = bucket
        return result


_SHARED_HEADER = struct.Struct("<Q")  # evictions, shared by all workers
_SHARED_HEADER_BYTES = 64  # the table starts on its own cache line
_SLOT = struct.Struct("<Qddd")  # key hash (0 = empty), tokens, last refill, full again at
_SHM_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, BufferError, struct.error)
_SHM_STORAGE = "shared-memory rate-limit storage"


class SharedMemoryStorage(SharedTable):
    """Token buckets in a fixed table shared by every worker process of one instance.

    Construct it in the gunicorn master before the workers fork, then use it in the workers as
    inherited, or re-open it there with `SharedMemoryStorage.attach(storage.fd)` (see
    `app/storage/shm.py`). Every worker limits against the same buckets, so a client gets one
    burst per instance, not one per worker. Keys are hashed (keyed blake2b, stable across the
    workers) into windows of `probe` slots. A slot whose bucket is full again counts as free
    (lazy sweep); with no free slot in the window, the bucket closest to full is evicted
    (`evictions`). Each call holds the cross-process lock for one window read and one slot
    write, never across an await.
    """

    KIND = b"ratelim"

    def __init__(self, slots: int = DEFAULT_SHARED_SLOTS, *, probe: int = DEFAULT_PROBE) -> None:
        if slots < 1 or probe < 1:
            raise ValueError("slots and probe must be at least 1")
        size = _SHARED_HEADER_BYTES + (slots + probe - 1) * _SLOT.size
        self._bind(SharedRegion.create(self.KIND, (slots, probe), size))

    def _bind(self, region: SharedRegion) -> None:
        super()._bind(region)
        self.slots, self._probe = region.params[0], region.params[1]
        self._window = struct.Struct("<" + "Qddd" * self._probe)
        self._table_at = DATA_OFFSET + _SHARED_HEADER_BYTES

    @property
    def evictions(self) -> int:
        """Buckets dropped before they were full again, by any worker."""
        with wrap_errors(_SHM_STORAGE, _SHM_ERRORS), self._region as buf:
            return int(_SHARED_HEADER.unpack_from(buf, DATA_OFFSET)[0])

    def _offset(self, key_hash: int) -> int:
        return self._table_at + window_start(key_hash, self.slots) * _SLOT.size

    def _decide(self, key: str, capacity: int, rate: float, cost: float, now: float) -> Acquisition:
        h = self._region.key_hash(key)
        base = self._offset(h)
        with self._region as buf:
            window = self._window.unpack_from(buf, base)
            found = free = victim = -1
            victim_full_at = math.inf
            for i in range(self._probe):
                slot_hash, _, _, slot_full_at = window[4 * i : 4 * i + 4]
                if slot_hash == h:
                    found = i
                    break
                if free < 0 and (slot_hash == 0 or slot_full_at <= now):
                    free = i
                if slot_full_at < victim_full_at:
                    victim, victim_full_at = i, slot_full_at
            if found >= 0:
                tokens, last = window[4 * found + 1], window[4 * found + 2]
                index = found
            else:
                tokens, last = float(capacity), now
                index = free
            tokens, last, result = take(tokens, last, capacity, rate, cost, now)
            if index < 0:
                index = victim
                (evicted,) = _SHARED_HEADER.unpack_from(buf, DATA_OFFSET)
                _SHARED_HEADER.pack_into(buf, DATA_OFFSET, evicted + 1)
            _SLOT.pack_into(buf, base + index * _SLOT.size, h, tokens, last, full_at(tokens, last, capacity, rate))
            return result

    async def acquire(self, key: str, capacity: int, refill_per_second: float, cost: float, now: float) -> Acquisition:
        with wrap_errors(_SHM_STORAGE, _SHM_ERRORS):
            return self._decide(key, capacity, refill_per_second, cost, now)


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token bucket: `capacity` requests at once (the burst), refilled at `refill_per_second`."""

    capacity: int = DEFAULT_BURST
    refill_per_second: float = DEFAULT_REQUESTS_PER_MINUTE / 60.0

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError("capacity must be at least 1")
        if not self.refill_per_second > 0 or math.isinf(self.refill_per_second):
            raise ValueError("refill_per_second must be positive and finite")

    @classmethod
    def per_minute(cls, requests: float, burst: int) -> RateLimit:
        return cls(capacity=burst, refill_per_second=requests / 60.0)

    @property
    def window_seconds(self) -> float:
        """Time an empty bucket takes to fill: the `w` of the advertised quota policy."""
        return self.capacity / self.refill_per_second


def _ceil_seconds(seconds: float) -> int:
    return max(0, math.ceil(seconds - TOKEN_EPSILON))


@dataclass(frozen=True, slots=True)
class RateLimitResult:
    """One decision, with what the `Retry-After` and IETF `RateLimit` headers need."""

    allowed: bool
    limit: int  # the bucket capacity (burst)
    remaining: int  # whole requests left right now
    retry_after_seconds: float  # 0 when allowed
    reset_after_seconds: float  # until the bucket is full again
    window_seconds: float
    policy_name: str = "default"
    error: StorageError | None = None  # set when the storage failed and the verdict is the fallback

    @property
    def degraded(self) -> bool:
        return self.error is not None

    def headers(self) -> dict[str, str]:
        """`Retry-After` when refused; `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers,
        structured-field form) unless the storage failed, since then the numbers would be made up."""
        headers: dict[str, str] = {}
        if self.error is None:
            name = self.policy_name
            headers["RateLimit-Policy"] = f'"{name}";q={self.limit};w={_ceil_seconds(self.window_seconds)}'
            headers["RateLimit"] = f'"{name}";r={self.remaining};t={_ceil_seconds(self.reset_after_seconds)}'
        if not self.allowed:
            # Rounded up and at least 1: a client that obeys never arrives before its token.
            headers["Retry-After"] = str(max(1, _ceil_seconds(self.retry_after_seconds)))
        return headers


class RateLimiter:
    """Token-bucket limiting of keys (client ids) against one `Storage`.

    `fail_open` is required: on a `StorageError`, True admits the request, False refuses it
    (retry after one token's time). Either way the result carries the error (`degraded`), so the
    caller can count and log it.
    """

    def __init__(
        self,
        storage: Storage,
        limit: RateLimit | None = None,
        *,
        fail_open: bool,
        clock: Clock = MONOTONIC,
        name: str = "default",
    ) -> None:
        if not _POLICY_NAME.fullmatch(name):
            raise ValueError(f"policy name {name!r} must match {_POLICY_NAME.pattern}")
        self.storage = storage
        self.limit = limit or RateLimit()
        self.fail_open = fail_open
        self.name = name
        self._clock = clock

    def _result(self, acquisition: Acquisition) -> RateLimitResult:
        limit = self.limit
        return RateLimitResult(
            allowed=acquisition.allowed,
            limit=limit.capacity,
            remaining=max(0, math.floor(acquisition.remaining + TOKEN_EPSILON)),
            retry_after_seconds=acquisition.retry_after_seconds,
            reset_after_seconds=max(0.0, (limit.capacity - acquisition.remaining) / limit.refill_per_second),
            window_seconds=limit.window_seconds,
            policy_name=self.name,
        )

    def _fallback(self, error: StorageError) -> RateLimitResult:
        limit = self.limit
        return RateLimitResult(
            allowed=self.fail_open,
            limit=limit.capacity,
            remaining=0,
            retry_after_seconds=0.0 if self.fail_open else 1.0 / limit.refill_per_second,
            reset_after_seconds=0.0,
            window_seconds=limit.window_seconds,
            policy_name=self.name,
            error=error,
        )

    def _check_cost(self, cost: float) -> None:
        if not 0 < cost <= self.limit.capacity:
            raise ValueError(f"cost must be in (0, {self.limit.capacity}]")

    async def hit(self, key: str, cost: float = 1) -> RateLimitResult:
        """Spend `cost` tokens of `key`'s bucket if it has them."""
        self._check_cost(cost)
        limit = self.limit
        try:
            acquisition = await self.storage.acquire(
                f"{self.name}/{key}", limit.capacity, limit.refill_per_second, cost, self._clock()
            )
        except StorageError as error:
            return self._fallback(error)
        return self._result(acquisition)
