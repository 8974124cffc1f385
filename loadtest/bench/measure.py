"""What the benchmark measures: load from `loadtest.loadgen` in its own process, server CPU (psutil, whole process
trees) and the rest of the machine's, capacity searches, replay cost, RSS per stream, admission cost, proxy
overhead."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from loadtest.bench.plan import (
    BUSY_MACHINE_CORES,
    INTERFERENCE_CORES,
    INTERFERENCE_RETRIES,
    LEVEL_STEP,
    LOADGEN_TIMEOUT_S,
    MIN_TOKENS_DELIVERED,
    PACE_TOKENS_PER_SECOND,
    REPLAY_STREAMS,
    ROOT,
    SAMPLE_INTERVAL_S,
    STOP_TIMEOUT_S,
    TTFT_P99_BUDGET_MS,
    Plan,
    log,
)
from loadtest.bench.servers import Server, clean_env
from loadtest.harness.redis import RedisServer


def loadgen_argv(
    port: int,
    *,
    users: int,
    max_tokens: int,
    rate: float,
    hold_seconds: float = 0.0,
    path: str = "/stream",
    first_ip: str = "127.0.1.1",
    hold_open: float | None = None,
    ttft_csv: Path | None = None,
) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "loadtest.loadgen",
        "--port",
        str(port),
        "--path",
        path,
        "--users",
        str(users),
        "--rate",
        str(rate),
        "--max-tokens",
        str(max_tokens),
        "--hold-seconds",
        str(hold_seconds),
        "--tokens-per-second",
        str(PACE_TOKENS_PER_SECOND),
        "--first-ip",
        first_ip,
    ]
    argv += ["--hold-open", str(hold_open)] if hold_open is not None else []
    return argv + (["--ttft-csv", str(ttft_csv)] if ttft_csv is not None else [])


class LoadProcess:
    """One loadgen process, started at once; its JSON lines are read as they come (`events`), so that a caller
    can wait for its ramp to end and bracket a window with marks (SIGUSR1) while it runs."""

    def __init__(self, argv: list[str]) -> None:
        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=self.err, text=True)
        self.events: list[dict[str, Any]] = []
        self.ramp_ended = threading.Event()
        self.reader = threading.Thread(target=self.read, name="loadgen-stdout", daemon=True)
        self.reader.start()

    def read(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:
            for line in self.proc.stdout:
                if line.startswith("{"):
                    event = json.loads(line)
                    self.events.append(event)
                    if event.get("event") == "ramp_end":
                        self.ramp_ended.set()

    def mark(self) -> None:
        """Ask for a `mark` event (the loadgen's counts now); only after `ramp_ended` (it handles SIGUSR1 then)."""
        self.proc.send_signal(signal.SIGUSR1)

    def marks(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == "mark"]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT_S)
        self.err.close()  # no-op once `finish` closed it

    def finish(self, sample: Callable[[], None] | None = None) -> dict[str, Any]:
        """Wait for the result, calling `sample` every SAMPLE_INTERVAL_S meanwhile."""
        deadline = time.monotonic() + LOADGEN_TIMEOUT_S
        try:
            while True:
                try:
                    self.proc.wait(SAMPLE_INTERVAL_S)
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() > deadline:
                        self.kill()
                        raise
                    if sample is not None:
                        sample()
            self.reader.join(STOP_TIMEOUT_S)  # the pipe is at its end once the process has exited
            self.err.seek(0)
            stderr = self.err.read().decode(errors="replace")
        finally:
            self.err.close()
        if self.proc.returncode or not self.events or self.events[-1].get("event") != "result":
            raise RuntimeError(f"loadgen failed ({self.proc.returncode}): {stderr[-2000:]}")
        return self.events[-1]


def run_load(argv: list[str], sample: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run one loadgen process to completion, calling `sample` every SAMPLE_INTERVAL_S meanwhile."""
    return LoadProcess(argv).finish(sample)


def busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores), including interrupt and softirq work."""
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + t.irq + t.softirq)


def own_cpu_seconds() -> float:
    """CPU seconds this process (the orchestrator: sampling, reading loadgens' output) has used."""
    t = psutil.Process().cpu_times()
    return float(t.user + t.system)


def background_cores(seconds: float = 2.0) -> float:
    """Cores busy before we start anything: on a shared machine, other jobs skew every number."""
    before = busy_seconds()
    time.sleep(seconds)
    return (busy_seconds() - before) / seconds


