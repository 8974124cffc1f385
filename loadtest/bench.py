"""One-command benchmark: relay capacity, the raw-ASGI ceiling, the price of every protection,
proxy overhead, RSS per stream, admission cost, and the resume store's capacity and replay cost.

Run: `python -m loadtest.bench [--quick] [--wait-quiet 600] [--profile] [--output loadtest/results/benchmark.md]`.
Starts every server it measures on free 127.0.0.1 ports (and its own redis-server, when
/usr/bin/redis-server or one on PATH exists), drives them with `loadtest.loadgen` in a separate process
(so starting servers and sampling psutil never steal its loop), stops them all and prints a Markdown
report, which it also writes to `--output`. Server logs go next to the report.

Phases, each with only its own servers running (redis-server idles through the others):
0. admission cost per request, in process (`loadtest.admission_bench`): memory, shared memory, Redis;
1. gateway "protections on" - the configuration as shipped (rate limit and slots on, set high enough
   never to refuse the benchmark's clients; breaker on; resume on, local store) on the built-in mock at
   20 tok/s: RSS per open stream (on an instance of its own), capacity on `/stream`, then the replay
   cost (local store);
2. the raw-ASGI app (`loadtest.raw_asgi_app`, same events and pace): its capacity, the ceiling;
3. gateway "protections off" (no rate limit, no resume, slot caps out of reach; the breaker cannot be
   switched off): its capacity - protections may cost at most 10% of it;
4. gateway with resume off (everything else as shipped), and with RESUME_STORE=redis (REDIS_URL set,
   so rate limits and per-client slots go through Redis too): capacity, then the replay cost (Redis);
5. fake_openai (20 tok/s), streamed straight and through a gateway (`UPSTREAM_URL`): TTFT added.

A capacity level passes with TTFT p99 <= 300 ms, zero errors and >= 95% of demanded tokens delivered in
time. On a shared machine other processes skew every number: a level (or the proxy load) during which they
used more than INTERFERENCE_CORES is run again once the machine is quiet, up to INTERFERENCE_RETRIES times.
The "on" gateway climbs the level ladder from the bottom until a level fails; the other servers
start at the level the "on" gateway reached (so every configuration runs that level: CPU per token is
compared there) and climb or descend from it; then each bracket [highest pass, lowest fail] is bisected
`refine` times. `--quick` runs levels 450 and 1500 on the protected gateway, no bisection, and every other
server at the highest of those only.
`--profile` adds py-spy runs (every worker) under the loads behind missed targets: the first failing level,
450 streams, the proxy load; the report lists what dominates.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, TypeVar

import psutil

from loadtest.admission_bench import markdown as admission_markdown

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = Path("loadtest/results/benchmark.md")

TTFT_P99_BUDGET_MS = 300.0  # a capacity level passes under this TTFT p99 ...
MIN_TOKENS_DELIVERED = 0.95  # ... with this share of demanded tokens delivered in time, and zero errors
TTFT_P99_AT_450_TARGET_MS = 100.0
CAPACITY_RATIO_TARGET = 0.70
# capacity with the protections on (rate limit, slots, breaker, deadlines; resumption is a feature of its
# own, measured beside them) / with them off
PROTECTIONS_RATIO_TARGET = 0.90
ADDED_TTFT_P50_TARGET_MS = 2.0
RSS_PER_STREAM_TARGET_KB = 64.0
PACE_TOKENS_PER_SECOND = 20.0
WORKERS = 2
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
LOADGEN_TIMEOUT_S = 900.0
SAMPLE_INTERVAL_S = 0.5
BUSY_MACHINE_CORES = 0.2  # background load above this gets a warning in the report
INTERFERENCE_CORES = 0.25  # other processes busier than this during a level: it is run again once quiet ...
INTERFERENCE_RETRIES = 2  # ... at most this many times (the last attempt counts, whatever it saw)
LEVEL_STEP = 25  # bisected levels are rounded to this many streams
REPLAY_STREAMS = 50  # streams produced, then each replayed once with Last-Event-ID
PROFILE_RATE_HZ = 100
BOOTSTRAP_FRAMES = re.compile(r"\((?:gunicorn/|uvicorn_worker/|<frozen runpy>|uvicorn/_compat\.py|asyncio/runners\.py|"
                              r"asyncio/events\.py|asyncio/base_events\.py)")
SITE_PACKAGES = re.compile(r"(?<=\()\S*?(?:site-packages|lib/python3\.\d+)/|(?<=\()" + re.escape(f"{ROOT}/"))

# Benchmark-only gateway settings: admission and rate limits stay switched on (their cost per request is part of
# what is measured) but are set so high that no level is ever rejected by them. Every user reuses its address
# across levels, so the default 20 requests/minute per client would otherwise trip within the first level.
GENEROUS_ENV = {
    "MAX_CONNECTIONS": "20000",
    "MAX_CONNECTIONS_PER_CLIENT": "10000",
    "RATE_LIMIT_PER_MINUTE": "1000000000",
    "RATE_LIMIT_BURST": "1000000",
}
MOCK_ENV = {"MOCK_TOKENS_PER_SECOND": str(PACE_TOKENS_PER_SECOND), "MOCK_FIRST_TOKEN_MS": "0"}


@dataclass(frozen=True, slots=True)
class Config:
    """One gateway configuration whose capacity is measured (env on top of the shipped defaults)."""

    key: str
    title: str
    description: str
    env: dict[str, str]
    needs_redis: bool = False


PROTECTIONS_ON = Config(
    "on", "protections on (as shipped)",
    "defaults: rate limit on (limits set out of reach), slots on, breaker on, resume on with the local store",
    {},
)
PROTECTIONS_OFF = Config(
    "off", "protections off",
    "RATE_LIMIT_PER_MINUTE=0, RESUME_ENABLED=false, MAX_CONNECTIONS(_PER_CLIENT)=20000 (breaker stays: no switch)",
    {"RATE_LIMIT_PER_MINUTE": "0", "RESUME_ENABLED": "false", "MAX_CONNECTIONS": "20000",
     "MAX_CONNECTIONS_PER_CLIENT": "20000"},
)
RESUME_OFF = Config("resume_off", "resume off", "RESUME_ENABLED=false, everything else as shipped",
                    {"RESUME_ENABLED": "false"})
RESUME_REDIS = Config(
    "redis", "resume store Redis",
    "RESUME_STORE=redis + REDIS_URL (rate limit and per-client slots in Redis too), everything else as shipped",
    {"RESUME_STORE": "redis"}, needs_redis=True,
)


@dataclass(frozen=True, slots=True)
class Plan:
    levels: tuple[int, ...]
    refine: int  # bisections of each capacity bracket
    compare_budget: int | None  # most levels per comparison configuration (None: as many as the search needs)
    hold_seconds: float  # cycling time after the ramp at each level
    max_tokens: int  # 200 tokens at 20 tok/s: 10 s streams
    rate: float  # stream arrivals per second during the ramp
    proxy_users: int
    proxy_max_tokens: int
    proxy_hold_seconds: float
    rss_streams: int
    rss_hold_seconds: float
    admission_requests: int
    admission_redis_requests: int
    all_levels: bool
    quiet_wait_s: float = 300.0  # how long to wait for a quiet machine before a retried level


FULL = Plan(levels=(250, 450, 700, 1000, 1500, 2000, 2500, 3000, 4000), refine=3, compare_budget=None,
            hold_seconds=20.0, max_tokens=200, rate=200.0, proxy_users=100, proxy_max_tokens=40,
            proxy_hold_seconds=10.0, rss_streams=500, rss_hold_seconds=4.0, admission_requests=20000,
            admission_redis_requests=4000, all_levels=False)
# The hold stays one full stream long even in quick mode: only then do streams arrive while every user is active,
# which is where TTFT suffers; during the ramp a server is never at the level's concurrency.
QUICK = replace(FULL, levels=(450, 1500), refine=0, compare_budget=1, hold_seconds=10.0, proxy_hold_seconds=5.0,
                rss_hold_seconds=3.0, admission_requests=5000, admission_redis_requests=1000)


# --- servers --------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A server process tree started for one phase; psutil views of the master and its workers."""

    def __init__(self, name: str, argv: list[str], *, port: int, env: dict[str, str], log_dir: Path,
                 workers: int, ready_path: str = "/health", inherit_env: bool = True) -> None:
        self.name, self.port, self.workers, self.ready_path = name, port, workers, ready_path
        self.metrics_port = int(env.get("METRICS_PORT", port))  # a gateway serves /metrics on a port of its own
        self.log_dir = log_dir
        self.log: IO[bytes] = open(log_dir / f"{name}.log", "wb")  # closed in stop()
        self.proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **env} if inherit_env else env,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.master = psutil.Process(self.proc.pid)

    def processes(self) -> list[psutil.Process]:
        return [self.master, *self.master.children(recursive=True)]

    def cpu_seconds(self) -> dict[int, float]:
        """User+system CPU seconds per pid (master first)."""
        out = {}
        for p in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
        return out

    def rss_bytes(self) -> int:
        total = 0
        for p in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                total += p.memory_info().rss
        return total

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see its log")
            if len(self.master.children()) >= self.workers and http_status(self.port, self.ready_path) == 200:
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {READY_TIMEOUT_S:.0f} s")

    def stop(self, *, kill: bool = False) -> None:
        """SIGTERM (the gateway drains: up to DRAIN_TIMEOUT_SECONDS while streams run); kill: SIGKILL at once."""
        if self.proc.poll() is None:
            children = self.master.children(recursive=True)
            if not kill:
                self.proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(STOP_TIMEOUT_S)
            if self.proc.poll() is None:
                for p in [*children, self.master]:  # only the tree we started, by pid
                    with contextlib.suppress(psutil.NoSuchProcess):
                        p.kill()
                self.proc.wait()
        self.log.close()


