"""Interleaved rounds: every configuration measured at one concurrency, round after round (round 1: A B C ...,
round 2 rotated by one: B C ... A, ...), so that all of them see the same machine; and what the rounds give per
configuration: the median and the spread (min-max) of each measure, and the ratio to the raw ASGI app round by
round (two loads minutes apart on a shared machine differ by far more than the configurations do)."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from loadtest.bench.measure import cpu_per_1k, measure_quietly, warm_up
from loadtest.bench.plan import Plan, log
from loadtest.bench.servers import Server, running

RAW = "raw"  # the reference every ratio is taken against: the bare ASGI app
BASELINE = "baseline"  # --baseline-src: the shipped configuration from another checkout

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Contestant:
    """One configuration of the rounds: how to start a fresh server of it for each round."""

    key: str
    title: str
    start: Callable[[str], Server]  # a new server, given the name its logs go under
    extra: tuple[Server, ...] = ()  # processes whose CPU counts with the server's (redis-server)
    prepare: Callable[[], object] | None = None  # before each start (e.g. empty the Redis store)


@dataclass(frozen=True, slots=True)
class Spread:
    median: float
    low: float
    high: float

    def text(self, fmt: str) -> str:
        return f"{self.median:{fmt}} ({self.low:{fmt}}–{self.high:{fmt}})"


def spread(values: Sequence[float | None]) -> Spread | None:
    """Median and min-max of the measured values (None: not measured in that round); None if there are none."""
    measured = [v for v in values if v is not None]
    if not measured:
        return None
    return Spread(statistics.median(measured), min(measured), max(measured))


def per_round_ratios(values: Sequence[float | None], reference: Sequence[float | None]) -> list[float]:
    """values[i] / reference[i] for every round where both were measured (and the reference is not zero)."""
    return [v / r for v, r in zip(values, reference, strict=True) if v is not None and r]


def round_order(items: Sequence[T], round_index: int) -> list[T]:
    """The order of round `round_index` (0-based): the first round's order rotated by one place per round, so
    that no configuration always runs first (after a pause) or right after the same neighbour."""
    if not items:
        return []
    k = round_index % len(items)
    return [*items[k:], *items[:k]]


def cpu_us_per_token(row: dict[str, Any]) -> float | None:
    """Server CPU (the whole process tree, from /proc) per delivered token, in µs."""
    per_1k = cpu_per_1k(row)
    return None if per_1k is None else per_1k * 1000


# What the report gives per configuration, each as median (min-max) over the rounds.
MEASURES: dict[str, Callable[[dict[str, Any]], float | None]] = {
    "cpu_us": cpu_us_per_token,
    "ttft_p50": lambda r: r["ttft_ms"]["p50"],
    "ttft_p99": lambda r: r["ttft_ms"]["p99"],
    "delivered": lambda r: r["delivered"],
}


@dataclass
class Rounds:
    """The rows of the interleaved rounds: per configuration, one measured level per round, in round order."""

    measures: ClassVar[dict[str, Callable[[dict[str, Any]], float | None]]] = MEASURES  # what a row gives
    users: int
    titles: dict[str, str]  # configuration key -> title, in the first round's order
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    orders: list[list[str]] = field(default_factory=list)  # the keys in the order each round ran them

    def values(self, key: str, measure: str) -> list[float | None]:
        return [self.measures[measure](r) for r in self.rows.get(key, [])]

    def stat(self, key: str, measure: str) -> Spread | None:
        return spread(self.values(key, measure))

    def cpu_ratio(self, key: str, reference: str = RAW) -> Spread | None:
        """CPU per delivered token over the reference's, taken within each round, then median and min-max."""
        if key not in self.rows or reference not in self.rows:
            return None
        return spread(per_round_ratios(self.values(key, "cpu_us"), self.values(reference, "cpu_us")))

    def passed(self, key: str) -> tuple[int, int]:
        rows = self.rows.get(key, [])
        return sum(1 for r in rows if r["passed"]), len(rows)

    def retried(self) -> int:
        return sum(r.get("attempts", 1) - 1 for rows in self.rows.values() for r in rows)


def measure_rounds(plan: Plan, contestants: Sequence[Contestant], users: int) -> Rounds:
    """`plan.rounds` rounds; in each, every contestant on a fresh server, warmed up, then one level of `users`."""
    rounds = Rounds(users, {c.key: c.title for c in contestants}, {c.key: [] for c in contestants})
    for i in range(plan.rounds):
        order = round_order(contestants, i)
        rounds.orders.append([c.key for c in order])
        log(f"round {i + 1} of {plan.rounds} at {users} streams: {' '.join(c.key for c in order)}")
        for c in order:
            if c.prepare is not None:
                c.prepare()
            with running(c.start(f"{c.key}_round{i + 1}")) as server:
                warm_up(server)
                row = measure_quietly(server, plan, users, c.extra)
            row["round"] = i + 1
            rounds.rows[c.key].append(row)
    return rounds
