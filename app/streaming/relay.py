"""The upstream-to-client pump and `StreamRun`, the owner of one stream's stay (responses.py uses them).

One stream is one task (the ASGI request task) plus a disconnect listener:

    admit ─► open upstream ─► headers + opening event ─► pump: batch ─► one write ─► ... ─► final event
               │ error or cut before headers:                  ▲ cut from outside (watchdog deadline, slow
               ▼ plain HTTP error                              │ client, drain, client gone): task.cancel()
                                                                 with the reason stored on the session

The pump takes every event already waiting upstream (at most STREAM_BUFFER_SIZE) as one batch and
writes it with one `send`. While a write waits on a slow client the upstream is not read, so what
a stream holds is bounded by one batch plus socket buffers, and the watchdog cuts a client that
accepts nothing for SLOW_CLIENT_TIMEOUT_SECONDS. `StreamRun` is entered once per stream and its
exit releases the registry entry, the active gauge and the upstream exactly once, on every path.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, Awaitable, Callable, Sized
from contextvars import Token
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, TypeVar

from starlette.types import Receive, Scope, Send

from app.errors import GatewayError, InternalError, NotResumableError, StreamTimeoutError, UpstreamError
from app.resume.store import EventLog
from app.streaming.session import Outcome, Phase, StreamRegistry, StreamSession
from app.upstream.base import Batch, ChatRequest, Upstream, UpstreamStream, Usage
from app.upstream.guard import CUT_FOR_UPSTREAM_FAULT

logger = logging.getLogger("app.streaming")
B = TypeVar("B", bound=Sized)  # a batch: texts, whole deltas, or stored frames

ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
BACKPRESSURE_FINAL_WRITE_S = 0.05  # a cut slow client gets its error event only if its socket takes it now
UPSTREAM_FAULT_DEADLINES = frozenset({"first token", "inter-token"})  # a stall the breaker should count
OUTCOME_BY_CODE = {
    "timeout": Outcome.TIMEOUT, "backpressure": Outcome.BACKPRESSURE, "server_shutdown": Outcome.SHUTDOWN,
    "cancelled": Outcome.CANCELLED,
    "memory_pressure": Outcome.BACKPRESSURE,  # a client not reading, cut early because the instance is at its budget
}


class Encoder(Protocol):
    def opening(self) -> bytes: ...
    def tokens(self, batch: Batch) -> bytes: ...
    def done(self, tokens: int, finish_reason: str | None, usage: Usage | None) -> bytes: ...
    def error(self, error: GatewayError) -> bytes: ...


class StreamObserver(Protocol):
    """Told once when a stream is admitted and once when it ends (metrics, logs)."""

    def started(self, session: StreamSession) -> None: ...
    def finished(self, session: StreamSession, error: GatewayError | None) -> None: ...


class ClientGoneError(Exception):
    """The client left before the upstream answered: there is no one to answer."""


async def pump(session: StreamSession, stream: AsyncIterable[B], write: Callable[[B], Awaitable[None]],
               clock: Callable[[], float]) -> None:
    """Relay every upstream batch to `write`. The only per-token work: a timestamp and a count."""
    async for batch in stream:
        now = clock()
        if not session.first_token_at:
            session.first_token_at = now
        session.last_token_at = now
        session.tokens += len(batch)
        session.writing_since = now
        await write(batch)
        session.writing_since = 0.0
        session.last_write_at = now


@dataclass(frozen=True)
class Relay:
    """What every stream of a worker relays with (built once per worker)."""

    upstream: Upstream
    registry: StreamRegistry
    observer: StreamObserver
    max_batch: int  # STREAM_BUFFER_SIZE: most events per batch

    def run(self, session: StreamSession, *, receive: Receive, disconnect_type: str,
            release: Callable[[], Awaitable[None]] | None = None) -> StreamRun:
        return StreamRun(session, relay=self, receive=receive, disconnect_type=disconnect_type, release=release)


class StreamRun:
    """One stream's stay in the worker: registry entry, disconnect listener, cut handling, release."""

    def __init__(self, session: StreamSession, *, relay: Relay, receive: Receive, disconnect_type: str,
                 release: Callable[[], Awaitable[None]] | None = None) -> None:
        self.session = session
        self.deps = relay
        self.registry = relay.registry
        self.observer = relay.observer
        self._release = release  # the admission ticket: connection slot(s)
        self._receive = receive
        self._disconnect_type = disconnect_type
        self._listener: asyncio.Task[None] | None = None
        self._stream: UpstreamStream | None = None
        self._reported = False
        self._fault_marker: Token[Callable[[], bool]] | None = None

    async def __aenter__(self) -> StreamRun:
        session = self.session
        session.task = asyncio.current_task()
        # the guard asks it when an attempt is cancelled (opening, or a retry before the first token)
        self._fault_marker = CUT_FOR_UPSTREAM_FAULT.set(self._cut_for_upstream_fault)
        self.registry.add(session)
        self.observer.started(session)
        self._listener = asyncio.get_running_loop().create_task(self._listen())
        return self

    async def _listen(self) -> None:
        receive, disconnect_type = self._receive, self._disconnect_type
        while (await receive())["type"] != disconnect_type:
            pass
        self.registry.client_left(self.session)

    def _absorb_cut(self) -> bool:
        """After a CancelledError: True if it was our own cut (now absorbed), False if it must propagate."""
        task = self.session.task
        return self.session.cut and task is not None and task.uncancel() == 0

    async def open(self, request: ChatRequest) -> UpstreamStream:
        """Open the upstream; a cut while waiting raises the cut's reason (or ClientGoneError)."""
        session = self.session
        try:
            if session.cut_error is not None:  # admitted after the drain deadline
                raise session.cut_error
            self._stream = await self.deps.upstream.open(request, max_batch=self.deps.max_batch)
        except asyncio.CancelledError:
            if not self._absorb_cut():
                raise
            if session.client_gone:
                self.report(Outcome.CLIENT_GONE, None)
                raise ClientGoneError from None
            assert session.cut_error is not None
            raise session.cut_error from None
        return self._stream

    def _cut_for_upstream_fault(self) -> bool:
        error = self.session.cut_error
        return isinstance(error, StreamTimeoutError) and error.deadline in UPSTREAM_FAULT_DEADLINES

    async def open_or_refuse(self, request: ChatRequest,
                             refuse: Callable[[GatewayError], Awaitable[None]]) -> UpstreamStream | None:
        """Open the upstream, or answer the failure with `refuse` (nothing was sent yet) and return None."""
        try:
            return await self.open(request)
        except ClientGoneError:
            return None
        except GatewayError as exc:
            self.report(Outcome.ERROR, exc)
            await refuse(exc)
            return None

    async def relay(self, write: Callable[[Batch], Awaitable[None]],
                    opening: Callable[[], Awaitable[None]] | None = None) -> tuple[Outcome, GatewayError | None]:
        """Relay the opened stream until it ends; return how it ended (the caller writes the final event)."""
        stream = self._stream
        assert stream is not None
        outcome, error = await self.relay_from(stream, write, opening)
        if isinstance(error, StreamTimeoutError) and error.deadline in UPSTREAM_FAULT_DEADLINES:
            stream.mark_failed()
        return outcome, error

    async def relay_from(self, source: AsyncIterable[B], write: Callable[[B], Awaitable[None]],
                         opening: Callable[[], Awaitable[None]] | None = None) -> tuple[Outcome, GatewayError | None]:
        """Relay any source of batches (the upstream, or a resume store's replay) with the same exits."""
        session = self.session
        exc: Exception | None = None
        session.phase = Phase.RELAYING
        try:
            if session.cut_error is None:
                if opening is not None:
                    await opening()
                await pump(session, source, write, asyncio.get_running_loop().time)
        except asyncio.CancelledError:
            if not self._absorb_cut():
                raise
        except Exception as e:  # a GatewayError from upstream, or a bug: the stream ends with an error event
            exc = e
            if not isinstance(e, GatewayError) and not session.client_gone:
                logger.exception("relay failed", extra={"stream_id": session.id})
        session.phase = Phase.FINISHING
        session.ping = None
        outcome, error = _end_reason(session, exc)
        self.report(outcome, error)
        return outcome, error

    def report(self, outcome: Outcome, error: GatewayError | None) -> None:
        if not self._reported:
            self._reported = True
            if isinstance(error, UpstreamError):  # reported before any encoder writes it
                error.for_request(self.session.request_id)
            self.session.outcome = outcome
            self.observer.finished(self.session, error)

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._fault_marker is not None:
            CUT_FOR_UPSTREAM_FAULT.reset(self._fault_marker)
        self.session.phase = Phase.FINISHING
        if not self._reported:  # cancelled by the server itself, or an error before relaying
            error = exc if isinstance(exc, GatewayError) else None
            self.report(Outcome.ERROR if error else Outcome.SHUTDOWN, error)
        self.registry.discard(self.session)
        if self._release is not None:
            await self._release()
        if self._listener is not None:
            self._listener.cancel()
        if self._stream is not None:
            await self._stream.aclose()