def http_status(port: int, path: str) -> int | None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        conn.request("GET", path)
        status = conn.getresponse().status
        conn.close()
        return status
    except OSError:
        return None


S = TypeVar("S", bound="Server")


@contextlib.contextmanager
def running(server: S, *, kill: bool = False) -> Iterator[S]:
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop(kill=kill)


class RedisServer(Server):
    """Our own redis-server on a free loopback port: no persistence, data in our work directory."""

    def __init__(self, binary: str, log_dir: Path, data_dir: Path) -> None:
        port = free_port()
        data_dir.mkdir(parents=True, exist_ok=True)
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(data_dir)]
        super().__init__("redis", argv, port=port, env={}, log_dir=log_dir, workers=0)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self, *args: str) -> bytes:
        """One command, its (first) reply line."""
        payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(payload.encode())
            return sock.recv(65536).split(b"\r\n", 1)[0]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}; see its log")
            with contextlib.suppress(OSError):
                if self.command("PING") == b"+PONG":
                    return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server not ready after {READY_TIMEOUT_S:.0f} s")


def redis_binary() -> str | None:
    return shutil.which("redis-server") or next((p for p in ("/usr/bin/redis-server",) if os.path.exists(p)), None)


def clean_env() -> dict[str, str]:
    """This process's environment without any gateway setting: a caller's REDIS_URL or API_KEYS stays out."""
    from app.settings import Settings

    names = {name.upper() for name in Settings.model_fields} | {"GATEWAY_SHARED_STATE", "PROMETHEUS_MULTIPROC_DIR"}
    return {k: v for k, v in os.environ.items() if k.upper() not in names}


def gateway(log_dir: Path, work_dir: Path, name: str, **env: str) -> Server:
    port = free_port()
    # Our own directories, removed at the end, instead of the app's defaults in /tmp.
    full_env = {**clean_env(), "HOST": "127.0.0.1", "PORT": str(port), "METRICS_PORT": str(free_port()),
                "WEB_CONCURRENCY": str(WORKERS),
                "PROMETHEUS_MULTIPROC_DIR": str(work_dir / f"metrics-{name}"),
                "RESUME_DIR": str(work_dir / f"resume-{name}"), **GENEROUS_ENV, **env}
    return Server(name, [sys.executable, "-m", "app"], port=port, env=full_env, log_dir=log_dir, workers=WORKERS,
                  inherit_env=False)


