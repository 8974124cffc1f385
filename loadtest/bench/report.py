"""The benchmark's Markdown report: the summary against the targets, every capacity table, the comparisons."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from loadtest.admission_bench import markdown as admission_markdown
from loadtest.bench.fleet import CHAT_PATH, FleetRounds
from loadtest.bench.measure import Capacity, cpu_per_1k, ms, result_text
from loadtest.bench.plan import (
    ADDED_TTFT_P50_TARGET_MS,
    BUSY_MACHINE_CORES,
    CAPACITY_RATIO_TARGET,
    CPU_RATIO_TARGET,
    FLEET_BALANCERS,
    FLEET_ENDPOINTS,
    GENEROUS_ENV,
    INTERFERENCE_CORES,
    LEVEL_STEP,
    MIN_TOKENS_DELIVERED,
    PACE_TOKENS_PER_SECOND,
    PROTECTIONS_OFF,
    PROTECTIONS_ON,
    PROTECTIONS_RATIO_TARGET,
    REDIS_CPU_RATIO_TARGET,
    REPLAY_STREAMS,
    RESUME_OFF,
    RESUME_REDIS,
    ROOT,
    RSS_PER_STREAM_TARGET_KB,
    SAMPLE_INTERVAL_S,
    TTFT_P99_AT_450_TARGET_MS,
    TTFT_P99_AT_1000_TARGET_MS,
    TTFT_P99_BUDGET_MS,
    WORKERS,
    Plan,
)
from loadtest.bench.profile import PROFILE_RATE_HZ
from loadtest.bench.rounds import BASELINE, RAW, Rounds, Spread, per_round_ratios
from loadtest.bench.side_by_side import SideRounds


def verdict(ok: bool | None) -> str:
    return "inconclusive" if ok is None else "met" if ok else "**missed**"


def capacity_table(cap: Capacity) -> list[str]:
    out = [
        "| Streams | Streams run | TTFT p50 ms | TTFT p99 ms | Tokens/s delivered | Tokens in time | Errors "
        "| Server CPU s / 1k tokens | Worker CPU avg/peak (cores) | Loadgen CPU (cores) | Loadgen lag p99 ms "
        "| Rest of machine (cores) | Load avg 1 min | Result |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
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
    out.append(f"Capacity: **{cap.bracket}**; levels in the order run: {', '.join(str(r['users']) for r in cap.rows)}.")
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


def source_revision(src: Path = ROOT) -> str:
    """The commit measured (`git rev-parse --short HEAD`); "dirty": uncommitted changes to tracked files were
    measured too."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "-C", str(src), *args], capture_output=True, text=True, timeout=10, check=False
            )
        except OSError:
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "unknown (not a git checkout)"
    return commit + (" dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = psutil.virtual_memory().total / 2**30
    return (
        f"{cpus} CPUs usable ({os.cpu_count()} online), {model}, {mem:.1f} GiB RAM; "
        f"Python {platform.python_version()} on {platform.platform()}"
    )


def spread_text(value: Spread | None, fmt: str) -> str:
    return "n/a" if value is None else value.text(fmt)


def render(
    *,
    plan: Plan,
    command: str,
    started: datetime,
    elapsed_s: float,
    caps: dict[str, Capacity],
    common: int,
    rounds: Rounds,
    proxy: dict[str, Any],
    rss: dict[str, Any],
    replay: dict[str, Any],
    admission: list[dict[str, Any]],
    log_dir: Path,
    background: float,
    loads: dict[str, tuple[float, float, float]],
    notes: list[str],
    profiles: list[dict[str, Any]],
    baseline_src: Path | None = None,
    fleet: FleetRounds | None = None,
    side: SideRounds | None = None,
) -> str:
    on, raw = caps["on"], caps[RAW]
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
    users = rounds.users
    shipped_cpu, redis_cpu = rounds.cpu_ratio("on"), rounds.cpu_ratio("redis")
    shipped_p99 = rounds.stat("on", "ttft_p99")
    by_backend = {r["backend"]: r for r in admission}
    # In quick mode the others' capacity rows are the rounds' rows: count each load once.
    loads_run = {id(r): r for cap in caps.values() for r in cap.rows}
    loads_run.update((id(r), r) for rows in rounds.rows.values() for r in rows)
    retried = sum(r.get("attempts", 1) - 1 for r in loads_run.values())
    retried += proxy["through"].get("attempts", 1) - 1

    def median_verdict(value: Spread | None, target: float) -> str:
        return verdict(None if value is None else value.median <= target)

    def load_text(key: str) -> str:
        return " / ".join(f"{x:.2f}" for x in loads[key]) if key in loads else "n/a"

    def adm(metric: str) -> str:
        return " / ".join(
            f"{by_backend[b][metric]:.0f}" if b in by_backend else "n/a" for b in ("memory", "shared memory", "redis")
        )

    def replay_text(key: str) -> str:
        r = replay.get(key)
        if not r or r["replay_ms"]["p50"] is None:
            return "n/a"
        return f"{ms(r['replay_ms']['p50'])} ms ({r['events_per_s']:,.0f} events/s)"

    lines = [
        "# Streaming gateway benchmark",
        "",
        *run_facts(command, started, elapsed_s),
        f"- Machine load: {background:.2f} cores busy just before the run"
        f"{' (not idle: expect worse numbers)' if background > BUSY_MACHINE_CORES else ''}; load average "
        f"(1 / 5 / 15 min) {load_text('start')} at the start, {load_text('end')} at the end (the benchmark's own "
        'processes count in it; per level, "rest of machine" is the CPU others used meanwhile); '
        f"{retried} load(s) run again after others used more than {INTERFERENCE_CORES} cores during them",
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
        *(side_summary_rows(side) if side is not None else []),
        f"| Server CPU per delivered token, gateway as shipped / raw ASGI app, interleaved rounds ({users} streams, "
        f"one configuration after another, median of {len(rounds.orders)} rounds, min–max) "
        f"| {spread_text(shipped_cpu, '.2f')} "
        f"| ≤ {CPU_RATIO_TARGET:g} | {median_verdict(shipped_cpu, CPU_RATIO_TARGET)} |",
        f"| Server CPU per delivered token, resume store Redis / raw ASGI app (interleaved rounds) "
        f"| {spread_text(redis_cpu, '.2f')} | ≤ {REDIS_CPU_RATIO_TARGET:g} "
        f"| {median_verdict(redis_cpu, REDIS_CPU_RATIO_TARGET)} |",
        f"| Server CPU µs per delivered token at {users} streams (rounds' median): as shipped / protections off / "
        "raw ASGI | "
        + " / ".join(spread_text(rounds.stat(k, "cpu_us"), ".1f") for k in ("on", "off", RAW))
        + " | — | |",
        f"| TTFT p99 at {users} streams, gateway as shipped (rounds' median) | {spread_text(shipped_p99, '.1f')} ms "
        f"| ≤ {TTFT_P99_AT_1000_TARGET_MS:.0f} ms at 1000 "
        f"| {median_verdict(shipped_p99, TTFT_P99_AT_1000_TARGET_MS) if users == 1000 else '—'} |",
        f"| Relay capacity, gateway with protections on (streams) | {on.bracket} | — | |",
        f"| Relay capacity, raw-ASGI ceiling (streams) | {raw.bracket} | — | |",
        f"| Capacity ratio gateway / raw | {gw_ratio} | ≥ {CAPACITY_RATIO_TARGET:.0%} | {verdict(gw_ok)} |",
        f"| TTFT p99 at 450 streams (gateway, protections on) | {ms(p99_450)} ms "
        f"| ≤ {TTFT_P99_AT_450_TARGET_MS:.0f} ms "
        f"| {verdict(None if p99_450 is None else p99_450 <= TTFT_P99_AT_450_TARGET_MS)} |",
        f"| TTFT added by the gateway, p50 (100 streams) | {ms(added_p50)} ms | ≤ {ADDED_TTFT_P50_TARGET_MS:.0f} ms "
        f"| {verdict(None if added_p50 is None else added_p50 <= ADDED_TTFT_P50_TARGET_MS)} |",
        f"| RSS per open stream | {rss_kb:.1f} KB | ≤ {RSS_PER_STREAM_TARGET_KB:.0f} KB "
        f"| {verdict(rss_kb <= RSS_PER_STREAM_TARGET_KB)} |",
        f"| Capacity with protections on (rate limit, slots, breaker, deadlines; resume off) / everything off "
        f"| {prot_ratio} | ≥ {PROTECTIONS_RATIO_TARGET:.0%} | {verdict(prot_ok)} |",
        f"| Capacity as shipped (protections and the local resume store) / everything off | {shipped_ratio} | — | |",
        f"| Admission cost per request p50, memory / shared memory / Redis | {adm('p50_us')} µs | — | |",
        f"| Admission cost per request p99, memory / shared memory / Redis | {adm('p99_us')} µs | — | |",
        "| Capacity, resume store Redis / local / off (streams) | "
        + " / ".join(caps[k].bracket if k in caps else "n/a" for k in ("redis", "on", "resume_off"))
        + " | — | |",
        f"| Replay of a finished {plan.max_tokens}-token stream from Last-Event-ID `<id>-0`, p50: local / Redis "
        f"| {replay_text('local')} / {replay_text('redis')} | — | |",
        *([fleet_summary_row(fleet)] if fleet is not None else []),
        "",
        *(side_by_side_section(side) if side is not None else []),
        *rounds_section(rounds, caps),
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
        (
            f"Quick mode: the other configurations (and the raw app) ran only in the interleaved rounds, at {users} "
            "streams, so their capacity says only whether that level passed; CPU per token is the estimate there (on "
            "these CPU-bound cores, capacity scales with its inverse)."
            if not plan.search_comparisons
            else f"Each configuration searches its own capacity, starting at the level the protected gateway reached "
            f"({common} streams). CPU per token comes from the interleaved rounds at {users} streams (above), "
            "its ratio to protections off taken within each round."
        ),
        "",
        f"| Configuration | Settings | Capacity (streams) | Server CPU µs / delivered token at {users}, median "
        "(min–max) | vs protections off, median (min–max) |",
        "|---|---|---:|---:|---:|",
    ]
    for config in (PROTECTIONS_ON, PROTECTIONS_OFF, RESUME_OFF, RESUME_REDIS):
        cap = caps.get(config.key)
        if cap is None:
            lines.append(f"| {config.title} | {config.description} | not run | | |")
            continue
        lines.append(
            f"| {config.title} | {config.description} | {cap.bracket} "
            f"| {spread_text(rounds.stat(config.key, 'cpu_us'), '.1f')} "
            f"| {spread_text(rounds.cpu_ratio(config.key, 'off'), '.0%')} |"
        )
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
        lines.append(
            f"| {name} | {r['replays']} of {r['produced']} | {r['events_per_replay']} "
            f"| {ms(r['replay_ms']['p50'])} | {ms(r['replay_ms']['p90'])} | {ms(r['replay_ms']['p99'])} "
            f"| {eps} | {', '.join(f'{k}: {v}' for k, v in r['errors'].items()) or 0} |"
        )
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
        lines.append(
            f"| {name} | {r['streams']} | {ms(r['ttft_ms']['p50'])} | {ms(r['ttft_ms']['p99'])} "
            f"| {r['steady_tokens_per_s']:,.0f} | {r['error_count']} | {cores:.2f} "
            f"| {ms(r['loadgen_lag_ms']['p99'])} | {r['rest_cores']:.2f} |"
        )
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
    if fleet is not None:
        lines += fleet_section(fleet)
    if profiles:
        lines += profile_section(profiles)
    if baseline_src is not None:
        lines += baseline_section(baseline_src, rounds, caps)
    return "\n".join(lines)


def run_facts(command: str, started: datetime, elapsed_s: float) -> list[str]:
    return [
        f"- Date: {started:%Y-%m-%d %H:%M} UTC (took {elapsed_s / 60:.1f} min)",
        f"- Command: `{command}`",
        f'- Source: `{source_revision()}` (`git rev-parse --short HEAD`; "dirty": with uncommitted changes)',
        f"- Machine: {machine()}",
    ]


def fleet_summary_row(fleet: FleetRounds) -> str:
    values = " / ".join(spread_text(fleet.stat(b, "in_flight_max_mean"), ".2f") for b in FLEET_BALANCERS)
    return (
        f"| Fleet with one slow model server of {len(FLEET_ENDPOINTS)}: streams in flight per endpoint, max / mean, "
        f"{' / '.join(FLEET_BALANCERS)} ({fleet.users} streams) | {values} | — | |"
    )


def fleet_section(fleet: FleetRounds) -> list[str]:
    """Least in flight against round robin over the same fleet, in the same interleaved rounds."""
    order = "; ".join(f"round {i}: {' '.join(keys)}" for i, keys in enumerate(fleet.orders, start=1))
    paces = ", ".join(
        f"{e.name} {e.tokens_per_second:g} tok/s"
        + (f" + {e.first_token_ms:g} ms to the first token" if e.first_token_ms else "")
        for e in FLEET_ENDPOINTS
    )
    out = [
        "## Fleet: least in flight against round robin, one slow model server",
        "",
        f"One gateway ({WORKERS} workers, as shipped otherwise) in front of {len(FLEET_ENDPOINTS)} fake model servers "
        f"(`loadtest/fake_openai.py`: {paces}) listed in UPSTREAM_URL, {fleet.users} concurrent `{CHAT_PATH}` "
        f"streams of {fleet.max_tokens} tokens. Each balancer (UPSTREAM_BALANCE) ran once per round on a fresh "
        f"gateway, interleaved ({order}); each figure is the median over the rounds, min–max in parentheses. "
        "`least_in_flight` (the default) sends a new stream to the endpoint with the fewest streams in flight, "
        "counted for the whole instance; `round_robin` takes the endpoints in turn in each worker, as a naive "
        "router does: the baseline, not a recommendation. In flight: each fake's streams being generated, sampled "
        "every 0.5 s while every user was active (max / mean 1.00: even). Served: the streams each fake got.",
        "",
        "| Balancer | Streams served, " + " / ".join(e.name for e in FLEET_ENDPOINTS) + " | In flight max / mean "
        "| Served max / mean | Share to the slow endpoint | TTFT p50 ms | TTFT p99 ms | Tokens in time | Tokens/s "
        "| Errors | CPU of each fake (cores) | Rest of machine (cores) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in FLEET_BALANCERS:
        served = " / ".join(spread_text(fleet.served(b, i), ".0f") for i in range(len(FLEET_ENDPOINTS)))
        fake_cores = " / ".join(spread_text(fleet.fake_cores(b, i), ".2f") for i in range(len(FLEET_ENDPOINTS)))
        out.append(
            f"| `{b}` | {served} | **{spread_text(fleet.stat(b, 'in_flight_max_mean'), '.2f')}** "
            f"| {spread_text(fleet.stat(b, 'served_max_mean'), '.2f')} "
            f"| {spread_text(fleet.stat(b, 'slow_share'), '.1%')} "
            f"| {spread_text(fleet.stat(b, 'ttft_p50'), '.1f')} | {spread_text(fleet.stat(b, 'ttft_p99'), '.1f')} "
            f"| {spread_text(fleet.stat(b, 'delivered'), '.1%')} "
            f"| {spread_text(fleet.stat(b, 'tokens_per_s'), ',.0f')} | {fleet.errors(b)} "
            f"| {fake_cores} | {spread_text(fleet.stat(b, 'rest_cores'), '.2f')} |"
        )
    out += [
        "",
        "Tokens in time: the share of demanded tokens that arrived within the fast pace's stream duration + 1 s; "
        "a stream on the slow endpoint cannot make it, so the share falls with what the slow endpoint got. "
        "The fakes share the cores with the gateway, the load generator and whatever else runs on the machine: "
        "the CPU of each fake and the rest of the machine (what other processes used meanwhile) tell whether a "
        "TTFT difference is the balancer's or the machine's. Tokens/s: delivered while every user was active; "
        "streams kept off the slow endpoint finish sooner, so the same users ask for more tokens per second, and "
        "on cores the gateway shares that costs TTFT.",
        "",
    ]
    return out


def render_fleet(plan: Plan, *, command: str, started: datetime, elapsed_s: float, fleet: FleetRounds) -> str:
    """`--fleet`: the fleet section alone."""
    return "\n".join(
        [
            "# Streaming gateway benchmark: the fleet section",
            "",
            *run_facts(command, started, elapsed_s),
            f"- Rounds: {plan.rounds}; load: streams ramped at {plan.rate:.0f}/s, each user running streams back to "
            f"back for {plan.fleet_hold_seconds:g} s after the ramp; the load generator shares the same cores.",
            "",
            *fleet_section(fleet),
        ]
    )


def display_path(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def profile_section(profiles: list[dict[str, Any]]) -> list[str]:
    out = ["## 8. Profiles (py-spy, every worker, non-idle samples)", ""]
    for p in profiles:
        out += [f"### {p['label']}", ""]
        if "error" in p:
            out += [p["error"], ""]
            continue
        busy = p["samples"] / PROFILE_RATE_HZ / p["seconds"]
        out += [
            f"`{display_path(p['file'])}`: {p['samples']:,} samples (≈ {busy:.2f} cores busy in Python-visible "
            f"frames over {p['seconds']:.0f} s); TTFT p50 / p99 during the profile {ms(p['ttft_ms']['p50'])} / "
            f"{ms(p['ttft_ms']['p99'])} ms (py-spy itself costs some CPU). `Runner.run` self time is the event "
            "loop's C code (uvloop: polling, socket I/O, callbacks).",
            "",
            "| Self | Frame | | Inclusive | Frame |",
            "|---:|---|---|---:|---|",
        ]
        for i in range(max(len(p["self"]), len(p["inclusive"]))):
            s = p["self"][i] if i < len(p["self"]) else ("", 0.0)
            n = p["inclusive"][i] if i < len(p["inclusive"]) else ("", 0.0)
            out.append(f"| {s[1]:.1%} | `{s[0]}` | | {n[1]:.1%} | `{n[0]}` |")
        out.append("")
    return out


def rounds_section(rounds: Rounds, caps: dict[str, Capacity]) -> list[str]:
    """Every configuration in the interleaved rounds: median (min-max) of each measure, the ratio to raw first."""
    order = "; ".join(f"round {i}: {' '.join(keys)}" for i, keys in enumerate(rounds.orders, start=1))
    out = [
        "## Interleaved rounds: server CPU per delivered token, one configuration after another",
        "",
        f"Every configuration ran {rounds.users} concurrent streams on a fresh server (warmed up first) once per "
        f"round, the configurations interleaved ({order}), so that all of them saw the same machine: loads minutes "
        "apart on a shared machine differ by more than the configurations do. Each figure is the median over the "
        "rounds, the spread (min–max) in parentheses. Server CPU is user+system of the server's whole process tree "
        "(psutil, from /proc; redis-server's included for the Redis store) over the level, per token the clients "
        "received. The ratio to the raw ASGI app is taken within each round, then its median and spread.",
        "",
        "| Configuration | **CPU per token / raw ASGI** | Server CPU µs / delivered token | Capacity (streams) "
        "| TTFT p50 ms | TTFT p99 ms | Tokens delivered in time | Levels passed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, title in rounds.titles.items():
        ratio_text = "1 (reference)" if key == RAW else f"**{spread_text(rounds.cpu_ratio(key), '.2f')}**"
        cap = caps.get(key)
        passed, run = rounds.passed(key)
        out.append(
            f"| {title} | {ratio_text} | {spread_text(rounds.stat(key, 'cpu_us'), '.1f')} "
            f"| {cap.bracket if cap else 'not measured'} | {spread_text(rounds.stat(key, 'ttft_p50'), '.1f')} "
            f"| {spread_text(rounds.stat(key, 'ttft_p99'), '.1f')} "
            f"| {spread_text(rounds.stat(key, 'delivered'), '.1%')} | {passed} of {run} |"
        )
    out += [
        "",
        "Every level of the rounds (server, round, result) is in the logs directory "
        "(`ttft-<configuration>_round<N>-<streams>.csv`).",
        "",
    ]
    return out


def side_summary_rows(side: SideRounds) -> list[str]:
    """The summary's headline: the shipped gateway (and the Redis store) against raw, side by side."""
    shipped, redis = side.cpu_ratio("on"), side.cpu_ratio("redis")
    counted = len(per_round_ratios(side.values("on", "cpu_us"), side.values(RAW, "cpu_us"))) if shipped else 0

    def verdict_of(value: Spread | None, target: float) -> str:
        return verdict(None if value is None else value.median <= target)

    return [
        f"| **Server CPU per delivered token, gateway as shipped / raw ASGI app, side by side** (every configuration "
        f"at once, {side.users} streams each, median of the {counted} of {len(side.orders)} rounds that count "
        "for both, min–max) "
        f"| **{spread_text(shipped, '.2f')}** | ≤ {CPU_RATIO_TARGET:g} | {verdict_of(shipped, CPU_RATIO_TARGET)} |",
        f"| Server CPU per delivered token, resume store Redis / raw ASGI app, side by side "
        f"| {spread_text(redis, '.2f')} | ≤ {REDIS_CPU_RATIO_TARGET:g} "
        f"| {verdict_of(redis, REDIS_CPU_RATIO_TARGET)} |",
    ]


def side_by_side_section(side: SideRounds) -> list[str]:
    """Every configuration at once: median (min-max) of each measure over the rounds, the ratio to raw first."""
    order = "; ".join(f"round {i}: {' '.join(keys)}" for i, keys in enumerate(side.orders, start=1))
    out = [
        "## Side-by-side rounds: server CPU per delivered token, every configuration at once (the headline)",
        "",
        f"In each round every configuration ran at the same time, each on a fresh server of its own (warmed up "
        f"first) under a load generator of its own: {side.users} streams each, from source addresses of its own "
        f"(started in the order {order}). Once every load's ramp had ended and the loads had settled, one common "
        f"window of {side.window_s:g} s: server CPU is user+system of each server's whole process tree (psutil, from "
        "/proc; redis-server's included for the Redis store) over the window, divided by the tokens that server's "
        "clients received over the same window (the load generator's counts at the window's two ends). Whatever "
        "the shared machine did during the window, it did to every configuration, so the ratio to the raw ASGI app, "
        "taken within each round, does not carry the drift between loads minutes apart that the interleaved rounds "
        "do. These ratios hold at this concurrency with every configuration sharing the 2 cores; the interleaved "
        "rounds measure each configuration alone, at their own concurrency (`--at`), where a server's own saturation "
        "shows. "
        "TTFT and tokens delivered in time are over each whole load (ramp included). A configuration's round is "
        "void (listed below, left out of its medians) when its load had errors, delivered less than "
        f"{MIN_TOKENS_DELIVERED:.0%} of the demanded tokens in time, a server process exited, or the window was not "
        "inside its steady phase.",
        "",
        "| Configuration | **CPU per token / raw ASGI** | Server CPU µs / delivered token | TTFT p50 ms "
        "| TTFT p99 ms | Tokens delivered in time | Rounds counted |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, title in side.titles.items():
        ratio_text = "1 (reference)" if key == RAW else f"**{spread_text(side.cpu_ratio(key), '.2f')}**"
        passed, run = side.passed(key)
        if key != RAW and RAW in side.rows:  # the ratio counts only the rounds where raw counted too
            passed = len(per_round_ratios(side.values(key, "cpu_us"), side.values(RAW, "cpu_us")))
        out.append(
            f"| {title} | {ratio_text} | {spread_text(side.stat(key, 'cpu_us'), '.1f')} "
            f"| {spread_text(side.stat(key, 'ttft_p50'), '.1f')} | {spread_text(side.stat(key, 'ttft_p99'), '.1f')} "
            f"| {spread_text(side.stat(key, 'delivered'), '.1%')} | {passed} of {run} |"
        )
    keys = list(side.titles)
    out += [
        "",
        "Per round: server CPU µs per delivered token (ratio to raw), and the machine over the window (busy cores, "
        "all of them; rest: what processes other than the servers, the load generators and the benchmark used).",
        "",
        "| Round | " + " | ".join(f"`{k}`" for k in keys) + " | Busy cores | Rest cores |",
        "|---:|" + "---:|" * (len(keys) + 2),
    ]
    for i, machine in enumerate(side.machine):
        raw_cpu = side.values(RAW, "cpu_us")[i] if RAW in side.rows else None
        cells = []
        for key in keys:
            cpu = side.values(key, "cpu_us")[i]
            rel = f" ({cpu / raw_cpu:.2f})" if cpu is not None and raw_cpu and key != RAW else ""
            cells.append("void" if cpu is None else f"{cpu:.1f}{rel}")
        out.append(f"| {i + 1} | {' | '.join(cells)} | {machine['busy_cores']:.2f} | {machine['rest_cores']:.2f} |")
    voided = side.voided()
    out += ["", *(f"- Void: round {i}, `{key}`: {reason}" for i, key, reason in voided)]
    return [*out, *([""] if voided else [])]


def render_side_by_side(plan: Plan, *, command: str, started: datetime, elapsed_s: float, side: SideRounds) -> str:
    """`--side-by-side`: those rounds alone."""
    return "\n".join(
        [
            "# Streaming gateway benchmark: side-by-side rounds",
            "",
            *run_facts(command, started, elapsed_s),
            f"- Rounds: {plan.rounds}; load per configuration: {plan.side_users} users ramped at {plan.rate:.0f}/s, "
            f"{plan.max_tokens}-token streams at {PACE_TOKENS_PER_SECOND:.0f} tok/s back to back; the load "
            "generators share the same cores.",
            "",
            "| Measure | Measured | Target | |",
            "|---|---:|---:|---|",
            *side_summary_rows(side),
            "",
            *side_by_side_section(side),
        ]
    )


def baseline_section(src: Path, rounds: Rounds, caps: dict[str, Capacity]) -> list[str]:
    """`--baseline-src`: the shipped configuration from another checkout (A) and from this tree (B), in the same
    interleaved rounds."""
    out = [
        "## Against another checkout (`--baseline-src`)",
        "",
        f"The gateway as shipped ({PROTECTIONS_ON.description}; built-in mock at {PACE_TOKENS_PER_SECOND:g} tok/s), "
        f"A from `{src}` (source `{source_revision(src)}`), B from this tree (source `{source_revision()}`), each "
        "started with that checkout as working directory and PYTHONPATH; both ran in every interleaved round above "
        f"(A as `{BASELINE}`, B as `on`) at {rounds.users} streams.",
        "",
        "| Round | A: CPU µs / token | B: CPU µs / token | B / A | A: TTFT p50 / p99 ms | B: TTFT p50 / p99 ms |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for i, (a, b) in enumerate(zip(rounds.rows.get(BASELINE, []), rounds.rows.get("on", []), strict=False), 1):
        cpu_a, cpu_b = cpu_per_1k(a), cpu_per_1k(b)
        rel = f"{cpu_b / cpu_a:.3f}" if cpu_a and cpu_b is not None else "n/a"
        out.append(
            f"| {i} | {fmt_cpu(cpu_a)} | {fmt_cpu(cpu_b)} | {rel} "
            f"| {ms(a['ttft_ms']['p50'])} / {ms(a['ttft_ms']['p99'])} "
            f"| {ms(b['ttft_ms']['p50'])} / {ms(b['ttft_ms']['p99'])} |"
        )
    cap_text, _ = ratio(caps.get("on"), caps.get(BASELINE), 1.0)
    out += [
        "",
        "| Measure | A (baseline) median (min–max) | B (this tree) median (min–max) | B / A |",
        "|---|---:|---:|---:|",
        f"| Server CPU µs per delivered token at {rounds.users} streams "
        f"| {spread_text(rounds.stat(BASELINE, 'cpu_us'), '.1f')} | {spread_text(rounds.stat('on', 'cpu_us'), '.1f')} "
        f"| {spread_text(rounds.cpu_ratio('on', BASELINE), '.3f')} |",
        f"| TTFT p99 ms at {rounds.users} streams | {spread_text(rounds.stat(BASELINE, 'ttft_p99'), '.1f')} "
        f"| {spread_text(rounds.stat('on', 'ttft_p99'), '.1f')} | — |",
        f"| Capacity (streams) "
        f"| {caps[BASELINE].bracket if BASELINE in caps else 'n/a'} | {caps['on'].bracket} | {cap_text} |",
        "",
        "B / A below 1 for CPU per token (above 1 for capacity) means this tree is cheaper than the baseline. The CPU "
        "ratio is taken within each round; the capacities come from one search each, minutes apart (full run), or "
        "only from the rounds' level (quick): compare CPU per token.",
        "",
    ]
    return out
