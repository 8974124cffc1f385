"""The memory budget for buffered stream data (MEMORY_BUDGET_BYTES, per instance): count, refuse, cut.

What counts: bytes the gateway holds for a client that the client has not taken yet.

- A full buffer: a stream whose write to its client is blocked. uvicorn writes a body into the socket
  transport and, once the transport's buffer passed its high-water mark (64 KiB, asyncio's and
  uvloop's default), makes the next write wait until the client has read it down. Such a stream holds
  the batch it waits to write, the transport buffer (the high-water mark plus at most the write that
  crossed it: counted as one more batch of the same size) and, with an OpenAI upstream, what the
  upstream client reads ahead while the relay does not read (aiohttp pauses at twice its 64 KiB
  read buffer). The relay stops reading the upstream while a write waits, so nothing else piles up.
- A non-streamed completion's answer, held whole until it is sent.
- Resume events appended but not yet written to the store (up to RESUME_WRITE_DELAY_SECONDS of a stream whose
  client is connected, one RESUME_FLUSH_INTERVAL_SECONDS of the others).

Not counted: a stream whose client keeps up (its transport buffer stays under the high-water mark)
and the kernel's socket buffers (kernel memory, bounded by the socket buffer sizes, not this process's).

How: nothing per token. A write records its size (one attribute per batch); the watchdog pass
(every DEADLINE_CHECK_INTERVAL_SECONDS) sums the worker's streams, publishes the sum and its oldest
full buffers to the instance's table (app/policies/buffers.py, shared memory across workers), and
reads back the instance's total. A write still pending at a pass is a blocked one: the pass runs on
the same loop, so a write that does not wait is never seen in flight. At the budget, admission
refuses new streams with 503 `memory_pressure` (the flag is one pass old at most) until the instance
is back under ADMIT_BELOW of it, and the instance-wide oldest full buffers that cover the excess
over the budget are cut with an `error` event `memory_pressure` (each worker cuts those it holds).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from app.errors import MemoryPressureError
from app.observability.metrics import BUFFERED_BYTES, MEMORY_BUDGET_BYTES
from app.policies.buffers import BufferTable, cutoff
from app.streaming.session import Phase, StreamSession

logger = logging.getLogger("app.streaming")

TRANSPORT_HIGH_WATER_BYTES = 65_536  # asyncio's and uvloop's default write buffer high-water mark
# Once at the budget, admission refuses until the instance is back under this share of it: cuts bring it
# down to the budget only, and new streams admitted right at the edge would push it straight over again.
ADMIT_BELOW = 0.8


class MemoryGuard:
    """One per worker; `enforce` runs on every watchdog pass, `over` is what admission asks."""

    def __init__(self, *, budget_bytes: int, table: BufferTable, read_ahead_bytes: int = 0) -> None:
        self.budget_bytes = budget_bytes
        self.read_ahead_bytes = read_ahead_bytes  # upstream data buffered for a stream whose relay does not read
        self.sources: list[Callable[[], int]] = []  # other buffered bytes of the worker (the resume store's)
        self.over = False
        self.worker_bytes = 0
        self.instance_bytes = 0
        self._table = table
        self._published = -1
        MEMORY_BUDGET_BYTES.set(budget_bytes)

    def full_bytes(self, session: StreamSession) -> int:
        """What a stream whose write is blocked holds: its batch, the transport buffer, the upstream read-ahead."""
        return 2 * session.write_bytes + TRANSPORT_HIGH_WATER_BYTES + self.read_ahead_bytes

    def enforce(self, streams: Iterable[StreamSession]) -> None:
        total = sum(source() for source in self.sources)
        full: list[tuple[float, int, StreamSession]] = []
        for s in streams:
            if s.cut or s.phase is Phase.FINISHING:
                continue  # on its way out: its bytes go with it
            total += s.held_bytes
            if s.writing_since and not s.orphaned_at:
                size = self.full_bytes(s)
                total += size
                full.append((s.writing_since, size, s))
        full.sort(key=lambda entry: entry[0])
        reports = self._table.publish(total, [(since, size) for since, size, _ in full], self.over)
        self.worker_bytes = total
        self.instance_bytes = sum(report.buffered for report in reports)
        if self.instance_bytes >= self.budget_bytes:
            self.over = True
        elif self.instance_bytes < self.budget_bytes * ADMIT_BELOW:
            self.over = False
        else:  # in between: refuse if any worker does, so that no worker misses the peak another one cut away
            self.over = any(report.refusing for report in reports)
        if total != self._published:
            self._published = total
            BUFFERED_BYTES.set(total)
        limit = cutoff(reports, self.budget_bytes)
        if limit is None:
            return
        victims = [s for since, _, s in full if since <= limit]
        for s in victims:
            s.cut_with(
                MemoryPressureError(
                    "this stream's client stopped reading while the gateway reached its memory budget for buffered "
                    "stream data; its generation has ended: retry the request"
                )
            )
        if victims:
            logger.warning(
                "memory budget reached: streams with the oldest full buffers cut",
                extra={"cut": len(victims), "buffered_bytes": self.instance_bytes, "budget_bytes": self.budget_bytes},
            )
