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
import logging

from app.upstream.discovery import Endpoint, accepting
from app.upstream.fleet import FleetUpstream
from app.upstream.load import LoadBoard, parse_vllm
from app.upstream.periodic import PeriodicRound

logger = logging.getLogger("app.upstream.scrape")

METRICS_PATH = "/metrics"
MAX_BODY_BYTES = 4 * 1024 * 1024  # vLLM's page, histograms included, is tens of KiB per model


class LoadScraper(PeriodicRound):
    def __init__(self, fleet: FleetUpstream, board: LoadBoard, *, interval_s: float) -> None:
        super().__init__("upstream-load-scrape", interval_s, logger)
        self._fleet = fleet
        self._board = board

    async def _scrape(self, endpoint: Endpoint) -> None:
        body = await self._fleet.at(endpoint).scrape(METRICS_PATH, self._interval_s, MAX_BODY_BYTES)
        self._board.report(endpoint.url, None if body is None else parse_vllm(body.decode("utf-8", "replace")))

    async def run_round(self) -> None:
        """One round: every endpoint that accepts new streams, at once."""
        endpoints = accepting(self._fleet.discovery.endpoints())
        self._board.keep(list(endpoints))
        await asyncio.gather(*(self._scrape(endpoint) for endpoint in endpoints.values()))
