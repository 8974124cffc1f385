"""`StreamRun`: one stream's whole life in the worker, written once for every transport (transports.py).

One stream is the ASGI request task, the pump's task it waits on while relaying (a task of its own, so a
token's wake-up resumes four frames, not the ASGI stack above the relay), and a disconnect listener:

    admit ─► open upstream ─► headers + opening event ─► pump: batch ─► one write ─► ... ─► final event
               │ error or cut before headers:                  ▲ cut from outside (watchdog deadline, slow
               ▼ refusal (plain HTTP error, WS error + close)  │ client, drain, client gone): the request
                                                                 task cancelled (Task.cancel passes it on to
                                                                 the pump's), the reason stored on the session;
                                                                 none once the pump has ended (FINISHING)

The pump takes every event already waiting upstream (at most STREAM_BUFFER_SIZE) as one batch and
writes it with one `send`. While a write waits on a slow client the upstream is not read, so what
a stream holds is bounded by one batch plus socket buffers, and the watchdog cuts a client that
accepts nothing for SLOW_CLIENT_TIMEOUT_SECONDS. `StreamRun` is entered once per stream and its
exit releases the registry entry, the active gauge and the upstream exactly once, on every path.

Its sequences: `stream` (open or refuse, opening event, pump, the resume log's end or handover, the
bounded final event), `replay` (a resumed stream from the store) and `collect` (a non-streamed answer).
An encoder (encoders.py) frames the events; a transport (SSE response, WebSocket, log only) carries them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Coroutine, Sized
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NamedTuple, Protocol, TypeVar, cast

from starlette.types import Receive

from app.errors import GatewayError, InternalError, NotResumableError, StreamTimeoutError, UpstreamError
from app.resume.store import EventLog
from app.streaming.session import Outcome, Phase, StreamRegistry, StreamSession
from app.upstream.base import Batch, ChatRequest, UpstreamStream, Usage
from app.upstream.guard import GuardedStream, GuardedUpstream

logger = logging.getLogger("app.streaming")
B = TypeVar("B", bound=Sized)  # a batch: texts, whole deltas, or stored frames
F = TypeVar("F")  # what a transport sends per write: bytes (SSE, the resume log) or text frames (WebSocket)
F_co = TypeVar("F_co", covariant=True)
F_contra = TypeVar("F_contra", contravariant=True)

BACKPRESSURE_FINAL_WRITE_S = 0.05  # a cut slow client gets its error event only if its socket takes it now
UPSTREAM_FAULT_DEADLINES = frozenset({"first token", "inter-token"})  # a stall the breaker should count
OUTCOME_BY_CODE = {
    "timeout": Outcome.TIMEOUT,
    "backpressure": Outcome.BACKPRESSURE,
    "server_shutdown": Outcome.SHUTDOWN,
    "cancelled": Outcome.CANCELLED,
    "memory_pressure": Outcome.BACKPRESSURE,  # a client not reading, cut early because the instance is at its budget
}


class Encoder(Protocol[F_co]):
    """Frames a stream's events for one protocol (encoders.py); `F` is what its transport sends."""

    def opening(self) -> F_co: ...
    def tokens(self, batch: Batch) -> F_co: ...
    def done(self, tokens: int, finish_reason: str | None, usage: Usage | None) -> F_co: ...
    def error(self, error: GatewayError) -> F_co: ...
    def shutdown_resume(self, event_id: str) -> F_co: ...


class ReplayEncoder(Protocol[F_co]):
    def stored(self, batch: list[bytes]) -> F_co: ...
    def error(self, error: GatewayError) -> F_co: ...


