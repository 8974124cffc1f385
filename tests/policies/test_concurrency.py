from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Callable, Iterator

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from app.policies.concurrency import (
    ConnectionLimiter,
    Lease,
    MemoryConnectionLimiter,
    SharedConnectionLimiter,
)
from tests.policies.policy_fakes import CHILD_TIMEOUT_S, run_forked

LimiterFactory = Callable[[int, int], ConnectionLimiter]


@pytest.fixture(params=["memory", "shared-memory"])
def make_limiter(request: pytest.FixtureRequest) -> Iterator[LimiterFactory]:
    made: list[SharedConnectionLimiter] = []

    def factory(max_total: int, max_per_client: int) -> ConnectionLimiter:
        if request.param == "memory":
            return MemoryConnectionLimiter(max_total, max_per_client)
        limiter = SharedConnectionLimiter(max_total, max_per_client)
        made.append(limiter)
        return limiter

    yield factory
    for limiter in made:
        limiter.close()


def test_defaults_are_the_seed_values() -> None:
    limiter = MemoryConnectionLimiter()
    assert (limiter.max_total, limiter.max_per_client) == (500, 10)
    with pytest.raises(ValueError):
        MemoryConnectionLimiter(0, 1)


def test_per_client_cap(make_limiter: LimiterFactory) -> None:
    limiter = make_limiter(500, 10)
    leases = [limiter.try_acquire("client") for _ in range(10)]
    assert all(lease is not None for lease in leases)
    assert limiter.try_acquire("client") is None
    assert limiter.try_acquire("someone-else") is not None
    assert limiter.active("client") == 10 and limiter.active() == 11
    assert leases[0] is not None and leases[0].release()
    assert limiter.try_acquire("client") is not None


def test_global_cap(make_limiter: LimiterFactory) -> None:
    limiter = make_limiter(3, 2)
    held = [limiter.try_acquire(c) for c in ("a", "a", "b")]
    assert limiter.try_acquire("c") is None
    assert held[2] is not None
    held[2].release()
    assert limiter.try_acquire("c") is not None
    assert limiter.active() == 3


def test_release_is_exactly_once(make_limiter: LimiterFactory) -> None:
    limiter = make_limiter(5, 5)
    lease = limiter.try_acquire("c")
    other = limiter.try_acquire("c")
    assert lease is not None and other is not None
    assert lease.release() is True
    assert lease.release() is False
    with lease:  # the context manager releases too, and still only once
        pass
    assert lease.released and not other.released
    assert limiter.active("c") == 1 and limiter.active() == 1


