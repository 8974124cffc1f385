"""A worker's objects, shared between its requests (`GatewayState`), and their lifespan: start, stop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import FastAPI
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client.registry import Collector

from app.admission import Admission
from app.drain import Drain
from app.observability.metrics import precreate_series
from app.policies.breaker import Circuit
from app.resume.claimer import Claimer
from app.resume.store import ResumeStore
from app.settings import Settings
from app.storage.redis import LazyRedis
from app.streaming.recorder import StreamRecorder
from app.streaming.run import Relay
from app.streaming.session import StreamRegistry
from app.upstream.base import Upstream
from app.upstream.discovery import Discovery

if TYPE_CHECKING:  # a fleet's; their modules (the HTTP client stack) load only when a real upstream is built
    from app.upstream.probe import Prober
    from app.upstream.scrape import LoadScraper

logger = logging.getLogger("app.lifecycle")  # the logger name operators filter worker start lines by


@dataclass
class GatewayState:
    """Everything a worker shares between requests; held by `app.state.gateway`, never a global."""

    settings: Settings
    upstream: Upstream
    registry: StreamRegistry
    recorder: StreamRecorder
    drain: Drain
    breaker: Circuit  # the upstream's breaker, or the view over a fleet's (upstream/health.py)
    admission: Admission
    relay: Relay
    tracer_provider: TracerProvider | None = None
    redis: LazyRedis | None = None
    resume: ResumeStore | None = None
    claimer: Claimer | None = None
    discovery: Discovery | None = None  # where a fleet's model servers are (none: one UPSTREAM_URL, or the mock)
    prober: Prober | None = None  # a fleet's active health probe (UPSTREAM_PROBE_INTERVAL_SECONDS)
    scraper: LoadScraper | None = None  # a fleet's load scrape (UPSTREAM_LOAD_METRICS)
    endpoint_metrics: Collector | None = None  # a fleet's per-endpoint series, read at scrape time

    @staticmethod
    def clock() -> float:
        """The event loop's monotonic clock: the one timebase of every stream timing."""
        return asyncio.get_running_loop().time()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: GatewayState = app.state.gateway
    precreate_series(state.settings.max_connections)
    state.registry.start()
    if state.resume is not None:
        state.resume.start()
    if state.claimer is not None:
        state.claimer.start()
    state.drain.install()
    if state.discovery is not None:
        await state.discovery.start()
    if state.prober is not None:
        state.prober.start()
    if state.scraper is not None:
        state.scraper.start()
    logger.info("worker ready", extra={"upstream": state.upstream.name})
    try:
        yield
    finally:
        if state.claimer is not None:
            await state.claimer.aclose()  # generations still running are reclaimed elsewhere after the lease
            await state.claimer.redis.aclose()
        await state.registry.stop()
        if state.prober is not None:
            await state.prober.aclose()
        if state.scraper is not None:
            await state.scraper.aclose()
        if state.discovery is not None:
            await state.discovery.aclose()
        if state.resume is not None:
            await state.resume.stop()
        await state.upstream.aclose()
        if state.redis is not None:
            await state.redis.aclose()
        if state.tracer_provider is not None:
            state.tracer_provider.shutdown()  # flush spans still in the batch queue
