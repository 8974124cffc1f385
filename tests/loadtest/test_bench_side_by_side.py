"""The benchmark's side-by-side rounds: a contestant's round from its load and its window (and when it is void),
the ratio to raw within each round, the report's section and the options; and one small real round (the raw app
and the shipped gateway at once), checked for its structure, never for a timing."""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from loadtest.bench.__main__ import parse_args
from loadtest.bench.plan import DEFAULT_OUTPUT, DEFAULT_SIDE_OUTPUT, FULL, MOCK_ENV, QUICK, ROOT
from loadtest.bench.report import side_by_side_section, side_summary_rows
from loadtest.bench.rounds import RAW, Contestant, round_order
from loadtest.bench.servers import gateway_from, raw_app
from loadtest.bench.side_by_side import SideRounds, client_range, measure_side_by_side, side_row


def loadgen_result(*, errors: int = 0, in_time: int = 1000, p50: float = 2.0, p99: float = 9.0) -> dict[str, Any]:
    """loadgen's result, reduced to what a side-by-side row reads."""
    return {
        "ttft_ms": {"p50": p50, "p99": p99},
        "errors": {"closed early": errors} if errors else {},
        "error_count": errors,
        "tokens_in_time": in_time,
        "tokens_demanded": 1000,
    }


def marks(tokens: int, *, steady: bool = True) -> list[dict[str, Any]]:
    return [
        {"event": "mark", "tokens": 5000, "errors": 0, "cpu_s": 1.0, "steady": True},
        {"event": "mark", "tokens": 5000 + tokens, "errors": 0, "cpu_s": 1.5, "steady": steady},
    ]


def ok_row(cpu_s: float, tokens: int = 100_000) -> dict[str, Any]:
    return side_row(loadgen_result(), marks(tokens), cpu_s=cpu_s, restarted=False, failure="")


def test_a_round_divides_window_cpu_by_the_tokens_received_in_the_window() -> None:
    row = ok_row(2.5, 50_000)
    assert row["void"] is None and row["passed"]
    assert (row["window_cpu_s"], row["window_tokens"], row["window_loadgen_cpu_s"]) == (2.5, 50_000, 0.5)
    assert SideRounds.measures["cpu_us"](row) == pytest.approx(50.0)  # 2.5 s / 50,000 tokens
    assert SideRounds.measures["delivered"](row) == 1.0


@pytest.mark.parametrize(
    ("result", "got", "restarted", "failure", "reason"),
    [
        (None, marks(100), False, "loadgen failed (1): boom", "load failed: loadgen failed (1): boom"),
        (loadgen_result(), marks(100)[:1], False, "", "1 of 2 marks (the loadgen missed the window)"),
        (loadgen_result(), marks(100, steady=False), False, "", "the window was not inside the load's steady phase"),
        (loadgen_result(), marks(100), True, "", "a server process exited or was replaced"),
        (loadgen_result(errors=2), marks(100), False, "", "2 errors (closed early: 2)"),
        (loadgen_result(in_time=940), marks(100), False, "", "94.0% of tokens delivered in time"),
        (loadgen_result(), marks(0), False, "", "no token in the window"),
    ],
)
def test_a_failed_load_voids_the_round_with_its_reason(
    result: dict[str, Any] | None, got: list[dict[str, Any]], restarted: bool, failure: str, reason: str
) -> None:
    row = side_row(result, got, cpu_s=1.0, restarted=restarted, failure=failure)
    assert row["void"] == reason and not row["passed"]
    assert all(measure(row) is None for measure in SideRounds.measures.values())


def side_of(rows: dict[str, list[dict[str, Any]]]) -> SideRounds:
    keys = list(rows)
    side = SideRounds(150, {k: k for k in keys}, rows, window_s=20.0)
    side.orders = [round_order(keys, i) for i in range(len(rows[keys[0]]))]
    side.machine = [{"busy_cores": 1.1, "rest_cores": 0.05}] * len(side.orders)
    return side