def test_concurrent_releases_free_one_slot(make_limiter: LimiterFactory) -> None:
    limiter = make_limiter(5, 5)
    lease = limiter.try_acquire("c")
    keep = limiter.try_acquire("c")
    assert lease is not None and keep is not None
    start = threading.Barrier(8)
    wins: list[bool] = []

    def release() -> None:
        start.wait(timeout=CHILD_TIMEOUT_S)
        wins.append(lease.release())

    threads = [threading.Thread(target=release) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(CHILD_TIMEOUT_S)
    assert sorted(wins) == [False] * 7 + [True]
    assert limiter.active("c") == 1


def test_a_release_after_reclaim_does_not_free_someone_elses_slot() -> None:
    limiter = SharedConnectionLimiter(1, 1)
    try:
        stale = limiter.try_acquire("c")
        assert stale is not None
        assert limiter.reclaim(os.getpid()) == 1
        fresh = limiter.try_acquire("c")  # reuses the same lease entry, next generation
        assert fresh is not None
        assert stale.release() is True  # this lease's first release...
        assert limiter.active() == 1 and limiter.active("c") == 1  # ...frees nothing: already reclaimed
        assert fresh.release()
        assert limiter.active() == 0
    finally:
        limiter.close()


def test_memory_limiter_has_nothing_to_reclaim() -> None:
    limiter = MemoryConnectionLimiter()
    assert limiter.try_acquire("c") is not None
    assert limiter.reclaim(os.getpid()) == 0


def test_ten_per_client_across_worker_processes() -> None:
    limiter = SharedConnectionLimiter(500, 10)  # built before fork, as in the gunicorn master
    all_tried = multiprocessing.get_context("fork").Barrier(2)
    try:

        def grab(_: int) -> int:
            held = [limiter.try_acquire("one-client") for _ in range(30)]
            granted = [lease for lease in held if lease is not None]
            count = len(granted)
            all_tried.wait(timeout=CHILD_TIMEOUT_S)  # hold the slots until both workers are done asking
            for lease in granted:
                lease.release()
            return count

        assert sum(run_forked(2, grab)) == 10
        assert limiter.active() == 0
    finally:
        limiter.close()


def test_global_cap_across_worker_processes() -> None:
    limiter = SharedConnectionLimiter(12, 10)
    try:

        def grab(index: int) -> int:
            held = [limiter.try_acquire(f"client-{index}-{i % 3}") for i in range(30)]
            return sum(lease is not None for lease in held)  # exits holding them: reclaimed below

        assert sum(run_forked(2, grab)) == 12
    finally:
        limiter.close()


def test_reclaim_frees_the_slots_of_a_dead_worker() -> None:
    limiter = SharedConnectionLimiter(20, 10)
    try:
        mine = limiter.try_acquire("client")
        assert mine is not None
        ctx = multiprocessing.get_context("fork")

        def die_holding_slots() -> None:
            for _ in range(9):
                assert limiter.try_acquire("client") is not None
            os._exit(0)  # like a SIGKILLed worker: nothing released

        worker = ctx.Process(target=die_holding_slots)
        worker.start()
        worker.join(CHILD_TIMEOUT_S)
        assert worker.exitcode == 0 and worker.pid is not None
        assert limiter.active("client") == 10
        assert limiter.try_acquire("client") is None

        assert limiter.reclaim(worker.pid) == 9  # what gunicorn's child_exit hook does
        assert limiter.reclaim(worker.pid) == 0
        assert limiter.active("client") == 1 and limiter.active() == 1
        assert not mine.released
        again = [limiter.try_acquire("client") for _ in range(9)]
        assert all(lease is not None for lease in again)
        assert limiter.try_acquire("client") is None
    finally:
        limiter.close()


class LimiterMachine(RuleBasedStateMachine):
    """Memory and shared limiters against a dict model, under any interleaving of acquire/release."""

    leases = Bundle("leases")

    def __init__(self) -> None:
        super().__init__()
        self.memory = MemoryConnectionLimiter(6, 3)
        self.shared = SharedConnectionLimiter(6, 3)
        self.model: dict[str, int] = {}

    def teardown(self) -> None:
        self.shared.close()

    @rule(target=leases, client=st.sampled_from(["a", "b", "c", "d"]))
    def acquire(self, client: str) -> tuple[Lease | None, Lease | None]:
        expect = sum(self.model.values()) < 6 and self.model.get(client, 0) < 3
        pair = (self.memory.try_acquire(client), self.shared.try_acquire(client))
        assert [lease is not None for lease in pair] == [expect, expect]
        if expect:
            self.model[client] = self.model.get(client, 0) + 1
        return pair

    @rule(pair=consumes(leases), times=st.integers(1, 3))
    def release(self, pair: tuple[Lease | None, Lease | None], times: int) -> None:
        memory, shared = pair
        if memory is None or shared is None:
            return
        for _ in range(times):
            memory.release()
            shared.release()
        self.model[memory.client] -= 1

    @invariant()
    def counts_match(self) -> None:
        for limiter in (self.memory, self.shared):
            assert limiter.active() == sum(self.model.values())
            for client in "abcd":
                assert limiter.active(client) == self.model.get(client, 0)


LimiterMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestLimiterMachine = LimiterMachine.TestCase


def test_a_worker_that_reopened_the_table_by_descriptor_is_reclaimed_too() -> None:
    limiter = SharedConnectionLimiter(20, 10)
    try:
        ctx = multiprocessing.get_context("fork")

        def die_holding_slots() -> None:
            reopened = SharedConnectionLimiter.attach(limiter.fd)
            assert (reopened.max_total, reopened.max_per_client) == (20, 10)
            for _ in range(10):
                assert reopened.try_acquire("client") is not None
            assert reopened.try_acquire("client") is None
            os._exit(0)

        worker = ctx.Process(target=die_holding_slots)
        worker.start()
        worker.join(CHILD_TIMEOUT_S)
        assert worker.exitcode == 0 and worker.pid is not None
        assert limiter.active("client") == 10
        assert limiter.reclaim(worker.pid) == 10
        assert limiter.active() == 0
    finally:
        limiter.close()