def raw_app(log_dir: Path) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "gunicorn", "loadtest.raw_asgi_app:app", "-k", "loadtest.raw_asgi_app.RawWorker",
            "-w", str(WORKERS), "-b", f"127.0.0.1:{port}", "--log-level", "warning", "--backlog", "2048"]
    env = {"RAW_TOKENS_PER_SECOND": str(PACE_TOKENS_PER_SECOND)}
    return Server("raw_asgi", argv, port=port, env=env, log_dir=log_dir, workers=WORKERS)


def fake_openai(log_dir: Path) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "loadtest.fake_openai", "--port", str(port),
            "--tokens-per-second", str(PACE_TOKENS_PER_SECOND), "--first-token-ms", "0"]
    return Server("fake_openai", argv, port=port, env={}, log_dir=log_dir, workers=0, ready_path="/v1/models")


# --- load -----------------------------------------------------------------------------------------

def loadgen_argv(port: int, *, users: int, max_tokens: int, rate: float, hold_seconds: float = 0.0,
                 path: str = "/stream", first_ip: str = "127.0.1.1", hold_open: float | None = None,
                 ttft_csv: Path | None = None) -> list[str]:
    argv = [sys.executable, "-m", "loadtest.loadgen", "--port", str(port), "--path", path, "--users", str(users),
            "--rate", str(rate), "--max-tokens", str(max_tokens), "--hold-seconds", str(hold_seconds),
            "--tokens-per-second", str(PACE_TOKENS_PER_SECOND), "--first-ip", first_ip]
    argv += ["--hold-open", str(hold_open)] if hold_open is not None else []
    return argv + (["--ttft-csv", str(ttft_csv)] if ttft_csv is not None else [])


def run_load(argv: list[str], sample: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run one loadgen process to completion, calling `sample` every SAMPLE_INTERVAL_S meanwhile."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True)
        deadline = time.monotonic() + LOADGEN_TIMEOUT_S
        while True:
            try:
                proc.wait(SAMPLE_INTERVAL_S)
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() > deadline:
                    proc.kill()
                    raise
                if sample is not None:
                    sample()
        assert proc.stdout is not None
        stdout = proc.stdout.read()
        proc.stdout.close()
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    results = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not results or results[-1].get("event") != "result":
        raise RuntimeError(f"loadgen failed ({proc.returncode}): {stderr[-2000:]}")
    result: dict[str, Any] = results[-1]
    return result


def busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores), including interrupt and softirq work."""
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + t.irq + t.softirq)


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
        self.me = psutil.Process()
        self.t0 = self.t = time.monotonic()
        self.first = self.last = self.snapshot()
        self.peaks: dict[int, float] = {}
        self.busy0, self.me0 = busy_seconds(), self.my_seconds()

    def snapshot(self) -> dict[int, float]:
        return {pid: cpu for server in self.servers for pid, cpu in server.cpu_seconds().items()}

    def my_seconds(self) -> float:
        t = self.me.cpu_times()
        return float(t.user + t.system)

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
        r["server_cpu_s"] = sum(self.last.values()) - sum(self.first.get(pid, 0.0) for pid in self.last)
        ours = r["server_cpu_s"] + r["loadgen_cpu_s"] + self.my_seconds() - self.me0
        r["rest_cores"] = max(0.0, busy_seconds() - self.busy0 - ours) / elapsed
        # A worker that exited or was replaced mid-level (crash, OOM, someone's signal) voids the level.
        r["restarted"] = set(self.first) != set(self.last) or any(s.proc.poll() is not None for s in self.servers)


def warm_up(server: Server, path: str = "/stream", users: int = 50) -> None:
    """Lazy imports, caches and upstream connection pools get filled before anything is timed."""
    r = run_load(loadgen_argv(server.port, users=users, max_tokens=20, rate=200.0, path=path, first_ip="127.0.250.1"))
    if r["error_count"]:  # a broken server would otherwise yield a report full of zeros
        raise RuntimeError(f"{server.name} failed its warm-up ({r['errors']}); see {server.log.name}")


def measure_level(server: Server, plan: Plan, users: int, extra: Sequence[Server] = ()) -> dict[str, Any]:
    """One level; `extra` servers (redis-server) count towards server CPU."""
    sampler = CpuSampler(server, *extra)
    csv = server.log_dir / f"ttft-{server.name}-{users}.csv"  # per-stream TTFT over time, to tell stalls from drift
    r = run_load(loadgen_argv(server.port, users=users, max_tokens=plan.max_tokens, rate=plan.rate,
                              hold_seconds=plan.hold_seconds, ttft_csv=csv), sample=sampler)
    sampler.finish(r)
    r["delivered"] = r["tokens_in_time"] / r["tokens_demanded"] if r["tokens_demanded"] else 0.0
    p99 = r["ttft_ms"]["p99"]
    r["passed"] = (r["error_count"] == 0 and p99 is not None and p99 <= TTFT_P99_BUDGET_MS
                   and r["delivered"] >= MIN_TOKENS_DELIVERED and not r["restarted"])
    r["load_avg_1m"] = os.getloadavg()[0]
    return r


@dataclass
class Capacity:
    """A capacity search: every level run, and the bracket it found."""

    rows: list[dict[str, Any]] = field(default_factory=list)  # in the order run
    skipped: list[int] = field(default_factory=list)  # ladder levels not run because the budget ran out

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


def search_capacity(server: Server, plan: Plan, *, start: int | None = None, budget: int | None = None,
                    extra: Sequence[Server] = ()) -> Capacity:
    """Climb the ladder from `start` (or its bottom) until a level fails, or descend until one passes; then
    bisect the bracket `plan.refine` times. At most `budget` levels."""
    cap = Capacity()
    ladder = sorted(set(plan.levels) | ({start} if start else set()))

    def run(users: int) -> bool | None:
        """True: passed; False: failed; None: not run (budget) or spoiled (the search stops there)."""
        if budget is not None and len(cap.rows) >= budget:
            cap.skipped.append(users)
            return None
        if cap.rows:
            time.sleep(1.0)  # let the server close the last connections before the next level
        for attempt in range(1, INTERFERENCE_RETRIES + 2):
            log(f"{server.name}: {users} concurrent streams" + (f" (attempt {attempt})" if attempt > 1 else ""))
            row = measure_level(server, plan, users, extra)
            row["attempts"] = attempt
            log(f"  -> {summary_line(row)}")
            if not interfered(row, plan, attempt):
                break
        # A failure while others still loaded the machine after every retry says nothing about the server.
        row["spoiled"] = not row["passed"] and row["rest_cores"] > INTERFERENCE_CORES
        cap.rows.append(row)
        return None if row["spoiled"] else bool(row["passed"])

    if plan.all_levels:
        for users in ladder:
            run(users)
        return cap
    i = ladder.index(start) if start else 0
    if run(ladder[i]):
        for users in ladder[i + 1:]:
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
    argv = loadgen_argv(server.port, users=REPLAY_STREAMS, max_tokens=plan.max_tokens, rate=plan.rate,
                        first_ip="127.0.230.1") + ["--replay", str(REPLAY_STREAMS), "--replay-after", "0"]
    r = run_load(argv)
    log(f"  -> replay p50 {ms(r['replay_ms']['p50'])} ms for {r['events_per_replay']} events, "
        f"{r['replays']}/{r['produced']} replays, errors {r['errors'] or 0}")
    return r


def measure_admission(plan: Plan, redis: RedisServer | None) -> list[dict[str, Any]]:
    """`loadtest.admission_bench` in its own process (its own loop, no server competing for its core)."""
    argv = [sys.executable, "-m", "loadtest.admission_bench", "--json", "--requests", str(plan.admission_requests),
            "--redis-requests", str(plan.admission_redis_requests)]
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
    argv = loadgen_argv(server.port, users=plan.rss_streams, max_tokens=10_000, rate=plan.rate,
                        first_ip="127.0.200.1", hold_open=plan.rss_hold_seconds)
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
    return {"before": before, "during": during, "open": n_open, "requested": plan.rss_streams,
            "errors": results[-1]["errors"] if results else {},
            "per_stream": (during - before) / n_open if n_open else float("nan")}


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
            results[label] = run_load(loadgen_argv(server.port, users=plan.proxy_users, rate=plan.rate, path=path,
                                                   max_tokens=plan.proxy_max_tokens,
                                                   hold_seconds=plan.proxy_hold_seconds), sample=sampler)
            sampler.finish(results[label])
            results[label]["attempts"] = attempt
        worst = max(results.values(), key=lambda r: r["rest_cores"])
        if not interfered(worst, plan, attempt):
            break
    return results


def py_spy_binary() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


def profile_load(server: Server, argv: list[str], seconds: float, label: str) -> dict[str, Any]:
    """Run one load while py-spy samples every worker of `server` (not counted in any measurement)."""
    binary = py_spy_binary()
    if binary is None:
        return {"label": label, "error": "py-spy not found (pip install py-spy)"}
    out = server.log_dir / f"profile-{server.name}-{label.replace(' ', '_')}.raw"
    log(f"{server.name}: profiling {label} with py-spy ({PROFILE_RATE_HZ} Hz, {seconds:.0f} s)")
    spy = subprocess.Popen([binary, "record", "-p", str(server.master.pid), "--subprocesses", "--nonblocking",
                            "-r", str(PROFILE_RATE_HZ), "-d", str(round(seconds)), "-f", "raw", "-o", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        result = run_load(argv)
        _, err = spy.communicate(timeout=seconds + 30)
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait()
    if not out.exists():
        return {"label": label, "error": f"py-spy wrote nothing: {err.strip()[-300:]}"}
    return {"label": label, "file": out, "seconds": seconds, "ttft_ms": result["ttft_ms"],
            "errors": result["errors"], **summarize_profile(out)}


def summarize_profile(path: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive shares of the sampled (non-idle) stacks, per frame "function (file:line)"."""
    self_n: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [SITE_PACKAGES.sub("", f) for f in stack.split(";") if not f.startswith("process ")]
        if not frames:
            continue
        total += n
        self_n[frames[-1]] += n
        for frame in set(frames):
            incl[frame] += n
    # The loop and gunicorn's bootstrap are on every stack (py-spy --nonblocking truncates some): no information.
    inclusive = [(f, n) for f, n in incl.most_common() if not BOOTSTRAP_FRAMES.search(f)][:top]
    return {"samples": total, "self": [(f, n / total) for f, n in self_n.most_common(top)],
            "inclusive": [(f, n / total) for f, n in inclusive]}


