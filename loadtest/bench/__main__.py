"""`python -m loadtest.bench`: parse the options, run every phase with only its own servers running, write the
report (see loadtest/bench/__init__.py)."""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import loadtest.bench
from loadtest.bench.fleet import measure_fleet
from loadtest.bench.measure import (
    Capacity,
    loadgen_argv,
    measure_admission,
    measure_proxy,
    measure_replay,
    measure_rss,
    search_capacity,
    wait_for_quiet,
    warm_up,
)
from loadtest.bench.plan import (
    ADDED_TTFT_P50_TARGET_MS,
    BUSY_MACHINE_CORES,
    DEFAULT_FLEET_OUTPUT,
    DEFAULT_OUTPUT,
    DEFAULT_SIDE_OUTPUT,
    FULL,
    MOCK_ENV,
    PACE_TOKENS_PER_SECOND,
    PROTECTIONS_OFF,
    PROTECTIONS_ON,
    PROTECTIONS_RATIO_TARGET,
    QUICK,
    RESUME_OFF,
    RESUME_REDIS,
    ROOT,
    TTFT_P99_AT_450_TARGET_MS,
    Plan,
    log,
)
from loadtest.bench.profile import profile_load
from loadtest.bench.report import display_path, ratio, render, render_fleet, render_side_by_side
from loadtest.bench.rounds import BASELINE, RAW, Contestant, measure_rounds
from loadtest.bench.servers import Server, fake_openai, gateway, gateway_from, raw_app, running, watched
from loadtest.bench.side_by_side import measure_side_by_side
from loadtest.harness.errors import HarnessError
from loadtest.harness.redis import RedisServer


def parse_args(argv: list[str] | None) -> tuple[Plan, Path, float, bool, Path | None]:
    description = (loadtest.bench.__doc__ or "").splitlines()[0]
    p = argparse.ArgumentParser(prog="python -m loadtest.bench", description=description)
    p.add_argument(
        "--quick",
        action="store_true",
        help="levels 450 and 1500 for the shipped gateway, no bisection, 2 rounds; the other "
        "configurations run only in the rounds",
    )
    p.add_argument(
        "--levels",
        help="comma-separated concurrency levels, overriding the plan's ladder (the rounds "
        "then run where the shipped gateway's search ended, unless --at says otherwise)",
    )
    p.add_argument("--refine", type=int, help="bisections of each capacity bracket, overriding the plan's")
    p.add_argument("--all-levels", action="store_true", help="run every ladder level (no search, no bisection)")
    p.add_argument("--rounds", type=int, help="interleaved rounds of every configuration (full run 3, quick 2)")
    p.add_argument(
        "--at",
        type=int,
        metavar="STREAMS",
        help="concurrency of the interleaved rounds (default 1000; with --levels, where the search ended)",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help=f"first wait up to this long for background load below {BUSY_MACHINE_CORES} cores "
        "(and as long before a level that other processes disturbed is run again; default 300 s there)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the gateway under the loads behind missed targets (extra runs, in the report)",
    )
    p.add_argument(
        "--fleet",
        action="store_true",
        help="only the fleet section: 3 fake model servers (one slow) behind one gateway, least_in_flight against "
        "round_robin in interleaved rounds (the full and quick runs include it)",
    )
    p.add_argument(
        "--fleet-streams",
        type=int,
        metavar="STREAMS",
        help=f"concurrent streams of the fleet section (full run {FULL.fleet_users}, quick {QUICK.fleet_users})",
    )
    p.add_argument(
        "--side-by-side",
        action="store_true",
        help="only the side-by-side rounds: every configuration at once, server CPU per delivered token over one "
        "common window (the full and quick runs include them)",
    )
    p.add_argument(
        "--side-by-side-streams",
        type=int,
        metavar="STREAMS",
        help=f"concurrent streams of each configuration in the side-by-side rounds (default {FULL.side_users}; "
        "all of them run at once on the same cores)",
    )
    p.add_argument(
        "--output",
        type=Path,
        default=None,
        help=f"where the Markdown report is written [{DEFAULT_OUTPUT}; --fleet: {DEFAULT_FLEET_OUTPUT}; "
        f"--side-by-side: {DEFAULT_SIDE_OUTPUT}]",
    )
    p.add_argument(
        "--baseline-src",
        type=Path,
        metavar="DIR",
        help="also measure the shipped configuration from the checkout DIR (e.g. `git worktree add "
        "/tmp/base <commit>`) in every round, and report it against this tree's with the ratios",
    )
    a = p.parse_args(argv)
    plan = QUICK if a.quick else FULL
    if a.levels:
        plan = replace(plan, levels=tuple(sorted(int(x) for x in a.levels.split(","))), round_users=None)
    if a.refine is not None:
        plan = replace(plan, refine=a.refine)
    if a.rounds is not None:
        if a.rounds < 1:
            p.error("--rounds: at least 1")
        plan = replace(plan, rounds=a.rounds)
    if a.at is not None:
        plan = replace(plan, round_users=a.at)
    if a.fleet_streams is not None:
        if a.fleet_streams < 1:
            p.error("--fleet-streams: at least 1")
        plan = replace(plan, fleet_users=a.fleet_streams)
    if a.side_by_side_streams is not None:
        if a.side_by_side_streams < 1:
            p.error("--side-by-side-streams: at least 1")
        plan = replace(plan, side_users=a.side_by_side_streams)
    if a.fleet and a.side_by_side:
        p.error("--fleet and --side-by-side each run one section alone: choose one")
    plan = replace(plan, fleet_only=a.fleet, side_only=a.side_by_side)
    output = a.output or (
        DEFAULT_FLEET_OUTPUT if a.fleet else DEFAULT_SIDE_OUTPUT if a.side_by_side else DEFAULT_OUTPUT
    )
    plan = replace(plan, all_levels=a.all_levels, quiet_wait_s=a.wait_quiet or plan.quiet_wait_s)
    if a.baseline_src is not None and not (a.baseline_src / "app" / "__main__.py").is_file():
        p.error(f"--baseline-src {a.baseline_src}: not a checkout of this project (no app/__main__.py)")
    return plan, output, a.wait_quiet, a.profile, a.baseline_src.resolve() if a.baseline_src else None


