"""Benchmark: legitimate streams beside hostile sockets, and RSS against the memory budget.

Run: `python -m loadtest.hostile_bench [--quick] [--sockets 1000] [--output loadtest/results/hostile.md]`.

1. One gateway as shipped (the benchmark's generous limits, `loadtest.bench.plan.GENEROUS_ENV`; built-in mock at
   20 tok/s). At each level of concurrent legitimate `/stream` clients (`loadtest.loadgen`), three conditions
   run one after another in the same run: no hostile sockets; N idle sockets (connected, nothing sent);
   N half-open sockets (half a request head sent, never finished). `loadtest.hostile` holds them from
   other loopback addresses and reopens every socket the server closes, as an attacker would. A level
   passes as in `loadtest.bench` (TTFT p99 within budget, no errors, >= 95 % of tokens in time); a
   condition's capacity is its highest passing level below its first failing one. The ladder stops after
   a level every condition failed.
2. RSS against MEMORY_BUDGET_BYTES: a gateway with a small budget and an unpaced mock; clients that read
   the response head and then nothing are opened one after another until admission has refused
   `REFUSALS_TO_STOP` of them with 503 memory_pressure. RSS (master + workers), the gateway's
   `streaming_buffered_bytes` and the budget are reported before, at the budget, and after every
   client left.

Not a test: nothing here asserts a timing; the report is for reading.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from loadtest.bench.measure import (
    Capacity,
    background_cores,
    measure_level,
    ms,
    result_text,
    sample_rss,
    summary_line,
    warm_up,
)
from loadtest.bench.plan import (
    FULL as BENCH_FULL,
)
from loadtest.bench.plan import (
    MIN_TOKENS_DELIVERED,
    MOCK_ENV,
    PACE_TOKENS_PER_SECOND,
    ROOT,
    TTFT_P99_BUDGET_MS,
    Plan,
    log,
)
from loadtest.bench.report import machine, source_revision
from loadtest.bench.servers import Server, gateway, running

DEFAULT_OUTPUT = Path("loadtest/results/hostile.md")
CONDITIONS = ("none", "idle", "partial")
TITLES = {
    "none": "no hostile sockets",
    "idle": "idle sockets (nothing sent)",
    "partial": "half-open sockets (half a request head)",
}
REFUSALS_TO_STOP = 20
SLOW_READER_TIMEOUT_S = 10.0
ACCEPT_SETTLE_S = 20.0


@dataclass(frozen=True, slots=True)
class HostilePlan:
    levels: tuple[int, ...]
    sockets: int
    budget_bytes: int  # the memory-budget phase's MEMORY_BUDGET_BYTES
    max_slow_readers: int
    level: Plan


FULL = HostilePlan(
    levels=(250, 500, 750, 1000, 1500, 2000),
    sockets=1000,
    budget_bytes=32 * 2**20,
    max_slow_readers=1500,
    level=replace(BENCH_FULL, hold_seconds=20.0),
)
QUICK = HostilePlan(
    levels=(100, 250, 500),
    sockets=1000,
    budget_bytes=8 * 2**20,
    max_slow_readers=600,
    level=replace(BENCH_FULL, hold_seconds=10.0),
)


def server_fds(server: Server) -> int:
    total = 0
    for p in server.processes():
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.num_fds()
    return total


@contextlib.contextmanager
def hostile_sockets(gw: Server, mode: str, sockets: int, out: dict[str, Any]) -> Iterator[None]:
    """`loadtest.hostile` holding `sockets` sockets in `mode` for the duration; its report lands in `out`.

    The level starts once the gateway holds them (its descriptors grew by 95 % of them, or after
    ACCEPT_SETTLE_S): connected is not yet accepted, and the accept burst is not what is measured."""
    if mode == "none":
        yield
        return
    before = server_fds(gw)
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadtest.hostile", "--port", str(gw.port), "--sockets", str(sockets), "--mode", mode],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    try:
        opened = json.loads(proc.stdout.readline() or "{}")
        out["opened"] = opened.get("open", 0)
        deadline = time.monotonic() + ACCEPT_SETTLE_S
        while server_fds(gw) - before < 0.95 * out["opened"] and time.monotonic() < deadline:
            time.sleep(0.1)
        out["server_fds_added"] = server_fds(gw) - before
        log(f"  {out['opened']} {mode} sockets open, the gateway holds {out['server_fds_added']} more descriptors")
        time.sleep(1.0)
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
        results = [json.loads(line) for line in rest.splitlines() if line.startswith("{")]
        out.update(results[-1] if results else {"error": f"hostile exited with {proc.returncode}"})


def run_levels(gw: Server, plan: HostilePlan) -> dict[str, Capacity]:
    caps = {condition: Capacity() for condition in CONDITIONS}
    for users in plan.levels:
        failed: set[str] = set()
        for condition in CONDITIONS:  # every condition at every level: TTFTs side by side
            log(f"{users} legitimate streams, {TITLES[condition]}")
            hostile: dict[str, Any] = {}
            time.sleep(1.0)  # the last level's connections close
            with hostile_sockets(gw, condition, plan.sockets, hostile):
                row = measure_level(gw, plan.level, users)
            row["hostile"] = hostile
            row["attempts"] = 1
            log(f"  -> {summary_line(row)}")
            caps[condition].rows.append(row)
            if not row["passed"]:
                failed.add(condition)
        if failed == set(CONDITIONS):
            break
    return caps


def metric(port: int, name: str, labels: str = "") -> float:
    """The sum of a metric's series (whose labels contain `labels`) on the gateway's /metrics (its METRICS_PORT)."""
    total = 0.0
    for found, value in re.findall(rf"^{name}(?:\{{([^}}]*)\}})? (\S+)$", metrics_text(port), re.M):
        if labels in found:
            total += float(value)
    return total


def metrics_text(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def open_slow_reader(port: int, index: int) -> tuple[socket.socket | None, int]:
    """A /stream client that reads the response head, then nothing: (its socket if admitted, the status)."""
    body = json.dumps({"prompt": f"slow reader {index}", "max_tokens": 10_000_000}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(SLOW_READER_TIMEOUT_S)
    sock.bind((f"127.0.{5 + index // 200}.{1 + index % 200}", 0))
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        b"POST /stream HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    status = int(head[9:12] or 0)
    if status != 200:
        sock.close()
        return None, status
    return sock, status


def measure_budget(log_dir: Path, work_dir: Path, plan: HostilePlan) -> dict[str, Any]:
    env = {
        **MOCK_ENV,
        "MOCK_TOKENS_PER_SECOND": "0",
        "MAX_TOKENS_LIMIT": "10000000",
        "MEMORY_BUDGET_BYTES": str(plan.budget_bytes),
        "SLOW_CLIENT_TIMEOUT_SECONDS": "120",
        "TOTAL_TIMEOUT_SECONDS": "240",
        "MAX_STREAM_AGE_SECONDS": "300",
    }
    out: dict[str, Any] = {"budget": plan.budget_bytes}
    readers: list[socket.socket] = []
    with running(gateway(log_dir, work_dir, "gateway_budget", **env), kill=True) as gw:
        warm_up(gw)
        time.sleep(1.0)
        out["rss_before"] = sample_rss(gw)
        refused, peak_rss, peak_buffered = 0, out["rss_before"], 0.0
        log(f"memory budget {plan.budget_bytes / 2**20:.0f} MiB: opening clients that stop reading")
        try:
            for index in range(plan.max_slow_readers):
                sock, status = open_slow_reader(gw.port, index)
                if sock is None:
                    refused += status == 503
                    out.setdefault("statuses", {}).setdefault(str(status), 0)
                    out["statuses"][str(status)] += 1
                    if refused >= REFUSALS_TO_STOP:
                        break
                    time.sleep(0.05)  # let the streams fill and the watchdog count them
                    continue
                readers.append(sock)
                if index % 10 == 0:
                    peak_rss = max(peak_rss, gw.rss_bytes())
                    peak_buffered = max(peak_buffered, metric(gw.metrics_port, "streaming_buffered_bytes"))
            time.sleep(2.0)  # a few watchdog passes at the budget
            out["rss_at_budget"] = sample_rss(gw)
            out["buffered_at_budget"] = metric(gw.metrics_port, "streaming_buffered_bytes")
            out["peak_rss"] = max(peak_rss, out["rss_at_budget"])
            out["peak_buffered"] = max(peak_buffered, out["buffered_at_budget"])
            out["admitted"], out["refused"] = len(readers), refused
            out["cut_memory_pressure"] = metric(
                gw.metrics_port, "streaming_errors_total", 'error_type="memory_pressure"'
            )
            out["active_at_budget"] = metric(gw.metrics_port, "streaming_active_connections")
        finally:
            for sock in readers:
                sock.close()
        deadline = time.monotonic() + 30
        while metric(gw.metrics_port, "streaming_active_connections") > 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        out["rss_after"] = sample_rss(gw)
        out["buffered_after"] = metric(gw.metrics_port, "streaming_buffered_bytes")
    return out


def level_table(caps: dict[str, Capacity]) -> list[str]:
    out = [
        "| Streams | Hostile sockets | Held open (fewest) | Closed by server | TTFT p50 ms | TTFT p99 ms "
        "| Tokens in time | Errors | Worker CPU avg/peak | Rest of machine (cores) | Result |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    rows = sorted(((r["users"], CONDITIONS.index(c), c, r) for c, cap in caps.items() for r in cap.rows))
    for users, _, condition, r in rows:
        h = r["hostile"]
        held = (
            "—"
            if condition == "none"
            else (f"{h.get('opened', 0)} ({h.get('min_open', 'n/a')}; gateway fds +{h.get('server_fds_added', '?')})")
        )
        closed = (
            "—"
            if condition == "none"
            else (
                f"{h.get('closed_by_server', 0)}"
                + (f" ({', '.join(f'{k}: {v}' for k, v in h['answers'].items())})" if h.get("answers") else "")
            )
        )
        errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"
        out.append(
            f"| {users} | {TITLES[condition]} | {held} | {closed} | {ms(r['ttft_ms']['p50'])} "
            f"| {ms(r['ttft_ms']['p99'])} | {r['delivered']:.1%} | {errors} "
            f"| {' + '.join(f'{a:.2f}/{p:.2f}' for a, p in r['worker_load'])} | {r['rest_cores']:.2f} "
            f"| {result_text(r)} |"
        )
    return out


def render(
    *,
    plan: HostilePlan,
    command: str,
    started: datetime,
    elapsed_s: float,
    caps: dict[str, Capacity],
    budget: dict[str, Any],
    background: float,
) -> str:
    mib = 2**20
    lines = [
        "# Hostile sockets and the memory budget",
        "",
        f"`{command}` on {started:%Y-%m-%d %H:%M} UTC, {elapsed_s / 60:.1f} min, source `{source_revision()}`.",
        f"Machine: {machine()}; background load before the start {background:.2f} cores (other jobs on a "
        "shared machine make every number worse; 'Rest of machine' shows them per level).",
        "",
        f"## 1. Legitimate streams beside {plan.sockets:,} hostile sockets",
        "",
        f"One gateway as shipped (2 workers, mock at {PACE_TOKENS_PER_SECOND:g} tok/s, streams of "
        f"{plan.level.max_tokens} tokens, hold {plan.level.hold_seconds:g} s per level), the three conditions one "
        f"after another at every level. A level passes with TTFT p99 <= {TTFT_P99_BUDGET_MS:g} ms, no errors "
        f"and >= {MIN_TOKENS_DELIVERED:.0%} of tokens in time. 'Held open' is how many hostile sockets were "
        "open when the level started, and the fewest at any time during it; 'closed by server' counts the hostile "
        "sockets the gateway closed (each is reopened at once) and what it answered first; 'gateway fds' is how many "
        "descriptors the gateway's processes gained once it had accepted them (each level starts after that).",
        "",
        "| Condition | Capacity (streams) | TTFT p50 / p99 ms at the lowest level |",
        "|---|---:|---:|",
    ]
    for condition in CONDITIONS:
        cap = caps[condition]
        first = min(cap.rows, key=lambda r: r["users"]) if cap.rows else None
        ttft = f"{ms(first['ttft_ms']['p50'])} / {ms(first['ttft_ms']['p99'])}" if first else "n/a"
        lines.append(f"| {TITLES[condition]} | {cap.bracket} | {ttft} |")
    lines += ["", *level_table(caps), ""]
    b = budget
    lines += [
        f"## 2. RSS against the memory budget (MEMORY_BUDGET_BYTES = {b['budget'] / mib:.0f} MiB)",
        "",
        "A gateway with an unpaced mock; `/stream` clients that read the response head and then nothing, opened one "
        f"after another until admission refused {REFUSALS_TO_STOP} with 503 `memory_pressure` (or "
        f"{plan.max_slow_readers} were tried). RSS is master + workers.",
        "",
        "| | RSS MiB | `streaming_buffered_bytes` MiB |",
        "|---|---:|---:|",
        f"| before | {b['rss_before'] / mib:.1f} | 0 |",
        f"| at the budget (2 s after the last client) | {b['rss_at_budget'] / mib:.1f} "
        f"| {b['buffered_at_budget'] / mib:.1f} |",
        f"| peak while opening | {b['peak_rss'] / mib:.1f} | {b['peak_buffered'] / mib:.1f} |",
        f"| after every client left | {b['rss_after'] / mib:.1f} | {b['buffered_after'] / mib:.1f} |",
        "",
        f"Clients admitted {b['admitted']}, refused {b['refused']} with 503 (statuses of refusals: "
        f"{b.get('statuses', {})}), streams cut with memory_pressure {b['cut_memory_pressure']:.0f}, streams open "
        f"at the budget {b['active_at_budget']:.0f}. RSS growth at the budget: "
        f"**{(b['rss_at_budget'] - b['rss_before']) / mib:.1f} MiB for a {b['budget'] / mib:.0f} MiB budget** "
        "(the growth also holds each open stream's own objects, which the budget does not count; the kernel's "
        "socket buffers are not in RSS).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="levels 100, 250, 500; an 8 MiB budget (about 6 min)")
    p.add_argument("--sockets", type=int, help="hostile sockets held open (default 1000)")
    p.add_argument("--levels", help="comma-separated levels of legitimate streams, overriding the plan's")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where the Markdown report is written")
    a = p.parse_args(argv)
    plan = QUICK if a.quick else FULL
    if a.sockets:
        plan = replace(plan, sockets=a.sockets)
    if a.levels:
        plan = replace(plan, levels=tuple(sorted(int(x) for x in a.levels.split(","))))
    command = " ".join(["python -m loadtest.hostile_bench", *(sys.argv[1:] if argv is None else argv)])
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by every server we start
    output = a.output if a.output.is_absolute() else ROOT / a.output
    log_dir = output.parent / "logs-hostile"
    log_dir.mkdir(parents=True, exist_ok=True)
    background = background_cores()
    started, t0 = datetime.now(UTC), time.monotonic()
    work_dir = Path(tempfile.mkdtemp(prefix="hostile-bench-"))
    try:
        with running(gateway(log_dir, work_dir, "gateway_hostile", **MOCK_ENV)) as gw:
            warm_up(gw)
            caps = run_levels(gw, plan)
        budget = measure_budget(log_dir, work_dir, plan)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    report = render(
        plan=plan,
        command=command,
        started=started,
        elapsed_s=time.monotonic() - t0,
        caps=caps,
        budget=budget,
        background=background,
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report)
    print(report)
    log(f"report written to {output}")


if __name__ == "__main__":
    main()
