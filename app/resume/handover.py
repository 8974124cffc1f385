"""Handover, the publishing side: a draining instance offers its unfinished generations to the fleet.

Only with RESUME_STORE=redis, and only when the upstream can continue a partial answer (the
mock always can; an OpenAI-compatible server with UPSTREAM_CONTINUATION=vllm).

    draining A, at its drain deadline, per stream:
      cut ─► flush the log ─► MULTI: HSET gw:ho:<sid> meta=<StreamMeta JSON> + PEXPIRE,
                              XADD gw:handover MAXLEN ~ n * sid=<sid>
          ─► client: {"type": "server_shutdown", "resume": "<sid>-<k>"} (no final event in the log)

Another instance's claimer (claimer.py) takes the entry and continues the generation into the same log.
"""

from __future__ import annotations

import logging
import os
import socket

from app.observability.metrics import HANDOVERS_TOTAL
from app.resume.redis_streams import redis_resume_errors
from app.resume.store import StreamMeta
from app.storage.errors import StorageError
from app.storage.redis import LazyRedis

logger = logging.getLogger("app.resume")

HANDOVER_STREAM = "gw:handover"
RECORD_PREFIX = "gw:ho:"  # hash per handed-over stream: meta, from, claimer
GROUP = "gw:claimers"
MAX_PENDING_HANDOVERS = 10_000  # the handover stream is trimmed to about this many entries


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
            with redis_resume_errors():
                pipe = self.redis.client().pipeline(transaction=True)
                pipe.delete(record)  # a stream handed over again: the previous claimer is no longer its owner
                pipe.hset(record, mapping={"meta": meta.to_json(), "from": self.source})
                pipe.pexpire(record, self.ttl_ms)
                pipe.xadd(HANDOVER_STREAM, {"sid": meta.stream_id}, maxlen=MAX_PENDING_HANDOVERS, approximate=True)
                await pipe.execute()
        except StorageError as exc:
            HANDOVERS_TOTAL.labels("failed").inc()
            logger.warning(
                "handover failed: the stream ends not resumable", extra={"stream_id": meta.stream_id, "error": str(exc)}
            )
            return False
        HANDOVERS_TOTAL.labels("published").inc()
        return True
