"""The benchmark's fleet section, the pure parts: how uneven a spread is, a level's row from what the fakes counted,
the medians per balancer, the report's section and the options (no server, no timing)."""

from __future__ import annotations

from typing import Any

import pytest

from loadtest.bench.__main__ import parse_args
from loadtest.bench.fleet import FleetRounds, fleet_row, max_over_mean
from loadtest.bench.plan import DEFAULT_FLEET_OUTPUT, DEFAULT_OUTPUT, FLEET_BALANCERS, FLEET_ENDPOINTS, FULL, QUICK
from loadtest.bench.report import fleet_section, fleet_summary_row
from loadtest.bench.rounds import Spread, round_order


def loadgen_result(p50: float, p99: float, *, errors: int = 0) -> dict[str, Any]:
    """loadgen's result, reduced to what the fleet section reads."""
    return {
        "ttft_ms": {"p50": p50, "p99": p99},
        "tokens_in_time": 900,
        "tokens_demanded": 1000,
        "error_count": errors,
        "steady_tokens_per_s": 2000.0,
        "rest_cores": 0.1,
        "fake_cores": [0.3, 0.3, 0.1],
    }


def test_max_over_mean_is_one_when_even() -> None:
    assert max_over_mean([10, 10, 10]) == 1.0
    assert max_over_mean([20.0, 10.0, 0.0]) == pytest.approx(2.0)
    assert max_over_mean([0, 0, 0]) is None  # nothing counted: no ratio, not a perfect one
    assert max_over_mean([]) is None


def test_fleet_row_puts_the_fakes_counts_beside_the_loads() -> None:
    row = fleet_row(loadgen_result(20.0, 300.0), served=[150, 150, 50], in_flight=[40.0, 40.0, 40.0])
    assert row["served_max_mean"] == pytest.approx(150 / (350 / 3))
    assert row["in_flight_max_mean"] == pytest.approx(1.0)
    assert row["slow_share"] == pytest.approx(50 / 350)  # the slow endpoint is the last one
    assert row["delivered"] == pytest.approx(0.9)
    assert fleet_row(loadgen_result(1, 2), served=[0, 0, 0], in_flight=[0.0] * 3)["slow_share"] is None


def fleet_of(rows: dict[str, list[tuple[list[int], list[float], float]]]) -> FleetRounds:
    """(served, in flight, TTFT p99) per balancer per round."""
    fleet = FleetRounds(150, 60)
    for balancer, levels in rows.items():
        fleet.rows[balancer] = [fleet_row(loadgen_result(10.0, p99), s, f) for s, f, p99 in levels]
    fleet.orders = [round_order(list(rows), i) for i in range(len(next(iter(rows.values()))))]
    return fleet


def test_medians_and_spreads_per_balancer() -> None:
    fleet = fleet_of(
        {
            "least_in_flight": [
                ([150, 150, 50], [50.0, 50.0, 50.0], 300.0),
                ([148, 152, 50], [60.0, 40.0, 50.0], 500.0),
            ],
            "round_robin": [
                ([106, 106, 106], [25.0, 25.0, 100.0], 400.0),
                ([105, 105, 105], [25.0, 25.0, 100.0], 350.0),
            ],
        }
    )
    assert fleet.stat("least_in_flight", "ttft_p99") == Spread(400.0, 300.0, 500.0)
    in_flight = fleet.stat("least_in_flight", "in_flight_max_mean")
    assert in_flight is not None and (in_flight.low, in_flight.high) == pytest.approx((1.0, 1.2))
    rr = fleet.stat("round_robin", "in_flight_max_mean")
    assert rr is not None and rr.median == pytest.approx(2.0)
    assert fleet.served("least_in_flight", 0) == Spread(149.0, 148.0, 150.0)
    assert fleet.errors("round_robin") == 0
    assert fleet.stat("nobody", "ttft_p99") is None


def test_fleet_section_compares_the_balancers_in_the_same_rounds() -> None:
    fleet = fleet_of(
        {
            "least_in_flight": [([150, 150, 50], [50.0, 50.0, 50.0], 300.0)],
            "round_robin": [([106, 106, 106], [25.0, 25.0, 100.0], 400.0)],
        }
    )
    text = "\n".join(fleet_section(fleet))
    assert "round 1: least_in_flight round_robin" in text
    assert "150 concurrent `/v1/chat/completions` streams of 60 tokens" in text
    assert all(e.name in text for e in FLEET_ENDPOINTS)
    lif = next(line for line in text.splitlines() if line.startswith("| `least_in_flight` |"))
    assert "| 150 (150–150) / 150 (150–150) / 50 (50–50) | **1.00 (1.00–1.00)** |" in lif
    assert "| 14.3% (14.3%–14.3%) |" in lif and "| 2,000 (2,000–2,000) | 0 |" in lif
    rr = next(line for line in text.splitlines() if line.startswith("| `round_robin` |"))
    assert "**2.00 (2.00–2.00)**" in rr and "| 400.0 (400.0–400.0) |" in rr
    assert "not a recommendation" in text
    assert "1.00 (1.00–1.00) / 2.00 (2.00–2.00)" in fleet_summary_row(fleet)


def test_fleet_options() -> None:
    plan, output, *_ = parse_args([])
    assert (plan.fleet_only, plan.fleet_users, output) == (False, FULL.fleet_users, DEFAULT_OUTPUT)
    plan, output, *_ = parse_args(["--fleet", "--quick"])
    assert (plan.fleet_only, plan.fleet_users, plan.rounds) == (True, QUICK.fleet_users, 2)
    assert output == DEFAULT_FLEET_OUTPUT
    plan, *_ = parse_args(["--fleet", "--fleet-streams", "300", "--rounds", "4"])
    assert (plan.fleet_users, plan.rounds) == (300, 4)
    assert 150 <= QUICK.fleet_users <= FULL.fleet_users <= 300  # sized for a 2-core machine
    assert FLEET_BALANCERS == ("least_in_flight", "round_robin")
    assert sum(e.tokens_per_second < FLEET_ENDPOINTS[0].tokens_per_second for e in FLEET_ENDPOINTS) == 1
    with pytest.raises(SystemExit):
        parse_args(["--fleet-streams", "0"])
