"""Circuit breaker per upstream: pure transitions over a snapshot, stored in a pluggable cell.

States (the `streaming_circuit_breaker_state` gauge value): 0 closed, 1 open, 2 half-open.

- Closed: every request gets a permit. `failure_threshold` failures within `window_seconds`
  (a sliding window of failure times) open the breaker.
- Open: no permits; `retry_after_seconds()` says when it half-opens (`open_seconds` later).
- Half-open: exactly one probe permit at a time. `success_threshold` consecutive probe
  successes close the breaker; a probe failure re-opens it.

Reporting contract. `allow()` returns a `Permit`, settled exactly once by `record_success()`,
`record_failure()` or `release()` (no verdict, e.g. the client left before the upstream
answered); later calls are no-ops. Report success when the upstream has proven itself (first
token); a failure after that (stream breaks mid-way) is reported with
`breaker.record_failure()` without a permit, and counts while the breaker is closed.

A permit dropped without any report counts as nothing, except a half-open probe: the breaker
cannot know it was dropped, so a probe still unsettled `probe_timeout_seconds` after it was
granted counts as a failure (the upstream did not answer in time) and re-opens the breaker.
Otherwise one lost probe would keep the breaker half-open and refusing everyone forever.

Fairness between clients. A failure a request's *content* can cause (an HTTP 5xx from a model
server that did answer, an error it sent, data it garbled) is reported with the client it may be
charged to (`record_failure(client=...)`). Such failures count at most `max_failures_per_client`
per client within `window_seconds`, in every state: one tenant's poisoned prompts cannot open the
breaker for everyone, nor keep it open by failing half-open probes (a probe failure over the cap
only frees the probe slot). Failures no content causes (connection refused, a reset before the
response, no answer by the first-token deadline) are reported without a client and always count in
full, so a dead upstream opens the breaker with a single client calling it. The charged failures
live in the snapshot (`charged`), so the cap holds across the workers sharing a cell.

Permits carry the epoch they were granted in; every transition and every probe grant starts a
new epoch, so a late report from before a transition (a closed-state request failing after the
breaker already opened, a probe that timed out) changes nothing.

Ejection. A fleet's endpoint that refuses connections, resets them or fails its health probe is opened at
once (`on_eject`, `CircuitBreaker.eject`), whatever the state and the counts; a passing health probe moves an
open breaker to half-open (`on_probe_pass`), so its next request is the probe that closes it.

Transitions are pure functions of (config, snapshot, event, now) in the style of tenacity's
strategies; `CircuitBreaker` applies them to a `BreakerCell` atomically. `MemoryBreakerCell` keeps
the snapshot in this process; `SharedBreakerCell` keeps it in shared memory so every gunicorn
worker of the instance sees one breaker (create it in the master, before fork; workers use it as
inherited or re-open it with `SharedBreakerCell.attach(fd)`). A fleet keeps one snapshot per endpoint in a
keyed table laid out the same way (breakers.py, `SnapshotLayout`).
"""

from __future__ import annotations

import enum
import hashlib
import math
import mmap
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol, TypeVar

from app.policies.clock import MONOTONIC, Clock
from app.storage.shm import DATA_OFFSET, SharedRegion, SharedTable

DEFAULT_FAILURE_THRESHOLD = 5
DEFAULT_WINDOW_SECONDS = 60.0
DEFAULT_OPEN_SECONDS = 30.0
DEFAULT_SUCCESS_THRESHOLD = 2
DEFAULT_PROBE_TIMEOUT_SECONDS = 30.0  # a probe settles at its first token: the first-token deadline
DEFAULT_MAX_FAILURES_PER_CLIENT = 2
MAX_CHARGED_CAPACITY = 1024  # charged failures a shared cell remembers at most (16 bytes each)
# Half-open with the probe in flight: the answer is one probe away, so refused clients are told to
# come back soon rather than after a whole open period.
PROBE_BUSY_RETRY_AFTER_SECONDS = 1.0