def profile_section(profiles: list[dict[str, Any]]) -> list[str]:
    out = ["## 8. Profiles (py-spy, every worker, non-idle samples)", ""]
    for p in profiles:
        out += [f"### {p['label']}", ""]
        if "error" in p:
            out += [p["error"], ""]
            continue
        busy = p["samples"] / PROFILE_RATE_HZ / p["seconds"]
        out += [f"`{display_path(p['file'])}`: {p['samples']:,} samples (≈ {busy:.2f} cores busy in Python-visible "
                f"frames over {p['seconds']:.0f} s); TTFT p50 / p99 during the profile {ms(p['ttft_ms']['p50'])} / "
                f"{ms(p['ttft_ms']['p99'])} ms (py-spy itself costs some CPU). `Runner.run` self time is the event "
                "loop's C code (uvloop: polling, socket I/O, callbacks).", "",
                "| Self | Frame | | Inclusive | Frame |", "|---:|---|---|---:|---|"]
        for i in range(max(len(p["self"]), len(p["inclusive"]))):
            s = p["self"][i] if i < len(p["self"]) else ("", 0.0)
            n = p["inclusive"][i] if i < len(p["inclusive"]) else ("", 0.0)
            out.append(f"| {s[1]:.1%} | `{s[0]}` | | {n[1]:.1%} | `{n[0]}` |")
        out.append("")
    return out


# --- report ---------------------------------------------------------------------------------------

def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def verdict(ok: bool | None) -> str:
    return "inconclusive" if ok is None else "met" if ok else "**missed**"


def summary_line(r: dict[str, Any]) -> str:
    return (f"TTFT p50 {ms(r['ttft_ms']['p50'])} ms, p99 {ms(r['ttft_ms']['p99'])} ms, "
            f"{r['delivered']:.1%} tokens, {r['error_count']} errors, {result_text(r)}")


