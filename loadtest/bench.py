"""One-command benchmark (DESIGN.md §9): relay capacity, the raw-ASGI ceiling, proxy overhead, RSS per stream.

Run: `python -m loadtest.bench [--quick] [--output loadtest/results/benchmark.md]`.
Starts every server it measures on free 127.0.0.1 ports, drives them with `loadtest.loadgen` in a
separate process (so starting servers and sampling psutil never steal its loop), stops them all and
prints a Markdown report, which it also writes to `--output`. Server logs go next to the report.

Phases, each with only its own servers running:
1. gateway on the built-in mock (20 tok/s): RSS per open stream, then capacity levels on `/stream`;
2. the raw-ASGI app (`loadtest.raw_asgi_app`, same events and pace): the same capacity levels;
3. fake_openai (20 tok/s), streamed straight and through a gateway (`UPSTREAM_URL`): TTFT added.
A level passes with TTFT p99 <= 300 ms, zero errors and >= 95% of demanded tokens delivered in
time; levels run in ascending order and, unless `--all-levels`, stop after the first failure.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = Path("loadtest/results/benchmark.md")

TTFT_P99_BUDGET_MS = 300.0  # a capacity level passes under this TTFT p99 ...
MIN_TOKENS_DELIVERED = 0.95  # ... with this share of demanded tokens delivered in time, and zero errors
TTFT_P99_AT_450_TARGET_MS = 100.0
CAPACITY_RATIO_TARGET = 0.70
ADDED_TTFT_P50_TARGET_MS = 2.0
RSS_PER_STREAM_TARGET_KB = 64.0
PACE_TOKENS_PER_SECOND = 20.0
WORKERS = 2
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
LOADGEN_TIMEOUT_S = 900.0
SAMPLE_INTERVAL_S = 0.5
BUSY_MACHINE_CORES = 0.2  # background load above this gets a warning in the report

# Benchmark-only gateway settings: admission and rate limits stay switched on (their cost per request is part of
# what is measured) but are set so high that no level is ever rejected by them. Every user reuses its address
# across levels, so the default 20 requests/minute per client would otherwise trip within the first level.
GENEROUS_ENV = {
    "MAX_CONNECTIONS": "20000",
    "MAX_CONNECTIONS_PER_CLIENT": "10000",
    "RATE_LIMIT_PER_MINUTE": "1000000000",
    "RATE_LIMIT_BURST": "1000000",
}


@dataclass(frozen=True, slots=True)
class Plan:
    levels: tuple[int, ...]
    hold_seconds: float  # cycling time after the ramp at each level
    max_tokens: int  # 200 tokens at 20 tok/s: 10 s streams
    rate: float  # stream arrivals per second during the ramp
    proxy_users: int
    proxy_max_tokens: int
    proxy_hold_seconds: float
    rss_streams: int
    rss_hold_seconds: float
    all_levels: bool


FULL = Plan(levels=(250, 450, 700, 1000, 1500, 2000), hold_seconds=20.0, max_tokens=200, rate=200.0,
            proxy_users=100, proxy_max_tokens=40, proxy_hold_seconds=10.0, rss_streams=500,
            rss_hold_seconds=4.0, all_levels=False)
# The hold stays one full stream long even in quick mode: only then do streams arrive while every user is active,
# which is where TTFT suffers; during the ramp a server is never at the level's concurrency.
QUICK = replace(FULL, levels=(250, 450, 1000), hold_seconds=10.0, proxy_hold_seconds=5.0, rss_hold_seconds=3.0)


# --- servers --------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A server process tree started for one phase; psutil views of the master and its workers."""

    def __init__(self, name: str, argv: list[str], *, port: int, env: dict[str, str], log_dir: Path,
                 workers: int, ready_path: str = "/health") -> None:
        self.name, self.port, self.workers, self.ready_path = name, port, workers, ready_path
        self.log_dir = log_dir
        self.log: IO[bytes] = open(log_dir / f"{name}.log", "wb")  # closed in stop()
        self.proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **env}, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
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

    def stop(self) -> None:
        if self.proc.poll() is None:
            children = self.master.children(recursive=True)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
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


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def gateway(log_dir: Path, metrics_dir: Path, name: str, **env: str) -> Server:
    port = free_port()
    multiproc = metrics_dir / name  # our own dir, removed at the end, instead of the app's default in /tmp
    full_env = {"HOST": "127.0.0.1", "PORT": str(port), "WEB_CONCURRENCY": str(WORKERS),
                "PROMETHEUS_MULTIPROC_DIR": str(multiproc), **GENEROUS_ENV, **env}
    return Server(name, [sys.executable, "-m", "app"], port=port, env=full_env, log_dir=log_dir, workers=WORKERS)


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


