"""Handover: a draining instance's unfinished generations are finished by another instance.

Only with RESUME_STORE=redis, and only when the upstream can continue a partial answer (the
mock always can; an OpenAI-compatible server with UPSTREAM_CONTINUATION=vllm).

    draining A, at its drain deadline, per stream:
      cut ─► flush the log ─► MULTI: HSET gw:ho:<sid> meta=<StreamMeta JSON> + PEXPIRE,
                              XADD gw:handover MAXLEN ~ n * sid=<sid>
          ─► client: {"type": "server_shutdown", "resume": "<sid>-<k>"} (no final event in the log)

    claimer on every worker of every instance (stopped when its instance starts draining):
      XREADGROUP gw:handover (new entries) / XAUTOCLAIM (entries idle longer than the lease)
      ─► HSET claimer ─► read the log: text, token count and last seq so far (first copy of a seq wins)
      ─► upstream.open(prompt + continuation) as a session of this worker's registry (deadlines,
         metrics, the next drain apply) ─► append seq k+1... to the same log ─► done(total tokens)
      ─► flush ─► XACK + XDEL the entry, DEL the record
      lease: every lease/3 the claimer re-claims its entry (XCLAIM JUSTID) if it still owns it;
      a claimer killed with SIGKILL stops renewing, and after the lease another one XAUTOCLAIMs it.

A claimer that loses its lease (another took the entry) stops without a final event. Readers
and claimers keep the first copy of each seq, so a late write of the old owner cannot duplicate
an event (with the mock both copies are equal; with a sampling upstream the first one wins).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError
from starlette.types import Message

from app.errors import GatewayError, StreamCancelledError
from app.observability.metrics import CLAIMED_STREAMS, HANDOVERS_TOTAL
from app.resume.redis_streams import redis_resume_errors as _wrap_errors
from app.resume.store import BACKEND_ERRORS, Backend, ResumeStore, StreamMeta, frame_seq, split_events
from app.storage.errors import StorageError
from app.storage.redis import LazyRedis, load_lua
from app.streaming.relay import Relay, end_log
from app.streaming.session import Outcome, StreamSession
from app.streaming.sse import SeedEncoder
from app.upstream.base import Batch, ChatRequest, batch_texts

logger = logging.getLogger("app.resume")

HANDOVER_STREAM = "gw:handover"
RECORD_PREFIX = "gw:ho:"  # hash per handed-over stream: meta, from, claimer
GROUP = "gw:claimers"
MAX_PENDING_HANDOVERS = 10_000  # the handover stream is trimmed to about this many entries
ENDPOINT = "/stream"  # the claimed generation is a /stream generation (metrics, logs)
CLIENT = "handover"  # its session's client: no connection, readers come through GET /stream/{id}
RETRY_S = 1.0  # after a Redis failure, the claimer loop waits this long
NO_DISCONNECT = "handover.none"  # a disconnect message type nothing ever sends

_RENEW_LUA = load_lua("handover_renew")  # re-claim an entry only while this consumer still owns it


def consumer_name() -> str:
    """This worker's name in the claimer group (also written to the record: who continues a stream)."""
    return f"{socket.gethostname()}:{os.getpid()}"


class HandoverPublisher:
    """The `HandoverSink` of a draining instance: offers a stream to the fleet's claimers."""

    def __init__(self, redis: LazyRedis, *, ttl_s: float, source: str | None = None) -> None:
        self.redis = redis
        self.ttl_ms = int(ttl_s * 1000)
        self.source = source or consumer_name()

    async def publish(self, meta: StreamMeta) -> bool:
        record = RECORD_PREFIX + meta.stream_id
        try:
            with _wrap_errors():
                pipe = self.redis.client().pipeline(transaction=True)
                pipe.delete(record)  # a stream handed over again: the previous claimer is no longer its owner
                pipe.hset(record, mapping={"meta": meta.to_json(), "from": self.source})
                pipe.pexpire(record, self.ttl_ms)
                pipe.xadd(HANDOVER_STREAM, {"sid": meta.stream_id}, maxlen=MAX_PENDING_HANDOVERS, approximate=True)
                await pipe.execute()
        except StorageError as exc:
            HANDOVERS_TOTAL.labels("failed").inc()
            logger.warning("handover failed: the stream ends not resumable",
                           extra={"stream_id": meta.stream_id, "error": str(exc)})
            return False
        HANDOVERS_TOTAL.labels("published").inc()
        return True


