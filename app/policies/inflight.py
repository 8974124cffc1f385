"""Streams in flight per upstream endpoint, counted for the whole instance: what the fleet balances on.

`acquire_least(keys)` reads every worker's counts, picks the key with the fewest streams in flight
(random tie-break) and counts one more stream on it, all under one lock, so two workers picking at
once do not both land on the same idle endpoint. `acquire_preferred(keys, load_factor)` is the same
with a preference order (a session's endpoints, consistent hashing): the first key whose load stays
within `load_factor` times the mean with this stream counted (bounded loads, Mirrokni et al.), so one
hot session cannot pile onto one endpoint. `acquire_next(keys)` is round robin, the comparison baseline
(UPSTREAM_BALANCE=round_robin): the key after the one this process picked last, whatever the loads, with a
cursor per worker as a naive router keeps it; it counts the stream like the others, so metrics and `release`
stay the same. `release(key)` takes any of them back.

Two implementations of one interface, like the buffered-bytes table (buffers.py):

- `MemoryInFlightTable`: one process.
- `SharedInFlightTable`: a cell per worker in shared memory, created by the gunicorn master before it
  forks; each worker writes only its own cell (so a killed worker's streams are forgotten with its
  cell: the master calls `reclaim(pid)` from `child_exit`), and a pick sums the live cells.
"""

from __future__ import annotations

import math
import mmap
import os
import random
import struct
from collections import Counter
from collections.abc import Sequence
from typing import Protocol

from app.storage.shm import DATA_OFFSET, SharedRegion, SharedTable

MAX_WORKERS = 64  # WEB_CONCURRENCY's upper bound
# Endpoints one worker can have streams in flight on at once; beyond, a stream is relayed but not counted.
MAX_ENDPOINTS = 128


class InFlightTable(Protocol):
    def acquire_least(self, keys: Sequence[str]) -> str:
        """The key (of a non-empty `keys`) with the fewest streams in flight, now counting one more."""
        ...

    def acquire_preferred(self, keys: Sequence[str], load_factor: float) -> str:
        """The first key (of a non-empty `keys`, in order) within the load bound, now counting one more."""
        ...

    def acquire_next(self, keys: Sequence[str]) -> str:
        """Round robin: the key (of a non-empty `keys`) after this process's last pick, now counting one more."""
        ...

    def release(self, key: str) -> None:
        """One stream on `key` ended (called exactly once per `acquire_least`, `acquire_preferred` or
        `acquire_next`)."""
        ...

    def counts(self, keys: Sequence[str]) -> list[int]:
        """Streams in flight on each key, instance-wide."""
        ...

    def reclaim(self, pid: int) -> bool:
        """Forget the streams of process `pid` (a dead worker); True if it had a cell."""
        ...


def _least(keys: Sequence[str], counts: Sequence[int]) -> str:
    fewest = min(counts)
    return random.choice([key for key, count in zip(keys, counts, strict=True) if count == fewest])


def _preferred(keys: Sequence[str], counts: Sequence[int], load_factor: float) -> str:
    bound = math.ceil(load_factor * (sum(counts) + 1) / len(keys))  # at least the least loaded key's count + 1
    return next(key for key, count in zip(keys, counts, strict=True) if count + 1 <= bound)


