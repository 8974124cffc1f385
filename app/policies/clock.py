"""The time seams every policy takes: a monotonic clock and an awaitable sleep.

Policies never call `time.time()` to measure intervals: wall time jumps (NTP, manual changes),
`time.monotonic()` does not. On Linux `time.monotonic()` reads CLOCK_MONOTONIC, which is one
clock for the whole machine, so readings taken in different worker processes of one instance
can be compared (the shared-memory policies rely on that). It is *not* comparable across
machines: a store shared by several hosts (Redis) must use its own clock.

Fakes for tests live in `tests/policies/`, never here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

Clock = Callable[[], float]
"""Seconds from an arbitrary, never-decreasing origin (`time.monotonic` in production)."""

Sleep = Callable[[float], Awaitable[None]]
"""Waits the given number of seconds (`asyncio.sleep` in production)."""

MONOTONIC: Clock = time.monotonic
ASYNC_SLEEP: Sleep = asyncio.sleep
