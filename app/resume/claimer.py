"""Handover, the claiming side: every worker of every instance claims handed-over streams and has them finished.

    claimer on every worker (stopped when its instance starts draining):
      XREADGROUP gw:handover (new entries) / XAUTOCLAIM (entries idle longer than the lease)
      ─► HSET claimer ─► read the log: text, token count and last seq so far (first copy of a seq wins)
      ─► the `Continuation` (streaming/continuation.py) runs the rest of the generation into the same log
      ─► flush ─► XACK + XDEL the entry, DEL the record
      lease: every lease/3 the claimer re-claims its entry (XCLAIM JUSTID) if it still owns it;
      a claimer killed with SIGKILL stops renewing, and after the lease another one XAUTOCLAIMs it.

A claimer that loses its lease (another took the entry) stops without a final event. Readers
and claimers keep the first copy of each seq, so a late write of the old owner cannot duplicate
an event (with the mock both copies are equal; with a sampling upstream the first one wins).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

from redis.exceptions import ResponseError

from app.errors import GatewayError
from app.observability.metrics import CLAIMED_STREAMS, HANDOVERS_TOTAL
from app.resume.handover import GROUP, HANDOVER_STREAM, RECORD_PREFIX, consumer_name
from app.resume.progress import Progress, parse_log, read_log
from app.resume.redis_streams import redis_resume_errors
from app.resume.store import BACKEND_ERRORS, ResumeStore, StreamMeta
from app.storage.errors import StorageError
from app.storage.redis import LazyRedis, load_lua

logger = logging.getLogger("app.resume")

RETRY_S = 1.0  # after a Redis failure, the claimer loop waits this long

_RENEW_LUA = load_lua("handover_renew")  # re-claim an entry only while this consumer still owns it


class Lease:
    """A claimed entry's lease, as its continuation sees it: lost once another claimer took the entry."""

    __slots__ = ("lost", "_on_lost")

    def __init__(self) -> None:
        self.lost = False
        self._on_lost: Callable[[], None] | None = None

    def on_lost(self, cut: Callable[[], None]) -> None:
        """What to do the moment the lease is lost (stop the generation)."""
        self._on_lost = cut
        if self.lost:
            cut()

    def lose(self) -> None:
        self.lost = True
        if self._on_lost is not None:
            self._on_lost()


class Continuation(Protocol):
    """Runs the rest of a handed-over generation into its log (implemented in streaming/continuation.py)."""

    async def run(self, meta: StreamMeta, progress: Progress, lease: Lease) -> str | None:
        """The result label ("completed", "failed", "handed_over"); None if the lease was lost."""

    async def end_stopped(self, meta: StreamMeta, progress: Progress) -> None:
        """Its owner stopped it while no instance ran it: write its `cancelled` final event."""


class LeaseLostError(GatewayError):
    """Another instance claimed this handed-over stream: stop without writing to its log."""

    code = "handover_lease_lost"


class Claimer:
    """One per worker: claims handed-over streams and finishes them (bounded by `max_claims`)."""

    def __init__(
        self,
        redis: LazyRedis,
        store: ResumeStore,
        continuation: Continuation,
        *,
        lease_s: float,
        max_claims: int,
        block_s: float = 1.0,
        consumer: str | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.redis = redis  # its socket timeout must exceed block_s (XREADGROUP BLOCK)
        self.store = store
        self.continuation = continuation
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
            with redis_resume_errors():
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
        with redis_resume_errors():
            try:
                await self.redis.client().xgroup_create(HANDOVER_STREAM, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def _reclaim(self, count: int) -> list[tuple[str, str]]:
        """Entries whose claimer stopped renewing for longer than the lease (killed, partitioned)."""
        with redis_resume_errors():
            reply = await self.redis.client().xautoclaim(
                HANDOVER_STREAM,
                GROUP,
                self.consumer,
                min_idle_time=int(self.lease_s * 1000),
                start_id=self._autoclaim_from,
                count=count,
            )
        next_start, entries = reply[0], reply[1]
        self._autoclaim_from = next_start.decode() if isinstance(next_start, bytes) else str(next_start)
        return _entries(entries)

    async def _read_new(self, count: int) -> list[tuple[str, str]]:
        with redis_resume_errors():
            reply: Any = await self.redis.client().xreadgroup(
                GROUP,
                self.consumer,
                {HANDOVER_STREAM: ">"},
                count=count,
                block=max(1, int(self.block_s * 1000)),
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
            logger.warning(
                "handover claim failed; the entry is reclaimed after the lease",
                extra={"stream_id": sid, "error": str(exc)},
            )
        except Exception:
            logger.exception("handover claim failed", extra={"stream_id": sid})
        finally:
            CLAIMED_STREAMS.dec()
            if result:
                HANDOVERS_TOTAL.labels(result).inc()

    async def _ack(self, entry_id: str, sid: str, *, drop_record: bool) -> None:
        with redis_resume_errors():
            pipe = self.redis.client().pipeline(transaction=True)
            pipe.xack(HANDOVER_STREAM, GROUP, entry_id)
            pipe.xdel(HANDOVER_STREAM, entry_id)
            if drop_record:
                pipe.delete(RECORD_PREFIX + sid)
            await pipe.execute()

    async def _continue(self, entry_id: str, sid: str) -> str:
        """Finish one handed-over stream; the result label ("" when handed over again)."""
        record = RECORD_PREFIX + sid
        with redis_resume_errors():
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
        logger.info(
            "continuing a handed-over stream",
            extra={"stream_id": sid, "tokens": progress.tokens, "last_seq": progress.last_seq},
        )
        outcome = await self._generate(entry_id, meta, progress)
        if outcome is None:  # the lease was lost: the entry is someone else's now
            return "failed"
        await self._ack(entry_id, sid, drop_record=outcome != "handed_over")
        return "" if outcome == "handed_over" else outcome

    async def _end_stopped(self, entry_id: str, meta: StreamMeta, progress: Progress) -> str:
        await self.continuation.end_stopped(meta, progress)
        await self._ack(entry_id, meta.stream_id, drop_record=True)
        return "completed"

    async def _generate(self, entry_id: str, meta: StreamMeta, progress: Progress) -> str | None:
        """Run the rest of the generation into the stream's log. None if the lease was lost."""
        lease = Lease()
        renewer = asyncio.get_running_loop().create_task(self._keep_lease(entry_id, meta.stream_id, lease))
        try:
            return await self.continuation.run(meta, progress, lease)
        finally:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)

    async def _keep_lease(self, entry_id: str, stream_id: str, lease: Lease) -> None:
        renewed_at = self._now()
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                with redis_resume_errors():
                    owned = bool(
                        int(
                            await self.redis.client().eval(
                                _RENEW_LUA, 1, HANDOVER_STREAM, GROUP, entry_id, self.consumer
                            )
                        )
                    )
            except StorageError:
                if self._now() - renewed_at < self.lease_s:
                    continue  # a blip: the lease still holds
                owned = False
            if not owned:
                logger.warning(
                    "handover lease lost; another instance continues the stream", extra={"stream_id": stream_id}
                )
                lease.lose()
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