_T = TypeVar("_T")


class BreakerState(enum.IntEnum):
    """Gauge values of `streaming_circuit_breaker_state`."""

    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class CallResult(enum.Enum):
    """How a guarded upstream call settled its permit (a stream's end is `streaming.session.Outcome`)."""

    SUCCESS = "success"
    FAILURE = "failure"
    RELEASE = "release"  # settled without a verdict


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    failure_threshold: int = DEFAULT_FAILURE_THRESHOLD
    window_seconds: float = DEFAULT_WINDOW_SECONDS
    open_seconds: float = DEFAULT_OPEN_SECONDS
    success_threshold: int = DEFAULT_SUCCESS_THRESHOLD
    probe_timeout_seconds: float = DEFAULT_PROBE_TIMEOUT_SECONDS
    max_failures_per_client: int = DEFAULT_MAX_FAILURES_PER_CLIENT

    def __post_init__(self) -> None:
        if self.failure_threshold < 1 or self.success_threshold < 1 or self.max_failures_per_client < 1:
            raise ValueError("failure_threshold, success_threshold and max_failures_per_client must be at least 1")
        if min(self.window_seconds, self.open_seconds, self.probe_timeout_seconds) <= 0:
            raise ValueError("window_seconds, open_seconds and probe_timeout_seconds must be positive")


@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    """Everything a breaker remembers; what a cell stores."""

    state: BreakerState = BreakerState.CLOSED
    epoch: int = 0
    failures: tuple[float, ...] = ()  # closed: recent failure times, oldest first, at most failure_threshold
    opened_at: float = 0.0
    probe_in_flight: bool = False
    probe_started_at: float = 0.0
    successes: int = 0  # half-open: consecutive probe successes
    # (time, client hash) of the charged failures that counted, oldest first; kept across transitions
    charged: tuple[tuple[float, int], ...] = ()


@dataclass(frozen=True, slots=True)
class Grant:
    epoch: int
    probe: bool


# --- pure transitions ---------------------------------------------------------------------------


def _open(s: BreakerSnapshot, at: float) -> BreakerSnapshot:
    return BreakerSnapshot(BreakerState.OPEN, s.epoch + 1, opened_at=at, charged=s.charged)


