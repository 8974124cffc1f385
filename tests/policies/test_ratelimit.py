from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.policies.breaker import SharedBreakerCell
from app.policies.ratelimit import (
    Acquisition,
    MemoryStorage,
    RateLimit,
    RateLimiter,
    SharedMemoryStorage,
    Storage,
)
from app.storage.errors import StorageError
from tests.policies.policy_fakes import CHILD_TIMEOUT_S, FakeClock, run_forked, run_sync

StorageFactory = Callable[[], Storage]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["memory", "shared-memory"])
def make_storage(request: pytest.FixtureRequest) -> Iterator[StorageFactory]:
    made: list[SharedMemoryStorage] = []

    def factory() -> Storage:
        if request.param == "memory":
            return MemoryStorage()
        storage = SharedMemoryStorage(slots=256)
        made.append(storage)
        return storage

    yield factory
    for storage in made:
        storage.close()


def test_defaults_are_the_seed_values() -> None:
    limit = RateLimit()
    assert limit.capacity == 5
    assert limit.refill_per_second == pytest.approx(20 / 60)
    assert RateLimit.per_minute(20, 5) == limit
    assert limit.window_seconds == pytest.approx(15.0)


def test_burst_then_refusal_then_one_token_per_interval(make_storage: StorageFactory) -> None:
    clock = FakeClock()
    limiter = RateLimiter(make_storage(), fail_open=False, clock=clock)
    allowed = [run_sync(limiter.hit("client")).allowed for _ in range(5)]
    assert allowed == [True] * 5
    refused = run_sync(limiter.hit("client"))
    assert not refused.allowed
    assert refused.remaining == 0
    assert refused.retry_after_seconds == pytest.approx(3.0)
    clock.advance(refused.retry_after_seconds)  # obeying Retry-After exactly is enough
    assert run_sync(limiter.hit("client")).allowed
    assert not run_sync(limiter.hit("client")).allowed
    assert run_sync(limiter.hit("other-client")).allowed


def test_headers_follow_the_ietf_draft_and_retry_after_rounds_up(make_storage: StorageFactory) -> None:
    clock = FakeClock()
    limiter = RateLimiter(make_storage(), fail_open=False, clock=clock)
    first = run_sync(limiter.hit("c"))
    assert first.headers() == {"RateLimit-Policy": '"default";q=5;w=15', "RateLimit": '"default";r=4;t=3'}
    for _ in range(4):
        run_sync(limiter.hit("c"))
    clock.advance(0.5)
    refused = run_sync(limiter.hit("c"))
    assert refused.retry_after_seconds == pytest.approx(2.5)
    assert refused.headers() == {
        "RateLimit-Policy": '"default";q=5;w=15',
        "RateLimit": '"default";r=0;t=15',
        "Retry-After": "3",
    }


def test_a_refused_hit_spends_nothing(make_storage: StorageFactory) -> None:
    clock = FakeClock()
    limiter = RateLimiter(make_storage(), RateLimit(capacity=1, refill_per_second=1.0), fail_open=False, clock=clock)
    assert run_sync(limiter.hit("c")).allowed
    refused = [run_sync(limiter.hit("c")) for _ in range(3)]
    assert [r.allowed for r in refused] == [False] * 3
    assert {r.retry_after_seconds for r in refused} == {1.0}  # hammering does not push the next token away
    clock.advance(1.0)
    assert run_sync(limiter.hit("c")).allowed


def test_each_key_has_its_own_bucket_and_a_full_one_is_fresh(make_storage: StorageFactory) -> None:
    clock = FakeClock()
    limiter = RateLimiter(make_storage(), RateLimit(capacity=1, refill_per_second=0.001), fail_open=False, clock=clock)
    for key in ("a", "b"):
        assert run_sync(limiter.hit(key)).allowed
    assert not run_sync(limiter.hit("a")).allowed and not run_sync(limiter.hit("b")).allowed
    assert run_sync(limiter.hit("c")).allowed  # another key: its own full bucket
    clock.advance(1000.0)  # "a" and "b" are full again: a fresh burst, as if never seen
    for key in ("a", "b"):
        result = run_sync(limiter.hit(key))
        assert result.allowed and result.remaining == 0


def test_a_reading_older_than_the_last_refill_mints_nothing(make_storage: StorageFactory) -> None:
    # Two workers read the clock, the one with the later reading takes the lock first.
    storage = make_storage()
    assert run_sync(storage.acquire("k", 5, 1.0, 5, now=10.0)).allowed
    late = run_sync(storage.acquire("k", 5, 1.0, 1, now=9.0))
    assert (late.allowed, late.remaining) == (False, 0.0)
    assert late.retry_after_seconds == pytest.approx(2.0)  # one token's time plus the skew