@dataclass(frozen=True)
class Progress:
    """What a stream's log says about its generation so far."""

    text: str
    tokens: int
    last_seq: int
    final: bool  # it already ended (done or error): nothing to continue


def parse_log(payload: bytes, stream_id: str) -> Progress | None:
    """Reconstruct a generation from its seed frames; None if events are missing or unreadable."""
    parts: list[str] = []
    last = -1
    for frame in split_events(payload):
        try:
            seq = frame_seq(frame, stream_id)
        except (IndexError, ValueError):
            return None
        if seq <= last:
            continue  # a second copy (a claimer that lost its lease wrote on): the first one counts
        if seq != last + 1:
            return None
        last = seq
        data = next((line[6:] for line in frame.split(b"\n") if line.startswith(b"data: ")), b"")
        try:
            event = json.loads(data)
        except ValueError:
            return None
        kind = event.get("type") if isinstance(event, dict) else None
        if kind == "token":
            parts.append(str(event.get("content", "")))
        elif kind in ("done", "error"):
            return Progress("".join(parts), len(parts), last, True)
    return Progress("".join(parts), len(parts), last, False)


async def read_log(backend: Backend, stream_id: str, owner: str) -> bytes | None:
    """A stream's whole log, over as many reads as the backend needs; None if it has none."""
    found = await backend.read(stream_id, "", owner)
    if found is None:
        return None
    parts, cursor = [found[0]], found[1]
    while True:
        more = await backend.read(stream_id, cursor, owner)
        if more is None or not more[0]:
            return b"".join(parts)
        parts.append(more[0])
        cursor = more[1]


async def _no_client() -> Message:
    await asyncio.get_running_loop().create_future()  # a claimed generation has no connection to leave
    raise AssertionError("unreachable")  # pragma: no cover - the future never resolves


class LeaseLostError(GatewayError):
    """Another instance claimed this handed-over stream: stop without writing to its log."""

    code = "handover_lease_lost"


