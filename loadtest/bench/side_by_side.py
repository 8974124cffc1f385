"""Side-by-side rounds: every configuration at the same time, each on a fresh server of its own under a load of its
own, server CPU per delivered token read over one common window.

The interleaved rounds (rounds.py) run the configurations one after another, and on a shared machine the machine
drifts between two loads minutes apart. Here every contestant runs at once, so whatever the machine does during
the window it does to all of them. Per round: start a fresh server of every contestant (the order rotated per
round, as in rounds.py) and warm each up; start one loadgen per contestant at once (`plan.side_users` streams,
each from a source address range of its own); wait until every loadgen says its ramp ended, then
`plan.side_settle_s`; then, at the window's start and end, snapshot every server's CPU (its whole process tree,
psutil from /proc; redis-server's with the Redis store) and mark every loadgen (SIGUSR1: the tokens it has
received so far). A contestant's CPU per delivered token is its server's CPU over the window divided by the tokens
its clients received over the same window (the difference of its two marks); its ratio to the raw ASGI app is
taken within each round, then median and min-max over the rounds.

A contestant's round is void (reported with the reason, left out of every median) when its loadgen failed, a
mark is missing or came outside the steady phase (before the ramp ended or after the hold), a server process
exited or was replaced, any stream failed, or fewer than MIN_TOKENS_DELIVERED of the demanded tokens arrived in
time.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from loadtest.bench.measure import CpuSampler, LoadProcess, busy_seconds, loadgen_argv, own_cpu_seconds, warm_up
from loadtest.bench.plan import MIN_TOKENS_DELIVERED, Plan, log
from loadtest.bench.rounds import MEASURES, Contestant, Rounds, round_order
from loadtest.bench.servers import Server, running

FIRST_OCTET = 2  # contestant k's clients come from 127.(2+k).0.1 on: apart from every other phase's (127.0.x.x)
RAMP_TIMEOUT_S = 60.0  # beyond its ramp, how long a loadgen may take to say the ramp ended


def client_range(position: int) -> str:
    """The first source address of the contestant started `position`-th (up to 65,534 clients each)."""
    return f"127.{FIRST_OCTET + position}.0.1"


def side_row(
    result: dict[str, Any] | None, marks: Sequence[dict[str, Any]], *, cpu_s: float, restarted: bool, failure: str
) -> dict[str, Any]:
    """One contestant's round: the loadgen's result (None: it failed, `failure` says how), its marks, its server's
    CPU over the window; with `void`, the reason the round does not count for it (None: it counts)."""
    row: dict[str, Any] = {"window_cpu_s": cpu_s, "restarted": restarted, "window_tokens": None}
    if result is not None:
        row.update(
            ttft_ms=result["ttft_ms"],
            errors=result["errors"],
            error_count=result["error_count"],
            delivered=result["tokens_in_time"] / result["tokens_demanded"] if result["tokens_demanded"] else 0.0,
        )
    if len(marks) >= 2:
        row["window_tokens"] = marks[1]["tokens"] - marks[0]["tokens"]
        row["window_loadgen_cpu_s"] = marks[1]["cpu_s"] - marks[0]["cpu_s"]
    row["void"] = void_reason(row, marks, failure)
    row["passed"] = row["void"] is None
    return row


def void_reason(row: dict[str, Any], marks: Sequence[dict[str, Any]], failure: str) -> str | None:
    if "delivered" not in row:
        return f"load failed: {failure or 'no result'}"
    if len(marks) < 2:
        return f"{len(marks)} of 2 marks (the loadgen missed the window)"
    if not all(m["steady"] for m in marks[:2]):
        return "the window was not inside the load's steady phase"
    if row["restarted"]:
        return "a server process exited or was replaced"
    if row["error_count"]:
        return f"{row['error_count']} errors ({', '.join(f'{k}: {v}' for k, v in row['errors'].items())})"
    if row["delivered"] < MIN_TOKENS_DELIVERED:
        return f"{row['delivered']:.1%} of tokens delivered in time"
    if not row["window_tokens"]:
        return "no token in the window"
    return None


def cpu_us_per_window_token(row: dict[str, Any]) -> float | None:
    """Server CPU over the window per token the clients received in it, in µs; None for a void round."""
    return None if row["void"] else row["window_cpu_s"] / row["window_tokens"] * 1e6


def counted(measure: Callable[[dict[str, Any]], float | None]) -> Callable[[dict[str, Any]], float | None]:
    return lambda r: None if r["void"] else measure(r)


# What the report gives per configuration, each as median (min-max) over the rounds that count for it.
# The interleaved rounds' measures, but CPU per token over the window, and nothing from a void round.
SIDE_MEASURES: dict[str, Callable[[dict[str, Any]], float | None]] = {
    **{key: counted(measure) for key, measure in MEASURES.items()},
    "cpu_us": cpu_us_per_window_token,
}


@dataclass
class SideRounds(Rounds):
    """Per configuration, one row (side_row) per round, in round order; per round, the machine over the window."""

    measures: ClassVar[dict[str, Callable[[dict[str, Any]], float | None]]] = SIDE_MEASURES
    window_s: float = 0.0
    machine: list[dict[str, float]] = field(default_factory=list)  # per round: busy_cores, rest_cores

    def voided(self) -> list[tuple[int, str, str]]:
        """(round, configuration, reason) of every void round."""
        return [
            (i, key, row["void"])
            for key, rows in self.rows.items()
            for i, row in enumerate(rows, start=1)
            if row["void"] is not None
        ]


def measure_side_by_side(plan: Plan, contestants: Sequence[Contestant]) -> SideRounds:
    side = SideRounds(
        plan.side_users,
        {c.key: c.title for c in contestants},
        {c.key: [] for c in contestants},
        window_s=plan.side_window_s,
    )
    for i in range(plan.rounds):
        order = round_order(contestants, i)
        side.orders.append([c.key for c in order])
        log(
            f"side-by-side round {i + 1} of {plan.rounds}, {plan.side_users} streams each, all at once: "
            + " ".join(c.key for c in order)
        )
        rows, machine = side_round(plan, order, f"side{i + 1}")
        for key, row in rows.items():
            side.rows[key].append(row)
            cpu = cpu_us_per_window_token(row)
            log(f"  {key}: " + (f"void: {row['void']}" if cpu is None else f"{cpu:.1f} µs per delivered token"))
        side.machine.append(machine)
        log(f"  machine: {machine['busy_cores']:.2f} cores busy, {machine['rest_cores']:.2f} of them others'")
    return side


def side_round(
    plan: Plan, order: Sequence[Contestant], suffix: str
) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    """One round: every contestant's row, and the machine's busy cores (and the rest's) over the window."""
    with contextlib.ExitStack() as stack:
        servers: dict[str, Server] = {}
        for c in order:
            if c.prepare is not None:
                c.prepare()
            servers[c.key] = stack.enter_context(running(c.start(f"{c.key}_{suffix}")))
        for server in servers.values():
            warm_up(server)
        hold = plan.side_settle_s + plan.side_window_s + plan.side_margin_s
        loads: dict[str, LoadProcess] = {}
        for position, c in enumerate(order):
            argv = loadgen_argv(
                servers[c.key].port,
                users=plan.side_users,
                max_tokens=plan.max_tokens,
                rate=plan.rate,
                hold_seconds=hold,
                first_ip=client_range(position),
            )
            loads[c.key] = load = LoadProcess(argv)
            stack.callback(load.kill)  # nothing left to kill once it has ended
        ramps_end = time.monotonic() + plan.side_users / plan.rate + RAMP_TIMEOUT_S
        ramped = {key for key, load in loads.items() if load.ramp_ended.wait(max(0.0, ramps_end - time.monotonic()))}
        time.sleep(plan.side_settle_s)
        # The same order at both ends (CPU, then marks): the token window is the CPU window, shifted by the few
        # milliseconds the snapshots take.
        samplers = {c.key: CpuSampler(servers[c.key], *c.extra) for c in order}
        busy0, me0, t0 = busy_seconds(), own_cpu_seconds(), time.monotonic()
        for key in ramped:  # a loadgen that never said so may not handle SIGUSR1 yet
            loads[key].mark()
        time.sleep(plan.side_window_s)
        for sampler in samplers.values():
            sampler()
        busy, mine, window = busy_seconds() - busy0, own_cpu_seconds() - me0, time.monotonic() - t0
        for key in ramped:
            loads[key].mark()
        rows = {}
        for key, load in loads.items():
            result, failure = None, ""
            try:
                result = load.finish()
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:  # a hung one voids its row only
                failure = str(exc)[-300:]
            s = samplers[key]
            rows[key] = side_row(result, load.marks(), cpu_s=s.server_cpu_s(), restarted=s.restarted(), failure=failure)
    ours = sum(r["window_cpu_s"] + (r.get("window_loadgen_cpu_s") or 0.0) for r in rows.values()) + mine
    return rows, {"busy_cores": busy / window, "rest_cores": max(0.0, busy - ours) / window}