def test_cost_and_limit_validation() -> None:
    with pytest.raises(ValueError):
        RateLimit(capacity=0)
    with pytest.raises(ValueError):
        RateLimit(refill_per_second=0)
    with pytest.raises(ValueError):
        RateLimiter(MemoryStorage(), fail_open=True, name='bad"name')
    limiter = RateLimiter(MemoryStorage(), fail_open=True, clock=FakeClock())
    with pytest.raises(ValueError):
        run_sync(limiter.hit("c", cost=6))


class _BrokenStorage:
    async def acquire(self, key: str, capacity: int, refill_per_second: float, cost: float, now: float) -> Acquisition:
        raise StorageError("down")


@pytest.mark.parametrize("fail_open", [True, False])
def test_storage_errors_apply_the_configured_fallback(fail_open: bool) -> None:
    limiter = RateLimiter(_BrokenStorage(), fail_open=fail_open, clock=FakeClock())
    for result in (run_sync(limiter.hit("c")), run_sync(limiter.hit("c"))):
        assert result.allowed is fail_open
        assert result.degraded and isinstance(result.error, StorageError)
        # No made-up RateLimit numbers; a refusal still says when to come back.
        assert result.headers() == ({} if fail_open else {"Retry-After": "3"})


def test_shared_storage_failures_become_storage_errors() -> None:
    storage = SharedMemoryStorage(slots=8)
    storage.close()
    with pytest.raises(StorageError):
        run_sync(storage.acquire("k", 5, 1.0, 1, 0.0))
    with pytest.raises(StorageError):
        assert storage.evictions == 0
    result = run_sync(RateLimiter(storage, fail_open=True, clock=FakeClock()).hit("k"))
    assert result.allowed and result.degraded


def test_memory_storage_sweeps_buckets_that_are_full_again() -> None:
    storage = MemoryStorage()
    clock = FakeClock()
    limiter = RateLimiter(storage, fail_open=False, clock=clock)
    for i in range(100):
        run_sync(limiter.hit(f"idle-{i}"))
    assert len(storage) == 100
    clock.advance(3.0)  # one token back: every idle bucket is full again
    run_sync(limiter.hit("active"))
    assert len(storage) == 1
    assert storage.evictions == 0


def test_memory_storage_caps_keys_dropping_the_least_recently_used() -> None:
    storage = MemoryStorage(max_keys=3)
    limiter = RateLimiter(storage, RateLimit(capacity=1, refill_per_second=0.001), fail_open=False, clock=FakeClock())
    for key in ("a", "b", "c"):
        run_sync(limiter.hit(key))
    run_sync(limiter.hit("a"))  # refused, and now the most recently used
    run_sync(limiter.hit("d"))
    assert len(storage) == 3 and storage.evictions == 1
    assert run_sync(limiter.hit("b")).allowed  # b was dropped: a fresh bucket (the documented cost)
    assert not run_sync(limiter.hit("d")).allowed


def test_shared_table_reuses_full_slots_before_evicting() -> None:
    storage = SharedMemoryStorage(slots=1, probe=4)  # one window of 4 slots
    clock = FakeClock()
    limiter = RateLimiter(storage, fail_open=False, clock=clock)
    try:
        for i in range(4):
            run_sync(limiter.hit(f"k{i}"))
        clock.advance(3.0)  # all four full again
        for i in range(4, 8):
            run_sync(limiter.hit(f"k{i}"))
        assert storage.evictions == 0
        assert run_sync(limiter.hit("k8")).allowed
        assert storage.evictions == 1
    finally:
        storage.close()


def test_shared_table_evicts_the_bucket_closest_to_full() -> None:
    storage = SharedMemoryStorage(slots=1, probe=2)
    try:
        run_sync(storage.acquire("drained", 5, 1.0, 5, now=0.0))  # full again at 5.0
        run_sync(storage.acquire("sipped", 5, 1.0, 1, now=0.0))  # full again at 1.0
        run_sync(storage.acquire("newcomer", 5, 1.0, 1, now=0.5))
        assert storage.evictions == 1
        assert not run_sync(storage.acquire("drained", 5, 1.0, 1, now=0.5)).allowed  # kept its state
    finally:
        storage.close()


def _allowed_within_bucket_bounds(times: list[float], allowed_costs: list[float], capacity: int, rate: float) -> None:
    # Over any interval [t_i, t_j], what was let through fits in a full bucket plus the refill.
    for i, j in itertools.combinations_with_replacement(range(len(times)), 2):
        spent = sum(allowed_costs[i : j + 1])
        assert spent <= capacity + (times[j] - times[i]) * rate + 1e-6