class MemoryInFlightTable:
    """One process: a counter."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._cursor = 0  # round robin: picks so far

    def acquire_least(self, keys: Sequence[str]) -> str:
        key = _least(keys, self.counts(keys))
        self._counts[key] += 1
        return key

    def acquire_preferred(self, keys: Sequence[str], load_factor: float) -> str:
        key = _preferred(keys, self.counts(keys), load_factor)
        self._counts[key] += 1
        return key

    def acquire_next(self, keys: Sequence[str]) -> str:
        key = keys[self._cursor % len(keys)]
        self._cursor += 1
        self._counts[key] += 1
        return key

    def release(self, key: str) -> None:
        self._counts[key] -= 1
        if self._counts[key] <= 0:
            del self._counts[key]

    def counts(self, keys: Sequence[str]) -> list[int]:
        return [self._counts[key] for key in keys]

    def reclaim(self, pid: int) -> bool:
        return False


_PID = struct.Struct("<q")  # a cell's owner (0 = free)
_ENTRIES = struct.Struct("<" + "Qq" * MAX_ENDPOINTS)  # (key hash, streams) pairs; hash 0 = free entry
_CELL = _PID.size + _ENTRIES.size


class SharedInFlightTable(SharedTable):
    """A cell per worker in shared memory (inherited through fork, or re-opened with `attach(fd)`)."""

    KIND = b"inflight"

    def __init__(self) -> None:
        self._bind(SharedRegion.create(self.KIND, (MAX_WORKERS,), MAX_WORKERS * _CELL))

    def _bind(self, region: SharedRegion) -> None:
        super()._bind(region)
        self._cell_of: tuple[int, int] = (0, -1)  # (pid, cell index) cached: a fork gets a new pid
        self._cursor = 0  # round robin: this process's picks so far (a forked worker starts from its copy)

    def _live_cells(self, buf: mmap.mmap) -> list[tuple[int, int]]:
        """(cell index, owner pid) of every owned cell."""
        return [(i, owner) for i in range(MAX_WORKERS) if (owner := _PID.unpack_from(buf, DATA_OFFSET + i * _CELL)[0])]

    def _my_cell(self, buf: mmap.mmap) -> int:
        pid = os.getpid()
        if self._cell_of[0] == pid and _PID.unpack_from(buf, DATA_OFFSET + self._cell_of[1] * _CELL)[0] == pid:
            return self._cell_of[1]
        free = -1
        for i in range(MAX_WORKERS):
            owner = _PID.unpack_from(buf, DATA_OFFSET + i * _CELL)[0]
            if owner == pid:
                free = i
                break
            if owner == 0 and free < 0:
                free = i
        if free >= 0:  # pragma: no branch - at most MAX_WORKERS workers exist
            _PID.pack_into(buf, DATA_OFFSET + free * _CELL, pid)
        self._cell_of = (pid, free)
        return free

    def _sum(self, buf: mmap.mmap, hashes: Sequence[int]) -> list[int]:
        wanted = dict.fromkeys(hashes, 0)
        for cell, _ in self._live_cells(buf):
            values = _ENTRIES.unpack_from(buf, DATA_OFFSET + cell * _CELL + _PID.size)
            for j in range(0, len(values), 2):
                if values[j] in wanted:
                    wanted[values[j]] += values[j + 1]
        return [wanted[h] for h in hashes]

    def _add(self, buf: mmap.mmap, key_hash: int, delta: int) -> None:
        cell = self._my_cell(buf)
        if cell < 0:
            return
        at = DATA_OFFSET + cell * _CELL + _PID.size
        values = _ENTRIES.unpack_from(buf, at)
        free = -1
        for j in range(0, len(values), 2):
            if values[j] == key_hash:
                streams = values[j + 1] + delta
                # an entry whose streams all ended is freed: endpoints come and go (pods are replaced)
                struct.pack_into("<Qq", buf, at + j * 8, key_hash if streams > 0 else 0, max(streams, 0))
                return
            if values[j] == 0 and free < 0:
                free = j
        if delta > 0 and free >= 0:
            struct.pack_into("<Qq", buf, at + free * 8, key_hash, delta)

    def acquire_least(self, keys: Sequence[str]) -> str:
        hashes = [self._region.key_hash(key) for key in keys]
        with self._region as buf:
            key = _least(keys, self._sum(buf, hashes))
            self._add(buf, hashes[keys.index(key)], 1)
        return key

    def acquire_preferred(self, keys: Sequence[str], load_factor: float) -> str:
        hashes = [self._region.key_hash(key) for key in keys]
        with self._region as buf:
            key = _preferred(keys, self._sum(buf, hashes), load_factor)
            self._add(buf, hashes[keys.index(key)], 1)
        return key

    def acquire_next(self, keys: Sequence[str]) -> str:
        key = keys[self._cursor % len(keys)]
        self._cursor += 1
        key_hash = self._region.key_hash(key)
        with self._region as buf:
            self._add(buf, key_hash, 1)
        return key

    def release(self, key: str) -> None:
        key_hash = self._region.key_hash(key)
        with self._region as buf:
            self._add(buf, key_hash, -1)

    def counts(self, keys: Sequence[str]) -> list[int]:
        hashes = [self._region.key_hash(key) for key in keys]
        with self._region as buf:
            return self._sum(buf, hashes)

    def reclaim(self, pid: int) -> bool:
        with self._region as buf:
            for cell, owner in self._live_cells(buf):
                if owner == pid:
                    at = DATA_OFFSET + cell * _CELL
                    buf[at : at + _CELL] = bytes(_CELL)
                    return True
        return False