class CpuSampler:
    """CPU of the measured servers, and of everything else on the machine, while one load runs.

    Each worker's peak per SAMPLE_INTERVAL_S is kept too: averages hide a core saturated in bursts.
    Whatever the machine spent beyond the servers, the load generator and this process is "rest":
    kernel network work and, on a shared machine, other people's processes that skew the numbers.
    """

    def __init__(self, *servers: Server) -> None:
        self.servers = servers
        self.t0 = self.t = time.monotonic()
        self.first = self.last = self.snapshot()
        self.peaks: dict[int, float] = {}
        self.busy0, self.me0 = busy_seconds(), own_cpu_seconds()

    def snapshot(self) -> dict[int, float]:
        return {pid: cpu for server in self.servers for pid, cpu in server.cpu_seconds().items()}

    def __call__(self) -> None:
        now, cpu = time.monotonic(), self.snapshot()
        for pid, seconds in cpu.items():
            load = (seconds - self.last.get(pid, seconds)) / max(now - self.t, 1e-9)
            self.peaks[pid] = max(self.peaks.get(pid, 0.0), load)
        self.t, self.last = now, cpu

    def finish(self, r: dict[str, Any]) -> None:
        """Add server CPU, per-worker (average, peak) load and the rest of the machine's load to a result."""
        self()
        elapsed = max(self.t - self.t0, 1e-9)
        masters = {server.master.pid for server in self.servers}
        workers = [pid for pid in self.last if pid not in masters]
        r["worker_load"] = sorted(
            (((self.last[pid] - self.first.get(pid, 0.0)) / elapsed, self.peaks.get(pid, 0.0)) for pid in workers),
            reverse=True,
        )
        r["server_cpu_s"] = self.server_cpu_s()
        ours = r["server_cpu_s"] + r["loadgen_cpu_s"] + own_cpu_seconds() - self.me0
        r["rest_cores"] = max(0.0, busy_seconds() - self.busy0 - ours) / elapsed
        r["restarted"] = self.restarted()

    def server_cpu_s(self) -> float:
        """CPU the servers spent between the first snapshot and the last (a process that appeared since counts
        whole)."""
        return sum(self.last.values()) - sum(self.first.get(pid, 0.0) for pid in self.last)

    def restarted(self) -> bool:
        """A worker that exited or was replaced meanwhile (crash, OOM, someone's signal) voids the load."""
        return set(self.first) != set(self.last) or any(s.child.exited() for s in self.servers)


def warm_up(server: Server, path: str = "/stream", users: int = 50) -> None:
    """Lazy imports, caches and upstream connection pools get filled before anything is timed."""
    r = run_load(loadgen_argv(server.port, users=users, max_tokens=20, rate=200.0, path=path, first_ip="127.0.250.1"))
    if r["error_count"]:  # a broken server would otherwise yield a report full of zeros
        raise RuntimeError(f"{server.name} failed its warm-up ({r['errors']}); see {server.child.log_path}")


def measure_level(server: Server, plan: Plan, users: int, extra: Sequence[Server] = ()) -> dict[str, Any]:
    """One level; `extra` servers (redis-server) count towards server CPU."""
    sampler = CpuSampler(server, *extra)
    csv = server.log_dir / f"ttft-{server.name}-{users}.csv"  # per-stream TTFT over time, to tell stalls from drift
    r = run_load(
        loadgen_argv(
            server.port,
            users=users,
            max_tokens=plan.max_tokens,
            rate=plan.rate,
            hold_seconds=plan.hold_seconds,
            ttft_csv=csv,
        ),
        sample=sampler,
    )
    sampler.finish(r)
    r["delivered"] = r["tokens_in_time"] / r["tokens_demanded"] if r["tokens_demanded"] else 0.0
    p99 = r["ttft_ms"]["p99"]
    r["passed"] = (
        r["error_count"] == 0
        and p99 is not None
        and p99 <= TTFT_P99_BUDGET_MS
        and r["delivered"] >= MIN_TOKENS_DELIVERED
        and not r["restarted"]
    )
    r["load_avg_1m"] = os.getloadavg()[0]
    return r


def measure_quietly(server: Server, plan: Plan, users: int, extra: Sequence[Server] = ()) -> dict[str, Any]:
    """One level, run again (up to INTERFERENCE_RETRIES times, once the machine is quiet) while other processes
    used more than INTERFERENCE_CORES during it."""
    for attempt in range(1, INTERFERENCE_RETRIES + 2):
        log(f"{server.name}: {users} concurrent streams" + (f" (attempt {attempt})" if attempt > 1 else ""))
        row = measure_level(server, plan, users, extra)
        row["attempts"] = attempt
        log(f"  -> {summary_line(row)}")
        if not interfered(row, plan, attempt):
            break
    # A failure while others still loaded the machine after every retry says nothing about the server.
    row["spoiled"] = not row["passed"] and row["rest_cores"] > INTERFERENCE_CORES
    return row


