"""The load scrape of a fleet (UPSTREAM_LOAD_METRICS=vllm): GET each endpoint's /metrics into the fleet's
`LoadBoard` (load.py), every UPSTREAM_LOAD_METRICS_INTERVAL_SECONDS.

Every worker scrapes, like the active probe (probe.py) and for its reasons: one small GET per endpoint per
period per worker is negligible next to the streams, a dead worker takes no shared scraper with it, and the
board a pick reads stays a plain dict in the worker's own memory (no shared table to lock per pick). Each
worker starts on a random phase; endpoints are scraped concurrently, each within the interval and
MAX_BODY_BYTES, on the probe's connections (not the streams' pool).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

from app.upstream.discovery import Endpoint, accepting
from app.upstream.fleet import FleetUpstream
from app.upstream.load import LoadBoard, parse_vllm

logger = logging.getLogger("app.upstream.scrape")

METRICS_PATH = "/metrics"
MAX_BODY_BYTES = 4 * 1024 * 1024  # vLLM's page, histograms included, is tens of KiB per model


class LoadScraper:
    def __init__(self, fleet: FleetUpstream, board: LoadBoard, *, interval_s: float) -> None:
        self._fleet = fleet
        self._board = board
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def _scrape(self, endpoint: Endpoint) -> None:
        body = await self._fleet.at(endpoint).scrape(METRICS_PATH, self._interval_s, MAX_BODY_BYTES)
        self._board.report(endpoint.url, None if body is None else parse_vllm(body.decode("utf-8", "replace")))

    async def scrape_all(self) -> None:
        """One round: every endpoint that accepts new streams, at once."""
        endpoints = accepting(self._fleet.discovery.endpoints())
        self._board.keep(list(endpoints))
        await asyncio.gather(*(self._scrape(endpoint) for endpoint in endpoints.values()))

    async def _run(self) -> None:
        await asyncio.sleep(random.uniform(0, self._interval_s))  # workers out of phase
        while True:
            try:
                await self.scrape_all()
            except Exception:  # a bug must not end the scraping silently
                logger.exception("upstream load scrape round failed")
            await asyncio.sleep(self._interval_s)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="upstream-load-scrape")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
