"""The benchmark's interleaved rounds, the pure parts: the order of each round, median and spread, the ratio to the
reference taken within each round, and the report's section built from them (no server, no timing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from loadtest.bench.__main__ import parse_args
from loadtest.bench.measure import Capacity
from loadtest.bench.plan import FULL, QUICK
from loadtest.bench.report import baseline_section, rounds_section
from loadtest.bench.rounds import (
    BASELINE,
    RAW,
    Rounds,
    Spread,
    cpu_us_per_token,
    per_round_ratios,
    round_order,
    spread,
)


def row(
    cpu_s: float, tokens: int, *, p50: float = 1.0, p99: float = 10.0, passed: bool = True, users: int = 1000
) -> dict[str, Any]:
    """A measured level as measure_level returns it, reduced to what the rounds read."""
    return {
        "users": users,
        "server_cpu_s": cpu_s,
        "tokens_total": tokens,
        "ttft_ms": {"p50": p50, "p99": p99},
        "delivered": 1.0 if passed else 0.5,
        "passed": passed,
        "attempts": 1,
    }


def test_round_order_rotates_one_place_per_round() -> None:
    keys = ["raw", "on", "off"]
    assert [round_order(keys, i) for i in range(4)] == [
        ["raw", "on", "off"],
        ["on", "off", "raw"],
        ["off", "raw", "on"],
        ["raw", "on", "off"],
    ]
    assert round_order([], 3) == []


def test_every_configuration_takes_every_place_once_in_as_many_rounds() -> None:
    keys = ["a", "b", "c", "d"]
    places = {k: {round_order(keys, i).index(k) for i in range(len(keys))} for k in keys}
    assert places == {k: {0, 1, 2, 3} for k in keys}


def test_spread_is_median_and_min_max_of_what_was_measured() -> None:
    assert spread([3.0, 1.0, 2.0]) == Spread(2.0, 1.0, 3.0)
    assert spread([4.0, None, 1.0, 2.0, 3.0]) == Spread(2.5, 1.0, 4.0)  # an even count: the mean of the middle two
    assert spread([None, None]) is None
    assert spread([]) is None
    assert Spread(1.25, 1.0, 1.5).text(".2f") == "1.25 (1.00–1.50)"
    assert Spread(0.5, 0.25, 1.0).text(".0%") == "50% (25%–100%)"


def test_ratios_are_taken_within_each_round() -> None:
    # Round 2 ran on a slower machine for both: the within-round ratio does not see it.
    assert per_round_ratios([60.0, 90.0, 66.0], [50.0, 75.0, 55.0]) == pytest.approx([1.2, 1.2, 1.2])
    # A round where either was not measured, or the reference measured zero, is left out.
    assert per_round_ratios([60.0, None, 66.0, 10.0], [50.0, 75.0, None, 0.0]) == pytest.approx([1.2])
    with pytest.raises(ValueError):
        per_round_ratios([1.0], [1.0, 2.0])  # misaligned rounds are a bug, not a shorter list


def test_cpu_per_delivered_token_in_microseconds() -> None:
    assert cpu_us_per_token(row(2.0, 40_000)) == pytest.approx(50.0)
    assert cpu_us_per_token(row(2.0, 0)) is None


def rounds_of(cpu: dict[str, list[float]], users: int = 1000) -> Rounds:
    keys = list(cpu)
    rounds = Rounds(users, {k: k for k in keys}, {k: [row(c, 100_000) for c in v] for k, v in cpu.items()})
    rounds.orders = [round_order(keys, i) for i in range(len(cpu[keys[0]]))]
    return rounds


def test_rounds_give_median_spread_and_the_ratio_to_raw() -> None:
    # CPU seconds per 100k tokens: µs per token = seconds * 10.
    rounds = rounds_of({RAW: [4.0, 6.0, 4.0], "on": [5.0, 7.2, 4.4], "off": [4.4, 6.6, 4.8]})
    stat = rounds.stat("on", "cpu_us")
    assert isinstance(stat, Spread)
    assert (stat.median, stat.low, stat.high) == pytest.approx((50.0, 44.0, 72.0))
    ratio = rounds.cpu_ratio("on")
    assert ratio is not None
    assert (ratio.median, ratio.low, ratio.high) == pytest.approx((1.2, 1.1, 1.25))
    to_off = rounds.cpu_ratio("on", "off")
    assert to_off is not None and to_off.median == pytest.approx(7.2 / 6.6)  # of 5/4.4, 7.2/6.6, 4.4/4.8
    assert rounds.cpu_ratio("redis") is None  # not measured (no redis-server)
    assert rounds.passed("on") == (3, 3)


def test_rounds_section_puts_the_ratio_to_raw_first() -> None:
    rounds = rounds_of({RAW: [4.0, 6.0], "on": [5.0, 7.5]})
    text = "\n".join(rounds_section(rounds, {"on": Capacity([row(5.0, 100_000)])}))
    header = next(line for line in text.splitlines() if line.startswith("| Configuration"))
    assert header.split("|")[2].strip() == "**CPU per token / raw ASGI**"
    on = next(line for line in text.splitlines() if line.startswith("| on |"))
    assert "| **1.25 (1.25–1.25)** | 62.5 (50.0–75.0) |" in on
    assert "round 1: raw on; round 2: on raw" in text


def test_baseline_section_compares_the_two_checkouts_round_by_round() -> None:
    rounds = rounds_of({RAW: [4.0, 6.0], "on": [4.5, 6.0], BASELINE: [5.0, 6.0]})
    caps = {"on": Capacity([row(4.5, 100_000)]), BASELINE: Capacity([row(5.0, 100_000)])}
    text = "\n".join(baseline_section(Path("/tmp/base"), rounds, caps))
    assert "| 1 | 50 | 45 | 0.900 |" in text
    assert "| 2 | 60 | 60 | 1.000 |" in text
    assert "0.950 (0.900–1.000)" in text


def test_options_set_the_rounds_and_their_level() -> None:
    plan, *_ = parse_args([])
    assert (plan.rounds, plan.round_users, plan.search_comparisons) == (FULL.rounds, 1000, True)
    assert FULL.rounds >= 3
    plan, *_ = parse_args(["--quick"])
    assert (plan.rounds, plan.round_users, plan.search_comparisons) == (QUICK.rounds, 1000, False)
    plan, *_ = parse_args(["--quick", "--levels", "200", "--rounds", "2"])
    assert (plan.levels, plan.rounds, plan.round_users) == ((200,), 2, None)  # the rounds run where the search ended
    plan, *_ = parse_args(["--levels", "200,450", "--at", "300"])
    assert plan.round_users == 300
    with pytest.raises(SystemExit):
        parse_args(["--rounds", "0"])
