"""The resume store: what a stream's producer appends and what reconnecting clients read.

The producer (the original connection's relay) writes each batch to its client *and* appends the
same framed bytes here. Appends are buffered in memory and written to the backend by one flusher
per worker, one tick every RESUME_FLUSH_INTERVAL_SECONDS, so the per-token path gains a list append,
not a syscall or a network round trip. Readers replay from the backend and then tail it until the
stream's final event.

Lazy writes: a stream whose client is connected is read by nobody else, so its events wait in memory
until the oldest of them is RESUME_WRITE_DELAY_SECONDS old (counted in ticks: the logs that became
dirty in one tick are one generation, written together that many ticks later), then go in one write.
Everything a reader needs is written on the next tick: a log's first write (a resume right after the
start finds the stream), a finished stream's last events, a log whose client left (an orphan), a log
someone tails (below), a tombstone; and everything at once on `hand_over` and `stop`. The trade-off:
a worker that crashes loses up to RESUME_WRITE_DELAY_SECONDS of a connected stream's events from its
log (one flush interval when every tick writes: RESUME_WRITE_DELAY_SECONDS=0). `buffered_bytes`
counts every byte still held.

Events are the seed `/stream` SSE frames with an `id: <stream id>-<seq>` line: seq 0 is the
status event, 1..n the tokens, n+1 the final `done`/`error`. `Last-Event-ID: <stream id>-<k>`
asks for every event after k.

A backend failure never reaches a stream: the flush drops what it could not write, the streams
concerned stop being resumable (readers get `not_resumable`), and a stream that already had
events stored gets a final `not_resumable` event once the backend answers again, so nobody tails
it forever. One warning per worker when the backend starts failing, one line when it is back.

Ownership: every log records its stream's owner (a hash of the API key; "" without keys) when
it is created, and a read from the start names the owner it expects: a stream of someone else reads
exactly like an unknown one (LookupError), after the same grace reads.

Stop: `request_stop` leaves a mark for the stream in the backend and rings the stop bell (one value per
instance or fleet that changes with every stop). Each worker's flusher reads the bell every tick while it
produces resumable streams, and only when it changed looks up marks for its own generations, which it then
cancels. A claimer looks for a mark before it continues a stream.

Readers: a reader that starts tailing a live stream leaves its reader mark; its stream's producer may believe
its own client is still there (a half-open connection) and hold the events back. A new mark is announced on
a channel of its own that names the stream (Redis: an entry in a capped stream; the local store: a bell of its
own, readers.bell), read in the same call as the stop bell (`Backend.bells`) by a flusher that holds logs back.
A worker only matches the new readers' ids against its own held-back logs (Redis), or, when the backend cannot
tell which streams they are (the local store's bell, one pod's streams), looks up those logs' marks; either
way the logs found are written every tick from then on. Neither a stop nor a reader costs lookups of the
other kind.

Rolling upgrade: a replica from before this channel announces its readers on the stop bell only (new replicas
then look for stop marks in vain), and a producer from before it does not read the channel. Nothing is lost
either way: such a tail gets its events in bursts, one per RESUME_WRITE_DELAY_SECONDS, until the producer's
client is gone (its log is then written every tick) or the stream ends.

Handover (drain with the Redis store): `EventLog.hand_over` flushes the log and publishes the
stream to the fleet instead of closing it; another instance appends the rest (resume/claimer.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import re
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from app.errors import NotResumableError
from app.observability.metrics import REPLAYED_EVENTS_TOTAL, RESUME_STORE_ERRORS_TOTAL, RESUMPTIONS_TOTAL
from app.storage.errors import StorageError

logger = logging.getLogger("app.resume")

EVENT_ID = re.compile(r"^([0-9a-f]{32})-(\d{1,9})$")  # <stream id>-<seq>, as sent in `id:` lines
FINAL_TYPES = (b'"type": "done"', b'"type": "error"')
BACKEND_ERRORS = (StorageError, OSError)  # what a backend may raise; anything else is a bug
UNKNOWN_GRACE_READS = 3  # an unknown stream is read this many more times, a flush interval apart, before 404
READER_CHECK_TICKS = 5  # producers look for readers of their orphaned generations every this many flushes


class Generation(Protocol):
    """A generation of this worker as the store sees it (a StreamSession writing a resume log)."""

    @property
    def id(self) -> str: ...

    def reader_seen(self) -> None:
        """A client reads this stream again: restart its orphan timeout."""
        ...

    def stop(self) -> None:
        """Its owner asked to stop it: cancel the generation (final event `cancelled`)."""
        ...


MAX_TOMBSTONES = 10_000  # streams awaiting their final not_resumable event after a failed flush


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
    owner: str = ""  # who may read and stop it: a hash of its API key ("" without keys: the id is the capability)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> StreamMeta:
        data = json.loads(raw)
        return cls(
            stream_id=str(data["stream_id"]),
            model=str(data["model"]),
            messages=list(data["messages"]),
            max_tokens=int(data["max_tokens"]),
            options=dict(data.get("options") or {}),
            owner=str(data.get("owner") or ""),
        )


class Backend(Protocol):
    """Where flushed events live: a per-instance directory, or Redis Streams for the fleet."""

    async def write(self, chunks: dict[str, bytes], created: dict[str, str]) -> None:
        """Append each stream's bytes (one call per flush for all dirty streams).

        `created`: the streams whose log this write starts, with their owner (recorded with the log).
        """
        ...

    async def read(self, stream_id: str, cursor: str, owner: str) -> tuple[bytes, str] | None:
        """Bytes appended after `cursor` ("" = from the start) and the next cursor.

        None if unknown or expired, and, for a read from the start, if `owner` is not the stream's owner.
        """
        ...

    async def request_stop(self, stream_id: str, ttl_s: float) -> None:
        """Mark the stream as stopped by its owner (the mark lasts `ttl_s`), then ring the bell."""
        ...

    async def stop_bell(self) -> object:
        """A value that changes with every stop (one cheap read: a stat, a GET)."""
        ...

    async def bells(self) -> tuple[object, set[str] | None]:
        """The stop bell (as `stop_bell`) and the streams with a new reader mark since the last call, in one read.

        None for the readers: cannot tell which (the first call, a bell that names no stream, a backlog too
        long to read): look up the mark of every log held back. A call that raises consumes nothing.
        """
        ...

    async def stops_requested(self, stream_ids: list[str]) -> set[str]:
        """Which of these streams carry a stop mark."""
        ...

    async def expire(self, stream_id: str) -> None:
        """The stream ended: keep it for the TTL, then let it go."""
        ...

    async def mark_reader(self, stream_id: str, ttl_s: float) -> None:
        """A client is reading this stream now (a resumed tail); the mark lasts `ttl_s`.

        A mark placed where none was fresh is then announced to `bells` (after the mark: a worker told finds it).
        """
        ...

    async def readers_seen(self, stream_ids: list[str]) -> set[str]:
        """Which of these streams have a live reader mark (their producers keep generating for them)."""
        ...

    async def sweep(self) -> None:
        """Drop streams past their TTL (called now and then by the flusher)."""
        ...

    async def aclose(self) -> None: ...


class HandoverSink(Protocol):
    """Where a draining instance hands its unfinished generations (resume/handover.py)."""

    async def publish(self, meta: StreamMeta) -> bool:
        """Offer the stream to the fleet; False if that failed (the stream then ends not resumable)."""
        ...


class EventLog:
    """One stream's side of the store, held by its producer. `append` is synchronous and cheap."""

    __slots__ = (
        "stream_id",
        "meta",
        "_store",
        "_storable",
        "_pending",
        "_events",
        "_closed",
        "resumable",
        "stored",
        "created",
        "eager",
        "due",
    )

    def __init__(self, store: ResumeStore, meta: StreamMeta, *, first_seq: int = 0, eager: bool = False) -> None:
        self.stream_id = meta.stream_id
        self.meta = meta
        self._store = store
        self._pending: list[bytes] = []
        self._events = first_seq  # events appended so far: the seq of the next one
        self._closed = False
        self.resumable = True  # False once the stream outgrew RESUME_MAX_EVENTS or a flush of it failed
        # The event count up to which appends are kept: RESUME_MAX_EVENTS, or -1 once closed or not resumable, so
        # that `append` tells its common case from every other with one comparison.
        self._storable = store.max_events
        self.stored = False  # some of its events reached the backend
        self.created = first_seq > 0  # its log exists in the backend (a continued stream's always does)
        self.eager = eager  # written every tick: someone may read it now (see write_eagerly)
        self.due = 0  # the tick its held-back events are written at (the store's generation it waits in)

    def append(self, payload: bytes, events: int) -> None:
        """Per batch of every resumable stream: kept to a few attribute reads (no byte count; see buffered_bytes)."""
        count = self._events + events
        if count > self._storable:  # closed, not resumable, or past RESUME_MAX_EVENTS
            self._append_unkept(count)
            return
        self._events = count
        pending = self._pending
        if not pending:
            self._store.dirty[self.stream_id] = self
        pending.append(payload)

    def _append_unkept(self, count: int) -> None:
        if self._closed:
            return
        self._events = count  # counted even when not resumable: a final not_resumable event comes after all
        if self.resumable:  # past RESUME_MAX_EVENTS
            self._store.broken(self)

    def stop_keeping(self, *, closed: bool) -> None:
        """No more appends are kept: the log is closed (none counted either), or it is not resumable any more."""
        self._storable = -1
        if closed:
            self._closed = True
        else:
            self.resumable = False

    @property
    def pending_bytes(self) -> int:
        """Appended, not yet taken by a flush."""
        return sum(map(len, self._pending))

    @property
    def last_event_id(self) -> str:
        """The id of the last event appended (what a client that saw all of them resumes after)."""
        return f"{self.stream_id}-{self._events - 1}"

    def take(self) -> bytes:
        pending, self._pending = self._pending, []
        return b"".join(pending)

    def write_eagerly(self) -> None:
        """From now on written every tick, and what it holds back on the next one: a client reads it from the
        store (a resumed tail, or its own client left and may come back), or it ended."""
        if not self.eager:
            self.eager = True
            self._store.held_back.pop(self.stream_id, None)
            if self._pending:  # waiting for its delay: written on the next tick
                self._store.urgent[self.stream_id] = self

    def close(self, final: bytes) -> None:
        """The stream's last event; the log is flushed on the next tick and expires after the TTL."""
        self.append(final, 1)
        self.stop_keeping(closed=True)
        self.write_eagerly()
        self._store.finished.append(self.stream_id)

    def abandon(self) -> None:
        """Stop writing without a final event (a claimer that lost its lease: the log is someone else's)."""
        self.stop_keeping(closed=True)
        self.take()
        self._store.forget(self)

    def tombstone(self) -> bytes:
        """The final event of a log whose events were lost: resuming it is impossible."""
        error = NotResumableError("events of this stream were lost (resume store unavailable or stream too long)")
        return f"id: {self.stream_id}-{self._events}\n".encode() + error.event_bytes()

    async def hand_over(self) -> bool:
        """Drain: flush, then publish the stream for another instance to finish; no final event is written.

        False when no handover is possible (no sink, not resumable, the flush or the publish
        failed): the caller then closes the log with its final event as usual.
        """
        store = self._store
        if store.handover is None or self._closed or not self.resumable:
            return False
        await store.flush(everything=True)
        if not self.resumable or not await store.handover.publish(self.meta):
            return False
        self.stop_keeping(closed=True)
        store.forget(self)
        return True