def measure_level(server: Server, plan: Plan, users: int) -> dict[str, Any]:
    sampler = CpuSampler(server)
    csv = server.log_dir / f"ttft-{server.name}-{users}.csv"  # per-stream TTFT over time, to tell stalls from drift
    r = run_load(loadgen_argv(server.port, users=users, max_tokens=plan.max_tokens, rate=plan.rate,
                              hold_seconds=plan.hold_seconds, ttft_csv=csv), sample=sampler)
    sampler.finish(r)
    r["delivered"] = r["tokens_in_time"] / r["tokens_demanded"] if r["tokens_demanded"] else 0.0
    p99 = r["ttft_ms"]["p99"]
    r["passed"] = (r["error_count"] == 0 and p99 is not None and p99 <= TTFT_P99_BUDGET_MS
                   and r["delivered"] >= MIN_TOKENS_DELIVERED and not r["restarted"])
    return r


def measure_capacity(server: Server, plan: Plan) -> list[dict[str, Any]]:
    rows = []
    for users in plan.levels:
        log(f"{server.name}: {users} concurrent streams")
        rows.append(measure_level(server, plan, users))
        log(f"  -> {summary_line(rows[-1])}")
        if not rows[-1]["passed"] and not plan.all_levels:
            break
        time.sleep(1.0)  # let the server close the last connections before the next level
    return rows


def capacity(rows: Sequence[dict[str, Any]]) -> int:
    """Highest level passed with every lower level passing too."""
    best = 0
    for r in rows:
        if not r["passed"]:
            break
        best = r["users"]
    return best


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


def measure_proxy(plan: Plan, upstream: Server, through: Server) -> dict[str, Any]:
    path = "/v1/chat/completions"
    warm_up(upstream, path, plan.proxy_users)
    warm_up(through, path, plan.proxy_users)  # the gateway's upstream pool holds one connection per stream
    results = {}
    for label, server in (("direct", upstream), ("through", through)):
        log(f"proxy overhead: {plan.proxy_users} streams {label}")
        sampler = CpuSampler(upstream) if server is upstream else CpuSampler(upstream, server)
        results[label] = run_load(loadgen_argv(server.port, users=plan.proxy_users, rate=plan.rate, path=path,
                                               max_tokens=plan.proxy_max_tokens, hold_seconds=plan.proxy_hold_seconds),
                                  sample=sampler)
        sampler.finish(results[label])
    return results


# --- report ---------------------------------------------------------------------------------------

def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def summary_line(r: dict[str, Any]) -> str:
    return (f"TTFT p50 {ms(r['ttft_ms']['p50'])} ms, p99 {ms(r['ttft_ms']['p99'])} ms, "
            f"{r['delivered']:.1%} tokens, {r['error_count']} errors, {result_text(r)}")


def result_text(r: dict[str, Any]) -> str:
    if r["restarted"]:
        return "FAIL (a server process exited during the level; see its log)"
    return "pass" if r["passed"] else "FAIL"