def contestants(
    log_dir: Path, work_dir: Path, redis: RedisServer | None, baseline_src: Path | None
) -> list[Contestant]:
    """Every configuration compared, in the first round's order; each knows how to start a fresh server of it."""
    out = [Contestant(RAW, "raw ASGI app (reference)", partial(raw_app, log_dir))]
    for config in (PROTECTIONS_ON, PROTECTIONS_OFF, RESUME_OFF, RESUME_REDIS):
        env = {**MOCK_ENV, **config.env}
        extra: tuple[Server, ...] = ()
        prepare = None
        if config.needs_redis:
            if redis is None or redis.proc is None:
                continue
            env["REDIS_URL"] = redis.url
            extra, prepare = (watched("redis", redis.proc, redis.port),), partial(redis.command, "FLUSHALL")
        out.append(
            Contestant(
                config.key, config.title, partial(gateway_from, ROOT, log_dir, work_dir, env=env), extra, prepare
            )
        )
    if baseline_src is not None:
        out.append(
            Contestant(
                BASELINE,
                f"{PROTECTIONS_ON.title}, from `{baseline_src}` (A)",
                partial(gateway_from, baseline_src, log_dir, work_dir, env=MOCK_ENV),
            )
        )
    return out


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
        argv = loadgen_argv(
            server.port, users=users, max_tokens=plan.max_tokens, rate=plan.rate, hold_seconds=plan.hold_seconds
        )
        time.sleep(1.0)
        out.append(profile_load(server, argv, level_seconds(plan, users), f"protections on, {users} streams"))
    return out


