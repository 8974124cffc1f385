"""The resume store: what a stream's producer appends and what reconnecting clients read.

The producer (the original connection's relay) writes each batch to its client *and* appends the
same framed bytes here. Appends are buffered in memory and written to the backend by one flusher
per worker every RESUME_FLUSH_INTERVAL_SECONDS, so the per-token path gains a list append, not a
syscall or a network round trip. Readers replay from the backend and then tail it until the
stream's final event.

Events are the seed `/stream` SSE frames with an `id: <stream id>-<seq>` line: seq 0 is the
status event, 1..n the tokens, n+1 the final `done`/`error`. `Last-Event-ID: <stream id>-<k>`
asks for every event after k.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

logger = logging.getLogger("app.resume")

EVENT_ID = re.compile(r"^([0-9a-z]{1,64})-(\d{1,9})$")  # <stream id>-<seq>, as sent in `id:` lines
FINAL_TYPES = (b'"type": "done"', b'"type": "error"')


def parse_event_id(value: str) -> tuple[str, int] | None:
    match = EVENT_ID.fullmatch(value.strip())
    return (match.group(1), int(match.group(2))) if match else None


def split_events(payload: bytes) -> list[bytes]:
    """SSE frames of a log chunk (each ends with a blank line)."""
    return [frame + b"\n\n" for frame in payload.split(b"\n\n") if frame]


def frame_seq(frame: bytes, stream_id: str) -> int:
    """The seq of a frame written by this store's producer (`id: <sid>-<seq>` is its first line)."""
    first_line = frame.split(b"\n", 1)[0]
    return int(first_line.rsplit(b"-", 1)[1])


def is_final(frame: bytes) -> bool:
    return any(marker in frame for marker in FINAL_TYPES)


@dataclass
class StreamMeta:
    """What another instance needs to continue a generation (handover)."""

    stream_id: str
    model: str
    messages: list[dict[str, Any]]
    max_tokens: int
    options: dict[str, Any] = field(default_factory=dict)


class Backend(Protocol):
    """Where flushed events live: a per-instance directory, or Redis Streams for the fleet."""

    async def write(self, chunks: dict[str, bytes]) -> None:
        """Append each stream's bytes (one call per flush for all dirty streams)."""
        ...

    async def read(self, stream_id: str, cursor: str) -> tuple[bytes, str] | None:
        """Bytes appended after `cursor` ("" = from the start) and the next cursor; None if unknown or expired."""
        ...

    async def expire(self, stream_id: str) -> None:
        """The stream ended: keep it for the TTL, then let it go."""
        ...

    async def sweep(self) -> None:
        """Drop streams past their TTL (called now and then by the flusher)."""
        ...

    async def aclose(self) -> None: ...


class EventLog:
    """One stream's side of the store, held by its producer. `append` is synchronous and cheap."""

    __slots__ = ("stream_id", "meta", "_store", "_pending", "_events", "_closed", "resumable")

    def __init__(self, store: ResumeStore, meta: StreamMeta) -> None:
        self.stream_id = meta.stream_id
        self.meta = meta
        self._store = store
        self._pending: list[bytes] = []
        self._events = 0
        self._closed = False
        self.resumable = True  # False once the stream outgrew RESUME_MAX_EVENTS

    def append(self, payload: bytes, events: int) -> None:
        if self._closed or not self.resumable:
            return
        self._events += events
        if self._events > self._store.max_events:
            self.resumable = False
            return
        if not self._pending:
            self._store.dirty[self.stream_id] = self
        self._pending.append(payload)

    def take(self) -> bytes:
        pending, self._pending = self._pending, []
        return b"".join(pending)

    def close(self, final: bytes) -> None:
        """The stream's last event; the log is flushed on the next tick and expires after the TTL."""
        self.append(final, 1)
        self._closed = True
        self._store.finished.append(self.stream_id)


class ResumeStore:
    """Buffers every producer's appends and flushes them to the backend on one per-worker tick."""

    def __init__(self, backend: Backend, *, flush_interval_s: float, max_events: int,
                 sweep_every: int = 50) -> None:
        self.backend = backend
        self.flush_interval_s = flush_interval_s
        self.max_events = max_events
        self.dirty: dict[str, EventLog] = {}
        self.finished: list[str] = []
        self._sweep_every = sweep_every
        self._task: asyncio.Task[None] | None = None

    def open(self, meta: StreamMeta) -> EventLog:
        return EventLog(self, meta)

    async def flush(self) -> None:
        dirty, self.dirty = self.dirty, {}
        finished, self.finished = self.finished, []
        if dirty:
            await self.backend.write({sid: log.take() for sid, log in dirty.items()})
        for sid in finished:
            await self.backend.expire(sid)

    async def _run(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(self.flush_interval_s)
            ticks += 1
            try:
                await self.flush()
                if ticks % self._sweep_every == 0:
                    await self.backend.sweep()
            except Exception:  # pragma: no cover - the store must not take streams down with it
                logger.exception("resume store flush failed")

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="resume-flush")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.flush()
        await self.backend.aclose()

    async def replay(self, stream_id: str, after_seq: int, *, poll_s: float) -> AsyncIterator[list[bytes]]:
        """Every frame after `after_seq`, then the live tail, until the final event.

        Raises LookupError if the stream is unknown, expired, or no longer holds `after_seq + 1`.
        """
        found = await self.backend.read(stream_id, "")
        if found is None:
            raise LookupError(stream_id)
        carry = b""
        first = True
        while True:
            chunk, cursor = found
            data = carry + chunk
            cut = data.rfind(b"\n\n") + 2  # only whole frames; the rest waits for the next read
            frames, carry = split_events(data[:cut]), data[cut:]
            if first and frames:
                if frame_seq(frames[0], stream_id) > after_seq + 1:
                    raise LookupError(stream_id)  # the events asked for are no longer held
                first = False
            out = [frame for frame in frames if frame_seq(frame, stream_id) > after_seq]
            if out:
                yield out
            if frames and is_final(frames[-1]):
                return
            await asyncio.sleep(poll_s)
            found = await self.backend.read(stream_id, cursor)
            if found is None:
                raise LookupError(stream_id)
