"""The rehearsal's run: gateway instances behind nginx, Locust load, and one instance at a time through the
pod termination sequence (removed, preStop, SIGTERM, drain, replaced, added back), or in `models` mode one model
server at a time replaced and killed (models.py); its results and checks."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loadtest.harness.errors import HarnessError
from loadtest.harness.nginx import Nginx
from loadtest.harness.ports import loopback_listener
from loadtest.harness.process import Child, Supervisor, require_binary, socket_activation, tail
from loadtest.harness.prometheus import Prometheus, ScrapeTarget, start_prometheus
from loadtest.harness.redis import RedisServer
from loadtest.rehearsal.measure import (
    ResumeClients,
    continuations,
    drain_cuts,
    locust_stats,
    log_messages,
    nginx_access_stats,
    query_series,
    shutdown_ends,
)
from loadtest.rehearsal.models import ModelFleet, ModelRoll

ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"

CLAIM_MESSAGE = "continuing a handed-over stream"  # app/resume/claimer.py: a claimer picked a stream up
LOCUST_RESUME_KEYS = ("resumed", "resume_mismatch", "not_resumable")  # in the summary of users that resume
RESUMABLE_ENDPOINTS = ("/stream", "/ws")  # /v1/chat/completions streams end with server_shutdown, not handed over

# guards only: how long a step may take before the rehearsal gives up on it
START_GUARD_S = 90.0  # an instance's /ready, Prometheus scraping every instance
LOCUST_EXIT_GUARD_S = 40.0  # Locust writing its summary and exiting after SIGTERM


class RehearsalError(HarnessError):
    """The rehearsal itself could not do a step (a tool missing, a process that would not start or stop)."""


def log(message: str) -> None:
    print(f"[rehearsal {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- gateway instances ----------------------------------------------------------------------------------------


@dataclass
class Termination:
    """One instance's pass through the pod termination sequence (times: seconds since the load started)."""

    instance: str
    removed_at: float = 0.0
    sigterm_at: float = 0.0
    exited_at: float = 0.0
    ready_at: float = 0.0
    added_at: float = 0.0
    drain_s: float = 0.0
    in_flight_at_sigterm: int | None = None
    cut_by_drain: int | None = None  # from the workers' "drain finished" log lines
    shutdown_by_endpoint: dict[str, int] = field(default_factory=dict)  # from their "stream finished" lines
    exit_code: int | None = None
    replacement_ready_s: float = 0.0
    sigterm_epoch: float = 0.0


class Instance:
    """One gateway "pod": a loopback listening socket held for the whole run, and the process serving it."""

    def __init__(self, index: int, env: dict[str, str], supervisor: Supervisor, workdir: Path, logdir: Path) -> None:
        self.index = index
        self.name = f"gw-{index}"
        self.sock = loopback_listener()  # held for the whole run: restarts take it over
        self.metrics_sock = loopback_listener()
        self.port = int(self.sock.getsockname()[1])
        self.metrics_url = f"http://127.0.0.1:{self.metrics_sock.getsockname()[1]}"
        self.address = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.address}"
        self.env = env
        self.supervisor = supervisor
        self.workdir = workdir
        self.logdir = logdir
        self.generation = 0
        self.child: Child | None = None

    def start(self) -> None:
        """`python -m app` on this instance's socket (systemd socket activation: fd 3, LISTEN_FDS, LISTEN_PID)."""
        self.generation += 1
        tag = f"{self.name}.{self.generation}"
        # the public socket on fd 3, the metrics socket on fd 4 (LISTEN_FDS=2)
        argv, activation = socket_activation([sys.executable, "-m", "app"], [self.sock, self.metrics_sock])
        env = dict(
            self.env,
            PORT=str(self.port),
            METRICS_PORT=self.metrics_url.rsplit(":", 1)[1],
            **activation,
            PROMETHEUS_MULTIPROC_DIR=str(self.workdir / f"metrics-{tag}"),
        )
        if env.get("RESUME_STORE", "local") == "local":
            env["RESUME_DIR"] = str(self.workdir / f"resume-{tag}")
        self.child = self.supervisor.spawn(
            tag,
            argv,
            log_path=self.logdir / f"{tag}.log",
            env=env,
            cwd=ROOT,
            pass_fds=(self.sock.fileno(), self.metrics_sock.fileno()),
            # at the end of the run a gateway is killed outright, not drained
            stop_signal=signal.SIGKILL,
        )

    def ready(self) -> bool:
        try:
            return httpx.get(self.url + "/ready", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self) -> float:
        assert self.child is not None
        return self.child.wait_ready(self.ready, START_GUARD_S, f"{self.name} /ready", interval=0.1)

    def in_flight(self) -> int | None:
        """Streams this instance relays right now (its own /metrics, all workers)."""
        try:
            text = httpx.get(self.metrics_url + "/metrics", timeout=2.0).text
        except httpx.HTTPError:
            return None
        return int(sum(float(v) for v in re.findall(r"^streaming_active_connections\{[^}]*\} (\S+)$", text, re.M)))

    def close(self) -> None:
        self.sock.close()
        self.metrics_sock.close()