def client_hash(client: str) -> int:
    """A non-zero 64-bit id of a client identity, the same in every process (0: not charged to anyone)."""
    digest = hashlib.blake2b(client.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") or 1


def charged_capacity(cfg: BreakerConfig) -> int:
    """Charged failures that can count within one window: up to `failure_threshold` per closed period,
    plus a failed probe per open period that fits in the window."""
    periods = math.ceil(cfg.window_seconds / cfg.open_seconds) + 1
    return min(MAX_CHARGED_CAPACITY, (cfg.failure_threshold + 1) * periods)


def _charge(cfg: BreakerConfig, s: BreakerSnapshot, now: float, client: int) -> BreakerSnapshot | None:
    """`s` with a failure charged to `client`, or None when the client is at its cap (it does not count)."""
    horizon = now - cfg.window_seconds
    charged = tuple(entry for entry in s.charged if entry[0] > horizon)
    if sum(1 for _, who in charged if who == client) >= cfg.max_failures_per_client:
        return None
    return replace(s, charged=(*charged, (now, client)))


def advance(cfg: BreakerConfig, s: BreakerSnapshot, now: float) -> BreakerSnapshot:
    """Transitions that happen by time alone: open -> half-open, and an overdue probe -> open."""
    while True:
        if s.state is BreakerState.OPEN and now >= s.opened_at + cfg.open_seconds:
            s = BreakerSnapshot(BreakerState.HALF_OPEN, s.epoch + 1, opened_at=s.opened_at, charged=s.charged)
        elif (
            s.state is BreakerState.HALF_OPEN
            and s.probe_in_flight
            and now >= s.probe_started_at + cfg.probe_timeout_seconds
        ):
            s = _open(s, s.probe_started_at + cfg.probe_timeout_seconds)
        else:
            return s


def on_allow(cfg: BreakerConfig, s: BreakerSnapshot, now: float) -> tuple[BreakerSnapshot, Grant | None]:
    """A request asks to go upstream."""
    s = advance(cfg, s, now)
    if s.state is BreakerState.CLOSED:
        return s, Grant(s.epoch, probe=False)
    if s.state is BreakerState.HALF_OPEN and not s.probe_in_flight:
        s = replace(s, epoch=s.epoch + 1, probe_in_flight=True, probe_started_at=now)
        return s, Grant(s.epoch, probe=True)
    return s, None


def _closed_failure(cfg: BreakerConfig, s: BreakerSnapshot, now: float) -> BreakerSnapshot:
    horizon = now - cfg.window_seconds
    failures = (*(t for t in s.failures if t > horizon), now)
    if len(failures) >= cfg.failure_threshold:
        return _open(s, now)
    return replace(s, failures=failures)


def on_outcome(
    cfg: BreakerConfig, s: BreakerSnapshot, now: float, grant: Grant | None, outcome: CallResult, client: int = 0
) -> BreakerSnapshot:
    """A permit settles (`grant`), or a failure is seen outside any permit (`grant` None).

    `client`: the hash of the client a failure is charged to (0: not charged, counts in full)."""
    s = advance(cfg, s, now)
    if (
        outcome is CallResult.FAILURE
        and client
        and (grant is None or grant.epoch == s.epoch)
        and (s.state is BreakerState.CLOSED or (grant is not None and grant.probe))
    ):
        charged = _charge(cfg, s, now, client)
        if charged is None:  # over the client's cap: no verdict
            outcome = CallResult.RELEASE
        else:
            s = charged
    if grant is None:
        if outcome is CallResult.FAILURE and s.state is BreakerState.CLOSED:
            return _closed_failure(cfg, s, now)
        return s
    if grant.epoch != s.epoch:
        return s  # stale: the breaker moved on since this permit was granted
    if s.state is BreakerState.CLOSED:
        return _closed_failure(cfg, s, now) if outcome is CallResult.FAILURE else s
    if s.state is BreakerState.HALF_OPEN and grant.probe:
        if outcome is CallResult.FAILURE:
            return _open(s, now)
        if outcome is CallResult.RELEASE:
            return replace(s, probe_in_flight=False)
        if s.successes + 1 >= cfg.success_threshold:
            return BreakerSnapshot(BreakerState.CLOSED, s.epoch + 1, charged=s.charged)
        return replace(s, probe_in_flight=False, successes=s.successes + 1)
    return s  # pragma: no cover - an open breaker's epoch never matches a live permit


def on_eject(s: BreakerSnapshot, now: float) -> BreakerSnapshot:
    """A failure no request's content can cause and no healthy server shows (connection refused, a reset, a
    failed health probe): open now, whatever the state; an open breaker's open period starts again."""
    return _open(s, now)


def on_probe_pass(cfg: BreakerConfig, s: BreakerSnapshot, now: float, sent_at: float) -> BreakerSnapshot:
    """A health probe sent at `sent_at` passed: a breaker open since before then half-opens at once (its next
    stream is the probe that closes it). One opened after the probe was sent stays open: the pass is older news."""
    s = advance(cfg, s, now)
    if s.state is BreakerState.OPEN and s.opened_at <= sent_at:
        return BreakerSnapshot(BreakerState.HALF_OPEN, s.epoch + 1, opened_at=s.opened_at, charged=s.charged)
    return s


def grantable(s: BreakerSnapshot) -> bool:
    """`on_allow` would grant a permit on this (advanced) snapshot: closed, or half-open with no probe out."""
    return s.state is BreakerState.CLOSED or (s.state is BreakerState.HALF_OPEN and not s.probe_in_flight)


def retry_after(cfg: BreakerConfig, s: BreakerSnapshot, now: float) -> float:
    """Seconds until a request could get a permit (0 when one would be granted now)."""
    s = advance(cfg, s, now)
    if s.state is BreakerState.OPEN:
        return max(0.0, s.opened_at + cfg.open_seconds - now)
    if s.state is BreakerState.HALF_OPEN and s.probe_in_flight:
        return min(PROBE_BUSY_RETRY_AFTER_SECONDS, s.probe_started_at + cfg.probe_timeout_seconds - now)
    return 0.0


# --- cells ----------------------------------------------------------------------------------------


class BreakerCell(Protocol):
    """Where a breaker's snapshot lives. `update` must be atomic with respect to every other user."""

    def load(self) -> BreakerSnapshot:
        """The stored snapshot."""
        ...

    def load_state(self) -> BreakerSnapshot:
        """The stored snapshot; the failure history may be left out (`advance`, `grantable` and `retry_after` do
        not read it). What every stream's admission reads, so it may be cheaper than `load`."""
        ...

    def update(self, change: Callable[[BreakerSnapshot], tuple[BreakerSnapshot, _T]]) -> _T:
        """Replace the snapshot with `change(snapshot)[0]` atomically; return `change(snapshot)[1]`.

        `change` returns the snapshot it was given when nothing changes (a success while closed: every
        stream's), and the cell may then skip the write."""
        ...


class MemoryBreakerCell:
    """The snapshot in this process."""

    def __init__(self) -> None:
        self._snapshot = BreakerSnapshot()
        self._lock = threading.Lock()

    def load(self) -> BreakerSnapshot:
        return self._snapshot

    load_state = load

    def update(self, change: Callable[[BreakerSnapshot], tuple[BreakerSnapshot, _T]]) -> _T:
        with self._lock:
            self._snapshot, result = change(self._snapshot)
            return result


# state, epoch, opened_at, probe flag, probe start, successes, n failures, n charged failures
_CELL_HEADER = struct.Struct("<QQdQdQQQ")
_CHARGED_ENTRY = struct.Struct("<dQ")  # time, client hash


class SnapshotLayout:
    """How a snapshot is laid out in shared bytes: a header, `failure_capacity` failure times and the latest
    `charged_capacity` charged failures (shared by the one-breaker cell and the keyed table, breakers.py)."""

    def __init__(self, failure_capacity: int, charged_capacity: int) -> None:
        if failure_capacity < 1 or charged_capacity < 1:
            raise ValueError("failure_capacity and charged_capacity must be at least 1")
        self.failure_capacity, self.charged_capacity = failure_capacity, charged_capacity
        self._failures = struct.Struct(f"<{failure_capacity}d")
        self.size = _CELL_HEADER.size + self._failures.size + charged_capacity * _CHARGED_ENTRY.size

    def read(self, buf: mmap.mmap, at: int) -> BreakerSnapshot:
        state, epoch, opened_at, probe, probe_at, successes, count, n_charged = _CELL_HEADER.unpack_from(buf, at)
        failures = self._failures.unpack_from(buf, at + _CELL_HEADER.size)
        charged_at = at + _CELL_HEADER.size + self._failures.size
        charged = tuple(
            _CHARGED_ENTRY.unpack_from(buf, charged_at + i * _CHARGED_ENTRY.size) for i in range(n_charged)
        )  # usually none: only failures charged to a client
        return BreakerSnapshot(
            BreakerState(state), epoch, tuple(failures[:count]), opened_at, bool(probe), probe_at, successes, charged
        )

    def read_state(self, buf: mmap.mmap, at: int) -> BreakerSnapshot:
        """The snapshot without its failure history (failure times, charged failures): all that the time-driven
        functions (`advance`, `grantable`, `retry_after`) read, at a fraction of `read`'s cost."""
        state, epoch, opened_at, probe, probe_at, successes, _, _ = _CELL_HEADER.unpack_from(buf, at)
        return BreakerSnapshot(BreakerState(state), epoch, (), opened_at, bool(probe), probe_at, successes)

    def write(self, buf: mmap.mmap, at: int, new: BreakerSnapshot) -> None:
        failures = new.failures[-self.failure_capacity :]
        charged = new.charged[-self.charged_capacity :]
        _CELL_HEADER.pack_into(
            buf,
            at,
            new.state,
            new.epoch,
            new.opened_at,
            new.probe_in_flight,
            new.probe_started_at,
            new.successes,
            len(failures),
            len(charged),
        )
        self._failures.pack_into(
            buf, at + _CELL_HEADER.size, *failures, *([0.0] * (self.failure_capacity - len(failures)))
        )
        charged_at = at + _CELL_HEADER.size + self._failures.size
        for i, entry in enumerate(charged):
            _CHARGED_ENTRY.pack_into(buf, charged_at + i * _CHARGED_ENTRY.size, *entry)


class SharedBreakerCell(SharedTable):
    """The snapshot in shared memory, for every worker forked after construction.

    Holds up to `failure_capacity` failure times (at least the breaker's `failure_threshold`) and
    the latest `charged_capacity` charged failures (`charged_capacity(config)` fits every one that
    can count within a window; if a smaller cell overflows, the oldest are forgotten, which can only
    let a client count more than its cap, never less).
    """

    KIND = b"breaker"

    def __init__(
        self,
        failure_capacity: int = DEFAULT_FAILURE_THRESHOLD,
        charged_capacity: int = (DEFAULT_FAILURE_THRESHOLD + 1) * 3,
    ) -> None:
        layout = SnapshotLayout(failure_capacity, charged_capacity)
        self._bind(SharedRegion.create(self.KIND, (failure_capacity, charged_capacity), layout.size))

    def _bind(self, region: SharedRegion) -> None:
        super()._bind(region)
        self._layout = SnapshotLayout(region.params[0], region.params[1])
        self.failure_capacity = self._layout.failure_capacity

    def load(self) -> BreakerSnapshot:
        with self._region as buf:
            return self._layout.read(buf, DATA_OFFSET)

    def load_state(self) -> BreakerSnapshot:
        with self._region as buf:
            return self._layout.read_state(buf, DATA_OFFSET)

    def update(self, change: Callable[[BreakerSnapshot], tuple[BreakerSnapshot, _T]]) -> _T:
        with self._region as buf:
            old = self._layout.read(buf, DATA_OFFSET)
            new, result = change(old)
            if new is not old:
                self._layout.write(buf, DATA_OFFSET, new)
            return result


# --- the policy -----------------------------------------------------------------------------------


class Circuit(Protocol):
    """What admission, /ready and the metrics read of the gateway's circuit: one upstream's breaker, or the
    view over a fleet's per-endpoint breakers (open only when every endpoint's is: upstream/health.py)."""

    name: str

    @property
    def state(self) -> BreakerState: ...

    def retry_after_seconds(self) -> float:
        """0 when a new stream would get a permit now; else seconds until one could."""
        ...


class Permit:
    """Leave to call the upstream once; settle it exactly once (first report wins)."""

    __slots__ = ("grant", "_breaker", "_pending")

    def __init__(self, breaker: CircuitBreaker | None, grant: Grant) -> None:
        self.grant = grant
        self._breaker = breaker  # None: a permit of no breaker, settled from the start
        self._pending = [True] if breaker is not None else []  # list.pop is atomic: one of concurrent reports wins

    @classmethod
    def uncounted(cls) -> Permit:
        """A permit settled from the start: its reports count nothing (a fleet's endpoints each have their own
        breaker, which the fleet reports to; the guard above holds this one)."""
        return cls(None, Grant(-1, probe=False))

    @property
    def probe(self) -> bool:
        """True when this permit is the half-open probe."""
        return self.grant.probe

    @property
    def settled(self) -> bool:
        return not self._pending

    def _settle(self, outcome: CallResult, client: str | None = None) -> bool:
        try:
            self._pending.pop()
        except IndexError:
            return False
        assert self._breaker is not None  # a permit of no breaker has nothing pending
        self._breaker._report(self.grant, outcome, client)
        return True

    def record_success(self) -> bool:
        """The upstream answered (first token). True if this call settled the permit."""
        return self._settle(CallResult.SUCCESS)

    def record_failure(self, client: str | None = None) -> bool:
        """The upstream failed (connect error, 5xx, no first token in time). `client`: the identity a
        failure the request's content can cause is charged to (capped per client); None counts in full."""
        return self._settle(CallResult.FAILURE, client)

    def release(self) -> bool:
        """Settle without a verdict (the client left first); frees the half-open probe slot."""
        return self._settle(CallResult.RELEASE)


class CircuitBreaker:
    """One upstream's breaker: `allow()` before calling it, then settle the permit."""

    def __init__(
        self,
        name: str,
        config: BreakerConfig | None = None,
        *,
        cell: BreakerCell | None = None,
        clock: Clock = MONOTONIC,
    ) -> None:
        self.name = name
        self.config = config or BreakerConfig()
        if isinstance(cell, SharedBreakerCell) and cell.failure_capacity < self.config.failure_threshold:
            raise ValueError("the shared cell holds fewer failure times than failure_threshold")
        self._hashes: dict[str, int] = {}  # client identity -> hash, bounded below
        self._cell: BreakerCell = cell if cell is not None else MemoryBreakerCell()
        self._clock = clock

    def allow(self) -> Permit | None:
        """A permit to call the upstream, or None: open, or half-open with the probe out."""
        cfg, now = self.config, self._clock()
        grant = self._cell.update(lambda s: on_allow(cfg, s, now))
        return None if grant is None else Permit(self, grant)

    def _client_hash(self, client: str | None) -> int:
        if client is None:
            return 0
        found = self._hashes.get(client)
        if found is None:
            if len(self._hashes) >= MAX_CHARGED_CAPACITY:
                self._hashes.clear()
            found = self._hashes[client] = client_hash(client)
        return found

    def _report(self, grant: Grant | None, outcome: CallResult, client: str | None = None) -> None:
        cfg, now, who = self.config, self._clock(), self._client_hash(client)
        self._cell.update(lambda s: (on_outcome(cfg, s, now, grant, outcome, who), None))

    def record_success(self, permit: Permit) -> bool:
        return permit.record_success()

    def record_failure(self, permit: Permit | None = None, *, client: str | None = None) -> bool:
        """Settle `permit` as failed; without a permit, count a failure seen after the permit was
        settled (an upstream stream breaking mid-way). The latter counts only while closed.
        `client`: see `Permit.record_failure`."""
        if permit is not None:
            return permit.record_failure(client)
        self._report(None, CallResult.FAILURE, client)
        return True

    def eject(self) -> None:
        """A failure no request causes (refused, reset, failed health probe): open now (`on_eject`)."""
        now = self._clock()
        self._cell.update(lambda s: (on_eject(s, now), None))

    def probe_passed(self, sent_at: float) -> None:
        """A health probe sent at `sent_at` (this breaker's clock) passed: open -> half-open (`on_probe_pass`)."""
        cfg, now = self.config, self._clock()
        self._cell.update(lambda s: (on_probe_pass(cfg, s, now, sent_at), None))

    def snapshot(self) -> BreakerSnapshot:
        return advance(self.config, self._cell.load(), self._clock())

    @property
    def state(self) -> BreakerState:
        """The current state; `int(state)` is the gauge value (0 closed, 1 open, 2 half-open)."""
        return advance(self.config, self._cell.load_state(), self._clock()).state

    def retry_after_seconds(self) -> float:
        """For `Retry-After` on a refusal: 0 when `allow()` would grant a permit now."""
        return retry_after(self.config, self._cell.load_state(), self._clock())
