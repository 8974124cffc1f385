"""The fleet section: how a gateway spreads streams over several model servers when one of them is slow.

Three fake model servers (loadtest/fake_openai.py; FLEET_ENDPOINTS: two at the benchmark's pace, one at a quarter
of it with a late first token) behind one gateway (UPSTREAM_URL lists all three), `plan.fleet_users` concurrent
`/v1/chat/completions` streams. Each balancer (UPSTREAM_BALANCE: least_in_flight, the default, against
round_robin, the naive router's baseline) runs once per round on a fresh gateway, the order rotated per round as
in the other rounds (rounds.py), the fakes' counts reset before each. Per level: the streams each fake served
(its /_stats `requests`), the streams each had in flight (its `active`, sampled every SAMPLE_INTERVAL_S), the
share the slow one got, and the clients' TTFT.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.bench.measure import CpuSampler, loadgen_argv, run_load, warm_up
from loadtest.bench.plan import FLEET_BALANCERS, FLEET_ENDPOINTS, Plan, log
from loadtest.bench.rounds import Spread, round_order, spread
from loadtest.bench.servers import Server, fake_openai, gateway, http_status, running

CHAT_PATH = "/v1/chat/completions"


def max_over_mean(values: Sequence[float]) -> float | None:
    """How uneven a spread is: the largest share over the mean one (1.0: even); None when nothing was counted."""
    if not values or not sum(values):
        return None
    return max(values) / statistics.fmean(values)


def fake_stats(server: Server) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("GET", "/_stats")
        stats: dict[str, Any] = json.loads(conn.getresponse().read())
        return stats
    finally:
        conn.close()


def fleet_row(result: dict[str, Any], served: Sequence[int], in_flight: Sequence[float]) -> dict[str, Any]:
    """One level's result (loadgen's) with what the fakes counted, in FLEET_ENDPOINTS' order (the slow one last)."""
    total = sum(served)
    return {
        **result,
        "served": list(served),
        "in_flight": list(in_flight),
        "served_max_mean": max_over_mean(served),
        "in_flight_max_mean": max_over_mean(in_flight),
        "slow_share": served[-1] / total if total else None,
        "delivered": result["tokens_in_time"] / result["tokens_demanded"] if result["tokens_demanded"] else 0.0,
    }


# What the report gives per balancer, each as median (min-max) over the rounds.
FLEET_MEASURES: dict[str, Callable[[dict[str, Any]], float | None]] = {
    "served_max_mean": lambda r: r["served_max_mean"],
    "in_flight_max_mean": lambda r: r["in_flight_max_mean"],
    "slow_share": lambda r: r["slow_share"],
    "ttft_p50": lambda r: r["ttft_ms"]["p50"],
    "ttft_p99": lambda r: r["ttft_ms"]["p99"],
    "delivered": lambda r: r["delivered"],
    "tokens_per_s": lambda r: r.get("steady_tokens_per_s"),
    "rest_cores": lambda r: r.get("rest_cores"),
}


@dataclass
class FleetRounds:
    """Per balancer, one row per round (fleet_row), in round order."""

    users: int
    max_tokens: int
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    orders: list[list[str]] = field(default_factory=list)

    def stat(self, balancer: str, measure: str) -> Spread | None:
        return spread([FLEET_MEASURES[measure](r) for r in self.rows.get(balancer, [])])

    def served(self, balancer: str, endpoint: int) -> Spread | None:
        return spread([r["served"][endpoint] for r in self.rows.get(balancer, [])])

    def fake_cores(self, balancer: str, endpoint: int) -> Spread | None:
        return spread([r["fake_cores"][endpoint] for r in self.rows.get(balancer, []) if "fake_cores" in r])

    def errors(self, balancer: str) -> int:
        return sum(r["error_count"] for r in self.rows.get(balancer, []))


def measure_fleet_level(gw: Server, fakes: Sequence[Server], plan: Plan) -> dict[str, Any]:
    samples: list[list[int]] = []
    cpu = CpuSampler(gw, *fakes)
    # in flight is sampled while every user is active: after the ramp, before the last streams run out (in the
    # tail only the slow endpoint's would be left)
    hold_from = time.monotonic() + plan.fleet_users / plan.rate + 1.0
    hold_until = hold_from + plan.fleet_hold_seconds - 1.0

    def sample() -> None:  # the streams each fake is generating now, and everyone's CPU
        cpu()
        if hold_from <= time.monotonic() <= hold_until:
            with contextlib.suppress(OSError, ValueError):
                samples.append([int(fake_stats(fake)["active"]) for fake in fakes])

    argv = loadgen_argv(
        gw.port,
        users=plan.fleet_users,
        max_tokens=plan.fleet_max_tokens,
        rate=plan.rate,
        hold_seconds=plan.fleet_hold_seconds,
        path=CHAT_PATH,
        first_ip="127.0.240.1",
    )
    result = run_load(argv, sample=sample)
    cpu.finish(result)
    elapsed = max(cpu.t - cpu.t0, 1e-9)
    # each fake is one process: on these shared cores a busy fake is slow for reasons of its own
    pids = [fake.master.pid for fake in fakes]
    result["fake_cores"] = [(cpu.last.get(pid, 0.0) - cpu.first.get(pid, 0.0)) / elapsed for pid in pids]
    served = [int(fake_stats(fake)["requests"]) for fake in fakes]
    in_flight = [statistics.fmean(column) for column in zip(*samples, strict=True)] if samples else [0.0] * len(fakes)
    return fleet_row(result, served, in_flight)


def measure_fleet(plan: Plan, log_dir: Path, work_dir: Path) -> FleetRounds:
    fleet = FleetRounds(plan.fleet_users, plan.fleet_max_tokens, {b: [] for b in FLEET_BALANCERS})
    with contextlib.ExitStack() as stack:
        fakes = [
            stack.enter_context(
                running(
                    fake_openai(
                        log_dir,
                        f"fleet_{e.name.replace(' ', '_').lower()}",
                        tokens_per_second=e.tokens_per_second,
                        first_token_ms=e.first_token_ms,
                    )
                )
            )
            for e in FLEET_ENDPOINTS
        ]
        urls = ",".join(f"http://127.0.0.1:{fake.port}/v1" for fake in fakes)
        for i in range(plan.rounds):
            order = round_order(FLEET_BALANCERS, i)
            fleet.orders.append(list(order))
            log(f"fleet round {i + 1} of {plan.rounds} at {plan.fleet_users} streams: {' '.join(order)}")
            for balance in order:
                name = f"fleet_{balance}_round{i + 1}"
                with running(gateway(log_dir, work_dir, name, UPSTREAM_URL=urls, UPSTREAM_BALANCE=balance)) as gw:
                    warm_up(gw, CHAT_PATH)
                    for fake in fakes:
                        http_status(fake.port, "/_reset")
                    row = measure_fleet_level(gw, fakes, plan)
                row["round"] = i + 1
                fleet.rows[balance].append(row)
                log(
                    f"  {balance}: served {' / '.join(map(str, row['served']))}, TTFT p99 "
                    f"{row['ttft_ms']['p99']} ms, slow share {row['slow_share']}, errors {row['error_count']}"
                )
    return fleet
