"""`python -m loadtest.rehearsal`: parse the options, run the rehearsal, write the report, the picture and the
numbers (see loadtest/rehearsal/__init__.py)."""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import loadtest.rehearsal
from loadtest.harness.errors import HarnessError
from loadtest.rehearsal.report import render_png, render_report
from loadtest.rehearsal.run import ROOT, Config, Rehearsal

DEFAULT_OUTPUT = ROOT / "loadtest" / "results" / "rehearsal"
MODES = ("full", "short-drain", "resume", "models")
DEFAULT_DRAIN = {"full": 30.0, "short-drain": 2.0, "resume": 2.0, "models": 30.0}
DEFAULT_CLOSE_GRACE = {"full": 5.0, "short-drain": 2.0, "resume": 2.0, "models": 5.0}
DEFAULT_INSTANCES = {"full": 3, "short-drain": 3, "resume": 3, "models": 2}  # models: the gateways are not rolled


class Interrupted(BaseException):
    """This process was asked to stop: clean up and exit."""


def parse_args(argv: Sequence[str] | None = None) -> Config:
    description = (loadtest.rehearsal.__doc__ or "").split("\n\n")[0]
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.rehearsal",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--mode", choices=MODES, default="full")
    parser.add_argument(
        "--duration", type=float, default=30.0, help="seconds of load at least (longer if the rollout needs it) [30]"
    )
    parser.add_argument("--users", type=int, default=30, help="Locust users [30]")
    parser.add_argument(
        "--instances", type=int, default=None, help="gateway instances (at least 2; models mode: 1) [3; models: 2]"
    )
    parser.add_argument("--models", type=int, default=3, help="models mode: fake model servers (at least 2) [3]")
    parser.add_argument(
        "--kill-grace",
        type=float,
        default=1.0,
        help="models mode: seconds from a model server's terminating to its SIGKILL [1]",
    )
    parser.add_argument(
        "--min-ready",
        type=float,
        default=2.0,
        help="models mode: seconds a replacement serves before the server it replaces goes terminating "
        "(a Deployment's minReadySeconds) [2]",
    )
    parser.add_argument(
        "--drain-timeout", type=float, default=None, help="DRAIN_TIMEOUT_SECONDS [full: 30, short-drain and resume: 2]"
    )
    parser.add_argument(
        "--close-grace", type=float, default=None, help="DRAIN_CLOSE_GRACE_SECONDS [full: 5, short-drain and resume: 2]"
    )
    parser.add_argument("--prestop", type=float, default=2.0, help="preStop seconds between removal and SIGTERM [2]")
    parser.add_argument("--max-tokens", type=int, default=150, help="tokens per stream [150]")
    parser.add_argument(
        "--tokens-per-second", type=float, default=20.0, help="the mock's pace (models mode: the model servers') [20]"
    )
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of load before the first removal [5]")
    parser.add_argument(
        "--cooldown", type=float, default=3.0, help="seconds of load after the last instance is back [3]"
    )
    parser.add_argument("--workers", type=int, default=2, help="WEB_CONCURRENCY of each instance [2]")
    parser.add_argument(
        "--resume-clients",
        type=int,
        default=6,
        help="resume mode: the rehearsal's own resuming SSE clients (streams of 2 x max_tokens) [6]",
    )
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    instances = args.instances if args.instances is not None else DEFAULT_INSTANCES[args.mode]
    if args.mode == "models":
        if instances < 1 or args.models < 2:
            parser.error("models mode: --instances at least 1, --models at least 2 (one is always being replaced)")
    elif instances < 2:
        parser.error("--instances must be at least 2 (one is always out of the upstream)")
    if args.users < 1 or args.max_tokens < 1 or args.tokens_per_second <= 0:
        parser.error("--users, --max-tokens and --tokens-per-second must be positive")
    return Config(
        mode=args.mode,
        duration=args.duration,
        users=args.users,
        instances=instances,
        drain_timeout=args.drain_timeout if args.drain_timeout is not None else DEFAULT_DRAIN[args.mode],
        close_grace=args.close_grace if args.close_grace is not None else DEFAULT_CLOSE_GRACE[args.mode],
        prestop=args.prestop,
        max_tokens=args.max_tokens,
        tokens_per_second=args.tokens_per_second,
        warmup=args.warmup,
        cooldown=args.cooldown,
        workers=args.workers,
        resume_clients=args.resume_clients,
        output_dir=args.output_dir.resolve(),
        models=args.models,
        kill_grace=args.kill_grace,
        min_ready=args.min_ready,
    )


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    config.output_dir.mkdir(parents=True, exist_ok=True)
    (config.output_dir / "logs").mkdir(exist_ok=True)
    for stale in ("report.md", "rollout.png", "rehearsal.json", "locust_summary.json"):
        with contextlib.suppress(FileNotFoundError):
            (config.output_dir / stale).unlink()
    for old_log in (config.output_dir / "logs").iterdir():
        old_log.unlink()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupted)
    command = " ".join(["python -m loadtest.rehearsal", *(shlex.quote(a) for a in (argv or sys.argv[1:]))])
    rehearsal = Rehearsal(config)
    try:
        results = rehearsal.run()
    except (HarnessError, Interrupted, KeyboardInterrupt) as exc:
        print(f"rehearsal failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    png = config.output_dir / "rollout.png"
    render_png(results, png)
    report = render_report(results, png.name, command)
    (config.output_dir / "report.md").write_text(report)
    (config.output_dir / "rehearsal.json").write_text(json.dumps(results, indent=1, default=str))
    print(report)
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