def main(argv: list[str] | None = None) -> None:
    plan, output, wait_quiet, profile, baseline_src = parse_args(argv)
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
    if plan.fleet_only:
        try:
            fleet = measure_fleet(plan, log_dir, work_dir)
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
        write_report(
            output, render_fleet(plan, command=command, started=started, elapsed_s=time.monotonic() - t0, fleet=fleet)
        )
        return
    caps: dict[str, Capacity] = {}
    replay: dict[str, Any] = {}
    notes: list[str] = []
    profiles: list[dict[str, Any]] = []
    try:
        redis: RedisServer | None = RedisServer(work_dir / "redis", log_path=log_dir / "redis.log")
    except HarnessError:  # redis-server is not installed
        redis = None
        notes.append("no redis-server found: the Redis admission backend and resume store were not measured")
    try:
        with contextlib.ExitStack() as stack:
            if redis is not None:
                redis.start()
                stack.callback(redis.stop)
            if plan.side_only:
                side = measure_side_by_side(plan, contestants(log_dir, work_dir, redis, baseline_src))
                write_report(
                    output,
                    render_side_by_side(
                        plan, command=command, started=started, elapsed_s=time.monotonic() - t0, side=side
                    ),
                )
                return
            log("admission cost per request (in process)")
            admission = measure_admission(plan, redis)
            # RSS gets an instance of its own: a fresh baseline, and the streams it aborts become orphaned
            # generations (resume on) that run on for ORPHAN_TIMEOUT_SECONDS - load no capacity level should see
            # (and that a graceful stop would wait for: this instance is killed instead).
            with running(gateway(log_dir, work_dir, "gateway_rss", **MOCK_ENV), kill=True) as gw:
                warm_up(gw)
                log(f"RSS: opening {plan.rss_streams} streams")
                rss = measure_rss(gw, plan)
            compared = contestants(log_dir, work_dir, redis, baseline_src)
            by_key = {c.key: c for c in compared}
            with running(by_key[PROTECTIONS_ON.key].start("gateway_on")) as gw:
                warm_up(gw)
                caps["on"] = search_capacity(gw, plan)
                replay["local"] = measure_replay(gw, plan)
                if profile:
                    profiles += profile_misses(gw, plan, caps["on"])
            # Where the others' capacity searches start: the protected gateway's capacity; in quick mode, the
            # highest level it ran, so that the rounds (when they run there) get a demanding one.
            on = caps["on"]
            common = (on.lo or plan.levels[0]) if plan.search_comparisons else max(r["users"] for r in on.rows)
            for c in compared:
                if c.key == PROTECTIONS_ON.key or not (plan.search_comparisons or c.key == RESUME_REDIS.key):
                    continue
                if c.prepare is not None:
                    c.prepare()
                with running(c.start(f"gateway_{c.key}" if c.key != RAW else "raw_asgi")) as server:
                    warm_up(server)
                    if plan.search_comparisons:
                        caps[c.key] = search_capacity(server, plan, start=common, extra=c.extra)
                    if c.key == RESUME_REDIS.key:
                        replay["redis"] = measure_replay(server, plan)
                    if (
                        profile
                        and c.key == PROTECTIONS_OFF.key
                        and c.key in caps
                        and on.hi
                        and ratio(on, caps[c.key], PROTECTIONS_RATIO_TARGET)[1] is not True
                    ):
                        # The same load as the protected gateway's profile: the difference is what they cost.
                        argv = loadgen_argv(
                            server.port,
                            users=on.hi,
                            max_tokens=plan.max_tokens,
                            rate=plan.rate,
                            hold_seconds=plan.hold_seconds,
                        )
                        time.sleep(1.0)
                        profiles.append(
                            profile_load(server, argv, level_seconds(plan, on.hi), f"protections off, {on.hi} streams")
                        )
            rounds = measure_rounds(plan, compared, plan.round_users or common)
            for key, rows in rounds.rows.items():  # quick: the rounds are all the others' capacity shows
                caps.setdefault(key, Capacity(rows=list(rows)))
            side = measure_side_by_side(plan, compared)
            with running(fake_openai(log_dir)) as upstream:
                upstream_url = f"http://127.0.0.1:{upstream.port}/v1"
                with running(gateway(log_dir, work_dir, "gateway_proxy", UPSTREAM_URL=upstream_url)) as through:
                    proxy = measure_proxy(plan, upstream, through)
                    through_p50, direct_p50 = proxy["through"]["ttft_ms"]["p50"], proxy["direct"]["ttft_ms"]["p50"]
                    if profile and (through_p50 or 0.0) - (direct_p50 or 0.0) > ADDED_TTFT_P50_TARGET_MS:
                        argv = loadgen_argv(
                            through.port,
                            users=plan.proxy_users,
                            rate=plan.rate,
                            path="/v1/chat/completions",
                            max_tokens=plan.proxy_max_tokens,
                            hold_seconds=plan.proxy_hold_seconds,
                        )
                        seconds = (
                            plan.proxy_users / plan.rate
                            + plan.proxy_hold_seconds
                            + plan.proxy_max_tokens / PACE_TOKENS_PER_SECOND
                        )
                        profiles.append(
                            profile_load(
                                through, argv, seconds, f"proxy, {plan.proxy_users} streams through the gateway"
                            )
                        )
            log("fleet: least_in_flight against round_robin, one slow model server of three")
            fleet = measure_fleet(plan, log_dir, work_dir)
        loads["end"] = os.getloadavg()
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    report = render(
        plan=plan,
        command=command,
        started=started,
        elapsed_s=time.monotonic() - t0,
        caps=caps,
        common=common,
        rounds=rounds,
        proxy=proxy,
        rss=rss,
        replay=replay,
        admission=admission,
        log_dir=display_path(log_dir),
        background=background,
        loads=loads,
        notes=notes,
        profiles=profiles,
        baseline_src=baseline_src,
        fleet=fleet,
        side=side,
    )
    write_report(output, report)


def write_report(output: Path, report: str) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report)
    print(report)
    log(f"report written to {output}")


if __name__ == "__main__":
    main()