@dataclass
class Capacity:
    """A capacity search: every level run, and the bracket it found."""

    rows: list[dict[str, Any]] = field(default_factory=list)  # in the order run

    def row(self, users: int) -> dict[str, Any] | None:
        return next((r for r in reversed(self.rows) if r["users"] == users), None)

    @property
    def hi(self) -> int | None:
        """Lowest failing level (failures spoiled by others' load do not count); None when no level failed."""
        return min((r["users"] for r in self.rows if not r["passed"] and not r.get("spoiled")), default=None)

    @property
    def lo(self) -> int:
        """Highest passing level below the lowest failing one: the capacity (0: none passed)."""
        hi = self.hi
        return max((r["users"] for r in self.rows if r["passed"] and (hi is None or r["users"] < hi)), default=0)

    @property
    def bracket(self) -> str:
        hi = self.hi
        return f"{self.lo}" + (f" (fails at {hi})" if hi is not None else " (no level failed)")


def search_capacity(server: Server, plan: Plan, *, start: int | None = None, extra: Sequence[Server] = ()) -> Capacity:
    """Climb the ladder from `start` (or its bottom) until a level fails, or descend until one passes; then
    bisect the bracket `plan.refine` times."""
    cap = Capacity()
    ladder = sorted(set(plan.levels) | ({start} if start else set()))

    def run(users: int) -> bool | None:
        """True: passed; False: failed; None: spoiled (the search stops there)."""
        if cap.rows:
            time.sleep(1.0)  # let the server close the last connections before the next level
        row = measure_quietly(server, plan, users, extra)
        cap.rows.append(row)
        return None if row["spoiled"] else bool(row["passed"])

    if plan.all_levels:
        for users in ladder:
            run(users)
        return cap
    i = ladder.index(start) if start else 0
    if run(ladder[i]):
        for users in ladder[i + 1 :]:
            if not run(users):
                break
    else:
        for users in reversed(ladder[:i]):
            if run(users) is not False:
                break
    for _ in range(plan.refine):
        lo, hi = cap.lo, cap.hi
        if hi is None or lo == 0:
            break
        mid = round((lo + hi) / 2 / LEVEL_STEP) * LEVEL_STEP
        if not lo < mid < hi or run(mid) is None:
            break
    return cap


def measure_replay(server: Server, plan: Plan) -> dict[str, Any]:
    """REPLAY_STREAMS streams of plan.max_tokens tokens end; each is replayed once from Last-Event-ID <id>-0."""
    log(f"{server.name}: replay cost ({REPLAY_STREAMS} streams of {plan.max_tokens} tokens, then one replay each)")
    argv = [
        *loadgen_argv(
            server.port, users=REPLAY_STREAMS, max_tokens=plan.max_tokens, rate=plan.rate, first_ip="127.0.230.1"
        ),
        "--replay",
        str(REPLAY_STREAMS),
        "--replay-after",
        "0",
    ]
    r = run_load(argv)
    log(
        f"  -> replay p50 {ms(r['replay_ms']['p50'])} ms for {r['events_per_replay']} events, "
        f"{r['replays']}/{r['produced']} replays, errors {r['errors'] or 0}"
    )
    return r


def measure_admission(plan: Plan, redis: RedisServer | None) -> list[dict[str, Any]]:
    """`loadtest.admission_bench` in its own process (its own loop, no server competing for its core)."""
    argv = [
        sys.executable,
        "-m",
        "loadtest.admission_bench",
        "--json",
        "--requests",
        str(plan.admission_requests),
        "--redis-requests",
        str(plan.admission_redis_requests),
    ]
    if redis is not None:
        redis.command("FLUSHALL")
        argv += ["--redis-url", redis.url]
    out = subprocess.run(argv, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"admission_bench failed ({out.returncode}): {out.stderr[-2000:]}")
    rows: list[dict[str, Any]] = json.loads(lines[-1])["rows"]
    return rows