def capacity_table(rows: Sequence[dict[str, Any]], plan: Plan) -> list[str]:
    out = ["| Streams | Streams run | TTFT p50 ms | TTFT p99 ms | Tokens/s delivered | Tokens in time | Errors "
           "| Server CPU s / 1k tokens | Worker CPU avg/peak (cores) | Loadgen CPU (cores) | Loadgen lag p99 ms "
           "| Rest of machine (cores) | Result |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        per_1k = r["server_cpu_s"] / r["tokens_total"] * 1000 if r["tokens_total"] else float("nan")
        errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"
        out.append(
            f"| {r['users']} | {r['streams']} | {ms(r['ttft_ms']['p50'])} | {ms(r['ttft_ms']['p99'])} "
            f"| {r['steady_tokens_per_s']:,.0f} | {r['delivered']:.1%} | {errors} | {per_1k:.3f} "
            f"| {' + '.join(f'{avg:.2f}/{peak:.2f}' for avg, peak in r['worker_load'])} "
            f"| {r['loadgen_cpu_s'] / r['duration_s']:.2f} | {ms(r['loadgen_lag_ms']['p99'])} "
            f"| {r['rest_cores']:.2f} | {result_text(r)} |"
        )
    skipped = [n for n in plan.levels if n not in {r["users"] for r in rows}]
    if skipped:
        out.append(f"\nNot run (a lower level failed): {', '.join(map(str, skipped))}.")
    return out


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


def render(*, plan: Plan, command: str, started: datetime, elapsed_s: float, gw_rows: list[dict[str, Any]],
           raw_rows: list[dict[str, Any]], proxy: dict[str, Any], rss: dict[str, Any], log_dir: Path,
           background: float) -> str:
    gw_cap, raw_cap = capacity(gw_rows), capacity(raw_rows)
    ratio = gw_cap / raw_cap if raw_cap else None
    at_450 = next((r for r in gw_rows if r["users"] == 450), None)
    p99_450 = at_450["ttft_ms"]["p99"] if at_450 else None
    d, t = proxy["direct"]["ttft_ms"], proxy["through"]["ttft_ms"]
    added_p50 = t["p50"] - d["p50"] if t["p50"] is not None and d["p50"] is not None else None
    added_p99 = t["p99"] - d["p99"] if t["p99"] is not None and d["p99"] is not None else None
    rss_kb = rss["per_stream"] / 1024
    raw_topped_out = bool(raw_rows) and raw_cap == plan.levels[-1]
    stream_s = plan.max_tokens / PACE_TOKENS_PER_SECOND

    lines = [
        "# Streaming gateway benchmark",
        "",
        f"- Date: {started:%Y-%m-%d %H:%M} UTC (took {elapsed_s / 60:.1f} min)",
        f"- Machine: {machine()}; busy before the run: {background:.2f} cores"
        f"{' (not idle: expect worse numbers)' if background > BUSY_MACHINE_CORES else ''}",
        f"- Command: `{command}` (source `{source_revision()}`)",
        f"- Load: {plan.max_tokens}-token streams at {PACE_TOKENS_PER_SECOND:.0f} tok/s ({stream_s:.0f} s each), "
        f"users ramped at {plan.rate:.0f}/s, each running streams back to back for {plan.hold_seconds:.0f} s after "
        "the ramp; one loopback source address per user; the load generator shares the same cores.",
        f"- Level passes: TTFT p99 ≤ {TTFT_P99_BUDGET_MS:.0f} ms, 0 errors, ≥ {MIN_TOKENS_DELIVERED:.0%} of demanded "
        "tokens delivered within the stream's expected duration + 1 s. TTFT is measured from opening the connection "
        "to the first token event.",
        f"- Servers: gunicorn, {WORKERS} uvicorn workers (uvloop, httptools) each. Logs: `{log_dir}`.",
        "",
        "## Summary",
        "",
        "| Measure | Measured | Target | |",
        "|---|---:|---:|---|",
        f"| Relay capacity, gateway (max passing level) | {gw_cap} streams | — | |",
        f"| Relay capacity, raw-ASGI ceiling | {raw_cap} streams{' (every level passed)' if raw_topped_out else ''} "
        "| — | |",
        f"| Capacity ratio gateway / raw | {'n/a' if ratio is None else f'{ratio:.0%}'} "
        f"| ≥ {CAPACITY_RATIO_TARGET:.0%} | {verdict(ratio is not None and ratio >= CAPACITY_RATIO_TARGET)} |",
        f"| TTFT p99 at 450 streams (gateway) | {ms(p99_450)} ms | ≤ {TTFT_P99_AT_450_TARGET_MS:.0f} ms "
        f"| {verdict(p99_450 is not None and p99_450 <= TTFT_P99_AT_450_TARGET_MS)} |",
        f"| TTFT added by the gateway, p50 | {ms(added_p50)} ms | ≤ {ADDED_TTFT_P50_TARGET_MS:.0f} ms "
        f"| {verdict(added_p50 is not None and added_p50 <= ADDED_TTFT_P50_TARGET_MS)} |",
        f"| RSS per open stream | {rss_kb:.1f} KB | ≤ {RSS_PER_STREAM_TARGET_KB:.0f} KB "
        f"| {verdict(rss_kb <= RSS_PER_STREAM_TARGET_KB)} |",
        "",
    ]
    if raw_topped_out:
        lines += ["The raw app passed every level run, so its true ceiling is higher and the ratio is an upper "
                  "bound.", ""]
    lines += [
        "## 1. Relay capacity: gateway (`POST /stream`, built-in mock at 20 tok/s)",
        "",
        *capacity_table(gw_rows, plan),
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
        *capacity_table(raw_rows, plan),
        "",
        f"## 3. Proxy overhead (`/v1/chat/completions`, fake_openai at 20 tok/s, {plan.proxy_users} concurrent "
        f"streams of {plan.proxy_max_tokens} tokens)",
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
        "Both paths are warmed with the same concurrency first (the gateway keeps one pooled upstream connection "
        "per stream). Server CPU covers fake_openai, plus the gateway on the path through it.",
        "",
        "## 4. Memory per open stream",
        "",
        f"{rss['open']} of {rss['requested']} streams open (`/stream`, still relaying at 20 tok/s); RSS summed over "
        f"master + workers: {rss['before'] / 2**20:.1f} MiB before, {rss['during'] / 2**20:.1f} MiB while open, "
        f"**{rss_kb:.1f} KB per stream**. Errors while opening: {rss['errors'] or 0}.",
        "",
    ]
    return "\n".join(lines)


def display_path(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


# --- main -----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> tuple[Plan, Path]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="fewer levels and shorter holds (~2-3 minutes)")
    p.add_argument("--levels", help="comma-separated concurrency levels, overriding the plan's")
    p.add_argument("--all-levels", action="store_true", help="keep stepping after a level fails")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where the Markdown report is written")
    a = p.parse_args(argv)
    plan = QUICK if a.quick else FULL
    if a.levels:
        plan = replace(plan, levels=tuple(sorted(int(x) for x in a.levels.split(","))))
    return replace(plan, all_levels=a.all_levels), a.output


def main(argv: list[str] | None = None) -> None:
    plan, output = parse_args(argv)
    command = " ".join(["python -m loadtest.bench", *(sys.argv[1:] if argv is None else argv)])
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by every server we start
    output = output if output.is_absolute() else ROOT / output
    log_dir = output.parent / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    metrics_dir = Path(tempfile.mkdtemp(prefix="bench-metrics-"))
    started, t0 = datetime.now(UTC), time.monotonic()
    background = background_cores()
    if background > BUSY_MACHINE_CORES:
        log(f"warning: the machine is already busy ({background:.2f} cores) before the benchmark starts")
    mock = {"MOCK_TOKENS_PER_SECOND": str(PACE_TOKENS_PER_SECOND), "MOCK_FIRST_TOKEN_MS": "0"}
    try:
        with running(gateway(log_dir, metrics_dir, "gateway_mock", **mock)) as gw:
            warm_up(gw)
            log(f"RSS: opening {plan.rss_streams} streams")
            rss = measure_rss(gw, plan)
            gw_rows = measure_capacity(gw, plan)
        with running(raw_app(log_dir)) as raw:
            warm_up(raw)
            raw_rows = measure_capacity(raw, plan)
        with running(fake_openai(log_dir)) as upstream:
            upstream_url = f"http://127.0.0.1:{upstream.port}/v1"
            with running(gateway(log_dir, metrics_dir, "gateway_proxy", UPSTREAM_URL=upstream_url)) as through:
                proxy = measure_proxy(plan, upstream, through)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    report = render(plan=plan, command=command, started=started, elapsed_s=time.monotonic() - t0,
                    gw_rows=gw_rows, raw_rows=raw_rows, proxy=proxy, rss=rss, log_dir=display_path(log_dir),
                    background=background)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report)
    print(report)
    log(f"report written to {output}")


if __name__ == "__main__":
    main()
