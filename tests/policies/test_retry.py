from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.policies.retry import ErrorKind, RetryPolicy, error_kind_for_status
from tests.policies.policy_fakes import SleepRecorder, run_sync


class _Extremes(random.Random):
    """A generator that always lands on one end of the jitter range."""

    def __init__(self, top: bool) -> None:
        super().__init__(0)
        self.top = top

    def uniform(self, a: float, b: float) -> float:
        return b if self.top else a


def test_defaults_are_the_seed_values() -> None:
    policy = RetryPolicy()
    assert (policy.max_retries, policy.base_seconds, policy.max_seconds) == (2, 1.0, 10.0)
    with pytest.raises(ValueError):
        RetryPolicy(max_retries=-1)
    with pytest.raises(ValueError):
        RetryPolicy(base_seconds=5.0, max_seconds=1.0)


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (429, ErrorKind.RATE_LIMITED),
        (500, ErrorKind.SERVER),
        (503, ErrorKind.SERVER),
        (599, ErrorKind.SERVER),
        (400, ErrorKind.CLIENT),
        (401, ErrorKind.CLIENT),
        (404, ErrorKind.CLIENT),
        (422, ErrorKind.CLIENT),
        (200, ErrorKind.OTHER),
        (302, ErrorKind.OTHER),
    ],
)
def test_error_kind_for_status(status: int, kind: ErrorKind) -> None:
    assert error_kind_for_status(status) is kind


@pytest.mark.parametrize("kind", list(ErrorKind))
def test_only_connect_errors_429_and_5xx_are_retried(kind: ErrorKind) -> None:
    retryable = kind in {ErrorKind.CONNECT, ErrorKind.RATE_LIMITED, ErrorKind.SERVER}
    assert RetryPolicy().should_retry(0, kind, tokens_sent=0) is retryable


def test_never_after_a_token_was_sent() -> None:
    policy = RetryPolicy()
    assert not policy.should_retry(0, ErrorKind.CONNECT, tokens_sent=1)
    assert not policy.should_retry(0, ErrorKind.SERVER, tokens_sent=17)


def test_at_most_max_retries() -> None:
    policy = RetryPolicy(max_retries=2)
    assert [policy.should_retry(a, ErrorKind.SERVER, tokens_sent=0) for a in range(4)] == [True, True, False, False]
    assert not RetryPolicy(max_retries=0).should_retry(0, ErrorKind.SERVER, tokens_sent=0)


def test_backoff_doubles_up_to_the_cap() -> None:
    sleep = SleepRecorder()
    policy = RetryPolicy(max_retries=6, rng=_Extremes(top=True), sleep=sleep)
    for attempt in range(6):
        run_sync(policy.wait(attempt))
    assert sleep.intervals == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert policy.backoff_ceiling(10_000) == 10.0  # no float overflow on absurd attempt numbers


def test_full_jitter_reaches_zero() -> None:
    sleep = SleepRecorder()
    policy = RetryPolicy(rng=_Extremes(top=False), sleep=sleep)
    assert run_sync(policy.wait(1)) == 0.0
    assert sleep.intervals == [0.0]


def test_a_longer_retry_after_wins_capped_at_max() -> None:
    sleep = SleepRecorder()
    policy = RetryPolicy(rng=_Extremes(top=True), sleep=sleep)
    run_sync(policy.wait(0, retry_after_seconds=7.0))  # longer than the 1 s ceiling: honoured
    run_sync(policy.wait(1, retry_after_seconds=0.5))  # shorter than the 2 s jitter: ignored
    run_sync(policy.wait(0, retry_after_seconds=120.0))  # capped
    assert sleep.intervals == [7.0, 2.0, 10.0]


def test_a_seeded_rng_gives_reproducible_waits() -> None:
    waits = [[RetryPolicy(rng=random.Random(42)).backoff_seconds(a) for a in range(3)] for _ in range(2)]
    assert waits[0] == waits[1]


@settings(deadline=None)  # Hypothesis's 200 ms per example is a time asserted on a shared machine
@given(
    attempt=st.integers(0, 200),
    base=st.floats(0.001, 5.0),
    cap_factor=st.floats(1.0, 100.0),
    retry_after=st.none() | st.floats(0.0, 1000.0),
    seed=st.integers(0, 2**32),
)
def test_wait_bounds(attempt: int, base: float, cap_factor: float, retry_after: float | None, seed: int) -> None:
    policy = RetryPolicy(base_seconds=base, max_seconds=base * cap_factor, rng=random.Random(seed))
    delay = policy.backoff_seconds(attempt, retry_after)
    ceiling = min(policy.max_seconds, base * 2.0**attempt)
    assert 0.0 <= delay <= policy.max_seconds
    if retry_after is None:
        assert delay <= ceiling
    else:
        assert delay >= min(retry_after, policy.max_seconds)
        assert delay <= max(ceiling, min(retry_after, policy.max_seconds))
