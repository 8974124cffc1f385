"""Waiting on a condition, never on a fixed sleep."""

from __future__ import annotations

import time
from collections.abc import Callable

from loadtest.harness.errors import HarnessError

POLL_S = 0.05  # polling interval, not an assertion
GUARD_S = 10.0  # default for `eventually`: a guard against a hang, never a timing assertion


def wait_until(
    condition: Callable[[], object],
    timeout: float,
    what: str,
    *,
    alive: Callable[[], bool] | None = None,
    interval: float = POLL_S,
) -> float:
    """Poll `condition` until it is true; returns the seconds waited.

    Raises HarnessError naming `what` after `timeout` seconds, or at once when `alive()` turns false (the
    process that should make the condition true has exited).
    """
    began = time.monotonic()
    while not condition():
        if alive is not None and not alive():
            raise HarnessError(f"{what}: the process exited")
        if time.monotonic() - began > timeout:
            raise HarnessError(f"{what}: not within {timeout:g} s")
        time.sleep(interval)
    return time.monotonic() - began


def eventually(condition: Callable[[], object], timeout: float = GUARD_S, *, interval: float = POLL_S) -> bool:
    """Whether `condition` turns true within `timeout` seconds (for `assert eventually(...)` in tests)."""
    try:
        wait_until(condition, timeout, "condition", interval=interval)
    except HarnessError:
        return False
    return True