def wait_for_quiet(max_wait_s: float) -> float:
    """Background load in cores; with max_wait_s, wait (up to that long) for it to drop below BUSY_MACHINE_CORES."""
    deadline = time.monotonic() + max_wait_s
    while True:
        busy = background_cores(5.0 if max_wait_s else 2.0)
        if busy <= BUSY_MACHINE_CORES or time.monotonic() >= deadline:
            return busy
        load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
        log(f"machine busy ({busy:.2f} cores, load average {load}); waiting for a quieter moment")
        time.sleep(10.0)


def measure_rss(server: Server, plan: Plan) -> dict[str, Any]:
    """Sum RSS of master + workers before and while N long streams are open."""
    time.sleep(1.0)
    before = sample_rss(server)
    # 20 tok/s for 10,000 tokens: every stream stays open (and relaying) far beyond the hold.
    argv = loadgen_argv(
        server.port,
        users=plan.rss_streams,
        max_tokens=10_000,
        rate=plan.rate,
        first_ip="127.0.200.1",
        hold_open=plan.rss_hold_seconds,
    )
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    opened: dict[str, Any] = {}
    for line in proc.stdout:
        if line.startswith("{") and (msg := json.loads(line)).get("event") == "all_open":
            opened = msg
            break
    time.sleep(0.5)
    during = sample_rss(server)
    rest, err = proc.communicate(timeout=120)
    results = [json.loads(line) for line in rest.splitlines() if line.startswith("{")]
    if proc.returncode or not opened:
        raise RuntimeError(f"loadgen (hold-open) failed ({proc.returncode}): {err[-2000:]}")
    n_open = int(opened["open"])
    return {
        "before": before,
        "during": during,
        "open": n_open,
        "requested": plan.rss_streams,
        "errors": results[-1]["errors"] if results else {},
        "per_stream": (during - before) / n_open if n_open else float("nan"),
    }


def sample_rss(server: Server, samples: int = 5) -> float:
    values = []
    for _ in range(samples):
        values.append(server.rss_bytes())
        time.sleep(0.2)
    return statistics.median(values)


def interfered(row: dict[str, Any], plan: Plan, attempt: int) -> bool:
    """Did other processes use the machine during this load? Then (retries left) wait for quiet and say so."""
    if row["rest_cores"] <= INTERFERENCE_CORES or attempt > INTERFERENCE_RETRIES:
        return False
    log(f"  -> other processes used {row['rest_cores']:.2f} cores meanwhile: waiting for quiet, then again")
    wait_for_quiet(plan.quiet_wait_s)
    return True


def measure_proxy(plan: Plan, upstream: Server, through: Server) -> dict[str, Any]:
    path = "/v1/chat/completions"
    warm_up(upstream, path, plan.proxy_users)
    warm_up(through, path, plan.proxy_users)  # the gateway's upstream pool may keep a connection per stream
    for attempt in range(1, INTERFERENCE_RETRIES + 2):
        results = {}
        for label, server in (("direct", upstream), ("through", through)):
            log(f"proxy overhead: {plan.proxy_users} streams {label}")
            sampler = CpuSampler(upstream) if server is upstream else CpuSampler(upstream, server)
            results[label] = run_load(
                loadgen_argv(
                    server.port,
                    users=plan.proxy_users,
                    rate=plan.rate,
                    path=path,
                    max_tokens=plan.proxy_max_tokens,
                    hold_seconds=plan.proxy_hold_seconds,
                ),
                sample=sampler,
            )
            sampler.finish(results[label])
            results[label]["attempts"] = attempt
        worst = max(results.values(), key=lambda r: r["rest_cores"])
        if not interfered(worst, plan, attempt):
            break
    return results


def ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def summary_line(r: dict[str, Any]) -> str:
    return (
        f"TTFT p50 {ms(r['ttft_ms']['p50'])} ms, p99 {ms(r['ttft_ms']['p99'])} ms, "
        f"{r['delivered']:.1%} tokens, {r['error_count']} errors, {result_text(r)}"
    )


def result_text(r: dict[str, Any]) -> str:
    if r["restarted"]:
        return "FAIL (a server process exited during the level; see its log)"
    retried = f" (attempt {r['attempts']}: others' load spoiled the earlier)" if r.get("attempts", 1) > 1 else ""
    if r.get("spoiled"):
        return f"FAIL, ignored: others used {r['rest_cores']:.2f} cores" + retried
    return ("pass" if r["passed"] else "FAIL") + retried


def cpu_per_1k(r: dict[str, Any] | None) -> float | None:
    return r["server_cpu_s"] / r["tokens_total"] * 1000 if r and r["tokens_total"] else None
