"""The optional active probe of a fleet (UPSTREAM_PROBE_INTERVAL_SECONDS > 0): GET each endpoint's health route.

A failing probe (an error status, refused, no answer within UPSTREAM_PROBE_TIMEOUT_SECONDS) ejects the endpoint
(health.py: its breaker opens for the whole instance, failure reason `probe`); a passing probe of an ejected
endpoint half-opens its breaker, so its next stream is the probe that closes it, without waiting out
CIRCUIT_OPEN_SECONDS. A passing probe of a healthy endpoint changes nothing.

Every worker probes, each on its own period with a random phase: one GET per endpoint per period per worker is
negligible next to the streams, a worker that dies takes no shared prober with it, and the verdicts land in the
one instance-wide table whichever worker reached them. Endpoints are probed concurrently, so a hung one delays
nobody else's verdict.
"""

from __future__ import annotations

import asyncio
import logging

from app.upstream.discovery import Endpoint, accepting
from app.upstream.fleet import FleetUpstream
from app.upstream.periodic import PeriodicRound

logger = logging.getLogger("app.upstream.probe")


class Prober(PeriodicRound):
    def __init__(self, fleet: FleetUpstream, *, interval_s: float, path: str, timeout_s: float) -> None:
        super().__init__("upstream-probe", interval_s, logger)
        self._fleet = fleet
        self._path = path
        self._timeout_s = min(timeout_s, interval_s)  # a round never overlaps the next

    async def _probe(self, endpoint: Endpoint) -> None:
        url = endpoint.url
        sent_at = self._fleet.health.now()
        if await self._fleet.at(endpoint).probe(self._path, self._timeout_s):
            self._fleet.health.probe_passed(url, sent_at)  # not if ejected meanwhile (a stream saw it fail)
        else:
            self._fleet.health.record(url, "probe", None)

    async def run_round(self) -> None:
        """One round: every endpoint that accepts new streams, at once."""
        await asyncio.gather(
            *(self._probe(endpoint) for endpoint in accepting(self._fleet.discovery.endpoints()).values())
        )
