# The state is a property that each call may change; mypy keeps an `is` check's narrowing across those calls.
# mypy: disable-error-code="comparison-overlap"
from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from app.policies.breaker import (
    MAX_CHARGED_CAPACITY,
    PROBE_BUSY_RETRY_AFTER_SECONDS,
    BreakerConfig,
    BreakerState,
    CircuitBreaker,
    MemoryBreakerCell,
    Permit,
    SharedBreakerCell,
    charged_capacity,
    client_hash,
)
from tests.policies.policy_fakes import FakeClock, run_forked


@pytest.fixture(params=["memory", "shared-memory"])
def breaker(request: pytest.FixtureRequest) -> Iterator[tuple[CircuitBreaker, FakeClock]]:
    clock = FakeClock()
    if request.param == "memory":
        yield CircuitBreaker("upstream", clock=clock), clock
        return
    cell = SharedBreakerCell()
    yield CircuitBreaker("upstream", cell=cell, clock=clock), clock
    cell.close()


Fixture = tuple[CircuitBreaker, FakeClock]


def _fail(b: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        permit = b.allow()
        assert permit is not None
        permit.record_failure()


def _open(b: CircuitBreaker) -> None:
    _fail(b, 5)
    assert b.state is BreakerState.OPEN


def test_defaults_are_the_seed_values() -> None:
    cfg = BreakerConfig()
    assert (cfg.failure_threshold, cfg.window_seconds, cfg.open_seconds, cfg.success_threshold) == (5, 60, 30, 2)
    with pytest.raises(ValueError):
        BreakerConfig(failure_threshold=0)
    with pytest.raises(ValueError):
        BreakerConfig(open_seconds=0)
    cell = SharedBreakerCell(failure_capacity=3)
    with pytest.raises(ValueError):
        CircuitBreaker("u", cell=cell)
    cell.close()


def test_five_failures_within_the_window_open_it(breaker: Fixture) -> None:
    b, clock = breaker
    _fail(b, 4)
    assert b.state is BreakerState.CLOSED and int(b.state) == 0
    clock.advance(59.9)
    _fail(b, 1)
    assert b.state is BreakerState.OPEN and int(b.state) == 1
    assert b.allow() is None
    assert b.retry_after_seconds() == pytest.approx(30.0)


def test_failures_spread_beyond_the_window_do_not(breaker: Fixture) -> None:
    b, clock = breaker
    for _ in range(10):
        _fail(b, 1)
        clock.advance(15.0)  # never 5 within any 60 s
    assert b.state is BreakerState.CLOSED


def test_successes_do_not_reset_the_sliding_window(breaker: Fixture) -> None:
    b, _ = breaker
    _fail(b, 4)
    permit = b.allow()
    assert permit is not None and permit.record_success()
    _fail(b, 1)
    assert b.state is BreakerState.OPEN


def test_open_then_half_open_after_thirty_seconds(breaker: Fixture) -> None:
    b, clock = breaker
    _open(b)
    clock.advance(20.0)
    assert b.allow() is None
    assert b.retry_after_seconds() == pytest.approx(10.0)
    clock.advance(10.0)
    assert b.state is BreakerState.HALF_OPEN and int(b.state) == 2
    assert b.retry_after_seconds() == 0.0


def test_half_open_admits_one_probe_at_a_time_and_two_successes_close(breaker: Fixture) -> None:
    b, clock = breaker
    _open(b)
    clock.advance(30.0)
    probe = b.allow()
    assert probe is not None and probe.probe
    assert b.allow() is None
    assert b.retry_after_seconds() == PROBE_BUSY_RETRY_AFTER_SECONDS
    assert b.record_success(probe)
    assert b.state is BreakerState.HALF_OPEN
    second = b.allow()
    assert second is not None and second.probe
    assert b.allow() is None
    second.record_success()
    assert b.state is BreakerState.CLOSED
    assert all(b.allow() is not None for _ in range(20))


def test_a_probe_failure_reopens_for_a_full_period(breaker: Fixture) -> None:
    b, clock = breaker
    _open(b)
    clock.advance(30.0)
    first = b.allow()
    assert first is not None
    first.record_success()
    clock.advance(1.0)
    probe = b.allow()
    assert probe is not None
    b.record_failure(probe)
    assert b.state is BreakerState.OPEN
    assert b.retry_after_seconds() == pytest.approx(30.0)
    clock.advance(30.0)
    again = b.allow()
    assert again is not None
    again.record_success()
    assert b.state is BreakerState.HALF_OPEN  # the success count started over


def test_a_released_probe_frees_the_slot_without_a_verdict(breaker: Fixture) -> None:
    b, clock = breaker
    _open(b)
    clock.advance(30.0)
    probe = b.allow()
    assert probe is not None and probe.release()
    assert b.state is BreakerState.HALF_OPEN
    assert b.allow() is not None


def test_a_dropped_probe_counts_as_a_failure_after_the_probe_timeout(breaker: Fixture) -> None:
    b, clock = breaker
    _open(b)
    clock.advance(30.0)
    lost = b.allow()
    assert lost is not None
    clock.advance(29.9)
    assert b.allow() is None and b.state is BreakerState.HALF_OPEN
    clock.advance(0.1)
    assert b.state is BreakerState.OPEN
    assert b.retry_after_seconds() == pytest.approx(30.0)
    assert lost.record_success()  # settles the permit, but too late to count
    clock.advance(30.0)
    assert b.state is BreakerState.HALF_OPEN
    probe = b.allow()
    assert probe is not None
    probe.record_success()
    assert b.state is BreakerState.HALF_OPEN


def test_late_reports_from_before_a_transition_change_nothing(breaker: Fixture) -> None:
    b, clock = breaker
    slow = b.allow()  # granted while closed
    assert slow is not None
    _open(b)
    clock.advance(30.0)
    probe = b.allow()
    assert probe is not None
    slow.record_success()  # not the probe: no success counted
    probe.record_success()
    assert b.state is BreakerState.HALF_OPEN
    second_probe = b.allow()
    assert second_probe is not None
    second_probe.record_success()
    assert b.state is BreakerState.CLOSED


def test_permitless_failures_count_only_while_closed(breaker: Fixture) -> None:
    b, clock = breaker
    for _ in range(5):
        b.record_failure()  # mid-stream breaks, after the permits were settled at first token
    assert b.state is BreakerState.OPEN
    clock.advance(30.0)
    probe = b.allow()
    assert probe is not None
    b.record_failure()
    assert b.state is BreakerState.HALF_OPEN
    probe.record_success()
    assert b.state is BreakerState.HALF_OPEN


def test_a_permit_settles_exactly_once(breaker: Fixture) -> None:
    b, _ = breaker
    permits = [b.allow() for _ in range(5)]
    for permit in permits:
        assert permit is not None
        assert permit.record_failure() is True
        assert permit.record_failure() is False
        assert permit.record_success() is False
        assert permit.release() is False
        assert permit.settled
    assert b.state is BreakerState.OPEN


def test_workers_see_one_breaker() -> None:
    cell = SharedBreakerCell()  # built before fork, as in the gunicorn master
    try:

        def fail_five(_: int) -> int:
            worker = CircuitBreaker("upstream", cell=cell, clock=lambda: 1000.0)
            _fail(worker, 5)
            return 0

        run_forked(1, fail_five)
        clock = FakeClock(1001.0)
        here = CircuitBreaker("upstream", cell=cell, clock=clock)
        assert here.state is BreakerState.OPEN and here.allow() is None

        def probe(_: int) -> int:
            # Every worker asks at once, right after the open period; none reports back.
            worker = CircuitBreaker("upstream", cell=cell, clock=lambda: 1031.0)
            return sum(worker.allow() is not None for _ in range(100))

        assert sum(run_forked(2, probe)) == 1
    finally:
        cell.close()


class BreakerModel:
    """The specification, written plainly: live permits are a set, transitions clear it."""

    def __init__(self) -> None:
        self.mode = "closed"
        self.failures: list[float] = []
        self.opened_at = 0.0
        self.probe: int | None = None
        self.probe_at = 0.0
        self.successes = 0
        self.live: set[int] = set()
        self.charged: list[tuple[float, str]] = []  # counted failures charged to a client, in every state

    def charge(self, now: float, client: str | None) -> bool:
        """False if `client` is at its cap of 2 per 60 s (the failure then counts as nothing)."""
        if client is None:
            return True
        self.charged = [(t, c) for t, c in self.charged if t > now - 60.0]
        if sum(c == client for _, c in self.charged) >= 2:
            return False
        self.charged.append((now, client))
        return True

    def open(self, at: float) -> None:
        self.mode, self.opened_at, self.failures, self.probe, self.successes = "open", at, [], None, 0
        self.live.clear()

    def tick(self, now: float) -> None:
        while True:
            if self.mode == "open" and now >= self.opened_at + 30.0:
                self.mode, self.probe, self.successes = "half", None, 0
                self.live.clear()
            elif self.mode == "half" and self.probe is not None and now >= self.probe_at + 30.0:
                self.open(self.probe_at + 30.0)
            else:
                return

    def closed_failure(self, now: float) -> None:
        self.failures = [t for t in self.failures if t > now - 60.0] + [now]
        if len(self.failures) >= 5:
            self.open(now)

    def allow(self, now: float, ident: int) -> bool:
        self.tick(now)
        if self.mode == "closed":
            self.live.add(ident)
            return True
        if self.mode == "half" and self.probe is None:
            self.live.add(ident)
            self.probe, self.probe_at = ident, now
            return True
        return False

    def settle(self, now: float, ident: int, outcome: str, client: str | None = None) -> None:
        self.tick(now)
        if ident not in self.live:
            return
        self.live.discard(ident)
        if outcome == "failure" and not self.charge(now, client):
            outcome = "release"
        if self.mode == "closed":
            if outcome == "failure":
                self.closed_failure(now)
        elif self.probe == ident:
            self.probe = None
            if outcome == "failure":
                self.open(now)
            elif outcome == "success":
                self.successes += 1
                if self.successes >= 2:
                    self.mode, self.failures, self.successes = "closed", [], 0
                    self.live.clear()

    def retry_after(self, now: float) -> float:
        self.tick(now)
        if self.mode == "open":
            return self.opened_at + 30.0 - now
        if self.mode == "half" and self.probe is not None:
            return min(1.0, self.probe_at + 30.0 - now)
        return 0.0


_STATES = {"closed": BreakerState.CLOSED, "open": BreakerState.OPEN, "half": BreakerState.HALF_OPEN}
# Steps that land on the boundaries (30 s open, 60 s window, 30 s probe timeout) and between them.
_STEPS = st.sampled_from([0.0, 0.1, 0.5, 1.0, 5.0, 10.0, 14.9, 15.0, 29.9, 30.0, 30.1, 59.9, 60.0])


class BreakerMachine(RuleBasedStateMachine):
    """Two breakers over one cell (two workers) against the model of one breaker."""

    permits = Bundle("permits")

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.cell = self.make_cell()
        self.workers = [CircuitBreaker("upstream", cell=self.cell, clock=self.clock) for _ in range(2)]
        self.model = BreakerModel()
        self.ids = itertools.count()

    def make_cell(self) -> MemoryBreakerCell | SharedBreakerCell:
        return MemoryBreakerCell()

    @rule(seconds=_STEPS)
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule(target=permits, worker=st.integers(0, 1))
    def allow(self, worker: int) -> tuple[int, Permit | None]:
        ident = next(self.ids)
        permit = self.workers[worker].allow()
        assert (permit is not None) == self.model.allow(self.clock.now, ident)
        if permit is not None:
            assert permit.probe == (self.model.probe == ident)
        return ident, permit

    @rule(entry=consumes(permits), outcome=st.sampled_from(["success", "failure", "release"]))
    def settle(self, entry: tuple[int, Permit | None], outcome: str) -> None:
        ident, permit = entry
        if permit is None:
            return
        report = {"success": permit.record_success, "failure": permit.record_failure, "release": permit.release}
        assert report[outcome]() is True
        self.model.settle(self.clock.now, ident, outcome)
        assert report[outcome]() is False  # exactly once

    @rule(entry=consumes(permits), client=st.sampled_from(["a", "b"]))
    def charged_failure(self, entry: tuple[int, Permit | None], client: str) -> None:
        ident, permit = entry
        if permit is None:
            return
        assert permit.record_failure(client) is True
        self.model.settle(self.clock.now, ident, "failure", client)

    @rule(worker=st.integers(0, 1), client=st.sampled_from([None, "a"]))
    def failure_without_permit(self, worker: int, client: str | None = None) -> None:
        self.workers[worker].record_failure(client=client)
        self.model.tick(self.clock.now)
        if self.model.mode == "closed" and self.model.charge(self.clock.now, client):
            self.model.closed_failure(self.clock.now)

    @rule(worker=st.integers(0, 1))
    def trip(self, worker: int) -> None:
        # A burst of failures in one step, so the search reaches the open and half-open states often.
        for _ in range(5):
            self.failure_without_permit(worker)

    @invariant()
    def agrees_with_model(self) -> None:
        now = self.clock.now
        expected_retry = self.model.retry_after(now)
        recent_failures = sum(t > now - 60.0 for t in self.model.failures)
        for worker in self.workers:
            assert worker.state is _STATES[self.model.mode]
            assert worker.retry_after_seconds() == pytest.approx(expected_retry)
            # The memory behind the state, so a miscounted late report shows up at once.
            snapshot = worker.snapshot()
            assert snapshot.successes == self.model.successes
            assert sum(t > now - 60.0 for t in snapshot.failures) == recent_failures
            assert sorted(t for t, _ in snapshot.charged if t > now - 60.0) == sorted(
                t for t, _ in self.model.charged if t > now - 60.0
            )


class SharedBreakerMachine(BreakerMachine):
    def make_cell(self) -> MemoryBreakerCell | SharedBreakerCell:
        return SharedBreakerCell()

    def teardown(self) -> None:
        assert isinstance(self.cell, SharedBreakerCell)
        self.cell.close()


_MACHINE_SETTINGS = settings(max_examples=150, stateful_step_count=60, deadline=None)
BreakerMachine.TestCase.settings = _MACHINE_SETTINGS
SharedBreakerMachine.TestCase.settings = _MACHINE_SETTINGS
TestBreakerMachine = BreakerMachine.TestCase
TestSharedBreakerMachine = SharedBreakerMachine.TestCase


def test_a_worker_can_reopen_the_cell_by_descriptor() -> None:
    cell = SharedBreakerCell()
    try:

        def fail_five(_: int) -> int:
            reopened = SharedBreakerCell.attach(cell.fd)
            _fail(CircuitBreaker("upstream", cell=reopened, clock=lambda: 1000.0), 5)
            reopened.close()
            return 0

        run_forked(1, fail_five)
        assert CircuitBreaker("upstream", cell=cell, clock=lambda: 1000.0).state is BreakerState.OPEN
    finally:
        cell.close()


# --- fairness: failures a client's content can cause count at most max_failures_per_client per window --------


def _charge(b: CircuitBreaker, client: str, times: int) -> None:
    for _ in range(times):
        permit = b.allow()
        assert permit is not None
        assert permit.record_failure(client) is True


def test_one_clients_failures_count_at_most_its_cap(breaker: Fixture) -> None:
    b, _ = breaker
    assert b.config.max_failures_per_client == 2
    _charge(b, "key:poisoner", 50)
    assert b.state is BreakerState.CLOSED
    assert len(b.snapshot().failures) == 2
    b.record_failure(client="key:poisoner")  # mid-stream, permitless: capped the same way
    assert len(b.snapshot().failures) == 2
    _fail(b, 3)  # failures no content causes count in full: 2 + 3 = the threshold
    assert b.state is BreakerState.OPEN


def test_many_clients_failing_still_open_it(breaker: Fixture) -> None:
    b, _ = breaker
    for client in ("a", "b"):
        _charge(b, client, 5)
    assert b.state is BreakerState.CLOSED and len(b.snapshot().failures) == 4
    _charge(b, "c", 1)
    assert b.state is BreakerState.OPEN


def test_a_clients_cap_renews_with_the_window(breaker: Fixture) -> None:
    b, clock = breaker
    _charge(b, "a", 3)
    assert len(b.snapshot().failures) == 2
    clock.advance(60.0)  # both charged failures leave the window
    _charge(b, "a", 3)
    assert len(b.snapshot().failures) == 2  # the old ones expired, two new ones count
    assert b.state is BreakerState.CLOSED


def test_a_capped_client_cannot_keep_it_open_by_failing_probes(breaker: Fixture) -> None:
    b, clock = breaker
    _charge(b, "a", 2)
    _fail(b, 3)
    assert b.state is BreakerState.OPEN
    clock.advance(30.0)
    probe = b.allow()
    assert probe is not None and probe.probe
    probe.record_failure("a")  # over its cap: no verdict, the probe slot is free again
    assert b.state is BreakerState.HALF_OPEN
    probe = b.allow()
    assert probe is not None and probe.probe
    probe.record_failure("b")  # another client's failing probe counts: the upstream may really be failing
    assert b.state is BreakerState.OPEN
    clock.advance(30.0)
    for _ in range(2):
        probe = b.allow()
        assert probe is not None
        probe.record_success()
    assert b.state is BreakerState.CLOSED


def test_the_cap_holds_across_workers() -> None:
    """Worker processes over one shared cell: a client's charged failures are counted once for the instance."""
    cell = SharedBreakerCell()
    try:

        def poison(_: int) -> int:
            worker = CircuitBreaker("upstream", cell=cell, clock=lambda: 1000.0)
            _charge(worker, "key:poisoner", 20)
            return len(worker.snapshot().failures)

        run_forked(2, poison)
        here = CircuitBreaker("upstream", cell=cell, clock=lambda: 1000.0)
        assert here.state is BreakerState.CLOSED
        assert len(here.snapshot().failures) == 2
        assert [who for _, who in here.snapshot().charged] == [client_hash("key:poisoner")] * 2
    finally:
        cell.close()


def test_charged_capacity_fits_a_window() -> None:
    cfg = BreakerConfig(failure_threshold=5, window_seconds=60.0, open_seconds=30.0)
    assert charged_capacity(cfg) == 6 * 3
    assert charged_capacity(BreakerConfig(window_seconds=60.0, open_seconds=0.001)) == MAX_CHARGED_CAPACITY
    with pytest.raises(ValueError):
        BreakerConfig(max_failures_per_client=0)


def test_an_uncounted_permit_is_settled_from_the_start_and_reports_nothing() -> None:
    permit = Permit.uncounted()
    assert permit.settled and not permit.probe
    assert not permit.record_success() and not permit.record_failure("tenant") and not permit.release()