@settings(max_examples=150, deadline=None)
@given(
    capacity=st.integers(1, 10),
    rate=st.floats(0.01, 5.0),
    steps=st.lists(st.tuples(st.floats(0.0, 20.0), st.integers(1, 3)), max_size=40),
)
def test_token_bucket_never_exceeds_capacity_plus_refill(
    capacity: int, rate: float, steps: list[tuple[float, int]]
) -> None:
    shared = SharedMemoryStorage(slots=16)
    try:
        decisions: dict[str, list[bool]] = {}
        for label, storage in (("memory", MemoryStorage()), ("shared", shared)):
            clock = FakeClock()
            limiter = RateLimiter(storage, RateLimit(capacity, rate), fail_open=False, clock=clock)
            times: list[float] = []
            costs: list[float] = []
            decisions[label] = []
            for dt, cost in steps:
                clock.advance(dt)
                cost = min(cost, capacity)
                result = run_sync(limiter.hit("k", cost))
                assert 0 <= result.remaining <= capacity
                assert result.allowed == (result.retry_after_seconds == 0)
                times.append(clock.now)
                costs.append(cost if result.allowed else 0)
                decisions[label].append(result.allowed)
            _allowed_within_bucket_bounds(times, costs, capacity, rate)
        assert decisions["memory"] == decisions["shared"]  # one algorithm, two stores
    finally:
        shared.close()


@settings(max_examples=150, deadline=None)
@given(
    capacity=st.integers(1, 10),
    rate=st.floats(0.01, 5.0),
    gaps=st.lists(st.floats(0.0, 5.0), max_size=20),
)
def test_retry_after_is_exactly_when_the_next_request_fits(capacity: int, rate: float, gaps: list[float]) -> None:
    clock = FakeClock()
    limiter = RateLimiter(MemoryStorage(), RateLimit(capacity, rate), fail_open=False, clock=clock)
    for gap in gaps:
        clock.advance(gap)
        run_sync(limiter.hit("k"))
    while (refused := run_sync(limiter.hit("k"))).allowed:
        pass
    wait = refused.retry_after_seconds
    if wait > 0.01:
        clock.advance(wait - 0.001)
        assert not run_sync(limiter.hit("k")).allowed  # not earlier (a refused hit spends nothing)...
        clock.advance(0.001)
    else:
        clock.advance(wait)
    assert run_sync(limiter.hit("k")).allowed  # ...but then


@pytest.mark.parametrize("workers", [2, 4])
def test_workers_share_one_burst(workers: int) -> None:
    """WEB_CONCURRENCY=2 must still mean 5 burst requests per client, not 10."""
    storage = SharedMemoryStorage(slots=64)  # built before fork, as in the gunicorn master
    try:

        def hammer(_: int) -> int:
            # A frozen clock: nothing refills during the test, so the only tokens are the burst.
            limiter = RateLimiter(storage, fail_open=False, clock=lambda: 1000.0)
            return sum(run_sync(limiter.hit("one-client")).allowed for _ in range(200))

        allowed = run_forked(workers, hammer)
        assert sum(allowed) == 5
        assert storage.evictions == 0
    finally:
        storage.close()


def test_a_worker_can_reopen_the_table_by_descriptor() -> None:
    storage = SharedMemoryStorage(slots=64)
    try:

        def hammer(_: int) -> int:
            reopened = SharedMemoryStorage.attach(storage.fd)  # what an app factory in the worker does
            try:
                limiter = RateLimiter(reopened, fail_open=False, clock=lambda: 1000.0)
                return sum(run_sync(limiter.hit("one-client")).allowed for _ in range(50))
            finally:
                reopened.close()

        assert sum(run_forked(2, hammer)) == 5
        here = RateLimiter(storage, fail_open=False, clock=lambda: 1000.0)
        assert not run_sync(here.hit("one-client")).allowed
    finally:
        storage.close()


def test_the_descriptor_survives_exec() -> None:
    """`python -m app` execs gunicorn: a table made before exec is reachable through an inheritable fd."""
    storage = SharedMemoryStorage(slots=64)
    try:
        os.set_inheritable(storage.fd, True)
        script = (
            "import asyncio, sys\n"
            "from app.policies.ratelimit import RateLimiter, SharedMemoryStorage\n"
            "storage = SharedMemoryStorage.attach(int(sys.argv[1]))\n"
            "limiter = RateLimiter(storage, fail_open=False, clock=lambda: 1000.0)\n"
            "print(sum(asyncio.run(limiter.hit('c')).allowed for _ in range(3)))\n"
        )
        child = subprocess.run(
            [sys.executable, "-c", script, str(storage.fd)],
            pass_fds=(storage.fd,),
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
            cwd=ROOT,
            check=True,
        )
        assert child.stdout.strip() == "3"
        limiter = RateLimiter(storage, fail_open=False, clock=lambda: 1000.0)
        assert [run_sync(limiter.hit("c")).allowed for _ in range(3)] == [True, True, False]
    finally:
        storage.close()


def test_attach_refuses_a_descriptor_of_another_kind() -> None:
    cell = SharedBreakerCell()
    try:
        with pytest.raises(ValueError, match="not a shared ratelim region"):
            SharedMemoryStorage.attach(cell.fd)
    finally:
        cell.close()
