"""One object owns a stream's life; one per-worker registry watches every stream's clock.

`StreamSession` holds the facts (id, endpoint, model, timings, tokens, outcome) that metrics,
logs and traces all read. `StreamRegistry` holds every stream of the worker from admission to
release, and runs one watchdog task that checks deadlines and idle pings a few times a second
instead of arming a timer around each token wait: the per-token path only stores a timestamp.
A stalled upstream therefore trips the inter-token deadline even though no token ever arrives.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from app.errors import BackpressureError, GatewayError, OrphanTimeoutError, StreamCancelledError, StreamTimeoutError

logger = logging.getLogger("app.streaming")


class Phase(enum.IntEnum):
    OPENING = 0  # waiting for the upstream to accept; a cut here becomes a plain HTTP error
    RELAYING = 1  # tokens flow; a cut here becomes the stream's final event
    FINISHING = 2  # writing the final event; no more cuts


class Outcome(enum.StrEnum):
    DONE = "done"
    ERROR = "error"
    TIMEOUT = "timeout"
    BACKPRESSURE = "backpressure"
    CLIENT_GONE = "client_gone"
    SHUTDOWN = "shutdown"
    CANCELLED = "cancelled"  # its owner stopped it (not a disconnect: the final event says so)


class StreamSession:
    """The life of one stream, from admission to the last byte."""

    __slots__ = (
        "id",
        "request_id",
        "endpoint",
        "model",
        "client",
        "started_at",
        "first_token_at",
        "last_token_at",
        "last_ping_at",
        "writing_since",
        "tokens",
        "phase",
        "outcome",
        "cut_error",
        "client_gone",
        "task",
        "ping",
        "resumable",
        "orphaned_at",
        "on_orphaned",
        "replays",
        "write_bytes",
        "held_bytes",
    )

    def __init__(
        self, *, stream_id: str, endpoint: str, model: str, client: str, now: float, request_id: str = ""
    ) -> None:
        self.id = stream_id
        self.request_id = request_id
        self.endpoint = endpoint
        self.model = model
        self.client = client
        self.started_at = now
        self.first_token_at = 0.0
        self.last_token_at = 0.0
        self.last_ping_at = now  # the watchdog's last ping (its start before any): with last_token_at, its last write
        self.writing_since = 0.0  # non-zero while a write to the client is pending
        self.tokens = 0
        self.phase = Phase.OPENING
        self.outcome: Outcome | None = None
        self.cut_error: GatewayError | None = None
        self.client_gone = False
        self.task: asyncio.Task[Any] | None = None
        self.ping: Callable[[], Coroutine[Any, Any, None]] | None = None  # set by relays that can ping
        self.resumable = False  # its events go to the resume store: it may outlive its client
        self.orphaned_at = 0.0  # when its client left while the generation ran on (0: it did not)
        self.on_orphaned: Callable[[], None] | None = None  # its resume log's: written every flush from then on
        self.replays = ""  # a resumed read: the id of the stream it replays (its own id is a fresh one)
        self.write_bytes = 0  # size of the latest write to the client (set per batch; memory.py reads it)
        self.held_bytes = 0  # answer text held until the stream ends (non-streamed completions)

    @property
    def cut(self) -> bool:
        """Was this stream ended from outside its task (a reason is on the session)?"""
        return self.client_gone or self.cut_error is not None

    def cut_with(self, error: GatewayError) -> None:
        """End the stream from outside its task (deadline, slow client, drain); the first reason wins."""
        if self.phase is Phase.FINISHING or self.cut:
            return
        self.cut_error = error
        if self.task is not None:
            self.task.cancel()

    def stop(self) -> None:
        """Its owner stopped it: the generation ends now, with a final `cancelled` event."""
        self.cut_with(StreamCancelledError())

    def reader_seen(self) -> None:
        """Its client reads it again (a resumed tail, maybe on another worker): not orphaned any more."""
        if self.orphaned_at:
            self.orphaned_at = asyncio.get_running_loop().time()

    def client_disconnected(self) -> None:
        if self.phase is Phase.FINISHING or self.cut:
            self.client_gone = True
            return
        self.client_gone = True
        if self.task is not None:
            self.task.cancel()


class StreamRegistry:
    """The streams of this worker, and the watchdog that enforces their deadlines."""

    def __init__(
        self,
        *,
        first_token_s: float,
        inter_token_s: float,
        total_s: float,
        slow_client_s: float,
        ping_interval_s: float,
        check_interval_s: float,
        orphan_timeout_s: float = 0.0,
        max_orphans: int = 0,
        memory: Callable[[set[StreamSession]], None] | None = None,
    ) -> None:
        self.streams: set[StreamSession] = set()
        self._memory = memory  # the memory budget's pass (streaming/memory.py), after the deadlines
        self.orphans = 0
        self._orphan_timeout_s = orphan_timeout_s
        self._max_orphans = max_orphans
        self.closing_error: GatewayError | None = None  # set by the drain: streams admitted late are cut at once
        self._first_token_s = first_token_s
        self._inter_token_s = inter_token_s
        self._total_s = total_s
        self._slow_client_s = slow_client_s
        self._ping_interval_s = ping_interval_s
        self._check_interval_s = check_interval_s
        self._watchdog: asyncio.Task[None] | None = None
        self._pings: set[asyncio.Task[None]] = set()
        self._empty = asyncio.Event()
        self._empty.set()

    @property
    def slow_client_s(self) -> float:
        """SLOW_CLIENT_TIMEOUT_SECONDS: also how long a final event waits on a client that stopped reading."""
        return self._slow_client_s

    def add(self, session: StreamSession) -> None:
        self.streams.add(session)
        self._empty.clear()
        if self.closing_error is not None:
            session.cut_error = self.closing_error

    def client_left(self, session: StreamSession) -> None:
        """The client went away. A resumable generation runs on (bounded) for it to reconnect."""
        keep = (
            session.resumable
            and session.phase is Phase.RELAYING
            and not session.cut
            and self._orphan_timeout_s > 0
            and self.orphans < self._max_orphans
        )
        if not keep:
            session.client_disconnected()
            return
        self.orphans += 1
        session.orphaned_at = asyncio.get_running_loop().time()
        if session.on_orphaned is not None:  # its client will read it from the store: no events held back
            session.on_orphaned()

    def producers(self) -> list[StreamSession]:
        """The generations writing a resume log (what a stop request can name)."""
        return [s for s in self.streams if s.resumable]

    def discard(self, session: StreamSession) -> None:
        if session.orphaned_at and session in self.streams:
            self.orphans -= 1
        self.streams.discard(session)
        if not self.streams:
            self._empty.set()

    async def wait_empty(self) -> None:
        await self._empty.wait()

    def cut_all(self, error: GatewayError) -> int:
        """Cut every stream (the drain deadline); later arrivals are cut on `add`. Returns how many."""
        self.closing_error = error
        cut = 0
        for session in list(self.streams):
            if not session.cut and session.phase is not Phase.FINISHING:
                session.cut_with(error)
                cut += 1
        return cut

    def sweep(self, now: float) -> None:
        """One watchdog pass: cut streams past a deadline, ping idle ones."""
        # A stream that got a token this recently, is not writing, not orphaned and younger than the total deadline
        # has nothing due (no deadline, and no ping: a token was written this recently). That is most
        # streams on every tick, so they cost one test.
        fresh_after = now - min(self._inter_token_s, self._ping_interval_s)
        born_after = now - self._total_s
        for s in list(self.streams):
            if (
                s.first_token_at
                and s.last_token_at > fresh_after
                and s.started_at > born_after
                and not s.writing_since
                and not s.orphaned_at
            ):
                continue
            if s.phase is Phase.FINISHING or s.cut:
                continue
            error = self._deadline_passed(s, now)
            if error is not None:
                s.cut_with(error)
            elif (
                s.ping is not None
                and not s.writing_since
                and not s.orphaned_at
                and now - max(s.last_token_at, s.last_ping_at) >= self._ping_interval_s
            ):
                s.last_ping_at = now
                task = asyncio.get_running_loop().create_task(s.ping())
                self._pings.add(task)
                task.add_done_callback(self._pings.discard)
        if self._memory is not None:
            self._memory(self.streams)

    def _deadline_passed(self, s: StreamSession, now: float) -> GatewayError | None:
        if s.orphaned_at and now - s.orphaned_at > self._orphan_timeout_s:
            return OrphanTimeoutError(self._orphan_timeout_s)
        if s.writing_since and not s.orphaned_at and now - s.writing_since > self._slow_client_s:
            return BackpressureError(f"client read nothing for {self._slow_client_s:g}s")
        if now - s.started_at > self._total_s:
            return StreamTimeoutError("total", self._total_s)
        if not s.first_token_at:
            if now - s.started_at > self._first_token_s:
                return StreamTimeoutError("first token", self._first_token_s)
            return None
        if not s.writing_since and now - s.last_token_at > self._inter_token_s:
            return StreamTimeoutError("inter-token", self._inter_token_s)
        return None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._check_interval_s)
            try:
                self.sweep(loop.time())
            except Exception:  # pragma: no cover - a watchdog bug must not stop deadline enforcement
                logger.exception("stream watchdog pass failed")

    def start(self) -> None:
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().create_task(self._run(), name="stream-watchdog")

    async def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, *self._pings, return_exceptions=True)
            self._watchdog = None