class Transport(Protocol[F_contra]):
    """Where a stream's framed events go (transports.py). The run decides what to send and when."""

    ping: Callable[[], Coroutine[Any, Any, None]] | None  # an idle-stream keepalive, if the protocol has one

    async def refuse(self, error: GatewayError) -> None:
        """Nothing was sent yet: answer with the protocol's plain error."""

    async def start(self, opening: F_contra) -> None:
        """The response's head, if any, and the opening event."""

    def writer(
        self, encode: Callable[[Batch], F_contra], log: EventLog | None, log_encode: Callable[[Batch], bytes] | None
    ) -> Callable[[Batch], Awaitable[None]]:
        """The per-batch write (the hot path): frame, append to the resume log first if any, send. It raises no
        GatewayError: one raised while relaying is the source's (the upstream's breaker counts it).

        `log_encode` frames the log's copy when it differs from what the client gets (else the
        client's bytes are appended as they are)."""
        ...

    def replay_writer(self, encode: Callable[[list[bytes]], F_contra]) -> Callable[[list[bytes]], Awaitable[None]]: ...

    async def finish(self, final: F_contra, error: GatewayError | None, handed_over: bool) -> None:
        """The final event and the end of the response (or the close)."""

    async def end_replay(self, final: F_contra | None, error: GatewayError | None) -> None:
        """A replay's end: its error event if it failed (the replayed frames hold the stream's own end)."""

    answers_before_start: bool  # a replay reads the store before the head, so a refusal is a plain answer


def _owned() -> bool:
    return True


@dataclass(frozen=True, slots=True)
class StreamLog:
    """A stream's resume log, with the seed framing its events are stored in."""

    events: EventLog
    encoder: Encoder[bytes]
    # a handed-over stream continued here: the tokens it had before (its log already holds its opening)
    continued_from: int | None = None
    owned: Callable[[], bool] = _owned  # False once a continuation's lease is lost: the log is another's

    async def end(
        self, session: StreamSession, stream: UpstreamStream | None, error: GatewayError | None
    ) -> bool | None:
        """Hand the stream over (drain deadline, Redis store) -> True, else write its final event -> False.

        None: the log is no longer ours and was left as it is. Handed over, the log stays open for the
        instance that claims it, and the client gets `server_shutdown` with a `resume` id.
        """
        if not self.owned():
            self.events.abandon()
            return None
        if (
            error is not None
            and error.code == "server_shutdown"
            and not session.client_gone
            and await self.events.hand_over()
        ):
            return True
        self.events.close(_log_final(self.encoder, session, stream, error, self.continued_from or 0))
        return False


class Relayed(NamedTuple):
    outcome: Outcome
    error: GatewayError | None  # what the stream ends with: its cut's reason, or what the relay raised
    raised: GatewayError | None  # a GatewayError raised while relaying: the source's (a transport raises none)


class StreamEnd(NamedTuple):
    outcome: Outcome
    error: GatewayError | None
    log_end: bool | None = None  # StreamLog.end: handed over, closed, or None (no log, or not ours)


class StreamObserver(Protocol):
    """Told once when a stream is admitted and once when it ends (metrics, logs)."""

    def started(self, session: StreamSession) -> None: ...
    def finished(self, session: StreamSession, error: GatewayError | None) -> None: ...


class ClientGoneError(Exception):
    """The client left before the upstream answered: there is no one to answer."""


async def pump(
    session: StreamSession, stream: AsyncIterable[B], write: Callable[[B], Awaitable[None]], clock: Callable[[], float]
) -> None:
    """Relay every upstream batch to `write`. The only per-token work: a timestamp and a count."""
    try:
        async for batch in stream:
            now = clock()
            if not session.first_token_at:
                session.first_token_at = now
            session.last_token_at = now
            session.tokens += len(batch)
            session.writing_since = now
            await write(batch)
            session.writing_since = 0.0
    finally:
        # The relay's end is decided here, however it ended: no cut may land in the loop turn before the run,
        # in another task (relay_from), reads it.
        session.phase = Phase.FINISHING


@dataclass(frozen=True)
class Relay:
    """What every stream of a worker relays with (built once per worker)."""

    upstream: GuardedUpstream
    registry: StreamRegistry
    observer: StreamObserver
    max_batch: int  # STREAM_BUFFER_SIZE: most events per batch

    def run(
        self,
        session: StreamSession,
        *,
        receive: Receive,
        disconnect_type: str,
        release: Callable[[], Awaitable[None]] | None = None,
    ) -> StreamRun:
        return StreamRun(session, relay=self, receive=receive, disconnect_type=disconnect_type, release=release)


