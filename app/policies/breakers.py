"""Circuit breakers keyed by upstream endpoint, for the whole instance: a fleet's per-endpoint health.

Each key (an endpoint's base URL) has a breaker snapshot, driven by breaker.py's pure transitions through
`cell(key)` (a `BreakerCell`, so `CircuitBreaker` works on it unchanged), and a counter per failure reason
(`FAILURE_REASONS`) that the metrics read at scrape time. `load(keys)` reads many keys under one lock:
the fleet's pick and the gateway-level circuit view read every endpoint at once.

Two implementations of one interface, like the in-flight table (inflight.py):

- `MemoryBreakerTable`: one process.
- `SharedBreakerTable`: one slot per key in shared memory, created by the gunicorn master before it forks, so
  an endpoint one worker saw die is skipped by every worker at its next pick.

Bounded: at most MAX_ENDPOINTS keys are remembered. A new key takes a free slot, or else the slot touched
least recently (an endpoint that left long ago: nothing reports on it any more); its breaker starts closed.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from app.policies.breaker import BreakerCell, BreakerSnapshot, SnapshotLayout
from app.policies.clock import MONOTONIC, Clock
from app.policies.inflight import MAX_ENDPOINTS
from app.storage.shm import DATA_OFFSET, SharedRegion, SharedTable

# Why an endpoint's failure was recorded (the `reason` label of streaming_upstream_endpoint_failures_total).
FAILURE_REASONS = ("connect", "reset", "status", "timeout", "malformed", "probe", "error_event")

_T = TypeVar("_T")


class BreakerTable(Protocol):
    def cell(self, key: str) -> BreakerCell:
        """The breaker cell of `key` (created at its first update)."""
        ...

    def load(self, keys: Sequence[str]) -> list[BreakerSnapshot]:
        """The stored snapshot of each key (a fresh one for a key never updated), read at once; the failure
        history may be left out (what `advance`, `grantable` and `retry_after` need is there)."""
        ...

    def count_failure(self, key: str, reason: str) -> None:
        """One more failure of `key` for `reason` (one of FAILURE_REASONS)."""
        ...

    def failures(self, keys: Sequence[str]) -> list[tuple[int, ...]]:
        """Failures counted per key, one count per FAILURE_REASONS entry."""
        ...


_FRESH = BreakerSnapshot()
_NO_FAILURES = (0,) * len(FAILURE_REASONS)


@dataclass
class _Entry:
    snapshot: BreakerSnapshot = _FRESH
    failures: list[int] = field(default_factory=lambda: list(_NO_FAILURES))
    touched: float = 0.0


class _MemoryCell:
    __slots__ = ("_table", "_key")

    def __init__(self, table: MemoryBreakerTable, key: str) -> None:
        self._table, self._key = table, key

    def load(self) -> BreakerSnapshot:
        return self._table.load((self._key,))[0]

    load_state = load

    def update(self, change: Callable[[BreakerSnapshot], tuple[BreakerSnapshot, _T]]) -> _T:
        entry = self._table.entry(self._key)
        entry.snapshot, result = change(entry.snapshot)
        return result


class MemoryBreakerTable:
    """One process: a dict, bounded like the shared table. The event loop is its only user (no lock)."""

    def __init__(self, *, clock: Clock = MONOTONIC) -> None:
        self._entries: dict[str, _Entry] = {}
        self._clock = clock

    def entry(self, key: str) -> _Entry:
        entry = self._entries.get(key)
        if entry is None:
            if len(self._entries) >= MAX_ENDPOINTS:
                del self._entries[min(self._entries, key=lambda k: self._entries[k].touched)]
            entry = self._entries[key] = _Entry()
        entry.touched = self._clock()
        return entry

    def cell(self, key: str) -> BreakerCell:
        return _MemoryCell(self, key)

    def load(self, keys: Sequence[str]) -> list[BreakerSnapshot]:
        return [entry.snapshot if (entry := self._entries.get(key)) else _FRESH for key in keys]

    def count_failure(self, key: str, reason: str) -> None:
        self.entry(key).failures[FAILURE_REASONS.index(reason)] += 1

    def failures(self, keys: Sequence[str]) -> list[tuple[int, ...]]:
        return [tuple(entry.failures) if (entry := self._entries.get(key)) else _NO_FAILURES for key in keys]


_SLOT_HEAD = struct.Struct(f"<Qd{len(FAILURE_REASONS)}Q")  # key hash (0: free), last touched, failures by reason


class _SharedCell:
    __slots__ = ("_table", "_key")

    def __init__(self, table: SharedBreakerTable, key: str) -> None:
        self._table, self._key = table, key

    def load(self) -> BreakerSnapshot:
        return self._table.snapshot(self._key)

    def load_state(self) -> BreakerSnapshot:
        return self._table.load((self._key,))[0]

    def update(self, change: Callable[[BreakerSnapshot], tuple[BreakerSnapshot, _T]]) -> _T:
        return self._table.update(self._key, change)


class SharedBreakerTable(SharedTable):
    """A slot per endpoint in shared memory (inherited through fork, or re-opened with `attach(fd)`).

    Each slot holds a snapshot in breaker.py's `SnapshotLayout` (sized like the one-breaker cell: pass the
    same capacities) after its key hash, last-touched time and failure counters."""

    KIND = b"breakers"

    def __init__(self, failure_capacity: int, charged_capacity: int, *, clock: Clock = MONOTONIC) -> None:
        layout = SnapshotLayout(failure_capacity, charged_capacity)
        size = MAX_ENDPOINTS * (_SLOT_HEAD.size + layout.size)
        self._bind(SharedRegion.create(self.KIND, (MAX_ENDPOINTS, failure_capacity, charged_capacity), size))
        self._clock = clock

    def _bind(self, region: SharedRegion) -> None:
        super()._bind(region)
        self._slots = region.params[0]
        self._layout = SnapshotLayout(region.params[1], region.params[2])
        self._stride = _SLOT_HEAD.size + self._layout.size
        self._index: dict[str, int] = {}  # key -> slot, as last found here (checked against the slot's hash)
        self._hashes: dict[str, int] = {}  # key -> its hash: the fleet reads the same few keys on every pick
        self._clock = MONOTONIC

    def _hash(self, key: str) -> int:
        found = self._hashes.get(key)
        if found is None:
            if len(self._hashes) >= 4 * self._slots:  # endpoints came and went
                self._hashes.clear()
            found = self._hashes[key] = self._region.key_hash(key)
        return found

    def _at(self, slot: int) -> int:
        return DATA_OFFSET + slot * self._stride

    def _find(self, buf: mmap.mmap, key: str, key_hash: int) -> int:
        """The slot holding `key_hash`, or -1."""
        slot = self._index.get(key, -1)
        if slot >= 0 and struct.unpack_from("<Q", buf, self._at(slot))[0] == key_hash:
            return slot
        for slot in range(self._slots):
            if struct.unpack_from("<Q", buf, self._at(slot))[0] == key_hash:
                if len(self._index) >= self._slots:
                    self._index.clear()
                self._index[key] = slot
                return slot
        return -1

    def _claim(self, buf: mmap.mmap, key: str, key_hash: int) -> int:
        """The slot of `key`, taking a free or the least recently touched one if it has none."""
        slot = self._find(buf, key, key_hash)
        if slot >= 0:
            return slot
        heads = [_SLOT_HEAD.unpack_from(buf, self._at(i))[:2] for i in range(self._slots)]
        slot = next((i for i, (h, _) in enumerate(heads) if h == 0), -1)
        if slot < 0:
            slot = min(range(self._slots), key=lambda i: heads[i][1])
        _SLOT_HEAD.pack_into(buf, self._at(slot), key_hash, self._clock(), *_NO_FAILURES)
        self._layout.write(buf, self._at(slot) + _SLOT_HEAD.size, _FRESH)
        self._index[key] = slot
        return slot

    def _touch(self, buf: mmap.mmap, slot: int) -> None:
        struct.pack_into("<d", buf, self._at(slot) + 8, self._clock())

    def update(self, key: str, change: Callable[[BreakerSnapshot], tuple[BreakerSnapshot, _T]]) -> _T:
        key_hash = self._hash(key)
        with self._region as buf:
            slot = self._claim(buf, key, key_hash)
            at = self._at(slot) + _SLOT_HEAD.size
            old = self._layout.read(buf, at)
            new, result = change(old)
            if new is not old:
                self._layout.write(buf, at, new)
            self._touch(buf, slot)
            return result

    def cell(self, key: str) -> BreakerCell:
        return _SharedCell(self, key)

    def snapshot(self, key: str) -> BreakerSnapshot:
        """The whole stored snapshot of `key`, failure history included."""
        key_hash = self._hash(key)
        with self._region as buf:
            slot = self._find(buf, key, key_hash)
            return _FRESH if slot < 0 else self._layout.read(buf, self._at(slot) + _SLOT_HEAD.size)

    def load(self, keys: Sequence[str]) -> list[BreakerSnapshot]:
        hashes = [self._hash(key) for key in keys]
        with self._region as buf:
            slots = [self._find(buf, key, h) for key, h in zip(keys, hashes, strict=True)]
            return [
                _FRESH if slot < 0 else self._layout.read_state(buf, self._at(slot) + _SLOT_HEAD.size) for slot in slots
            ]

    def count_failure(self, key: str, reason: str) -> None:
        key_hash, index = self._hash(key), FAILURE_REASONS.index(reason)
        with self._region as buf:
            slot = self._claim(buf, key, key_hash)
            at = self._at(slot) + 16 + 8 * index
            struct.pack_into("<Q", buf, at, struct.unpack_from("<Q", buf, at)[0] + 1)
            self._touch(buf, slot)

    def failures(self, keys: Sequence[str]) -> list[tuple[int, ...]]:
        hashes = [self._hash(key) for key in keys]
        with self._region as buf:
            slots = [self._find(buf, key, h) for key, h in zip(keys, hashes, strict=True)]
            return [
                _NO_FAILURES if slot < 0 else tuple(_SLOT_HEAD.unpack_from(buf, self._at(slot))[2:]) for slot in slots
            ]