def _end_reason(session: StreamSession, exc: Exception | None) -> tuple[Outcome, GatewayError | None]:
    if session.client_gone:
        return Outcome.CLIENT_GONE, None
    error = session.cut_error
    if error is None and isinstance(exc, GatewayError):
        error = exc
    elif error is None and exc is not None:
        error = InternalError("the gateway failed while relaying this stream")
    if error is None:
        return Outcome.DONE, None
    return OUTCOME_BY_CODE.get(error.code, Outcome.ERROR), error


async def end_log(log: EventLog, encoder: Encoder, session: StreamSession, stream: UpstreamStream | None,
                  error: GatewayError | None, *, tokens_before: int = 0) -> bool:
    """End a stream's resume log: hand the stream over (drain deadline, Redis store), else write its final event.

    True if it was handed over: the log stays open for the instance that claims it, and the client
    gets `server_shutdown` with a `resume` id instead of the plain one.
    """
    if error is not None and error.code == "server_shutdown" and not session.client_gone and await log.hand_over():
        return True
    log.close(_log_final(encoder, session, stream, error, tokens_before))
    return False


def _log_final(encoder: Encoder, session: StreamSession, stream: UpstreamStream | None, error: GatewayError | None,
               tokens_before: int = 0) -> bytes:
    """The resume log's last event: what a client resuming this stream will end with.

    `tokens_before`: tokens a handed-over stream had before this instance continued it (`done`
    reports the stream's total).
    """
    final: GatewayError | None = error
    if session.client_gone and error is None:
        final = NotResumableError("the generation stopped when its client left")
    elif error is not None and error.code == "server_shutdown":
        final = NotResumableError("the instance shut down before this stream finished; send the request again")
    if final is None:
        assert stream is not None
        return encoder.done(tokens_before + session.tokens, stream.finish_reason, stream.usage)
    return encoder.error(final)