class StreamRun:
    """One stream's stay in the worker: registry entry, disconnect listener, cut handling, release."""

    def __init__(
        self,
        session: StreamSession,
        *,
        relay: Relay,
        receive: Receive,
        disconnect_type: str,
        release: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.session = session
        self.deps = relay
        self.registry = relay.registry
        self.observer = relay.observer
        self._release = release  # the admission ticket: connection slot(s)
        self._receive = receive
        self._disconnect_type = disconnect_type
        self._listener: asyncio.Task[None] | None = None
        self._stream: GuardedStream | None = None
        self._reported = False

    async def __aenter__(self) -> StreamRun:
        session = self.session
        session.task = asyncio.current_task()
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

    async def open(self, request: ChatRequest) -> GuardedStream:
        """Open the upstream; a cut while waiting raises the cut's reason (or ClientGoneError)."""
        session = self.session
        try:
            if session.cut_error is not None:  # admitted after the drain deadline
                raise session.cut_error
            self._stream = await self.deps.upstream.open(
                request, max_batch=self.deps.max_batch, cut_for_upstream_fault=self._cut_for_upstream_fault
            )
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
        return _upstream_fault(self.session.cut_error)

    async def stream(
        self, transport: Transport[F], encoder: Encoder[F], request: ChatRequest, log: StreamLog | None = None
    ) -> StreamEnd:
        """A live stream, from opening the upstream to the final event."""
        session = self.session
        continued = log is not None and log.continued_from is not None
        try:
            stream = await self.open(request)
        except ClientGoneError:
            return StreamEnd(Outcome.CLIENT_GONE, None)
        except GatewayError as exc:
            self.report(Outcome.ERROR, exc)
            if log is not None and continued:  # its log exists already and must end; a new one stays unwritten
                return StreamEnd(Outcome.ERROR, exc, await log.end(session, None, exc))
            await transport.refuse(exc)
            return StreamEnd(Outcome.ERROR, exc)
        same = log is not None and log.encoder is encoder  # the log stores the client's very bytes
        if log is not None:
            session.on_orphaned = log.events.write_eagerly

        async def opening() -> None:
            body = encoder.opening()
            if log is not None:
                log.events.append(cast(bytes, body) if same else log.encoder.opening(), 1)
            await transport.start(body)
            session.ping = transport.ping

        write = transport.writer(
            encoder.tokens, None if log is None else log.events, None if log is None or same else log.encoder.tokens
        )
        outcome, error, raised = await self.relay_from(stream, write, None if continued else opening)
        _blame_upstream(stream, error, raised)
        log_end = None if log is None else await log.end(session, stream, error)
        end = StreamEnd(outcome, error, log_end)
        if outcome is Outcome.CLIENT_GONE or session.orphaned_at:
            return end
        if log_end:
            assert log is not None
            final = encoder.shutdown_resume(log.events.last_event_id)
        elif error is None:
            final = encoder.done(session.tokens, stream.finish_reason, stream.usage)
        else:
            final = encoder.error(error)
        # A client cut for not reading gets its final event only if its socket takes it now. Any other
        # client that stops reading right before the end is waited for as long as a slow client, not
        # forever: the watchdog no longer watches a finishing stream, and it still holds its slot.
        wait_s = BACKPRESSURE_FINAL_WRITE_S if outcome is Outcome.BACKPRESSURE else self.registry.slow_client_s
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                await transport.finish(final, error, bool(log_end))
        return end

    async def replay(
        self,
        transport: Transport[F],
        encoder: ReplayEncoder[F],
        frames: AsyncIterator[list[bytes]],
        not_resumable: Callable[[], GatewayError],
    ) -> None:
        """A resumed stream: its stored events from the store, then its live tail, then its end."""
        session = self.session
        opening: Callable[[], Awaitable[None]] | None = None
        if transport.answers_before_start:
            try:
                first = await anext(frames)
            except LookupError:
                refusal = not_resumable()
                self.report(Outcome.ERROR, refusal)
                await transport.refuse(refusal)
                return
            except StopAsyncIteration:
                first = []

            async def opening() -> None:
                await transport.start(encoder.stored(first))
                session.ping = transport.ping

        outcome, error, _ = await self.relay_from(
            not_resumable_on_lookup(frames, not_resumable), transport.replay_writer(encoder.stored), opening
        )
        if outcome is not Outcome.CLIENT_GONE:
            await transport.end_replay(None if error is None else encoder.error(error), error)

    async def collect(
        self, transport: Transport[Any], request: ChatRequest, write: Callable[[Batch], Awaitable[None]]
    ) -> UpstreamStream | None:
        """A non-streamed answer: relay into `write`. The ended upstream stream if it succeeded, else None
        (a failure was answered through the transport; a client that left gets nothing)."""
        try:
            stream = await self.open(request)
        except ClientGoneError:
            return None
        except GatewayError as exc:
            self.report(Outcome.ERROR, exc)
            await transport.refuse(exc)
            return None
        outcome, error, raised = await self.relay_from(stream, write)
        _blame_upstream(stream, error, raised)
        if outcome is Outcome.CLIENT_GONE:
            return None
        if error is not None:
            await transport.refuse(error)
            return None
        return stream

    async def relay_from(
        self,
        source: AsyncIterable[B],
        write: Callable[[B], Awaitable[None]],
        opening: Callable[[], Awaitable[None]] | None = None,
    ) -> Relayed:
        """Relay any source of batches (the upstream, or a resume store's replay) with the same exits."""
        session = self.session
        exc: Exception | None = None
        pumping: asyncio.Task[None] | None = None
        session.phase = Phase.RELAYING
        try:
            if session.cut_error is None:
                if opening is not None:
                    await opening()
                # The pump runs as a task of its own. A task's every resumption (every token) walks its whole
                # await chain, and this one's is the ASGI stack, a dozen frames above the relay; the pump's is
                # four. A cut cancels this task, and Task.cancel passes that on to the task it awaits.
                loop = asyncio.get_running_loop()
                pumping = loop.create_task(pump(session, source, write, loop.time))
                await pumping
        except asyncio.CancelledError:
            if pumping is not None and pumping.done() and not pumping.cancelled():
                raise  # the pump had ended, so no cut was made after it (see pump): the server cancelled this task
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
        return Relayed(outcome, error, exc if isinstance(exc, GatewayError) else None)

    def report(self, outcome: Outcome, error: GatewayError | None) -> None:
        if not self._reported:
            self._reported = True
            if isinstance(error, UpstreamError):  # reported before any encoder writes it
                error.for_request(self.session.request_id)
            self.session.outcome = outcome
            self.observer.finished(self.session, error)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.session.phase = Phase.FINISHING
        if not self._reported:  # cancelled by the server itself, or an error before relaying
            error = exc if isinstance(exc, GatewayError) else None
            self.report(Outcome.ERROR if error else Outcome.SHUTDOWN, error)
        self.registry.discard(self.session)
        if self._listener is not None:
            self._listener.cancel()
        try:
            if self._release is not None:
                await self._release()
        finally:  # a release cancelled or failing (a Redis lease) still closes the upstream
            if self._stream is not None:
                await self._stream.aclose()


def _blame_upstream(stream: GuardedStream, error: GatewayError | None, raised: GatewayError | None) -> None:
    """What the upstream's breaker counts of a relay: the stream failing while it was read, or a cut for its stall."""
    if raised is not None:
        stream.broke(raised)
    elif _upstream_fault(error):
        stream.mark_failed()


def _upstream_fault(error: GatewayError | None) -> bool:
    """A first-token or inter-token stall: the upstream's fault, which its breaker counts."""
    return isinstance(error, StreamTimeoutError) and error.deadline in UPSTREAM_FAULT_DEADLINES


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


async def not_resumable_on_lookup(
    frames: AsyncIterator[list[bytes]], error: Callable[[], GatewayError]
) -> AsyncIterator[list[bytes]]:
    try:
        async for batch in frames:
            yield batch
    except LookupError:
        raise error() from None


def _log_final(
    encoder: Encoder[bytes],
    session: StreamSession,
    stream: UpstreamStream | None,
    error: GatewayError | None,
    tokens_before: int = 0,
) -> bytes:
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