def result_text(r: dict[str, Any]) -> str:
    if r["restarted"]:
        return "FAIL (a server process exited during the level; see its log)"
    retried = f" (attempt {r['attempts']}: others' load spoiled the earlier)" if r.get("attempts", 1) > 1 else ""
    if r.get("spoiled"):
        return f"FAIL, ignored: others used {r['rest_cores']:.2f} cores" + retried
    return ("pass" if r["passed"] else "FAIL") + retried


def cpu_per_1k(r: dict[str, Any] | None) -> float | None:
    return r["server_cpu_s"] / r["tokens_total"] * 1000 if r and r["tokens_total"] else None


def capacity_table(cap: Capacity) -> list[str]:
    out = ["| Streams | Streams run | TTFT p50 ms | TTFT p99 ms | Tokens/s delivered | Tokens in time | Errors "
           "| Server CPU s / 1k tokens | Worker CPU avg/peak (cores) | Loadgen CPU (cores) | Loadgen lag p99 ms "
           "| Rest of machine (cores) | Load avg 1 min | Result |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in sorted(cap.rows, key=lambda r: r["users"]):
        per_1k = cpu_per_1k(r)
        errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"
        out.append(
            f"| {r['users']} | {r['streams']} | {ms(r['ttft_ms']['p50'])} | {ms(r['ttft_ms']['p99'])} "
            f"| {r['steady_tokens_per_s']:,.0f} | {r['delivered']:.1%} | {errors} "
            f"| {'n/a' if per_1k is None else f'{per_1k:.3f}'} "
            f"| {' + '.join(f'{avg:.2f}/{peak:.2f}' for avg, peak in r['worker_load'])} "
            f"| {r['loadgen_cpu_s'] / r['duration_s']:.2f} | {ms(r['loadgen_lag_ms']['p99'])} "
            f"| {r['rest_cores']:.2f} | {r['load_avg_1m']:.2f} | {result_text(r)} |"
        )
    out.append("")
    out.append(f"Capacity: **{cap.bracket}**; levels in the order run: {', '.join(str(r['users']) for r in cap.rows)}"
               + (f"; not run (level budget): {', '.join(map(str, cap.skipped))}" if cap.skipped else "") + ".")
    return out


def ratio(a: Capacity | None, b: Capacity | None, target: float) -> tuple[str, bool | None]:
    """a's capacity over b's, as text with its bound, and whether it meets `target` (None: cannot tell)."""
    if a is None or b is None:
        return "n/a (not run)", None
    if not b.lo:
        return "n/a (the reference passed no level)", None
    value = a.lo / b.lo
    a_open, b_open = a.hi is None, b.hi is None  # "open": no level failed, the true capacity may be higher
    if a_open and b_open:
        return f"{value:.0%} (neither failed a level: unresolved)", None
    if b_open:
        return f"≤ {value:.0%} (the denominator failed no level)", None if value >= target else False
    if a_open:
        return f"≥ {value:.0%} (the numerator failed no level)", True if value >= target else None
    return f"{value:.0%}", value >= target


def fmt_cpu(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1000:.0f}"


def source_revision() -> str:
    """The commit measured; "-dirty" means uncommitted changes were measured too."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10, check=False)
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown (not a git checkout)"


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = psutil.virtual_memory().total / 2**30
    return (f"{cpus} CPUs usable ({os.cpu_count()} online), {model}, {mem:.1f} GiB RAM; "
            f"Python {platform.python_version()} on {platform.platform()}")


def render(*, plan: Plan, command: str, started: datetime, elapsed_s: float, caps: dict[str, Capacity],
           raw: Capacity, common: int, proxy: dict[str, Any], rss: dict[str, Any], replay: dict[str, Any],
           admission: list[dict[str, Any]], log_dir: Path, background: float,
           loads: dict[str, tuple[float, float, float]], notes: list[str],
           profiles: list[dict[str, Any]]) -> str:
    on = caps["on"]
    gw_ratio, gw_ok = ratio(on, raw, CAPACITY_RATIO_TARGET)
    prot_ratio, prot_ok = ratio(caps.get("resume_off"), caps.get("off"), PROTECTIONS_RATIO_TARGET)
    shipped_ratio, _ = ratio(on, caps.get("off"), PROTECTIONS_RATIO_TARGET)
    at_450 = on.row(450)
    p99_450 = at_450["ttft_ms"]["p99"] if at_450 else None
    d, t = proxy["direct"]["ttft_ms"], proxy["through"]["ttft_ms"]
    added_p50 = t["p50"] - d["p50"] if t["p50"] is not None and d["p50"] is not None else None
    added_p99 = t["p99"] - d["p99"] if t["p99"] is not None and d["p99"] is not None else None
    rss_kb = rss["per_stream"] / 1024
    stream_s = plan.max_tokens / PACE_TOKENS_PER_SECOND
    cpu_at = {key: cpu_per_1k(cap.row(common)) for key, cap in caps.items()}
    cpu_on, cpu_off = cpu_at.get("on"), cpu_at.get("off")
    cpu_ratio = f"{cpu_off / cpu_on:.0%}" if cpu_on and cpu_off else "n/a"
    by_backend = {r["backend"]: r for r in admission}
    retried = sum(r.get("attempts", 1) - 1 for cap in (*caps.values(), raw) for r in cap.rows)
    retried += proxy["through"].get("attempts", 1) - 1

    def load_text(key: str) -> str:
        return " / ".join(f"{x:.2f}" for x in loads[key]) if key in loads else "n/a"

    def adm(metric: str) -> str:
        return " / ".join(f"{by_backend[b][metric]:.0f}" if b in by_backend else "n/a"
                          for b in ("memory", "shared memory", "redis"))

    def replay_text(key: str) -> str:
        r = replay.get(key)
        if not r or r["replay_ms"]["p50"] is None:
            return "n/a"
        return f"{ms(r['replay_ms']['p50'])} ms ({r['events_per_s']:,.0f} events/s)"

    lines = [
        "# Streaming gateway benchmark",
        "",
        f"- Date: {started:%Y-%m-%d %H:%M} UTC (took {elapsed_s / 60:.1f} min)",
        f"- Machine: {machine()}",
        f"- Machine load: {background:.2f} cores busy just before the run"
        f"{' (not idle: expect worse numbers)' if background > BUSY_MACHINE_CORES else ''}; load average "
        f"(1 / 5 / 15 min) {load_text('start')} at the start, {load_text('end')} at the end (the benchmark's own "
        "processes count in it; per level, \"rest of machine\" is the CPU others used meanwhile); "
        f"{retried} load(s) run again after others used more than {INTERFERENCE_CORES} cores during them",
        f"- Command: `{command}` (source `{source_revision()}`)",
        f"- Load: {plan.max_tokens}-token streams at {PACE_TOKENS_PER_SECOND:.0f} tok/s ({stream_s:.0f} s each), "
        f"users ramped at {plan.rate:.0f}/s, each running streams back to back for {plan.hold_seconds:.0f} s after "
        "the ramp; one loopback source address per user; the load generator shares the same cores.",
        f"- Level passes: TTFT p99 ≤ {TTFT_P99_BUDGET_MS:.0f} ms, 0 errors, ≥ {MIN_TOKENS_DELIVERED:.0%} of demanded "
        "tokens delivered within the stream's expected duration + 1 s. TTFT is measured from opening the connection "
        "to the first token event. Capacity = highest passing level below the lowest failing one (ladder "
        f"{', '.join(map(str, plan.levels))}, then {plan.refine} bisection(s) of the bracket, to {LEVEL_STEP}s).",
        f"- Servers: gunicorn, {WORKERS} uvicorn workers (uvloop, httptools) each. Gateways run with rate limits "
        "set out of reach (every user reuses its address across levels): "
        f"{', '.join(f'{k}={v}' for k, v in GENEROUS_ENV.items())}. Logs: `{log_dir}`.",
        *(f"- Note: {note}" for note in notes),
        "",
        "## Summary",
        "",
        "| Measure | Measured | Target | |",
        "|---|---:|---:|---|",
        f"| Relay capacity, gateway with protections on (streams) | {on.bracket} | — | |",
        f"| Relay capacity, raw-ASGI ceiling (streams) | {raw.bracket} | — | |",
        f"| Capacity ratio gateway / raw | {gw_ratio} | ≥ {CAPACITY_RATIO_TARGET:.0%} | {verdict(gw_ok)} |",
        f"| TTFT p99 at 450 streams (gateway, protections on) | {ms(p99_450)} ms "
        f"| ≤ {TTFT_P99_AT_450_TARGET_MS:.0f} ms "
        f"| {verdict(p99_450 is not None and p99_450 <= TTFT_P99_AT_450_TARGET_MS)} |",
        f"| TTFT added by the gateway, p50 (100 streams) | {ms(added_p50)} ms | ≤ {ADDED_TTFT_P50_TARGET_MS:.0f} ms "
        f"| {verdict(added_p50 is not None and added_p50 <= ADDED_TTFT_P50_TARGET_MS)} |",
        f"| RSS per open stream | {rss_kb:.1f} KB | ≤ {RSS_PER_STREAM_TARGET_KB:.0f} KB "
        f"| {verdict(rss_kb <= RSS_PER_STREAM_TARGET_KB)} |",
        f"| Capacity with protections on (rate limit, slots, breaker, deadlines; resume off) / everything off "
        f"| {prot_ratio} | ≥ {PROTECTIONS_RATIO_TARGET:.0%} | {verdict(prot_ok)} |",
        f"| Capacity as shipped (protections and the local resume store) / everything off | {shipped_ratio} | — | |",
        f"| Server CPU ms per 1k tokens at {common} streams, protections on / off | {fmt_cpu(cpu_on)} / "
        f"{fmt_cpu(cpu_off)} (off/on = {cpu_ratio}) | — | |",
        f"| Admission cost per request p50, memory / shared memory / Redis | {adm('p50_us')} µs | — | |",
        f"| Admission cost per request p99, memory / shared memory / Redis | {adm('p99_us')} µs | — | |",
        "| Capacity, resume store Redis / local / off (streams) | "
        + " / ".join(caps[k].bracket if k in caps else "n/a" for k in ("redis", "on", "resume_off")) + " | — | |",
        f"| Replay of a finished {plan.max_tokens}-token stream from Last-Event-ID `<id>-0`, p50: local / Redis "
        f"| {replay_text('local')} / {replay_text('redis')} | — | |",
        "",
        "## 1. Relay capacity: gateway with protections on (`POST /stream`, built-in mock at 20 tok/s)",
        "",
        f"Configuration: {PROTECTIONS_ON.description}.",
        "",
        *capacity_table(on),
        "",
        "Tokens/s is measured over the hold window (all users active). Server CPU is user+system of gunicorn's "
        "master and workers (psutil) over the whole level, per 1k tokens received. Worker CPU is each worker's "
        f"average and peak ({SAMPLE_INTERVAL_S:g} s window) load, 1.00 = one core. Loadgen lag is how late the load "
        "generator's own 10 ms timer fired: when it is small, TTFT spikes are the server's. Per-stream TTFT over "
        "time is in the logs directory (`ttft-<server>-<level>.csv`). Rest of machine is CPU spent outside the "
        "servers, the load generator and the orchestrator: kernel network work, plus anything else running on the "
        "machine (a shared machine's other jobs make every number above worse).",
        "",
        "## 2. Ceiling: raw-ASGI SSE app (`loadtest/raw_asgi_app.py`, same events and pace)",
        "",
        *capacity_table(raw),
        "",
        "## 3. What the protections cost",
        "",
        (f"Quick mode: every configuration runs one level, the highest the protected gateway ran ({common} "
         "streams), so capacities above it are unresolved; CPU per token is the estimate there (on these CPU-bound "
         "cores, capacity scales with its inverse)." if plan.compare_budget == 1 else
         f"Every configuration runs the level the protected gateway reached ({common} streams), where CPU per "
         "token is compared; from there each climbs or descends to its own capacity."),
        "",
        f"| Configuration | Settings | Capacity (streams) | TTFT p50 / p99 ms at {common} | Server CPU ms / 1k tokens "
        f"at {common} | vs protections off | Result at {common} |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for config in (PROTECTIONS_ON, PROTECTIONS_OFF, RESUME_OFF, RESUME_REDIS):
        cap = caps.get(config.key)
        if cap is None:
            lines.append(f"| {config.title} | {config.description} | not run | | | | |")
            continue
        row = cap.row(common)
        cpu = cpu_at.get(config.key)
        rel = f"{cpu / cpu_off:.0%} CPU" if cpu and cpu_off else "—"
        ttft = f"{ms(row['ttft_ms']['p50'])} / {ms(row['ttft_ms']['p99'])}" if row else "n/a"
        lines.append(f"| {config.title} | {config.description} | {cap.bracket} | {ttft} | {fmt_cpu(cpu)} | {rel} "
                     f"| {result_text(row) if row else 'not run'} |")
    lines += ["", "The Redis configuration's server CPU includes redis-server's.", ""]
    for config in (PROTECTIONS_OFF, RESUME_OFF, RESUME_REDIS):
        if config.key in caps:
            lines += [f"### {config.title}", "", *capacity_table(caps[config.key]), ""]
    lines += [
        "## 4. Resumable streams: replay cost",
        "",
        f"{REPLAY_STREAMS} streams of {plan.max_tokens} tokens run to their end on the protected gateway (local "
        "store) and on the Redis one; then each is fetched once, one after another, with `GET /stream/{id}` and "
        "`Last-Event-ID: <id>-0` (everything after the status event: the tokens and `done`). Time runs from opening "
        "the connection to the `done` event.",
        "",
        "| Store | Replays | Events per replay | p50 ms | p90 ms | p99 ms | Events/s at p50 | Errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, name in (("local", "local (RESUME_DIR)"), ("redis", "Redis Streams")):
        r = replay.get(key)
        if r is None:
            lines.append(f"| {name} | not run | | | | | | |")
            continue
        eps = f"{r['events_per_s']:,.0f}" if r["events_per_s"] else "n/a"
        lines.append(f"| {name} | {r['replays']} of {r['produced']} | {r['events_per_replay']} "
                     f"| {ms(r['replay_ms']['p50'])} | {ms(r['replay_ms']['p90'])} | {ms(r['replay_ms']['p99'])} "
                     f"| {eps} | {', '.join(f'{k}: {v}' for k, v in r['errors'].items()) or 0} |")
    lines += [
        "",
        "## 5. Admission cost per request (`loadtest/admission_bench.py`, in process)",
        "",
        "`Admission.admit` + `take_slot` + `Ticket.release` on the objects `app.wiring.build_state` builds, "
        "requests rotating over 1,000 client addresses, nothing refused. Memory: one process; shared memory: the "
        "tables gunicorn's master creates (what `python -m app` runs); Redis: shared memory plus REDIS_URL (rate "
        "limit and per-client slots in Redis: three round trips per request, against the benchmark's own "
        "redis-server on the same cores).",
        "",
        *admission_markdown(admission).splitlines(),
        "",
        f"## 6. Proxy overhead (`/v1/chat/completions`, fake_openai at 20 tok/s, {plan.proxy_users} concurrent "
        f"streams of {plan.proxy_max_tokens} tokens, gateway with protections on)",
        "",
        "| Path | Streams | TTFT p50 ms | TTFT p99 ms | Tokens/s | Errors | Server CPU (cores) "
        "| Loadgen lag p99 ms | Rest of machine (cores) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label in ("direct", "through"):
        r = proxy[label]
        name = "straight to fake_openai" if label == "direct" else "through the gateway"
        cores = r["server_cpu_s"] / r["duration_s"]
        lines.append(f"| {name} | {r['streams']} | {ms(r['ttft_ms']['p50'])} | {ms(r['ttft_ms']['p99'])} "
                     f"| {r['steady_tokens_per_s']:,.0f} | {r['error_count']} | {cores:.2f} "
                     f"| {ms(r['loadgen_lag_ms']['p99'])} | {r['rest_cores']:.2f} |")
    lines += [
        f"| **added** | | **{ms(added_p50)}** | **{ms(added_p99)}** | | | | | |",
        "",
        "Both paths are warmed with the same concurrency first (so the gateway's upstream pool could hold a "
        "connection per stream). Server CPU covers fake_openai, plus the gateway on the path through it.",
        "",
        "## 7. Memory per open stream (protections on)",
        "",
        f"{rss['open']} of {rss['requested']} streams open (`/stream`, still relaying at 20 tok/s); RSS summed over "
        f"master + workers: {rss['before'] / 2**20:.1f} MiB before, {rss['during'] / 2**20:.1f} MiB while open, "
        f"**{rss_kb:.1f} KB per stream**. Errors while opening: {rss['errors'] or 0}.",
        "",
    ]
    if profiles:
        lines += profile_section(profiles)
    return "\n".join(lines)


def display_path(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


# --- main -----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> tuple[Plan, Path, float, bool]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true",
                   help="levels 450 and 1500, no bisection, one level per comparison (under 4 min)")
    p.add_argument("--levels", help="comma-separated concurrency levels, overriding the plan's ladder")
    p.add_argument("--refine", type=int, help="bisections of each capacity bracket, overriding the plan's")
    p.add_argument("--all-levels", action="store_true", help="run every ladder level (no search, no bisection)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help=f"first wait up to this long for background load below {BUSY_MACHINE_CORES} cores "
                   "(and as long before a level that other processes disturbed is run again; default 300 s there)")
    p.add_argument("--profile", action="store_true",
                   help="py-spy the gateway under the loads behind missed targets (extra runs, in the report)")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where the Markdown report is written")
    a = p.parse_args(argv)
    plan = QUICK if a.quick else FULL
    if a.levels:
        plan = replace(plan, levels=tuple(sorted(int(x) for x in a.levels.split(","))))
    if a.refine is not None:
        plan = replace(plan, refine=a.refine)
    plan = replace(plan, all_levels=a.all_levels, quiet_wait_s=a.wait_quiet or plan.quiet_wait_s)
    return plan, a.output, a.wait_quiet, a.profile


def level_seconds(plan: Plan, users: int) -> float:
    """How long one capacity level's load runs: ramp, hold, then the last streams finish."""
    return users / plan.rate + plan.hold_seconds + plan.max_tokens / PACE_TOKENS_PER_SECOND


def profile_misses(server: Server, plan: Plan, cap: Capacity) -> list[dict[str, Any]]:
    """The load where capacity ends (the first failing level) and 450 streams if its TTFT p99 missed."""
    levels = [cap.hi] if cap.hi else []
    at_450 = cap.row(450)
    if at_450 and (at_450["ttft_ms"]["p99"] or 0) > TTFT_P99_AT_450_TARGET_MS and 450 not in levels:
        levels.insert(0, 450)
    out = []
    for users in levels:
        argv = loadgen_argv(server.port, users=users, max_tokens=plan.max_tokens, rate=plan.rate,
                            hold_seconds=plan.hold_seconds)
        time.sleep(1.0)
        out.append(profile_load(server, argv, level_seconds(plan, users), f"protections on, {users} streams"))
    return out


def main(argv: list[str] | None = None) -> None:
    plan, output, wait_quiet, profile = parse_args(argv)
    command = " ".join(["python -m loadtest.bench", *(sys.argv[1:] if argv is None else argv)])
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by every server we start
    output = output if output.is_absolute() else ROOT / output
    log_dir = output.parent / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    background = wait_for_quiet(wait_quiet)
    if background > BUSY_MACHINE_CORES:
        log(f"warning: the machine is already busy ({background:.2f} cores) before the benchmark starts")
    loads = {"start": os.getloadavg()}
    started, t0 = datetime.now(UTC), time.monotonic()
    work_dir = Path(tempfile.mkdtemp(prefix="bench-"))
    caps: dict[str, Capacity] = {}
    replay: dict[str, Any] = {}
    notes: list[str] = []
    profiles: list[dict[str, Any]] = []
    redis_bin = redis_binary()
    if redis_bin is None:
        notes.append("no redis-server found: the Redis admission backend and resume store were not measured")
    try:
        with contextlib.ExitStack() as stack:
            redis = stack.enter_context(running(RedisServer(redis_bin, log_dir, work_dir / "redis"))) \
                if redis_bin else None
            log("admission cost per request (in process)")
            admission = measure_admission(plan, redis)
            # RSS gets an instance of its own: a fresh baseline, and the streams it aborts become orphaned
            # generations (resume on) that run on for ORPHAN_TIMEOUT_SECONDS - load no capacity level should see
            # (and that a graceful stop would wait for: this instance is killed instead).
            with running(gateway(log_dir, work_dir, "gateway_rss", **MOCK_ENV), kill=True) as gw:
                warm_up(gw)
                log(f"RSS: opening {plan.rss_streams} streams")
                rss = measure_rss(gw, plan)
            with running(gateway(log_dir, work_dir, "gateway_on", **MOCK_ENV)) as gw:
                warm_up(gw)
                caps["on"] = search_capacity(gw, plan)
                replay["local"] = measure_replay(gw, plan)
                if profile:
                    profiles += profile_misses(gw, plan, caps["on"])
            # Where the others start (and CPU per token is compared): the protected gateway's capacity; in quick
            # mode, the highest level it ran, so that the one level each comparison gets is a demanding one.
            on = caps["on"]
            common = max(r["users"] for r in on.rows) if plan.compare_budget == 1 else on.lo or plan.levels[0]
            with running(raw_app(log_dir)) as raw_server:
                warm_up(raw_server)
                raw = search_capacity(raw_server, plan, start=common)
            for config in (PROTECTIONS_OFF, RESUME_OFF, RESUME_REDIS):
                env = {**MOCK_ENV, **config.env}
                extra: tuple[Server, ...] = ()
                if config.needs_redis:
                    if redis is None:
                        continue
                    redis.command("FLUSHALL")
                    env["REDIS_URL"], extra = redis.url, (redis,)
                with running(gateway(log_dir, work_dir, f"gateway_{config.key}", **env)) as gw:
                    warm_up(gw)
                    caps[config.key] = search_capacity(gw, plan, start=common, budget=plan.compare_budget,
                                                       extra=extra)
                    if config.needs_redis:
                        replay["redis"] = measure_replay(gw, plan)
                    if profile and config is PROTECTIONS_OFF and on.hi and ratio(
                            on, caps[config.key], PROTECTIONS_RATIO_TARGET)[1] is not True:
                        # The same load as the protected gateway's profile: the difference is what they cost.
                        argv = loadgen_argv(gw.port, users=on.hi, max_tokens=plan.max_tokens, rate=plan.rate,
                                            hold_seconds=plan.hold_seconds)
                        time.sleep(1.0)
                        profiles.append(profile_load(gw, argv, level_seconds(plan, on.hi),
                                                     f"protections off, {on.hi} streams"))
            with running(fake_openai(log_dir)) as upstream:
                upstream_url = f"http://127.0.0.1:{upstream.port}/v1"
                with running(gateway(log_dir, work_dir, "gateway_proxy", UPSTREAM_URL=upstream_url)) as through:
                    proxy = measure_proxy(plan, upstream, through)
                    through_p50, direct_p50 = proxy["through"]["ttft_ms"]["p50"], proxy["direct"]["ttft_ms"]["p50"]
                    if profile and (through_p50 or 0.0) - (direct_p50 or 0.0) > ADDED_TTFT_P50_TARGET_MS:
                        argv = loadgen_argv(through.port, users=plan.proxy_users, rate=plan.rate,
                                            path="/v1/chat/completions", max_tokens=plan.proxy_max_tokens,
                                            hold_seconds=plan.proxy_hold_seconds)
                        seconds = (plan.proxy_users / plan.rate + plan.proxy_hold_seconds
                                   + plan.proxy_max_tokens / PACE_TOKENS_PER_SECOND)
                        profiles.append(profile_load(through, argv, seconds,
                                                     f"proxy, {plan.proxy_users} streams through the gateway"))
        loads["end"] = os.getloadavg()
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    report = render(plan=plan, command=command, started=started, elapsed_s=time.monotonic() - t0, caps=caps,
                    raw=raw, common=common, proxy=proxy, rss=rss, replay=replay, admission=admission,
                    log_dir=display_path(log_dir), background=background, loads=loads, notes=notes,
                    profiles=profiles)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report)
    print(report)
    log(f"report written to {output}")


if __name__ == "__main__":
    main()