# --- the run ------------------------------------------------------------------------------------------------


@dataclass
class Config:
    mode: str
    duration: float
    users: int
    instances: int
    drain_timeout: float
    close_grace: float
    prestop: float
    max_tokens: int
    tokens_per_second: float
    warmup: float
    cooldown: float
    workers: int
    resume_clients: int
    output_dir: Path
    models: int = 3  # models mode: fake model servers
    kill_grace: float = 1.0  # models mode: seconds from terminating to SIGKILL
    min_ready: float = 2.0  # models mode: seconds a replacement serves before its predecessor goes terminating

    @property
    def stream_seconds(self) -> float:
        return self.max_tokens / self.tokens_per_second


def gateway_env(config: Config, redis_url: str | None, upstream: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("UPSTREAM_", "MOCK_", "PROMETHEUS_", "LISTEN_", "RESUME_", "REDIS_", "LOCUST_"))
    }
    env.update(
        {
            "HOST": "127.0.0.1",
            "WEB_CONCURRENCY": str(config.workers),
            "LOG_LEVEL": "info",
            "LOG_FORMAT": "json",
            "MOCK_TOKENS_PER_SECOND": f"{config.tokens_per_second:g}",
            "MOCK_FIRST_TOKEN_MS": "50",
            "DRAIN_TIMEOUT_SECONDS": f"{config.drain_timeout:g}",
            "DRAIN_CLOSE_GRACE_SECONDS": f"{config.close_grace:g}",
            # every client reaches the gateways through nginx from 127.0.0.1: one "client" for the per-client limits
            "RATE_LIMIT_PER_MINUTE": "0",
            "MAX_CONNECTIONS_PER_CLIENT": "10000",
        }
    )
    if redis_url is not None:
        env.update({"RESUME_STORE": "redis", "REDIS_URL": redis_url, "REDIS_TIMEOUT_SECONDS": "2"})
    env.update(upstream or {})  # models mode: the fleet instead of the built-in mock
    return env


