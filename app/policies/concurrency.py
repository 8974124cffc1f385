"""Connection slots: how many streams the instance carries, in total and per client.

`try_acquire(client)` returns a `Lease` or None; whoever owns the stream calls `Lease.release()`
on every exit path, and only the first call frees the slot. Two implementations of one interface:

- `MemoryConnectionLimiter`: one process (single worker, tests).
- `SharedConnectionLimiter`: every gunicorn worker of the instance counts against one table in
  shared memory, so the caps hold per instance rather than per worker. Create it in the gunicorn
  master before fork; the workers inherit it, or re-open it by descriptor with
  `SharedConnectionLimiter.attach(fd)`. A worker that dies (SIGKILL, crash) cannot release its leases: each lease
  records its owner's pid, and the master calls `reclaim(worker.pid)` from gunicorn's
  `child_exit` hook.

Across replicas, `ClientSlots` adds a per-client cap on top (Redis: concurrency_redis.py), which
admission asks after the instance's own limiter.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from functools import partial
from types import TracebackType
from typing import Protocol

from app.storage.shm import DATA_OFFSET, SharedRegion, SharedTable, window_start

DEFAULT_MAX_CONNECTIONS = 500
DEFAULT_MAX_PER_CLIENT = 10
CLIENT_PROBE = 32  # client-table window; the table is >= 4x the most clients there can be, so it never fills
DEFAULT_LEASE_TTL_SECONDS = 300.0  # ClientSlots leases last the max stream age: a crashed replica's go after it
LOCAL_ONLY = "local-only"
"""The lease id `ResilientClientSlots.try_acquire` returns while Redis is unreachable: no
cross-replica check was made, only the local limits apply; releasing it does nothing. Real lease
ids are hex, so they never equal it."""


class Lease:
    """One held connection slot. `release()` frees it exactly once, however often it is called."""

    __slots__ = ("client", "_pending")

    def __init__(self, client: str, release: Callable[[], None]) -> None:
        self.client = client
        # list.pop is atomic under the GIL: of any number of concurrent release() calls, one wins.
        self._pending = [release]

    def release(self) -> bool:
        """Free the slot; True for the call that freed it, False for every later call."""
        try:
            release = self._pending.pop()
        except IndexError:
            return False
        release()
        return True

    @property
    def released(self) -> bool:
        return not self._pending

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Lease(client={self.client!r}, released={self.released})"


class ConnectionLimiter(Protocol):
    """Slot accounting for one instance: `max_total` streams, `max_per_client` per client id."""

    max_total: int
    max_per_client: int

    def try_acquire(self, client: str) -> Lease | None:
        """A lease on one slot for `client`, or None when either cap is reached."""
        ...

    def active(self, client: str | None = None) -> int:
        """Slots held in total, or by `client`."""
        ...

    def reclaim(self, pid: int) -> int:
        """Free every slot held by process `pid` (dead worker); returns how many."""
        ...


class ClientSlots(Protocol):
    """Concurrent streams per client, counted across replicas. Methods may raise `StorageError`."""

    async def try_acquire(
        self, client: str, limit: int, lease_ttl_seconds: float = DEFAULT_LEASE_TTL_SECONDS
    ) -> str | None:
        """A lease id when `client` holds fewer than `limit` live leases, else None.

        The lease lapses by itself after `lease_ttl_seconds` if nobody releases it.
        """
        ...

    async def release(self, client: str, lease_id: str) -> bool:
        """Give the lease back; True if it was still held (so repeated calls are harmless)."""
        ...


def _check_caps(max_total: int, max_per_client: int) -> None:
    if max_total < 1 or max_per_client < 1:
        raise ValueError("max_total and max_per_client must be at least 1")


class MemoryConnectionLimiter:
    """Slot counts in this process: the caps hold per worker, not per instance."""

    def __init__(self, max_total: int = DEFAULT_MAX_CONNECTIONS, max_per_client: int = DEFAULT_MAX_PER_CLIENT) -> None:
        _check_caps(max_total, max_per_client)
        self.max_total = max_total
        self.max_per_client = max_per_client
        self._total = 0
        self._counts: dict[str, int] = {}  # only clients holding slots: bounded by max_total

    def try_acquire(self, client: str) -> Lease | None:
        count = self._counts.get(client, 0)
        if self._total >= self.max_total or count >= self.max_per_client:
            return None
        self._counts[client] = count + 1
        self._total += 1
        return Lease(client, partial(self._release, client))

    def _release(self, client: str) -> None:
        self._total -= 1
        count = self._counts[client] - 1
        if count:
            self._counts[client] = count
        else:
            del self._counts[client]

    def active(self, client: str | None = None) -> int:
        return self._total if client is None else self._counts.get(client, 0)

    def reclaim(self, pid: int) -> int:
        return 0  # leases never outlive the one process that holds them all


_HEADER = struct.Struct("<q")  # number of free lease entries (top of the free stack)
_HEADER_BYTES = 64
_LEASE = struct.Struct("<qQQ")  # owner pid (0 = free), client hash, generation
_FREE = struct.Struct("<I")  # free-stack entry: a lease index
_CLIENT = struct.Struct("<Qq")  # client hash (0 = empty), slots held


class SharedConnectionLimiter(SharedTable):
    """Slot accounting shared by every worker of the instance (inherited through fork, or re-opened
    with `attach(fd)`); the master reclaims a dead worker's slots with `reclaim(pid)`.

    Layout: a lease table of `max_total` entries (owner pid, client hash, generation) is the
    truth; a stack of free lease indices makes acquiring O(1); a client table (hash -> count)
    enforces the per-client cap. The generation makes a release that lost a race with
    `reclaim` (slot already freed and handed out again) a no-op.
    """

    KIND = b"conns"

    def __init__(self, max_total: int = DEFAULT_MAX_CONNECTIONS, max_per_client: int = DEFAULT_MAX_PER_CLIENT) -> None:
        _check_caps(max_total, max_per_client)
        size = self._layout(max_total, max_per_client)
        self._bind(SharedRegion.create(self.KIND, (max_total, max_per_client), size))
        buf = self._region.buf
        for index in range(max_total):
            _FREE.pack_into(buf, self._free_at + index * _FREE.size, index)
        _HEADER.pack_into(buf, DATA_OFFSET, max_total)

    def _bind(self, region: SharedRegion) -> None:
        super()._bind(region)
        self._layout(*region.params[:2])

    def _layout(self, max_total: int, max_per_client: int) -> int:
        self.max_total = max_total
        self.max_per_client = max_per_client
        self._client_slots = max(64, 1 << (4 * max_total - 1).bit_length())
        self._client_window = struct.Struct("<" + "Qq" * CLIENT_PROBE)
        self._leases_at = DATA_OFFSET + _HEADER_BYTES
        self._free_at = self._leases_at + max_total * _LEASE.size
        self._clients_at = self._free_at + max_total * _FREE.size
        return self._clients_at - DATA_OFFSET + (self._client_slots + CLIENT_PROBE - 1) * _CLIENT.size

    def _client_base(self, key_hash: int) -> int:
        return self._clients_at + window_start(key_hash, self._client_slots) * _CLIENT.size

    def try_acquire(self, client: str) -> Lease | None:
        h = self._region.key_hash(client)
        pid = os.getpid()
        base = self._client_base(h)
        with self._region as buf:
            (free,) = _HEADER.unpack_from(buf, DATA_OFFSET)
            if free == 0:
                return None
            window = self._client_window.unpack_from(buf, base)
            slot = empty = -1
            for i in range(CLIENT_PROBE):
                if window[2 * i] == h:
                    slot = i
                    break
                if empty < 0 and window[2 * i] == 0:
                    empty = i
            if slot >= 0:
                count = window[2 * slot + 1]
                if count >= self.max_per_client:
                    return None
            elif empty >= 0:
                slot, count = empty, 0
            else:
                return None  # pragma: no cover - window full needs 32 live clients in one window at load <= 1/4
            free -= 1
            (index,) = _FREE.unpack_from(buf, self._free_at + free * _FREE.size)
            lease_at = self._leases_at + index * _LEASE.size
            generation = _LEASE.unpack_from(buf, lease_at)[2] + 1
            _LEASE.pack_into(buf, lease_at, pid, h, generation)
            _CLIENT.pack_into(buf, base + slot * _CLIENT.size, h, count + 1)
            _HEADER.pack_into(buf, DATA_OFFSET, free)
        return Lease(client, partial(self._release, index, generation))

    def _release(self, index: int, generation: int) -> None:
        lease_at = self._leases_at + index * _LEASE.size
        with self._region as buf:
            pid, h, current = _LEASE.unpack_from(buf, lease_at)
            if pid == 0 or current != generation:
                return  # reclaimed (and maybe handed out again) since this lease was granted
            _LEASE.pack_into(buf, lease_at, 0, 0, current)
            (free,) = _HEADER.unpack_from(buf, DATA_OFFSET)
            _FREE.pack_into(buf, self._free_at + free * _FREE.size, index)
            _HEADER.pack_into(buf, DATA_OFFSET, free + 1)
            base = self._client_base(h)
            window = self._client_window.unpack_from(buf, base)
            for i in range(CLIENT_PROBE):
                if window[2 * i] == h:
                    count = window[2 * i + 1] - 1
                    _CLIENT.pack_into(buf, base + i * _CLIENT.size, h if count > 0 else 0, max(count, 0))
                    return

    def active(self, client: str | None = None) -> int:
        if client is None:
            with self._region as buf:
                return self.max_total - int(_HEADER.unpack_from(buf, DATA_OFFSET)[0])
        h = self._region.key_hash(client)
        base = self._client_base(h)
        with self._region as buf:
            window = self._client_window.unpack_from(buf, base)
        for i in range(CLIENT_PROBE):
            if window[2 * i] == h:
                return int(window[2 * i + 1])
        return 0

    def reclaim(self, pid: int) -> int:
        """Free the slots of process `pid`, then rebuild the free stack and client counts from the
        lease table, which also repairs a table a worker was killed in the middle of updating."""
        reclaimed = 0
        with self._region as buf:
            holders: dict[int, int] = {}
            free = 0
            for index in range(self.max_total):
                lease_at = self._leases_at + index * _LEASE.size
                owner, h, generation = _LEASE.unpack_from(buf, lease_at)
                if owner == pid and owner != 0:
                    _LEASE.pack_into(buf, lease_at, 0, 0, generation)
                    reclaimed += 1
                    owner = 0
                if owner == 0:
                    _FREE.pack_into(buf, self._free_at + free * _FREE.size, index)
                    free += 1
                else:
                    holders[h] = holders.get(h, 0) + 1
            _HEADER.pack_into(buf, DATA_OFFSET, free)
            buf[self._clients_at :] = bytes(len(buf) - self._clients_at)
            for h, count in holders.items():
                base = self._client_base(h)
                window = self._client_window.unpack_from(buf, base)
                for i in range(CLIENT_PROBE):
                    if window[2 * i] == 0:
                        _CLIENT.pack_into(buf, base + i * _CLIENT.size, h, count)
                        break
        return reclaimed
