"""A round of work this worker repeats every interval (the fleet's active probe, its load scrape).

Each worker runs its own, starting at a random phase so the workers of an instance do not all hit the model
servers at once. A round that raises is logged and the next one still runs: a bug must not end it silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random


class PeriodicRound:
    """Subclasses implement `run_round`; the lifespan calls `start` and `aclose`."""

    def __init__(self, name: str, interval_s: float, logger: logging.Logger) -> None:
        self._name = name
        self._interval_s = interval_s
        self._logger = logger
        self._task: asyncio.Task[None] | None = None

    async def run_round(self) -> None:
        raise NotImplementedError

    async def _run(self) -> None:
        await asyncio.sleep(random.uniform(0, self._interval_s))  # workers out of phase
        while True:
            try:
                await self.run_round()
            except Exception:
                self._logger.exception("%s round failed", self._name)
            await asyncio.sleep(self._interval_s)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self._name)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