def locust_env(config: Config, summary_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCUST_")}
    env.update(
        {
            "LOCUST_SUMMARY_PATH": str(summary_path),
            "LOCUST_MAX_TOKENS": str(config.max_tokens),
            "LOCUST_MAX_RECONNECTS": "5",
            "LOCUST_MAX_RETRY_AFTER": "1",
            "LOCUST_NETWORK_TIMEOUT": f"{max(60.0, config.stream_seconds + config.drain_timeout + 30):g}",
            # the text each /stream and /ws stream must add up to: the built-in mock's, or the fake model server's
            "LOCUST_VERIFY_TEXT": "fake" if config.mode == "models" else "mock",
        }
    )
    return env


class Rehearsal:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.out = config.output_dir
        self.logdir = self.out / "logs"
        self.workdir = Path(tempfile.mkdtemp(prefix="rehearsal-"))
        self.supervisor = Supervisor(self.out / "processes.json")
        self.instances: list[Instance] = []
        self.nginx: Nginx | None = None
        self.prometheus: Prometheus | None = None
        self.locust: Child | None = None
        self.resume_clients: ResumeClients | None = None
        self.terminations: list[Termination] = []
        self.fleet: ModelFleet | None = None  # models mode
        self.rolls: list[ModelRoll] = []
        self.problems: list[str] = []
        self.t0 = 0.0  # monotonic, Locust start
        self.t0_epoch = 0.0

    def since(self) -> float:
        return round(time.monotonic() - self.t0, 3)

    # -- setup ------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        config = self.config
        for binary in ("nginx", "prometheus", *(["redis-server"] if config.mode == "resume" else [])):
            require_binary(binary)
        redis_url = None
        if config.mode == "resume":
            redis = RedisServer(self.workdir / "redis", spawn=self.supervisor.spawn)
            redis.start()
            redis_url = redis.url
            log(f"redis-server at {redis_url}")
        upstream = None
        if config.mode == "models":
            self.fleet = ModelFleet(config.models, config.tokens_per_second, self.supervisor, self.workdir, self.logdir)
            self.fleet.start()
            upstream = self.fleet.gateway_env()
            log(f"{config.models} model servers in the EndpointSlices of the API server at {self.fleet.api_url}")
        env = gateway_env(config, redis_url, upstream)
        self.instances = [Instance(i, env, self.supervisor, self.workdir, self.logdir) for i in range(config.instances)]
        # Prometheus first: it applies its targets a few seconds after start (discovery reload interval)
        self.prometheus = start_prometheus(
            [ScrapeTarget(inst.metrics_url, {"instance": inst.name}) for inst in self.instances],
            (),
            self.workdir / "prometheus",
            spawn=self.supervisor.spawn,
        )
        log(f"prometheus at {self.prometheus.url}")
        for instance in self.instances:
            instance.start()
        for instance in self.instances:
            waited = instance.wait_ready()
            log(f"{instance.name} ready on {instance.url} ({waited:.1f} s)")
        prefix = self.workdir / "nginx"
        prefix.mkdir()
        self.nginx = Nginx(prefix, self.supervisor.spawn)
        self.nginx.start([inst.address for inst in self.instances])
        log(f"nginx at {self.nginx.url} in front of {', '.join(i.address for i in self.instances)}")
        try:  # the picture starts with the load: every instance scraped before Locust starts
            self.prometheus.wait_for_scrapes(1, timeout=START_GUARD_S)
        except AssertionError as exc:
            raise RehearsalError(f"prometheus does not scrape the instances: {exc}") from None

    # -- load -------------------------------------------------------------------------------------------------
    def start_load(self) -> None:
        assert self.nginx is not None
        config = self.config
        guard = int(config.duration * 3 + config.instances * (config.prestop + config.drain_timeout + 60) + 60)
        argv = [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(LOCUSTFILE),
            "--headless",
            "-u",
            str(config.users),
            "-r",
            str(max(1, config.users // 2)),
            "-t",
            f"{guard}s",
            "--host",
            self.nginx.url,
            "--csv",
            str(self.out / "locust"),
            "--only-summary",
            # at the stop, users finish the stream they are reading (then `aborted` stays 0)
            "--stop-timeout",
            f"{self.stop_timeout():g}",
        ]
        self.t0, self.t0_epoch = time.monotonic(), time.time()
        self.locust = self.supervisor.spawn(
            "locust",
            argv,
            log_path=self.logdir / "locust.log",
            env=locust_env(config, self.out / "locust_summary.json"),
            cwd=self.out,
        )
        if config.mode == "resume" and config.resume_clients > 0:
            # twice as long as Locust's streams: most of them span a removal, preStop and drain
            self.resume_clients = ResumeClients(self.nginx.url, config.resume_clients, 2 * config.max_tokens)
            self.resume_clients.start()
        log(f"locust: {config.users} users against {self.nginx.url}")

    def stop_timeout(self) -> float:
        """Seconds Locust's users get at the stop to finish the stream in hand (with its reconnects)."""
        return round(self.config.stream_seconds * 2 + 10, 1)

    def stop_load(self) -> dict[str, Any]:
        assert self.locust is not None
        locust = self.locust
        if self.resume_clients is not None:
            self.resume_clients.finish(self.config.stream_seconds * 3 + 30)
        if locust.exited():
            self.problems.append("locust exited before the rehearsal stopped it (see logs/locust.log)")
        locust.send(signal.SIGTERM)  # users finish their stream (--stop-timeout), the summary is written, exit
        guard = self.stop_timeout() + LOCUST_EXIT_GUARD_S
        if not locust.wait_exit(guard):
            self.problems.append(f"locust did not exit within {guard:g} s of SIGTERM")
        code = locust.stop(signal.SIGKILL, 1.0)
        self.supervisor.reaped(locust)
        log(f"locust exited with {code}")
        path = self.out / "locust_summary.json"
        if not path.exists():
            raise RehearsalError(f"locust wrote no summary:\n{tail(locust.log_path)}")
        summary: dict[str, Any] = json.loads(path.read_text())
        if not summary.get("final"):
            self.problems.append("locust's summary is not final (it did not quit cleanly)")
        summary["exit_code"] = code
        return summary

    # -- the rollout ------------------------------------------------------------------------------------------
    def in_service(self, exclude: Instance | None = None) -> list[str]:
        return [inst.address for inst in self.instances if inst is not exclude]

    def terminate(self, instance: Instance) -> Termination:
        assert self.nginx is not None and instance.child is not None
        config = self.config
        record = Termination(instance.name)
        record.removed_at = self.since()
        took = self.nginx.reload(self.in_service(exclude=instance), f"remove {instance.name}", self.t0)
        log(f"{instance.name}: out of nginx's upstream (reload {took:.2f} s); preStop {config.prestop:g} s")
        time.sleep(config.prestop)
        record.in_flight_at_sigterm = instance.in_flight()
        old = instance.child
        record.sigterm_at, record.sigterm_epoch = self.since(), time.time()
        sigterm = time.monotonic()
        old.send(signal.SIGTERM)
        guard = config.drain_timeout + 2 * config.close_grace + 30
        if not old.wait_exit(guard):
            self.problems.append(f"{instance.name} did not exit within {guard:g} s of SIGTERM: SIGKILLed")
        record.drain_s = round(time.monotonic() - sigterm, 3)
        record.exited_at = self.since()
        record.exit_code = old.stop(signal.SIGKILL, 1.0)
        self.supervisor.reaped(old)
        record.cut_by_drain = drain_cuts(old.log_path)
        record.shutdown_by_endpoint = dict(shutdown_ends(old.log_path))
        if record.exit_code != 0:
            self.problems.append(f"{instance.name} exited with {record.exit_code} after SIGTERM")
        log(
            f"{instance.name}: drained and exited in {record.drain_s:.2f} s (code {record.exit_code}, "
            f"{record.in_flight_at_sigterm} streams at SIGTERM, {record.cut_by_drain} cut)"
        )
        instance.start()
        record.replacement_ready_s = round(instance.wait_ready(), 3)
        record.ready_at = self.since()
        self.nginx.reload(self.in_service(), f"add {instance.name}", self.t0)
        record.added_at = self.since()
        log(f"{instance.name}: replacement ready in {record.replacement_ready_s:.1f} s, back in the upstream")
        return record

    def roll_model(self, fleet: ModelFleet, index: int) -> ModelRoll:
        record = fleet.roll(index, self.config.min_ready, self.config.kill_grace, self.since)
        log(
            f"{record.server}: replaced by {record.replacement}, terminating, SIGKILLed after "
            f"{self.config.kill_grace:g} s with {record.in_flight_at_kill} streams in flight, out of the slices"
        )
        return record

    def run(self) -> dict[str, Any]:
        config = self.config
        try:
            self.setup()
            self.start_load()
            time.sleep(config.warmup)
            for step in range(config.models if self.fleet is not None else len(self.instances)):
                assert self.locust is not None
                if self.locust.exited():
                    raise RehearsalError(f"locust exited during the rollout:\n{tail(self.locust.log_path)}")
                if self.fleet is not None:
                    self.rolls.append(self.roll_model(self.fleet, step))
                else:
                    self.terminations.append(self.terminate(self.instances[step]))
            rollout_end = time.monotonic()
            stop_at = max(self.t0 + config.duration, rollout_end + config.cooldown)
            time.sleep(max(0.0, stop_at - time.monotonic()))
            load_seconds = time.monotonic() - self.t0
            summary = self.stop_load()
            end_epoch = time.time()
            assert self.prometheus is not None
            with contextlib.suppress(AssertionError):
                self.prometheus.wait_for_scrapes(2, timeout=10)
            series = query_series(self.prometheus, self.t0_epoch - 2, end_epoch + 1)
            resume = self.resume_clients.stats.as_dict() if self.resume_clients is not None else None
            return self.results(summary, series, load_seconds, resume)
        finally:
            self.teardown()

    def teardown(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):  # cleaning up: no second interruption
                signal.signal(sig, signal.SIG_IGN)
        if self.resume_clients is not None:
            self.resume_clients.stop.set()
        if self.prometheus is not None:
            self.prometheus.client.close()
        self.supervisor.stop_all()
        if self.fleet is not None:
            self.fleet.close()
        for instance in self.instances:
            instance.close()
        for source, name in (
            (self.workdir / "nginx" / "error.log", "nginx-error.log"),
            (self.workdir / "nginx" / "access.log", "nginx-access.log"),
            (self.workdir / "prometheus" / "prometheus.log", "prometheus.log"),
            (self.workdir / "redis" / "redis-server.log", "redis.log"),
        ):
            if source.exists():
                shutil.copyfile(source, self.logdir / name)
        if self.nginx is not None and self.nginx.conf.exists():
            shutil.copyfile(self.nginx.conf, self.logdir / "nginx.conf")
        shutil.rmtree(self.workdir, ignore_errors=True)
        with contextlib.suppress(OSError):
            (self.out / "processes.json").unlink()

    # -- results ----------------------------------------------------------------------------------------------
    def results(
        self, summary: dict[str, Any], series: dict[str, Any], load_seconds: float, resume: dict[str, Any] | None
    ) -> dict[str, Any]:
        config = self.config
        counts = {
            key: int(summary.get(key, 0))
            for key in (
                "started",
                "completed",
                "graceful",
                "truncated",
                "refused",
                "errors",
                "aborted",
                "reconnects",
                "retried",
                "in_flight",
            )
        }
        # a locustfile whose users resume (issue 8) reports these too; None: its users do not resume
        locust_resume = {key: summary[key] for key in LOCUST_RESUME_KEYS if key in summary} or None
        checks: list[tuple[str, bool]] = [
            ("no stream truncated (truncated == 0)", counts["truncated"] == 0),
            ("no stream ended in an error (errors == 0)", counts["errors"] == 0),
            ("streams completed under load (completed > 0)", counts["completed"] > 0),
            ("the rehearsal's own steps went as planned", not self.problems),
        ]
        longest = max((t.drain_s for t in self.terminations), default=0.0)
        models = None
        if self.fleet is not None:
            continued = continuations([inst.metrics_url for inst in self.instances])
            models = {
                "killed_in_flight": sum(r.in_flight_at_kill or 0 for r in self.rolls),
                "continued": continued.get("continued", 0),
                "continuation_failed": continued.get("failed", 0),
            }
            checks += [
                (
                    f"every model server was replaced and SIGKILLed with streams in flight ({len(self.rolls)}/"
                    f"{config.models} rolled, {models['killed_in_flight']} streams in flight at the kills)",
                    len(self.rolls) == config.models and models["killed_in_flight"] > 0,
                ),
                (
                    "the gateways were not drained: no server_shutdown (graceful == 0)",
                    counts["graceful"] == 0,
                ),
                (
                    # limits are lifted and nothing drains: a refusal means the fleet was taken for down
                    f"no stream refused while one model server was down (refused == 0; {counts['refused']})",
                    counts["refused"] == 0,
                ),
            ]
        else:
            checks.append(
                (
                    f"every instance drained, exited 0 and was replaced ({len(self.terminations)}/{config.instances})",
                    len(self.terminations) == config.instances and all(t.exit_code == 0 for t in self.terminations),
                )
            )
        if config.mode == "full":
            checks.append(
                (
                    f"drain {config.drain_timeout:g} s outlasts the ~{config.stream_seconds:g} s streams: "
                    "no server_shutdown (graceful == 0)",
                    counts["graceful"] == 0,
                )
            )
            checks.append(
                (f"every drain ended before its deadline (longest {longest:.1f} s)", longest < config.drain_timeout)
            )
        elif config.mode != "models":
            checks.append(
                (
                    f"drain {config.drain_timeout:g} s is shorter than the ~{config.stream_seconds:g} s "
                    "streams: the streams it cut ended with server_shutdown (graceful > 0)",
                    counts["graceful"] > 0,
                )
            )
        handover = None
        if config.mode == "resume":
            gateway_logs = [c.log_path for c in self.supervisor.children if c.name.startswith("gw-")]
            handover = {
                "cut_by_drains": sum(t.cut_by_drain or 0 for t in self.terminations),
                "cut_resumable": sum(
                    t.shutdown_by_endpoint.get(e, 0) for t in self.terminations for e in RESUMABLE_ENDPOINTS
                ),
                "continued_elsewhere": log_messages(gateway_logs, CLAIM_MESSAGE),
            }
            checks.append(
                (
                    "every /stream and /ws stream a drain cut was handed over and continued by another "
                    f"instance ({handover['continued_elsewhere']} continued, {handover['cut_resumable']} cut)",
                    handover["continued_elsewhere"] >= handover["cut_resumable"] > 0,
                )
            )
            if locust_resume is not None:
                checks.append(
                    (
                        "Locust users resumed handed-over streams, every resumed stream whole "
                        f"(resumed {locust_resume.get('resumed', 0)}, resume_mismatch "
                        f"{locust_resume.get('resume_mismatch', 0)}, not_resumable "
                        f"{locust_resume.get('not_resumable', 0)})",
                        locust_resume.get("resumed", 0) > 0
                        and not locust_resume.get("resume_mismatch")
                        and not locust_resume.get("not_resumable"),
                    )
                )
            stats = resume or {}
            failures = sum((stats.get("failures") or {}).values())
            checks.append(
                (
                    "resuming clients: every server_shutdown was resumed to done with the whole text, no "
                    "gap or duplicate, and no stream failed otherwise "
                    f"({stats.get('resumed', 0)}/{stats.get('shutdowns', 0)} resumed, {failures} failed)",
                    stats.get("shutdowns", 0) > 0 and stats.get("resumed") == stats.get("shutdowns") and failures == 0,
                )
            )
        return {
            "mode": config.mode,
            "ok": all(passed for _, passed in checks),
            "checks": [{"check": text, "passed": passed} for text, passed in checks],
            "problems": self.problems,
            "config": {**asdict(config), "output_dir": str(config.output_dir), "stream_seconds": config.stream_seconds},
            "load_seconds": round(load_seconds, 1),
            "summary": counts,
            "locust_resume": locust_resume,
            "by_reason": summary.get("by_reason", {}),
            "by_endpoint": summary.get("by_endpoint", {}),
            "locust_exit_code": summary.get("exit_code"),
            "terminations": [asdict(t) for t in self.terminations],
            "model_rolls": [asdict(r) for r in self.rolls],
            "models": models,
            "nginx_reloads": self.nginx.reloads if self.nginx is not None else [],
            "nginx_requests": nginx_access_stats(self.workdir / "nginx" / "access.log"),
            "resume_clients": resume,
            "handover": handover,
            "prometheus": series,
            "locust_stats": locust_stats(self.out / "locust_stats.csv"),
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            },
            "t0_epoch": self.t0_epoch,
        }
