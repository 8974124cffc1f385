"""Retry before the first token: which failures, how many times, how long to wait.

Only failures that left nothing at the client and may pass on their own are retried: connect
errors, 429 and 5xx. Never another 4xx (the request itself is wrong; it fails again), and never
once a token reached the client (a retry would replay the answer from its start).

Waits use exponential backoff with full jitter, `uniform(0, min(max, base * 2**attempt))`, so
clients refused together do not come back together. A server's `Retry-After` wins when it is
longer, capped at `max_seconds`. The sleep is injected: tests pass a recorder and never wait.
"""

from __future__ import annotations

import enum
import math
import random

from app.policies.clock import ASYNC_SLEEP, Sleep

DEFAULT_MAX_RETRIES = 2
DEFAULT_BASE_SECONDS = 1.0
DEFAULT_MAX_SECONDS = 10.0
_MAX_EXPONENT = 1000  # 2.0**1024 overflows a float; the cap is reached long before


class ErrorKind(enum.Enum):
    """What went wrong with an upstream attempt, as far as retrying is concerned."""

    CONNECT = "connect"  # no connection (refused, DNS, TLS, connect timeout): the upstream saw nothing
    RATE_LIMITED = "rate_limited"  # 429
    SERVER = "server"  # 5xx
    CLIENT = "client"  # any other 4xx
    TIMEOUT = "timeout"  # a stream deadline passed: its budget is spent, a retry cannot fit in it
    OTHER = "other"


RETRYABLE = frozenset({ErrorKind.CONNECT, ErrorKind.RATE_LIMITED, ErrorKind.SERVER})


def error_kind_for_status(status: int) -> ErrorKind:
    """The kind of an upstream HTTP error status."""
    if status == 429:
        return ErrorKind.RATE_LIMITED
    if 500 <= status <= 599:
        return ErrorKind.SERVER
    if 400 <= status <= 499:
        return ErrorKind.CLIENT
    return ErrorKind.OTHER


class RetryPolicy:
    """Retries of one upstream call before its first token reached the client.

    `attempt` counts retries already made: 0 when the first try has just failed. The caller's
    loop: on failure, `if policy.should_retry(attempt, kind, tokens_sent=n): await
    policy.wait(attempt, retry_after_seconds)`, then try again with `attempt + 1`.
    """

    def __init__(
        self,
        max_retries: int = DEFAULT_MAX_RETRIES,
        base_seconds: float = DEFAULT_BASE_SECONDS,
        max_seconds: float = DEFAULT_MAX_SECONDS,
        *,
        rng: random.Random | None = None,
        sleep: Sleep = ASYNC_SLEEP,
    ) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if not 0 < base_seconds <= max_seconds or math.isinf(max_seconds):
            raise ValueError("need 0 < base_seconds <= max_seconds < inf")
        self.max_retries = max_retries
        self.base_seconds = base_seconds
        self.max_seconds = max_seconds
        self._rng = rng if rng is not None else random.Random()
        self._sleep = sleep

    def should_retry(self, attempt: int, error_kind: ErrorKind, *, tokens_sent: int) -> bool:
        """True when the failed try may be repeated: retries left, nothing sent, retryable kind."""
        return tokens_sent == 0 and 0 <= attempt < self.max_retries and error_kind in RETRYABLE

    def backoff_ceiling(self, attempt: int) -> float:
        """The upper bound of the jittered wait before retry number `attempt + 1`."""
        return min(self.max_seconds, self.base_seconds * 2.0 ** min(max(attempt, 0), _MAX_EXPONENT))

    def backoff_seconds(self, attempt: int, retry_after_seconds: float | None = None) -> float:
        """Full jitter in [0, ceiling]; a longer server `Retry-After` wins, capped at `max_seconds`."""
        delay = self._rng.uniform(0.0, self.backoff_ceiling(attempt))
        if retry_after_seconds is not None and retry_after_seconds > delay:
            delay = retry_after_seconds
        return min(delay, self.max_seconds)

    async def wait(self, attempt: int, retry_after_seconds: float | None = None) -> float:
        """Sleep the backoff before the next try; returns the interval slept."""
        delay = self.backoff_seconds(attempt, retry_after_seconds)
        await self._sleep(delay)
        return delay