class ResumeStore:
    """Buffers every producer's appends and flushes them to the backend on one per-worker tick."""

    def __init__(
        self,
        backend: Backend,
        *,
        flush_interval_s: float,
        max_events: int,
        write_delay_s: float = 0.0,
        sweep_every: int = 50,
        handover: HandoverSink | None = None,
        on_tick: Callable[[], None] | None = None,
        orphans: Callable[[], list[Generation]] | None = None,
        producers: Callable[[], Sequence[Generation]] | None = None,
        ttl_s: float = 300.0,
    ) -> None:
        self.backend = backend
        self.flush_interval_s = flush_interval_s
        self.max_events = max_events
        self.ttl_s = ttl_s  # how long a stream's marks (stop) last: as long as its log
        self.handover = handover  # set with the Redis store when the upstream can continue a generation
        # Every log holding events is in exactly one of `dirty` (it got its first pending event since the last
        # tick: EventLog.append puts it there) or `_waiting` (held back: tick it is due at -> its logs).
        self.dirty: dict[str, EventLog] = {}
        self._waiting: dict[int, dict[str, EventLog]] = {}
        self.urgent: dict[str, EventLog] = {}  # made eager while waiting: written on the next tick
        self._tick = 0  # flushes so far
        # a connected stream's events wait this many ticks (1: every tick), rounded up (1e-9: 1.1 / 0.1 is 11.000...2)
        self._delay_ticks = max(1, math.ceil(write_delay_s / flush_interval_s - 1e-9))
        # written at least once, held back (not eager), not ended: what a new reader's mark can make eager
        self.held_back: dict[str, EventLog] = {}
        self.finished: list[str] = []
        self.writing_bytes = 0  # taken by the flush under way, not yet written
        self.healthy = True  # the backend's last call succeeded
        self._tombstones: dict[str, EventLog] = {}
        self._sweep_every = sweep_every
        self._on_tick = on_tick  # sampled gauges (orphaned streams), once per flush interval
        self._orphans = orphans  # this worker's orphaned generations, kept alive while a client reads them
        self._producers = producers  # this worker's generations writing logs: what a stop can name
        self._bell: object = None  # the stop bell as last seen
        self._listening = False  # `bells` was read once: the backend announces new readers from then on
        self._readers_unheard = False  # a lookup of reader marks failed: every held-back log's is looked up again
        self._lock = asyncio.Lock()  # flushes write in order: a stream's chunks never overtake each other
        self._task: asyncio.Task[None] | None = None

    def open(self, meta: StreamMeta, *, first_seq: int = 0, eager: bool = False) -> EventLog:
        """A stream's log. `eager`: written every tick from the start (no client holds it: a continued stream)."""
        return EventLog(self, meta, first_seq=first_seq, eager=eager)

    @property
    def buffered_bytes(self) -> int:
        """Events held in memory until the backend has them (counted against MEMORY_BUDGET_BYTES).

        Counted when asked (once per watchdog tick), not per append: at most RESUME_WRITE_DELAY_SECONDS of a
        connected stream's batches, one flush interval of the others'."""
        held = sum(log.pending_bytes for log in self.dirty.values()) + self.writing_bytes
        return held + sum(log.pending_bytes for logs in self._waiting.values() for log in logs.values())

    def broken(self, log: EventLog) -> None:
        """`log` lost events: no longer resumable; if readers may know it, it gets a final not_resumable event."""
        log.stop_keeping(closed=False)
        log.take()
        self.forget(log)
        if log.stored and len(self._tombstones) < MAX_TOMBSTONES:
            self._tombstones[log.stream_id] = log

    def forget(self, log: EventLog) -> None:
        """`log` is written no more by this worker (broken, abandoned, handed over): drop it from every queue."""
        sid = log.stream_id
        self.dirty.pop(sid, None)
        self.urgent.pop(sid, None)
        self.held_back.pop(sid, None)
        waiting = self._waiting.get(log.due)
        if waiting is not None:
            waiting.pop(sid, None)

    def _due(self, everything: bool) -> dict[str, EventLog]:
        """One tick's logs to write: the new ones, the eager ones, those whose delay is up (all if `everything`)."""
        fresh, self.dirty = self.dirty, {}
        urgent, self.urgent = self.urgent, {}  # each is in `fresh` or waiting too: a log in `due` leaves both
        if everything or self._delay_ticks == 1:
            for logs in self._waiting.values():
                fresh.update(logs)
            self._waiting.clear()
            return fresh
        due = self._waiting.pop(self._tick, {})
        later = self._tick + self._delay_ticks - 1
        held: dict[str, EventLog] | None = None
        for sid, log in fresh.items():
            if log.eager or not log.created:  # a first write is prompt: a resume right after the start finds it
                due[sid] = log
            else:
                if held is None:
                    held = self._waiting[later] = {}
                held[sid] = log
                log.due = later  # a log is in one generation at a time: `due` names it (stale once it is written)
        for sid, log in urgent.items():
            waiting = self._waiting.get(log.due)
            if waiting is not None:
                waiting.pop(sid, None)
            due[sid] = log
        return due

    async def flush(self, *, everything: bool = False) -> None:
        """One tick: write what is due; `everything`: every event held (a handover, the worker's stop)."""
        async with self._lock:
            self._tick += 1
            dirty = self._due(everything)
            finished, self.finished = self.finished, []
            tombstones, self._tombstones = self._tombstones, {}
            chunks = {sid: log.take() for sid, log in dirty.items()}
            created = {sid: log.meta.owner for sid, log in dirty.items() if not log.created}
            for sid in created:
                log = dirty[sid]
                log.created = True  # a failed first write breaks the log: it is never written again
                if not log.eager and self._delay_ticks > 1:
                    self.held_back[sid] = log
            for sid, log in tombstones.items():
                chunks[sid] = chunks.get(sid, b"") + log.tombstone()
                if sid not in finished:  # its log's last write: the handle it may reopen goes with it
                    finished.append(sid)
            self.writing_bytes = sum(map(len, chunks.values()))
            try:
                if chunks:
                    await self._write(chunks, created, dirty, tombstones)
            finally:  # even after a failed write: a finished stream's file handle must not outlive it
                self.writing_bytes = 0
                try:
                    for sid in finished:
                        await self.backend.expire(sid)
                except BACKEND_ERRORS as exc:  # the rest keep the TTL their last write set
                    self._failed(exc)

    async def _write(
        self,
        chunks: dict[str, bytes],
        created: dict[str, str],
        dirty: dict[str, EventLog],
        tombstones: dict[str, EventLog],
    ) -> None:
        try:
            await self.backend.write(chunks, created)
        except BACKEND_ERRORS as exc:
            self._failed(exc)
            for log in dirty.values():
                self.broken(log)
            for sid, log in tombstones.items():
                if len(self._tombstones) < MAX_TOMBSTONES:
                    self._tombstones.setdefault(sid, log)
            return
        self._succeeded()
        for log in dirty.values():
            log.stored = True

    def _failed(self, exc: BaseException) -> None:
        RESUME_STORE_ERRORS_TOTAL.inc()
        if self.healthy:
            self.healthy = False
            logger.warning("resume store unavailable: streams continue without resumption", extra={"error": str(exc)})

    def _succeeded(self) -> None:
        if not self.healthy:
            self.healthy = True
            logger.info("resume store reachable again: new streams are resumable")

    async def _run(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(self.flush_interval_s)
            ticks += 1
            try:
                if self._on_tick is not None:
                    self._on_tick()
                await self.hear_bell()  # before the flush: a log a reader just asked for is written in this tick
                await self.flush()
                if ticks % READER_CHECK_TICKS == 0:
                    await self._keep_read_orphans_alive()
                if ticks % self._sweep_every == 0:
                    await self.backend.sweep()
            except Exception:  # pragma: no cover - the store must not take streams down with it
                logger.exception("resume store flush failed")

    @property
    def reader_mark_s(self) -> float:
        """How long a reader's mark lasts: a few checks, so one late poll does not orphan the stream."""
        return self.flush_interval_s * READER_CHECK_TICKS * 3

    async def _keep_read_orphans_alive(self) -> None:
        """An orphaned generation whose client came back (on any worker or replica) is not orphaned."""
        orphans = self._orphans() if self._orphans is not None else []
        if not orphans:
            return
        try:
            read = await self.backend.readers_seen([orphan.id for orphan in orphans])
        except BACKEND_ERRORS:
            return  # no verdict: the orphan timeout stands
        for orphan in orphans:
            if orphan.id in read:
                orphan.reader_seen()

    async def hear_bell(self) -> None:
        """Cancel this worker's generations whose owner asked another worker or replica to stop them, and write
        every tick the logs it held back that a client now tails (on any worker or replica)."""
        producers = self._producers() if self._producers is not None else []
        if not producers:
            return  # the bells are read again once there are; a changed value then triggers one lookup
        # New readers are listened for while logs are held back, and once as soon as there are producers: the
        # backend starts announcing them at that first call (Redis: its cursor is then the newest entry). That
        # first call comes before this worker's first write (this tick's flush comes after it), and a reader
        # marks a stream only after reading it, so no reader of a log written here is announced before it;
        # should the first call fail, its None on the next tick still looks up every held-back log's mark.
        listen = bool(self.held_back) or (self._delay_ticks > 1 and not self._listening)
        try:
            if listen:
                bell, readers = await self.backend.bells()
                self._listening = True
            else:
                bell, readers = await self.backend.stop_bell(), set()
        except BACKEND_ERRORS:
            return  # nothing consumed: the same bells are heard on the next tick
        if bell != self._bell:
            with contextlib.suppress(*BACKEND_ERRORS):  # no verdict now: the bell still differs on the next tick
                requested = await self.backend.stops_requested([p.id for p in producers])
                self._bell = bell
                for producer in producers:
                    if producer.id in requested:
                        producer.stop()
        if readers is None or self._readers_unheard:
            held = list(self.held_back)
            try:
                seen = await self.backend.readers_seen(held) if held else set()
            except BACKEND_ERRORS:
                self._readers_unheard = True  # looked up again on the next tick
                seen = set()
            else:
                self._readers_unheard = False
            readers = seen if readers is None else readers | seen  # the ones named are heard either way
        for sid in readers:
            log = self.held_back.get(sid)
            if log is not None:
                log.write_eagerly()

    async def request_stop(self, stream_id: str) -> None:
        """Ask whichever worker or replica produces `stream_id` to stop it (LookupError if the backend failed)."""
        try:
            await self.backend.request_stop(stream_id, self.ttl_s)
        except BACKEND_ERRORS as exc:
            self._failed(exc)
            raise LookupError(stream_id) from exc

    async def stop_requested(self, stream_id: str) -> bool:
        """Did its owner ask to stop this stream (a claimer asks before it continues one)?"""
        return stream_id in await self.backend.stops_requested([stream_id])

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="resume-flush")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.flush(everything=True)
        await self.backend.aclose()

    async def _read(self, stream_id: str, cursor: str, owner: str) -> tuple[bytes, str]:
        try:
            found = await self.backend.read(stream_id, cursor, owner)
        except BACKEND_ERRORS as exc:
            self._failed(exc)
            raise LookupError(stream_id) from exc
        if found is None:
            raise LookupError(stream_id)
        return found

    async def replay(
        self, stream_id: str, after_seq: int, *, owner: str, poll_s: float, endpoint: str | None = "/stream/{stream_id}"
    ) -> AsyncGenerator[list[bytes]]:
        """Every frame after `after_seq`, then the live tail, until the final event.

        Each seq is yielded once, in order (a frame whose seq was already passed is skipped, so a
        claimer that appends an event twice cannot duplicate it). `endpoint` labels the metrics
        (None: not a resumption, nothing is counted). Raises LookupError if the stream is unknown,
        expired, not `owner`'s, or no longer holds `after_seq + 1`.
        """
        for _ in range(UNKNOWN_GRACE_READS):  # its producer may not have flushed yet
            try:
                found = await self._read(stream_id, "", owner)
                break
            except LookupError:
                await asyncio.sleep(poll_s)
        else:
            found = await self._read(stream_id, "", owner)
        carry = b""
        first = unchecked = True
        while True:
            chunk, cursor = found
            data = carry + chunk
            cut = data.rfind(b"\n\n") + 2  # only whole frames; the rest waits for the next read
            frames, carry = split_events(data[:cut]), data[cut:]
            if unchecked and frames:
                if frame_seq(frames[0], stream_id) > after_seq + 1:
                    raise LookupError(stream_id)  # the events asked for are no longer held
                unchecked = False
            out = []
            for frame in frames:
                seq = frame_seq(frame, stream_id)
                if seq > after_seq:
                    out.append(frame)
                    after_seq = seq
            if first and endpoint is not None:
                first = False
                RESUMPTIONS_TOTAL.labels(endpoint).inc()
                REPLAYED_EVENTS_TOTAL.inc(len(out))
            if out:
                yield out
            if frames and is_final(frames[-1]):
                return
            # A live tail: its mark extends an orphan's life, and a new one has its stream written every tick.
            # After the events it read (no round trip before they reach the client), before the poll's wait
            # (the producer hears of it by its next tick).
            with contextlib.suppress(*BACKEND_ERRORS):
                await self.backend.mark_reader(stream_id, self.reader_mark_s)
            await asyncio.sleep(poll_s)
            found = await self._read(stream_id, cursor, owner)