def test_the_ratio_to_raw_is_taken_within_each_round_and_a_void_round_left_out() -> None:
    void = side_row(loadgen_result(errors=1), marks(100_000), cpu_s=9.0, restarted=False, failure="")
    side = side_of(
        {
            RAW: [ok_row(2.0), ok_row(3.0), ok_row(2.0)],
            "on": [ok_row(3.0), ok_row(4.8), void],
        }
    )
    ratio = side.cpu_ratio("on")
    assert ratio is not None
    assert (ratio.median, ratio.low, ratio.high) == pytest.approx((1.55, 1.5, 1.6))  # rounds 1 and 2 only
    cpu = side.stat("on", "cpu_us")
    assert cpu is not None and (cpu.low, cpu.high) == pytest.approx((30.0, 48.0))
    assert side.passed("on") == (2, 3)
    assert side.voided() == [(3, "on", "1 errors (closed early: 1)")]


def test_section_gives_each_configuration_its_ratio_and_lists_the_void_rounds() -> None:
    void = side_row(None, [], cpu_s=0.0, restarted=False, failure="loadgen failed (1)")
    side = side_of({RAW: [ok_row(2.0), ok_row(3.0)], "on": [ok_row(3.0), void]})
    text = "\n".join(side_by_side_section(side))
    header = next(line for line in text.splitlines() if line.startswith("| Configuration"))
    assert header.split("|")[2].strip() == "**CPU per token / raw ASGI**"
    on = next(line for line in text.splitlines() if line.startswith("| on |"))
    assert "| **1.50 (1.50–1.50)** | 30.0 (30.0–30.0) |" in on
    assert "| 1 of 2 |" in on
    assert "round 1: raw on; round 2: on raw" in text
    assert "round 2, `on`: load failed: loadgen failed (1)" in text
    assert "150 streams each" in text
    summary = "\n".join(side_summary_rows(side))
    assert "**1.50 (1.50–1.50)**" in summary
    assert "median of the 1 of 2 rounds that count for both" in summary


def test_options_add_the_side_by_side_rounds_or_run_them_alone() -> None:
    plan, output, *_ = parse_args([])
    assert (plan.side_users, plan.side_window_s, plan.side_only, output) == (100, 20.0, False, DEFAULT_OUTPUT)
    plan, output, *_ = parse_args(["--side-by-side", "--quick", "--side-by-side-streams", "80"])
    assert (plan.side_users, plan.side_window_s, plan.side_only) == (80, QUICK.side_window_s, True)
    assert output == DEFAULT_SIDE_OUTPUT
    assert QUICK.side_window_s <= FULL.side_window_s
    for bad in (["--side-by-side-streams", "0"], ["--side-by-side", "--fleet"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_every_contestant_gets_a_source_range_of_its_own() -> None:
    assert [client_range(k) for k in range(3)] == ["127.2.0.1", "127.3.0.1", "127.4.0.1"]


def test_one_real_round_measures_the_raw_app_and_the_gateway_at_once(tmp_path: Path) -> None:
    logs, work = tmp_path / "logs", tmp_path / "work"
    logs.mkdir()
    work.mkdir()
    contestants = [
        Contestant(RAW, "raw ASGI app", partial(raw_app, logs)),
        Contestant("on", "as shipped", partial(gateway_from, ROOT, logs, work, env=MOCK_ENV)),
    ]
    plan = replace(
        QUICK, rounds=1, side_users=20, max_tokens=20, side_window_s=2.0, side_settle_s=0.5, side_margin_s=3.0
    )
    side = measure_side_by_side(plan, contestants)
    assert side.orders == [[RAW, "on"]]
    # the structure, never the timing: on a busy machine a load may miss the in-time share (its round is then void)
    assert all("delivered in time" in reason for _, _, reason in side.voided()), side.voided()
    for key in (RAW, "on"):
        (row,) = side.rows[key]
        assert row["window_cpu_s"] > 0 and row["window_tokens"] > 0 and row["error_count"] == 0
        assert (side.stat(key, "cpu_us") is None) == (row["void"] is not None)
    assert (side.cpu_ratio("on") is None) == bool(side.voided())
    assert len(side.machine) == 1 and side.machine[0]["busy_cores"] > 0
