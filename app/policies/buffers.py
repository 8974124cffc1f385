"""The instance's buffered stream data, as every worker reports it: what the memory budget is checked against.

Each worker publishes, once per watchdog pass, its buffered bytes and its oldest full buffers (when
each filled, how many bytes it holds); `publish` returns every live worker's report. From those,
`cutoff` picks the instance-wide oldest full buffers whose cut brings the instance back to its
budget, so all workers cut the same streams whichever worker holds them.

Two implementations of one interface, like the connection slots (concurrency.py):

- `MemoryBufferTable`: one process.
- `SharedBufferTable`: a cell per worker in shared memory, created by the gunicorn master before it
  forks; the master clears a dead worker's cell with `reclaim(pid)` from `child_exit`.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from app.storage.shm import DATA_OFFSET, SharedRegion, SharedTable

MAX_WORKERS = 64  # WEB_CONCURRENCY's upper bound
FULL_PER_WORKER = 32  # full buffers a worker publishes (its oldest); the rest count in its total only

FullBuffer = tuple[float, int]  # (monotonic time it filled, bytes it holds)


@dataclass(frozen=True, slots=True)
class WorkerBuffers:
    pid: int
    buffered: int
    full: tuple[FullBuffer, ...]  # oldest first
    refusing: bool = False  # this worker's admission refuses for memory (what the instance decided last)


class BufferTable(Protocol):
    def publish(self, buffered: int, full: Sequence[FullBuffer], refusing: bool = False) -> list[WorkerBuffers]:
        """Record this worker's buffered bytes, oldest full buffers and refusal state; every live worker's report."""
        ...

    def reclaim(self, pid: int) -> bool:
        """Forget the report of process `pid` (a dead worker); True if it had one."""
        ...


def cutoff(workers: Sequence[WorkerBuffers], budget: int) -> float | None:
    """Full buffers that filled at or before the returned time are cut; None: the instance is within budget.

    Oldest first across all workers, until the bytes they hold cover what the instance is over.
    """
    excess = sum(w.buffered for w in workers) - budget
    if excess <= 0:
        return None
    ordered = sorted(entry for w in workers for entry in w.full)
    if not ordered:
        return None  # nothing full to cut (admission alone refuses)
    freed = 0
    for filled_at, size in ordered:
        freed += size
        if freed >= excess:
            return filled_at
    return ordered[-1][0]  # not enough published: cut all of them; the next pass sees the rest


class MemoryBufferTable:
    """One process: its own report is the instance's."""

    def publish(self, buffered: int, full: Sequence[FullBuffer], refusing: bool = False) -> list[WorkerBuffers]:
        return [WorkerBuffers(os.getpid(), buffered, tuple(full[:FULL_PER_WORKER]), refusing)]

    def reclaim(self, pid: int) -> bool:
        return False


_CELL_HEAD = struct.Struct("<qqqq")  # pid (0 = free), buffered bytes, full entries, refusing
_ENTRY = struct.Struct("<dq")  # filled at, bytes
_CELL = _CELL_HEAD.size + FULL_PER_WORKER * _ENTRY.size
_ENTRIES = struct.Struct("<" + "dq" * FULL_PER_WORKER)  # a cell's full buffers, in one struct call


class SharedBufferTable(SharedTable):
    """A cell per worker in shared memory (inherited through fork, or re-opened with `attach(fd)`)."""

    KIND = b"buffers"

    def __init__(self) -> None:
        self._bind(SharedRegion.create(self.KIND, (MAX_WORKERS,), MAX_WORKERS * _CELL))

    def publish(self, buffered: int, full: Sequence[FullBuffer], refusing: bool = False) -> list[WorkerBuffers]:
        pid = os.getpid()
        full = full[:FULL_PER_WORKER]
        flat: list[float | int] = []
        for filled_at, size in full:
            flat += (filled_at, size)
        flat += [0.0, 0] * (FULL_PER_WORKER - len(full))
        reports = []
        with self._region as buf:
            mine = free = -1
            for i in range(MAX_WORKERS):
                owner = _CELL_HEAD.unpack_from(buf, DATA_OFFSET + i * _CELL)[0]
                if owner == pid:
                    mine = i
                elif owner == 0 and free < 0:
                    free = i
            cell = mine if mine >= 0 else free
            if cell >= 0:  # pragma: no branch - at most MAX_WORKERS workers exist
                at = DATA_OFFSET + cell * _CELL
                _CELL_HEAD.pack_into(buf, at, pid, buffered, len(full), int(refusing))
                _ENTRIES.pack_into(buf, at + _CELL_HEAD.size, *flat)
            for i in range(MAX_WORKERS):
                at = DATA_OFFSET + i * _CELL
                owner, total, count, refusing_flag = _CELL_HEAD.unpack_from(buf, at)
                if owner:
                    values = _ENTRIES.unpack_from(buf, at + _CELL_HEAD.size)
                    entries = tuple((float(values[2 * j]), int(values[2 * j + 1])) for j in range(count))
                    reports.append(WorkerBuffers(int(owner), int(total), entries, bool(refusing_flag)))
        return reports

    def reclaim(self, pid: int) -> bool:
        with self._region as buf:
            for i in range(MAX_WORKERS):
                at = DATA_OFFSET + i * _CELL
                if _CELL_HEAD.unpack_from(buf, at)[0] == pid:
                    buf[at : at + _CELL] = bytes(_CELL)
                    return True
        return False
