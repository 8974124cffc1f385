"""The rest of a handed-over generation, run on this worker into the stream's own log (resume/claimer.py claims it).

It is a `StreamRun` like any other (deadlines, metrics, the next drain apply) over the log-only
transport: it has no client, continues the log after its last event, and ends it with the stream's
total tokens. A lost lease cuts it, and its log is then left to the instance that owns it now.
"""

from __future__ import annotations

import asyncio

from starlette.types import Message

from app.errors import StreamCancelledError
from app.resume.claimer import Lease, LeaseLostError
from app.resume.progress import Progress
from app.resume.store import ResumeStore, StreamMeta
from app.streaming.encoders import SeedEncoder
from app.streaming.run import Relay, StreamLog
from app.streaming.session import Outcome, StreamSession
from app.streaming.transports import LogTransport
from app.upstream.base import ChatRequest

ENDPOINT = "/stream"  # the claimed generation is a /stream generation (metrics, logs)
CLIENT = "handover"  # its session's client: no connection, readers come through GET /stream/{id}
NO_DISCONNECT = "handover.none"  # a disconnect message type nothing ever sends


async def _no_client() -> Message:
    await asyncio.get_running_loop().create_future()  # a claimed generation has no connection to leave
    raise AssertionError("unreachable")  # pragma: no cover - the future never resolves


class HandoverContinuation:
    """The claimer's `Continuation`: generations continued through this worker's relay."""

    def __init__(self, relay: Relay, store: ResumeStore) -> None:
        self.relay = relay
        self.store = store

    async def run(self, meta: StreamMeta, progress: Progress, lease: Lease) -> str | None:
        first_seq = progress.last_seq + 1
        encoder = SeedEncoder(meta.stream_id, seq=first_seq)
        log = StreamLog(
            self.store.open(meta, first_seq=first_seq, eager=True),  # no client: its readers read the store
            encoder,
            continued_from=progress.tokens,
            owned=lambda: not lease.lost,
        )
        session = StreamSession(
            stream_id=meta.stream_id,
            endpoint=ENDPOINT,
            model=meta.model,
            client=CLIENT,
            now=asyncio.get_running_loop().time(),
        )
        session.resumable = True
        request = ChatRequest(
            model=meta.model,
            messages=meta.messages,
            max_tokens=meta.max_tokens,
            options=meta.options,
            continuation_text=progress.text,
            continuation_tokens=progress.tokens,
        )
        lease.on_lost(lambda: session.cut_with(LeaseLostError("another instance claimed this stream")))
        async with self.relay.run(session, receive=_no_client, disconnect_type=NO_DISCONNECT) as run:
            end = await run.stream(LogTransport(), encoder, request, log)
        if end.log_end is None:  # the lease was lost: the log is someone else's now
            return None
        await self.store.flush()  # the final event is stored before the entry is acknowledged
        if end.log_end:
            return "handed_over"
        return "completed" if end.outcome in (Outcome.DONE, Outcome.CANCELLED) else "failed"

    async def end_stopped(self, meta: StreamMeta, progress: Progress) -> None:
        first_seq = progress.last_seq + 1
        log = self.store.open(meta, first_seq=first_seq)
        log.close(SeedEncoder(meta.stream_id, seq=first_seq).error(StreamCancelledError()))
        await self.store.flush()
