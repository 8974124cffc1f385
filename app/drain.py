"""The worker's drain: SIGTERM -> refuse new streams, let streams in flight finish, then cut the rest.

Drain timeline of one worker (gunicorn forwards the pod's SIGTERM to every worker):

    SIGTERM ─► draining: /ready 503, new streams 503 + Retry-After + Connection: close
       │       (the listening socket stays open, so late requests get an answer, not a refusal)
       ├─ streams in flight run on ... all done ─────────────────────────┐
       └─ DRAIN_TIMEOUT_SECONDS passed: the rest are cut with            │
          server_shutdown (SSE event / OpenAI error chunk / WS 1012)     │
          (RESUME_STORE=redis: a resumable /stream is handed to the      │
          fleet instead, and its client gets server_shutdown + resume)   │
          ─► /metrics served DRAIN_METRICS_LINGER_SECONDS more, so a ────┤
             scrape sees streaming_drain_cut_streams_total               │
                                                                         ▼
          uvicorn's own exit handler runs: close sockets, lifespan shutdown, exit
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Coroutine
from types import FrameType
from typing import Any

from app.errors import ShutdownError
from app.observability.metrics import DRAIN_CUT_STREAMS_TOTAL, DRAIN_DURATION_SECONDS, DRAINING
from app.streaming.session import StreamRegistry

logger = logging.getLogger("app.lifecycle")  # the logger name operators filter drain lines by


class Drain:
    """Owns the worker's shutdown: starts at SIGTERM, ends by handing the signal to uvicorn."""

    def __init__(
        self, registry: StreamRegistry, *, timeout_s: float, close_grace_s: float, metrics_linger_s: float = 0.0
    ) -> None:
        self.registry = registry
        self.timeout_s = timeout_s
        self.close_grace_s = close_grace_s
        self.metrics_linger_s = metrics_linger_s
        self.draining = False
        self.on_start: list[Callable[[], Coroutine[Any, Any, None]]] = []  # e.g. stop claiming handed-over streams
        self._task: asyncio.Task[None] | None = None

    def install(self) -> None:
        """Chain onto the SIGTERM handler uvicorn installed for this serve (called from lifespan startup)."""
        server_handler = signal.getsignal(signal.SIGTERM)
        if not callable(server_handler):  # not under uvicorn's signal capture (e.g. an in-process test server)
            return
        loop = asyncio.get_running_loop()

        def on_sigterm(sig: int, frame: FrameType | None) -> None:
            if self.draining:  # a second SIGTERM: stop waiting
                server_handler(sig, frame)
                return
            self.draining = True  # readiness flips before the loop even wakes
            loop.call_soon_threadsafe(self.start, lambda: server_handler(sig, frame))

        signal.signal(signal.SIGTERM, on_sigterm)

    def start(self, then: Callable[[], object]) -> None:
        self.draining = True
        DRAINING.set(1)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(then), name="drain")

    async def _run(self, then: Callable[[], object]) -> None:
        loop = asyncio.get_running_loop()
        began = loop.time()
        in_flight = len(self.registry.streams)
        logger.info("drain started", extra={"streams": in_flight, "drain_timeout_s": self.timeout_s})
        # Hooks run beside the drain, never before it: the deadline counts from SIGTERM whatever they do.
        hooks: list[asyncio.Task[None]] = [loop.create_task(hook()) for hook in self.on_start]
        cut = 0
        try:
            await asyncio.wait_for(self.registry.wait_empty(), self.timeout_s)
        except TimeoutError:
            cut = self.registry.cut_all(ShutdownError("this instance is shutting down; reconnect to continue"))
            try:
                await asyncio.wait_for(self.registry.wait_empty(), self.close_grace_s)
            except TimeoutError:
                logger.warning(
                    "drain: streams still open after the close grace", extra={"streams": len(self.registry.streams)}
                )
        if hooks:
            await asyncio.wait(hooks, timeout=self.close_grace_s)
        duration = loop.time() - began
        DRAIN_DURATION_SECONDS.observe(duration)
        DRAIN_CUT_STREAMS_TOTAL.inc(cut)
        logger.info("drain finished", extra={"streams": in_flight, "cut": cut, "drain_seconds": round(duration, 3)})
        if cut and self.metrics_linger_s > 0:
            # A pod that exits now is gone before the next scrape, and the cut is never seen: keep answering
            # (/metrics; new streams still get 503 draining) for one scrape interval. A second SIGTERM ends it.
            await asyncio.sleep(self.metrics_linger_s)
        then()