class Claimer:
    """One per worker: claims handed-over streams and finishes them (bounded by `max_claims`)."""

    def __init__(self, redis: LazyRedis, store: ResumeStore, relay: Relay, *, lease_s: float, max_claims: int,
                 block_s: float = 1.0, consumer: str | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self.redis = redis  # its socket timeout must exceed block_s (XREADGROUP BLOCK)
        self.store = store
        self.relay = relay
        self.lease_s = lease_s
        self.max_claims = max_claims
        self.block_s = block_s
        self.consumer = consumer or consumer_name()
        self._clock = clock
        self.active: dict[str, asyncio.Task[None]] = {}  # entry id -> its generation
        self._freed = asyncio.Event()
        self._autoclaim_from = "0-0"
        self._healthy = True
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="handover-claimer")

    async def stop(self) -> None:
        """Claim nothing more (drain start). Claimed generations run on, as streams of the registry."""
        self._stopped = True  # at once: an entry read while the cancellation lands is left for others
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def aclose(self) -> None:
        """Worker shutdown: stop claiming, and stop generations still running (their entries get reclaimed)."""
        await self.stop()
        tasks = list(self.active.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:  # leave the group unless entries still wait on this consumer (DELCONSUMER would drop them)
            with _wrap_errors():
                client = self.redis.client()
                if not await client.xpending_range(HANDOVER_STREAM, GROUP, "-", "+", 1, consumername=self.consumer):
                    await client.xgroup_delconsumer(HANDOVER_STREAM, GROUP, self.consumer)
        except StorageError:
            pass  # an empty consumer left behind costs Redis a few bytes

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    async def _run(self) -> None:
        while True:
            try:
                await self._ensure_group()
                while True:
                    if len(self.active) >= self.max_claims:
                        self._freed.clear()
                        await self._freed.wait()
                        continue
                    for entry_id, sid in await self._reclaim(self.max_claims - len(self.active)):
                        self._spawn(entry_id, sid)
                    free = self.max_claims - len(self.active)
                    if free > 0:
                        for entry_id, sid in await self._read_new(free):
                            self._spawn(entry_id, sid)
                    self._set_healthy(True, None)
            except StorageError as exc:
                self._set_healthy(False, exc)
                await asyncio.sleep(RETRY_S)

    def _set_healthy(self, healthy: bool, exc: BaseException | None) -> None:
        if healthy == self._healthy:
            return
        self._healthy = healthy
        if healthy:
            logger.info("handover claimer reconnected to redis")
        else:
            logger.warning("handover claimer cannot reach redis; retrying", extra={"error": str(exc)})

    async def _ensure_group(self) -> None:
        with _wrap_errors():
            try:
                await self.redis.client().xgroup_create(HANDOVER_STREAM, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def _reclaim(self, count: int) -> list[tuple[str, str]]:
        """Entries whose claimer stopped renewing for longer than the lease (killed, partitioned)."""
        with _wrap_errors():
            reply = await self.redis.client().xautoclaim(
                HANDOVER_STREAM, GROUP, self.consumer, min_idle_time=int(self.lease_s * 1000),
                start_id=self._autoclaim_from, count=count,
            )
        next_start, entries = reply[0], reply[1]
        self._autoclaim_from = next_start.decode() if isinstance(next_start, bytes) else str(next_start)
        return _entries(entries)

    async def _read_new(self, count: int) -> list[tuple[str, str]]:
        with _wrap_errors():
            reply: Any = await self.redis.client().xreadgroup(
                GROUP, self.consumer, {HANDOVER_STREAM: ">"}, count=count, block=max(1, int(self.block_s * 1000)),
            )
        found: list[tuple[str, str]] = []
        for _stream, entries in reply or []:  # RESP2: [[stream, [(id, fields), ...]]]
            found.extend(_entries(entries))
        return found

    def _spawn(self, entry_id: str, sid: str) -> None:
        if entry_id in self.active or self._stopped:  # stopped: another instance reclaims it after the lease
            return
        task = asyncio.get_running_loop().create_task(self._claim(entry_id, sid), name=f"handover-{sid}")
        self.active[entry_id] = task

        def done(_: asyncio.Task[None]) -> None:
            self.active.pop(entry_id, None)
            self._freed.set()

        task.add_done_callback(done)

    async def _claim(self, entry_id: str, sid: str) -> None:
        HANDOVERS_TOTAL.labels("claimed").inc()
        CLAIMED_STREAMS.inc()
        result = "failed"
        try:
            result = await self._continue(entry_id, sid)
        except BACKEND_ERRORS as exc:
            logger.warning("handover claim failed; the entry is reclaimed after the lease",
                           extra={"stream_id": sid, "error": str(exc)})
        except Exception:
            logger.exception("handover claim failed", extra={"stream_id": sid})
        finally:
            CLAIMED_STREAMS.dec()
            if result:
                HANDOVERS_TOTAL.labels(result).inc()

    async def _ack(self, entry_id: str, sid: str, *, drop_record: bool) -> None:
        with _wrap_errors():
            pipe = self.redis.client().pipeline(transaction=True)
            pipe.xack(HANDOVER_STREAM, GROUP, entry_id)
            pipe.xdel(HANDOVER_STREAM, entry_id)
            if drop_record:
                pipe.delete(RECORD_PREFIX + sid)
            await pipe.execute()

    async def _continue(self, entry_id: str, sid: str) -> str:
        """Finish one handed-over stream; the result label ("" when handed over again)."""
        record = RECORD_PREFIX + sid
        with _wrap_errors():
            client = self.redis.client()
            raw = await client.hget(record, "meta")
            if raw is not None:
                await client.hset(record, "claimer", self.consumer)
        if raw is None:  # expired with its TTL, or finished by an earlier claimer that was slow to ack
            await self._ack(entry_id, sid, drop_record=False)
            return "failed"
        meta = StreamMeta.from_json(raw)
        payload = await read_log(self.store.backend, sid, meta.owner)
        progress = parse_log(payload, sid) if payload is not None else None
        if progress is None or progress.final:
            if payload is not None and progress is None:
                logger.warning("handed-over stream has a gap; it ends not resumable", extra={"stream_id": sid})
            await self._ack(entry_id, sid, drop_record=True)
            return "completed" if progress is not None else "failed"
        if await self.store.stop_requested(sid):  # its owner stopped it while no instance ran it
            return await self._end_stopped(entry_id, meta, progress)
        logger.info("continuing a handed-over stream",
                    extra={"stream_id": sid, "tokens": progress.tokens, "last_seq": progress.last_seq})
        outcome = await self._generate(entry_id, meta, progress)
        if outcome is None:  # the lease was lost: the entry is someone else's now
            return "failed"
        await self._ack(entry_id, sid, drop_record=outcome != "handed_over")
        return "" if outcome == "handed_over" else outcome

    async def _end_stopped(self, entry_id: str, meta: StreamMeta, progress: Progress) -> str:
        first_seq = progress.last_seq + 1
        log = self.store.open(meta, first_seq=first_seq)
        log.close(SeedEncoder(meta.stream_id, seq=first_seq).error(StreamCancelledError()))
        await self.store.flush()
        await self._ack(entry_id, meta.stream_id, drop_record=True)
        return "completed"

    async def _generate(self, entry_id: str, meta: StreamMeta, progress: Progress) -> str | None:
        """Run the rest of the generation into the stream's log. None if the lease was lost."""
        first_seq = progress.last_seq + 1
        log = self.store.open(meta, first_seq=first_seq)
        encoder = SeedEncoder(meta.stream_id, seq=first_seq)
        session = StreamSession(stream_id=meta.stream_id, endpoint=ENDPOINT, model=meta.model, client=CLIENT,
                                now=asyncio.get_running_loop().time())
        session.resumable = True
        request = ChatRequest(
            model=meta.model, messages=meta.messages, max_tokens=meta.max_tokens, options=meta.options,
            continuation_text=progress.text, continuation_tokens=progress.tokens,
        )
        lost = asyncio.Event()
        renewer = asyncio.get_running_loop().create_task(self._keep_lease(entry_id, session, lost))
        result = "failed"
        try:
            async with self.relay.run(session, receive=_no_client, disconnect_type=NO_DISCONNECT) as run:
                try:
                    stream = await run.open(request)
                except GatewayError as exc:
                    run.report(Outcome.ERROR, exc)
                    if lost.is_set():
                        log.abandon()
                        return None
                    handed = await end_log(log, encoder, session, None, exc, tokens_before=progress.tokens)
                    return "handed_over" if handed else "failed"

                async def write(batch: Batch) -> None:
                    texts = batch_texts(batch)
                    log.append(encoder.tokens(texts), len(texts))

                outcome, error = await run.relay(write)
                if lost.is_set():
                    log.abandon()
                    return None
                handed = await end_log(log, encoder, session, stream, error, tokens_before=progress.tokens)
                ended = outcome in (Outcome.DONE, Outcome.CANCELLED)
                result = "handed_over" if handed else ("completed" if ended else "failed")
        finally:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)
        await self.store.flush()  # the final event is stored before the entry is acknowledged
        return result

    async def _keep_lease(self, entry_id: str, session: StreamSession, lost: asyncio.Event) -> None:
        renewed_at = self._now()
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                with _wrap_errors():
                    owned = bool(int(await self.redis.client().eval(
                        _RENEW_LUA, 1, HANDOVER_STREAM, GROUP, entry_id, self.consumer)))
            except StorageError:
                if self._now() - renewed_at < self.lease_s:
                    continue  # a blip: the lease still holds
                owned = False
            if not owned:
                logger.warning("handover lease lost; another instance continues the stream",
                               extra={"stream_id": session.id})
                lost.set()
                session.cut_with(LeaseLostError("another instance claimed this stream"))
                return
            renewed_at = self._now()


def _entries(entries: list[tuple[bytes | str | None, dict[bytes, bytes] | None]]) -> list[tuple[str, str]]:
    found = []
    for entry_id, fields in entries:
        if entry_id is None or not fields:  # deleted while pending
            continue
        sid = fields.get(b"sid")
        if sid:
            found.append((_text(entry_id), _text(sid)))
    return found


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value

