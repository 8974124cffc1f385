"""Admission cost per request, in process: `Admission.admit` + `take_slot` + `Ticket.release` on the real objects.

Run: `python -m loadtest.admission_bench [--redis-url redis://127.0.0.1:6379/0] [--requests 20000] [--json]`.
Each backend gets its state from `app.wiring.build_state`, exactly as a worker builds it:

- memory: one process, no gunicorn master (`instance_state` falls back to process memory);
- shared memory: the tables a gunicorn master creates before fork (`app.instance.create_shared`), attached
  through GATEWAY_SHARED_STATE as a worker attaches them - what `python -m app` runs with by default;
- redis: shared memory plus REDIS_URL, so the rate limit and per-client slots also go through Redis
  (one script per check, one ZREM per release: three round trips per request).

Requests rotate over `--clients` peer addresses (a real table, not one hot bucket), with limits set so
high that nothing is refused (the benchmark's gateways run with the same ones): every request takes the
admitted path, which is the one every stream pays. Timed per phase with perf_counter_ns on uvloop, after
a warm-up; CPU is this process's user+system time over the timed loop (with Redis the wall time also
waits on redis-server, which is another process on the same cores).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from time import perf_counter_ns
from typing import Any

import uvloop

# the benchmark's gateways run with these (loadtest.bench.plan.GENEROUS_ENV): nobody is refused
GENEROUS_LIMITS: dict[str, Any] = {
    "max_connections": 20000,
    "max_connections_per_client": 10000,
    "rate_limit_per_minute": 1_000_000_000.0,
    "rate_limit_burst": 1_000_000,
}
BACKENDS = ("memory", "shared memory", "redis")


def settings_for(redis_url: str | None) -> Any:
    from app.settings import Settings

    # Resumption has no part in admission; off, so building the state creates no store directory.
    return Settings(redis_url=redis_url, resume_enabled=False, **GENEROUS_LIMITS)


def scope_for(address: str) -> dict[str, Any]:
    return {
        "type": "http",
        "method": "POST",
        "path": "/stream",
        "raw_path": b"/stream",
        "query_string": b"",
        "headers": [(b"host", b"gateway"), (b"content-type", b"application/json")],
        "client": (address, 40000),
        "server": ("127.0.0.1", 8000),
        "scheme": "http",
        "http_version": "1.1",
    }


def percentile(ordered: list[int], q: float) -> float:
    """Nearest-rank percentile of sorted nanoseconds, in microseconds."""
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.999999) - 1))] / 1000


def summary(values: list[int]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50_us": percentile(ordered, 0.50),
        "p90_us": percentile(ordered, 0.90),
        "p99_us": percentile(ordered, 0.99),
        "mean_us": sum(ordered) / len(ordered) / 1000,
    }


async def measure(backend: str, redis_url: str | None, requests: int, clients: int, warmup: int) -> dict[str, Any]:
    from starlette.requests import Request

    from app.instance import ENV_VAR, create_shared
    from app.wiring import build_state

    os.environ.pop(ENV_VAR, None)
    settings = settings_for(redis_url if backend == "redis" else None)
    tables = create_shared(settings) if backend != "memory" else None  # publishes ENV_VAR, as the master does
    try:
        state = build_state(settings)
    finally:
        os.environ.pop(ENV_VAR, None)
    admission = state.admission
    scopes = [scope_for(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}") for i in range(clients)]
    admit_ns: list[int] = []
    slot_ns: list[int] = []
    release_ns: list[int] = []
    total_ns: list[int] = []
    cpu0 = 0.0
    try:
        for i in range(warmup + requests):
            if i == warmup:
                usage = resource.getrusage(resource.RUSAGE_SELF)
                cpu0 = usage.ru_utime + usage.ru_stime
            request = Request(scopes[i % clients])
            t0 = perf_counter_ns()
            ticket = await admission.admit(request)
            t1 = perf_counter_ns()
            await admission.take_slot(ticket)
            t2 = perf_counter_ns()
            await ticket.release()
            t3 = perf_counter_ns()
            if i >= warmup:
                admit_ns.append(t1 - t0)
                slot_ns.append(t2 - t1)
                release_ns.append(t3 - t2)
                total_ns.append(t3 - t0)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu_us = (usage.ru_utime + usage.ru_stime - cpu0) / requests * 1e6
        rate_storage = getattr(getattr(admission, "_rate_limiter", None), "storage", None)
        degraded = backend == "redis" and not all(
            getattr(part, "using_primary", True) for part in (admission._remote_slots, rate_storage)
        )
    finally:
        if state.redis is not None:
            await state.redis.aclose()
        if tables is not None:
            for table in (tables.rate_storage, tables.slots, tables.breaker_cell):
                table.close()
    if degraded:
        raise RuntimeError("Redis was unreachable during the run: the numbers would be the local fallback's")
    return {
        "backend": backend,
        "requests": requests,
        "clients": clients,
        **summary(total_ns),
        "cpu_us": cpu_us,
        "admit": summary(admit_ns),
        "take_slot": summary(slot_ns),
        "release": summary(release_ns),
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    out = [
        "| Backend | Requests | p50 µs | p90 µs | p99 µs | mean µs | CPU µs / request "
        "| admit p50 µs | take_slot p50 µs | release p50 µs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['backend']} | {r['requests']:,} | {r['p50_us']:.1f} | {r['p90_us']:.1f} | {r['p99_us']:.1f} "
            f"| {r['mean_us']:.1f} | {r['cpu_us']:.1f} | {r['admit']['p50_us']:.1f} "
            f"| {r['take_slot']['p50_us']:.1f} | {r['release']['p50_us']:.1f} |"
        )
    return "\n".join(out)


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for backend in BACKENDS:
        if backend == "redis" and not args.redis_url:
            continue
        n = args.redis_requests if backend == "redis" else args.requests
        rows.append(await measure(backend, args.redis_url, n, args.clients, min(args.warmup, n)))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument(
        "--redis-url",
        default=None,
        help="a real redis-server (its database is written to); unset: memory and shared memory only",
    )
    p.add_argument("--requests", type=int, default=20000, help="timed requests per in-process backend")
    p.add_argument("--redis-requests", type=int, default=5000, help="timed requests with Redis")
    p.add_argument("--clients", type=int, default=1000, help="distinct client addresses the requests rotate over")
    p.add_argument("--warmup", type=int, default=1000)
    p.add_argument("--json", action="store_true", help="one JSON line instead of a Markdown table")
    args = p.parse_args(argv)
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)  # plain in-process metrics (app is imported after this)
    rows = uvloop.run(run(args))
    sys.stdout.write((json.dumps({"event": "result", "rows": rows}) if args.json else markdown(rows)) + "\n")


if __name__ == "__main__":
    main()
