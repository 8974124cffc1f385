"""Rolling-restart rehearsal: what `kubectl rollout restart` does to the gateway, performed here under load.

    python -m loadtest.rehearsal [--duration 30] [--users 30] [--instances 3] [--drain-timeout S] [--prestop 2]
                                 [--mode full|short-drain|resume] [--output-dir loadtest/results/rehearsal]

One command starts N gateway instances (`python -m app`, 2 workers each, the built-in mock at 20 tok/s, each on
its own loopback socket that this process binds once and hands over through socket activation, so a
replacement gets the same port), Debian's nginx in front of them configured like the chart's Ingress
(loadtest/nginx.conf.template: no buffering, long timeouts, HTTP/1.1 keep-alive upstream, WebSocket upgrades,
a 503 from a draining instance retried on the next one), a real Prometheus scraping every instance each second
(label `instance="gw-N"`), and Locust headless (loadtest/locustfile.py, host = nginx). While Locust runs, one
instance at a time goes through the pod termination sequence:

    removed from nginx's upstream (config rewritten, reload, the new configuration answers)
    → preStop wait → SIGTERM to the gunicorn master → drain → exit (the drain time is SIGTERM → exit)
    → replacement started on the same socket → its /ready answers 200 → added back (reload) → next instance

At the end it writes to the output directory: `report.md` (also printed), `rollout.png` (active connections per
instance and TTFT p95 from Prometheus, a marker at each SIGTERM), `rehearsal.json` (every number), Locust's
CSVs and summary, and `logs/` (gateways, nginx, Prometheus, Locust). Exit code 0 only when no stream was
truncated, none ended in an error, every instance drained, exited and was replaced, and the mode's expectation
held:

    full         drain timeout (30 s) longer than the streams (~7.5 s): every stream finishes, no server_shutdown
    short-drain  drain timeout (2 s) shorter than the streams: the streams still running at the deadline end with
                 server_shutdown (graceful > 0), none ends silently (truncated = 0); Locust users reconnect
    resume       RESUME_STORE=redis on a real redis-server, short drains: a stream still running at the deadline
                 is handed to the fleet and its client gets server_shutdown with a resume id. The Locust users
                 resume such streams and check the text; besides them the rehearsal runs its own resuming SSE
                 clients through nginx (--resume-clients, streams twice as long as Locust's, so most span a
                 drain deadline): each reconnects with Last-Event-ID
                 via GET /stream/{id} and checks that the events continue without a gap or duplicate and that
                 the text equals the mock's uninterrupted answer. Expectation: every server_shutdown they saw
                 carried a resume id and was resumed to `done` with the whole text.

Locust runs for --duration seconds, or longer when the rollout needs it: it stops --cooldown seconds after the
last instance is back (SIGTERM: streams cut by the load test's own stop are counted `aborted`, not truncated).
All clients reach the gateways through nginx from 127.0.0.1, so the per-client limits are lifted
(RATE_LIMIT_PER_MINUTE=0, MAX_CONNECTIONS_PER_CLIENT=10000); everything listens on loopback only.

Every process started here runs in its own process group and is stopped with it (also on Ctrl-C or SIGTERM).
`processes.json` in the output directory lists them while the run lasts, for `kill_recorded()` (tests use it
as a backstop if this process itself was killed).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import grp
import json
import os
import platform
import pwd
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from app.upstream.mock import mock_tokens
from tests.dashboards.prometheus import Prometheus, ScrapeTarget, prometheus_config

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
NGINX_TEMPLATE = ROOT / "loadtest" / "nginx.conf.template"
DEFAULT_OUTPUT = ROOT / "loadtest" / "results" / "rehearsal"
SD_LISTEN_FDS_START = 3

MODES = ("full", "short-drain", "resume")
DEFAULT_DRAIN = {"full": 30.0, "short-drain": 2.0, "resume": 2.0}
DEFAULT_CLOSE_GRACE = {"full": 5.0, "short-drain": 2.0, "resume": 2.0}
CHART_VALUES = ROOT / "chart" / "values.yaml"  # nginx takes the Ingress' timeout and body size from here
TTFT_P95 = "histogram_quantile(0.95, sum by (le) (rate(streaming_ttft_seconds_bucket[10s])))"
ACTIVE = "sum by (instance) (streaming_active_connections)"
UP = "up"
CLAIM_MESSAGE = "continuing a handed-over stream"  # app/resume/claimer.py: a claimer picked a stream up
LOCUST_RESUME_KEYS = ("resumed", "resume_mismatch", "not_resumable")  # in the summary of users that resume
RESUMABLE_ENDPOINTS = ("/stream", "/ws")  # /v1/chat/completions streams end with server_shutdown, not handed over

# guards only: how long a step may take before the rehearsal gives up on it
START_GUARD_S = 90.0  # an instance's /ready, nginx, Prometheus, redis-server answering
RELOAD_GUARD_S = 20.0  # nginx answering with the new configuration
LOCUST_EXIT_GUARD_S = 40.0  # Locust writing its summary and exiting after SIGTERM
POLL_S = 0.05


class RehearsalError(RuntimeError):
    """The rehearsal itself could not do a step (a tool missing, a process that would not start or stop)."""


class Interrupted(BaseException):  # noqa: N818 - raised by the SIGTERM/SIGHUP handler, like KeyboardInterrupt
    """This process was asked to stop: clean up and exit."""


def log(message: str) -> None:
    print(f"[rehearsal {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def require_binary(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if path is None:
        raise RehearsalError(f"`{name}` is not installed: apt-get install {name} (.ci/bootstrap.sh installs it)")
    return path


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _loopback_listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    return sock


def wait_until(condition: Callable[[], bool], what: str, guard_s: float, *,
               alive: Callable[[], bool] | None = None, interval: float = POLL_S) -> float:
    """Poll `condition` until it holds; returns the seconds waited. `alive()` false (a process died) fails at once."""
    began = time.monotonic()
    while not condition():
        if alive is not None and not alive():
            raise RehearsalError(f"{what}: the process exited")
        if time.monotonic() - began > guard_s:
            raise RehearsalError(f"{what}: not within {guard_s:g} s")
        time.sleep(interval)
    return time.monotonic() - began


# --- processes ------------------------------------------------------------------------------------------------

class Child:
    """A process this run started, leader of its own process group (the group is what gets stopped).

    The leader is never reaped before its group was signalled for the last time: until then its pid, and so the
    group id, cannot belong to anyone else, and signals reach only what this run started.
    """

    def __init__(self, name: str, argv: Sequence[str], *, log_path: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None, pass_fds: Sequence[int] = ()) -> None:
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as out:
            self.popen = subprocess.Popen(
                list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                pass_fds=tuple(pass_fds), process_group=0,
            )
        self.pid = self.popen.pid
        try:
            self.create_time = psutil.Process(self.pid).create_time()
        except psutil.Error:  # already gone (exec failed): nothing of it left to stop
            self.create_time = 0.0
        self.exit_code: int | None = None

    def exited(self) -> bool:
        """Has the leader exited? (It stays a zombie, unreaped, so its pid and group id stay ours.)"""
        if self.exit_code is not None:
            return True
        try:
            return os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    def send(self, sig: int) -> None:
        if self.exit_code is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def wait_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.exited():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """`sig` to the leader, up to `timeout` for it to exit, then SIGKILL to whatever is left of the group."""
        if self.exit_code is None:
            if not self.exited():
                self.send(sig)
                self.wait_exit(timeout)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)  # the leader is alive or a zombie: the group is ours
            self.exit_code = self.popen.wait()
        return self.exit_code

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "pid": self.pid, "pgid": self.pid, "create_time": self.create_time}


class Supervisor:
    """Every child of the run, stopped in reverse order; `processes.json` lists the ones still running."""

    def __init__(self, record_path: Path) -> None:
        self.record_path = record_path
        self.children: list[Child] = []

    def spawn(self, name: str, argv: Sequence[str], **kwargs: Any) -> Child:
        child = Child(name, argv, **kwargs)
        self.children.append(child)
        self._write()
        return child

    def reaped(self, child: Child) -> None:
        self._write()

    def _write(self) -> None:
        live = [c.record() for c in self.children if c.exit_code is None]
        tmp = self.record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(live, indent=1))
        tmp.replace(self.record_path)

    def stop_all(self) -> None:
        """At the end (or on failure): gateways are killed outright, with their workers (group SIGKILL): a SIGTERM
        would drain for up to DRAIN_TIMEOUT_SECONDS, and gunicorn's quick shutdown (SIGINT/SIGQUIT) waits its
        graceful_timeout for uvicorn workers; nothing of theirs outlives the run's temp directory. The others
        get SIGTERM (nginx: fast shutdown; Prometheus, redis-server, Locust: their clean exit)."""
        for child in reversed(self.children):
            if child.exit_code is None:
                if child.name.startswith("gw-"):
                    child.stop(signal.SIGKILL, timeout=5.0)
                else:
                    child.stop(signal.SIGTERM, timeout=10.0)
        self._write()


def kill_recorded(path: Path) -> list[str]:
    """Backstop after a run that could not clean up (it was SIGKILLed): SIGKILL the process groups it recorded.

    A group is killed only while provably the run's: its leader alive with the recorded start time (killpg),
    or, once the leader is gone, the members still in the group that are not leaders of it themselves (a group
    id stays taken while a member lives; a new process reusing the number would lead its own group).
    """
    if not path.exists():
        return []
    killed = []
    for entry in json.loads(path.read_text() or "[]"):
        pid, pgid = int(entry["pid"]), int(entry["pgid"])
        try:
            leader = psutil.Process(pid)
            if abs(leader.create_time() - float(entry["create_time"])) < 0.01 and os.getpgid(pid) == pgid:
                os.killpg(pgid, signal.SIGKILL)
                killed.append(entry["name"])
                continue
        except (psutil.Error, ProcessLookupError, PermissionError):
            pass
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
                if proc.pid != pgid and os.getpgid(proc.pid) == pgid:
                    proc.kill()
                    killed.append(f"{entry['name']}:{proc.pid}")
    return killed


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
        self.sock = _loopback_listener()  # held for the whole run: restarts take it over
        self.metrics_sock = _loopback_listener()
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
        fd, metrics_fd = self.sock.fileno(), self.metrics_sock.fileno()
        tag = f"{self.name}.{self.generation}"
        env = dict(self.env, PORT=str(self.port), METRICS_PORT=self.metrics_url.rsplit(":", 1)[1], LISTEN_FDS="2",
                   PROMETHEUS_MULTIPROC_DIR=str(self.workdir / f"metrics-{tag}"))
        if env.get("RESUME_STORE", "local") == "local":
            env["RESUME_DIR"] = str(self.workdir / f"resume-{tag}")
        # the shell moves the public socket to fd 3 and the metrics socket to fd 4, through two spare fds
        # (copied first, so neither move overwrites the other), and sets LISTEN_PID to its own pid, which
        # exec keeps for gunicorn
        spare, spare2 = [n for n in range(5, 10) if n not in (fd, metrics_fd)][:2]
        move = (f"exec {spare}<&{fd} {spare2}<&{metrics_fd}; "
                f"exec {SD_LISTEN_FDS_START}<&{spare} {SD_LISTEN_FDS_START + 1}<&{spare2} {spare}<&- {spare2}<&-; ")
        script = f'{move}LISTEN_PID=$$; export LISTEN_PID; exec {shlex.quote(sys.executable)} -m app'
        self.child = self.supervisor.spawn(tag, ["/bin/sh", "-c", script], log_path=self.logdir / f"{tag}.log",
                                           env=env, cwd=ROOT, pass_fds=(fd, metrics_fd))

    def ready(self) -> bool:
        try:
            return httpx.get(self.url + "/ready", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self) -> float:
        child = self.child
        assert child is not None
        try:
            return wait_until(self.ready, f"{self.name} /ready", START_GUARD_S, alive=lambda: not child.exited(),
                              interval=0.1)
        except RehearsalError as exc:
            raise RehearsalError(f"{exc}\n{tail(child.log_path)}") from None

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


def drain_cuts(log_path: Path) -> int | None:
    """Streams the drain ended with server_shutdown, summed over the workers' "drain finished" log lines."""
    cuts = []
    for line in log_path.read_text(errors="replace").splitlines():
        if '"drain finished"' in line:
            with contextlib.suppress(ValueError):
                cuts.append(int(json.loads(line).get("cut", 0)))
    return sum(cuts) if cuts else None


def shutdown_ends(log_path: Path) -> Counter[str]:
    """Streams that ended with server_shutdown, by endpoint, from the `stream finished` log lines."""
    ends: Counter[str] = Counter()
    for line in log_path.read_text(errors="replace").splitlines():
        if '"stream finished"' in line and '"shutdown"' in line:
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if entry.get("outcome") == "shutdown":
                    ends[str(entry.get("endpoint"))] += 1
    return ends


def log_messages(paths: Sequence[Path], message: str) -> int:
    """How many JSON log lines of these files have this message (e.g. a claimer's handover pickups)."""
    needle = json.dumps(message)
    return sum(path.read_text(errors="replace").count(f'"message": {needle}') for path in paths if path.exists())


def nginx_access_stats(path: Path) -> dict[str, Any]:
    """From nginx's access log: requests by status, and the ones it sent to more than one instance (a 503 or
    connection error from the first, `proxy_next_upstream`), with what the earlier attempts answered."""
    statuses: Counter[str] = Counter()
    retried: Counter[str] = Counter()
    pattern = re.compile(r'"(?P<request>[^"]*)" (?P<status>\d{3}) .*upstream_status=(?P<upstream>.*?) rt=')
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            match = pattern.search(line)
            if match is None:
                continue
            statuses[match["status"]] += 1
            attempts = [a.strip() for a in re.split(r"[,:]", match["upstream"]) if a.strip()]
            if len(attempts) > 1:
                retried[" → ".join(attempts)] += 1
    return {"requests": sum(statuses.values()), "by_status": dict(sorted(statuses.items())),
            "retried_on_another_instance": sum(retried.values()), "retries": dict(retried)}


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --- nginx ----------------------------------------------------------------------------------------------------

def chart_ingress() -> dict[str, Any]:
    """The chart's `ingress` values (chart/values.yaml): the settings nginx mirrors come from there."""
    import yaml

    values: dict[str, Any] = yaml.safe_load(CHART_VALUES.read_text())
    ingress: dict[str, Any] = values["ingress"]
    return ingress


class Nginx:
    """Debian's nginx with its own prefix (config, pid, logs, temp paths), `daemon off`, reloaded with SIGHUP."""

    def __init__(self, prefix: Path, supervisor: Supervisor) -> None:
        self.binary = require_binary("nginx")
        self.prefix = prefix
        self.conf = prefix / "nginx.conf"
        self.supervisor = supervisor
        self.generation = 0
        self.port = 0
        self.child: Child | None = None
        self.reloads: list[dict[str, Any]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def flags(self) -> list[str]:
        """Its own prefix, config and early error log: nothing of the system's nginx setup is read or written."""
        return ["-p", f"{self.prefix}/", "-c", str(self.conf), "-e", str(self.prefix / "error.log")]

    def render(self, servers: Sequence[str]) -> str:
        user = ""
        if os.geteuid() == 0:  # workers would run as nobody, who cannot write to this prefix
            user = f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};"
        upstream = "\n".join(f"        server {address} max_fails=1 fail_timeout=10s;" for address in servers)
        ingress = chart_ingress()
        text = NGINX_TEMPLATE.read_text()
        for key, value in {
            "PREFIX": str(self.prefix), "PORT": str(self.port), "GENERATION": str(self.generation),
            "UPSTREAM_SERVERS": upstream, "USER_DIRECTIVE": user,
            "PROXY_TIMEOUT": str(int(ingress["proxyTimeoutSeconds"])), "BODY_SIZE": str(ingress["proxyBodySize"]),
        }.items():
            text = text.replace("{{" + key + "}}", value)
        leftover = re.findall(r"\{\{\w+\}\}", text)
        if leftover:
            raise RehearsalError(f"nginx template: unknown placeholders {leftover}")
        return text

    def _write(self, servers: Sequence[str]) -> None:
        self.conf.write_text(self.render(servers))
        check = subprocess.run([self.binary, "-t", "-q", *self.flags], capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise RehearsalError(f"nginx -t refused the configuration:\n{check.stderr}")

    def answering_generation(self) -> int | None:
        try:  # a new connection each time: a kept-alive one could still be served by an old worker
            response = httpx.get(self.url + "/__rehearsal/generation", timeout=2.0, headers={"Connection": "close"})
            return int(response.text.strip()) if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def start(self, servers: Sequence[str]) -> None:
        for _attempt in range(3):  # the port is free when picked; another process may take it before nginx binds
            self.port = free_loopback_port()
            self.generation = 1
            self._write(servers)
            self.child = self.supervisor.spawn(
                "nginx", [self.binary, *self.flags],
                log_path=self.prefix / "stdout.log",
            )
            child = self.child
            try:
                wait_until(lambda: self.answering_generation() == 1, "nginx", START_GUARD_S,
                           alive=lambda: not child.exited())
                return
            except RehearsalError:
                child.stop()
                if "Address already in use" not in tail(self.prefix / "error.log"):
                    raise RehearsalError(f"nginx did not start:\n{tail(self.prefix / 'error.log')}") from None
        raise RehearsalError("nginx: no free port after 3 attempts")

    def reload(self, servers: Sequence[str], why: str, t0: float) -> float:
        """New upstream list, SIGHUP, and wait until new connections get the new configuration; returns seconds."""
        assert self.child is not None
        self.generation += 1
        self._write(servers)
        began = time.monotonic()
        self.child.send(signal.SIGHUP)
        child = self.child
        wanted = self.generation

        def settled() -> bool:  # three new connections in a row answered by the new workers
            return all(self.answering_generation() == wanted for _ in range(3))

        waited = wait_until(settled, f"nginx reload to generation {wanted}", RELOAD_GUARD_S,
                            alive=lambda: not child.exited())
        self.reloads.append({"generation": wanted, "why": why, "servers": list(servers),
                             "at": round(began - t0, 3), "took_s": round(waited, 3)})
        return waited


# --- Prometheus, redis-server ------------------------------------------------------------------------------

def start_prometheus(targets: Sequence[ScrapeTarget], workdir: Path, supervisor: Supervisor) -> Prometheus:
    """Debian's Prometheus on a free loopback port, 1 s scrapes (tests/dashboards/prometheus.py's config)."""
    binary = require_binary("prometheus")
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "prometheus.yml"
    config_path.write_text(json.dumps(prometheus_config(targets, [], interval="1s"), indent=2))
    for _attempt in range(3):
        port = free_loopback_port()
        child = supervisor.spawn(
            "prometheus",
            [binary, f"--config.file={config_path}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            log_path=workdir / "prometheus.log",
        )
        server = Prometheus(url=f"http://127.0.0.1:{port}", proc=child.popen, config_path=config_path,
                            log_path=workdir / "prometheus.log")

        def ready(server: Prometheus = server) -> bool:
            try:
                return server.client.get("/-/ready").status_code == 200
            except httpx.HTTPError:
                return False

        try:
            wait_until(ready, "prometheus", START_GUARD_S, alive=lambda child=child: not child.exited())  # type: ignore[misc]
            return server
        except RehearsalError:
            server.client.close()
            child.stop()
            if "address already in use" not in tail(workdir / "prometheus.log").lower():
                raise RehearsalError(f"prometheus did not start:\n{tail(workdir / 'prometheus.log')}") from None
    raise RehearsalError("prometheus: no free port after 3 attempts")


def start_redis(workdir: Path, supervisor: Supervisor) -> tuple[Child, str]:
    binary = require_binary("redis-server")
    workdir.mkdir(parents=True, exist_ok=True)

    def pong(port: int) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    for _attempt in range(3):
        port = free_loopback_port()
        child = supervisor.spawn(
            "redis-server",
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(workdir)],
            log_path=workdir / "redis.log",
        )
        try:
            wait_until(lambda p=port: pong(p), "redis-server", START_GUARD_S,  # type: ignore[misc]
                       alive=lambda c=child: not c.exited())  # type: ignore[misc]
            return child, f"redis://127.0.0.1:{port}/0"
        except RehearsalError:
            child.stop()
    raise RehearsalError(f"redis-server did not start:\n{tail(workdir / 'redis.log')}")


# --- resuming SSE clients (resume mode) ---------------------------------------------------------------------

@dataclass
class ResumeStats:
    streams: int = 0  # streams opened (each counted once, however many times it was resumed)
    completed: int = 0  # ended with done, every seq once, the whole text
    shutdowns: int = 0  # server_shutdown events seen
    shutdowns_with_resume: int = 0  # the generation was handed over (a cut replay connection carries no id)
    resumed: int = 0  # server_shutdowns after which GET /stream/{id} continued the stream (the rest checked at done)
    failures: Counter[str] = field(default_factory=Counter)  # by reason: not_resumable, gap, text_mismatch, ...
    refused: int = 0
    done_id_skips: int = 0  # completed streams whose `done` did not carry the next event id (n+1)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["failures"] = dict(self.failures)
        return out


class ResumeClients:
    """`clients` threads, each streaming `/stream` through nginx until stopped, resuming after server_shutdown."""

    MAX_HOPS = 6

    def __init__(self, base_url: str, clients: int, max_tokens: int) -> None:
        self.base_url = base_url
        self.max_tokens = max_tokens
        self.stop = threading.Event()
        self.stats = ResumeStats()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), name=f"resume-client-{i}", daemon=True)
                        for i in range(clients)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def finish(self, guard_s: float) -> None:
        """Stop opening streams; the ones open are read to their end (bounded by the guard)."""
        self.stop.set()
        deadline = time.monotonic() + guard_s
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _count(self, **deltas: int) -> None:
        with self.lock:
            for key, value in deltas.items():
                setattr(self.stats, key, getattr(self.stats, key) + value)

    def _fail(self, reason: str) -> None:
        with self.lock:
            self.stats.failures[reason] += 1

    def _run(self, index: int) -> None:
        n = 0
        with httpx.Client(timeout=httpx.Timeout(60.0, connect=5.0)) as client:
            while not self.stop.is_set():
                prompt = f"rehearsal resume client {index} stream {n}"
                n += 1
                try:
                    self._one(client, prompt)
                except httpx.HTTPError as exc:
                    self._fail(f"client:{type(exc).__name__}")
                    time.sleep(0.2)

    @staticmethod
    def _events(response: httpx.Response) -> Iterator[tuple[str | None, dict[str, Any]]]:
        event_id: str | None = None
        data: list[str] = []
        for line in response.iter_lines():
            if line.startswith("id:"):
                event_id = line[3:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip(" "))
            elif not line and data:
                yield event_id, json.loads("\n".join(data))
                event_id, data = None, []

    def _one(self, client: httpx.Client, prompt: str) -> None:
        body = {"prompt": prompt, "max_tokens": self.max_tokens}
        request: tuple[str, str, dict[str, Any]] = ("POST", "/stream", {"json": body})
        seqs: list[int] = []  # of status and token events (0, 1..n)
        text: list[str] = []
        final_seq: int | None = None
        last_id: str | None = None
        counted = False
        shutdowns = 0  # of this stream: each one resumed, once the stream reached done with the whole text
        for _hop in range(self.MAX_HOPS):
            method, path, kwargs = request
            with client.stream(method, self.base_url + path, **kwargs) as response:
                if response.status_code in (429, 503) and not counted:
                    response.read()
                    self._count(refused=1)
                    time.sleep(0.5)
                    return
                if response.status_code != 200:
                    response.read()
                    self._fail(f"http_{response.status_code}:{'resume' if counted else 'open'}")
                    return
                if not counted:
                    self._count(streams=1)
                    counted = True
                stream_id = response.headers.get("x-stream-id", "")
                terminal: dict[str, Any] | None = None
                for event_id, event in self._events(response):
                    last_id = event_id or last_id
                    seq = int(event_id.rsplit("-", 1)[1]) if event_id else None
                    if event.get("type") in ("done", "error", "server_shutdown"):
                        terminal, final_seq = event, seq
                        break
                    if seq is not None:
                        seqs.append(seq)
                    if event.get("type") == "token":
                        text.append(str(event.get("content", "")))
            if terminal is None:
                self._fail("ended_silently")
                return
            if terminal["type"] == "server_shutdown":
                self._count(shutdowns=1)
                shutdowns += 1
                resume_id = terminal.get("resume")
                if resume_id:
                    self._count(shutdowns_with_resume=1)
                elif method == "GET" and last_id:
                    # a resumed connection (a replay) cut by a drain: the generation runs on elsewhere, so the
                    # client resumes again from the last event it got, as EventSource would
                    resume_id = last_id
                else:
                    self._fail("server_shutdown_without_resume_id")
                    return
                request = ("GET", f"/stream/{stream_id}", {"headers": {"Last-Event-ID": str(resume_id)}})
                continue
            if terminal["type"] == "error":
                self._fail(f"error:{terminal.get('code')}")
                return
            break
        else:
            self._fail("too_many_hops")
            return
        if seqs != list(range(len(seqs))):
            self._fail("gap_or_duplicate")
        elif "".join(text) != "".join(mock_tokens(prompt, 0, self.max_tokens)):
            self._fail("text_mismatch")
        elif terminal.get("tokens") != self.max_tokens:
            self._fail("done_tokens")
        else:
            self._count(completed=1, resumed=shutdowns)
            if final_seq != len(seqs):  # `done` should be the next id (n+1); noted, not a resumption failure
                self._count(done_id_skips=1)


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

    @property
    def stream_seconds(self) -> float:
        return self.max_tokens / self.tokens_per_second


def gateway_env(config: Config, redis_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("UPSTREAM_", "MOCK_", "PROMETHEUS_", "LISTEN_", "RESUME_", "REDIS_", "LOCUST_"))}
    env.update({
        "HOST": "127.0.0.1", "WEB_CONCURRENCY": str(config.workers), "LOG_LEVEL": "info", "LOG_FORMAT": "json",
        "MOCK_TOKENS_PER_SECOND": f"{config.tokens_per_second:g}", "MOCK_FIRST_TOKEN_MS": "50",
        "DRAIN_TIMEOUT_SECONDS": f"{config.drain_timeout:g}", "DRAIN_CLOSE_GRACE_SECONDS": f"{config.close_grace:g}",
        # every client reaches the gateways through nginx from 127.0.0.1: one "client" for the per-client limits
        "RATE_LIMIT_PER_MINUTE": "0", "MAX_CONNECTIONS_PER_CLIENT": "10000",
    })
    if redis_url is not None:
        env.update({"RESUME_STORE": "redis", "REDIS_URL": redis_url, "REDIS_TIMEOUT_SECONDS": "2"})
    return env


def locust_env(config: Config, summary_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCUST_")}
    env.update({
        "LOCUST_SUMMARY_PATH": str(summary_path), "LOCUST_MAX_TOKENS": str(config.max_tokens),
        "LOCUST_MAX_RECONNECTS": "5", "LOCUST_MAX_RETRY_AFTER": "1",
        "LOCUST_NETWORK_TIMEOUT": f"{max(60.0, config.stream_seconds + config.drain_timeout + 30):g}",
    })
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
            _, redis_url = start_redis(self.workdir / "redis", self.supervisor)
            log(f"redis-server at {redis_url}")
        env = gateway_env(config, redis_url)
        self.instances = [Instance(i, env, self.supervisor, self.workdir, self.logdir)
                          for i in range(config.instances)]
        # Prometheus first: it applies its targets a few seconds after start (discovery reload interval)
        self.prometheus = start_prometheus(
            [ScrapeTarget(inst.metrics_url, {"instance": inst.name}) for inst in self.instances],
            self.workdir / "prometheus", self.supervisor)
        log(f"prometheus at {self.prometheus.url}")
        for instance in self.instances:
            instance.start()
        for instance in self.instances:
            waited = instance.wait_ready()
            log(f"{instance.name} ready on {instance.url} ({waited:.1f} s)")
        prefix = self.workdir / "nginx"
        prefix.mkdir()
        self.nginx = Nginx(prefix, self.supervisor)
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
        argv = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(config.users),
                "-r", str(max(1, config.users // 2)), "-t", f"{guard}s", "--host", self.nginx.url,
                "--csv", str(self.out / "locust"), "--only-summary",
                # at the stop, users finish the stream they are reading (then `aborted` stays 0)
                "--stop-timeout", f"{self.stop_timeout():g}"]
        self.t0, self.t0_epoch = time.monotonic(), time.time()
        self.locust = self.supervisor.spawn("locust", argv, log_path=self.logdir / "locust.log",
                                            env=locust_env(config, self.out / "locust_summary.json"), cwd=self.out)
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
        log(f"{instance.name}: drained and exited in {record.drain_s:.2f} s (code {record.exit_code}, "
            f"{record.in_flight_at_sigterm} streams at SIGTERM, {record.cut_by_drain} cut)")
        instance.start()
        record.replacement_ready_s = round(instance.wait_ready(), 3)
        record.ready_at = self.since()
        self.nginx.reload(self.in_service(), f"add {instance.name}", self.t0)
        record.added_at = self.since()
        log(f"{instance.name}: replacement ready in {record.replacement_ready_s:.1f} s, back in the upstream")
        return record

    def run(self) -> dict[str, Any]:
        config = self.config
        try:
            self.setup()
            self.start_load()
            time.sleep(config.warmup)
            for instance in self.instances:
                assert self.locust is not None
                if self.locust.exited():
                    raise RehearsalError(f"locust exited during the rollout:\n{tail(self.locust.log_path)}")
                self.terminations.append(self.terminate(instance))
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
        for instance in self.instances:
            instance.close()
        for source, name in ((self.workdir / "nginx" / "error.log", "nginx-error.log"),
                             (self.workdir / "nginx" / "access.log", "nginx-access.log"),
                             (self.workdir / "prometheus" / "prometheus.log", "prometheus.log"),
                             (self.workdir / "redis" / "redis.log", "redis.log")):
            if source.exists():
                shutil.copyfile(source, self.logdir / name)
        if self.nginx is not None and self.nginx.conf.exists():
            shutil.copyfile(self.nginx.conf, self.logdir / "nginx.conf")
        shutil.rmtree(self.workdir, ignore_errors=True)
        with contextlib.suppress(OSError):
            (self.out / "processes.json").unlink()

    # -- results ----------------------------------------------------------------------------------------------
    def results(self, summary: dict[str, Any], series: dict[str, Any], load_seconds: float,
                resume: dict[str, Any] | None) -> dict[str, Any]:
        config = self.config
        counts = {key: int(summary.get(key, 0)) for key in
                  ("started", "completed", "graceful", "truncated", "refused", "errors", "aborted", "reconnects",
                   "retried", "in_flight")}
        # a locustfile whose users resume (issue 8) reports these too; None: its users do not resume
        locust_resume = {key: summary[key] for key in LOCUST_RESUME_KEYS if key in summary} or None
        checks: list[tuple[str, bool]] = [
            ("no stream truncated (truncated == 0)", counts["truncated"] == 0),
            ("no stream ended in an error (errors == 0)", counts["errors"] == 0),
            ("streams completed under load (completed > 0)", counts["completed"] > 0),
            (f"every instance drained, exited 0 and was replaced ({len(self.terminations)}/{config.instances})",
             len(self.terminations) == config.instances and all(t.exit_code == 0 for t in self.terminations)),
            ("the rehearsal's own steps went as planned", not self.problems),
        ]
        longest = max((t.drain_s for t in self.terminations), default=0.0)
        if config.mode == "full":
            checks.append((f"drain {config.drain_timeout:g} s outlasts the ~{config.stream_seconds:g} s streams: "
                           "no server_shutdown (graceful == 0)", counts["graceful"] == 0))
            checks.append((f"every drain ended before its deadline (longest {longest:.1f} s)",
                           longest < config.drain_timeout))
        else:
            checks.append((f"drain {config.drain_timeout:g} s is shorter than the ~{config.stream_seconds:g} s "
                           "streams: the streams it cut ended with server_shutdown (graceful > 0)",
                           counts["graceful"] > 0))
        handover = None
        if config.mode == "resume":
            gateway_logs = [c.log_path for c in self.supervisor.children if c.name.startswith("gw-")]
            handover = {"cut_by_drains": sum(t.cut_by_drain or 0 for t in self.terminations),
                        "cut_resumable": sum(t.shutdown_by_endpoint.get(e, 0) for t in self.terminations
                                             for e in RESUMABLE_ENDPOINTS),
                        "continued_elsewhere": log_messages(gateway_logs, CLAIM_MESSAGE)}
            checks.append(("every /stream and /ws stream a drain cut was handed over and continued by another "
                           f"instance ({handover['continued_elsewhere']} continued, {handover['cut_resumable']} cut)",
                           handover["continued_elsewhere"] >= handover["cut_resumable"] > 0))
            if locust_resume is not None:
                checks.append(("Locust users resumed handed-over streams, every resumed stream whole "
                               f"(resumed {locust_resume.get('resumed', 0)}, resume_mismatch "
                               f"{locust_resume.get('resume_mismatch', 0)}, not_resumable "
                               f"{locust_resume.get('not_resumable', 0)})",
                               locust_resume.get("resumed", 0) > 0 and not locust_resume.get("resume_mismatch")
                               and not locust_resume.get("not_resumable")))
            stats = resume or {}
            failures = sum((stats.get("failures") or {}).values())
            checks.append(("resuming clients: every server_shutdown was resumed to done with the whole text, no "
                           "gap or duplicate, and no stream failed otherwise "
                           f"({stats.get('resumed', 0)}/{stats.get('shutdowns', 0)} resumed, {failures} failed)",
                           stats.get("shutdowns", 0) > 0 and stats.get("resumed") == stats.get("shutdowns")
                           and failures == 0))
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
            "nginx_reloads": self.nginx.reloads if self.nginx is not None else [],
            "nginx_requests": nginx_access_stats(self.workdir / "nginx" / "access.log"),
            "resume_clients": resume,
            "handover": handover,
            "prometheus": series,
            "locust_stats": locust_stats(self.out / "locust_stats.csv"),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")},
            "t0_epoch": self.t0_epoch,
        }


# --- Prometheus data --------------------------------------------------------------------------------------------

def query_series(prometheus: Prometheus, start: float, end: float) -> dict[str, Any]:
    """Range queries over the run (1 s steps): active connections per instance, TTFT p95."""
    def points(expr: str) -> list[dict[str, Any]]:
        data = prometheus.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step="1s")
        return [{"labels": item["metric"], "values": [[float(t), float(v)] for t, v in item["values"]]}
                for item in data["result"]]

    return {"active_connections": points(ACTIVE), "ttft_p95": points(TTFT_P95), "up": points(UP),
            "queries": {"active_connections": ACTIVE, "ttft_p95": TTFT_P95, "up": UP}}


def locust_stats(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    keep = ("Type", "Name", "Request Count", "Failure Count", "Median Response Time", "95%", "99%",
            "Max Response Time")
    with path.open() as f:
        return [{k: row.get(k, "") for k in keep} for row in csv.DictReader(f)]


# --- picture and report -------------------------------------------------------------------------------------

def render_png(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = float(results["t0_epoch"])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True, height_ratios=[3, 2])
    colours = {}
    series = sorted(results["prometheus"]["active_connections"], key=lambda s: s["labels"].get("instance", ""))
    for n, item in enumerate(series):
        name = item["labels"].get("instance", "?")
        xs, ys = with_gaps([(t - t0, v) for t, v in item["values"]])
        width = 1.2 + 1.0 * (len(series) - 1 - n)  # wider first: instances carrying equal loads stay visible
        line, = top.step(xs, ys, where="post", label=name, linewidth=width, alpha=0.85)
        colours[name] = line.get_color()
    for termination in results["terminations"]:
        colour = colours.get(termination["instance"], "grey")
        for axis in (top, bottom):
            axis.axvspan(termination["removed_at"], termination["added_at"], color=colour, alpha=0.08)
            axis.axvline(termination["sigterm_at"], color=colour, linestyle="--", linewidth=1.2)
        top.annotate(f"SIGTERM {termination['instance']}\ndrain {termination['drain_s']:.1f} s",
                     xy=(termination["sigterm_at"], 1.0), xycoords=("data", "axes fraction"),
                     xytext=(3, -3), textcoords="offset points", va="top", fontsize=8, color=colour)
    top.set_ylabel("active streams per instance")
    top.set_ylim(bottom=0)
    top.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, borderaxespad=0)
    top.grid(alpha=0.3)
    config = results["config"]
    counts = results["summary"]
    top.set_title(
        f"Rolling restart, mode {results['mode']}: {config['instances']} instances, {config['users']} users, "
        f"drain {config['drain_timeout']:g} s, preStop {config['prestop']:g} s  —  completed {counts['completed']}, "
        f"server_shutdown {counts['graceful']}, truncated {counts['truncated']}, errors {counts['errors']}",
        fontsize=9)
    highest = 0.0
    ttft_lines: list[Any] = []
    for item in results["prometheus"]["ttft_p95"]:
        pairs = [(t - t0, v * 1000) for t, v in item["values"] if v == v]  # NaN: no stream started in the window
        if pairs:
            xs, ys = with_gaps(pairs)
            ttft_lines += bottom.plot(xs, ys, color="black", linewidth=1.4,
                                      label="TTFT p95,\nall instances\n(rate over 10 s)")
            highest = max(highest, max(p[1] for p in pairs))
    bottom.set_ylabel("TTFT p95 (ms)")
    bottom.set_xlabel("seconds since the load started (shaded: instance out of nginx's upstream; dashed: SIGTERM; "
                      "a line breaks while its instance is not scraped)", fontsize=8)
    bottom.set_ylim(0, max(highest * 1.3, 10.0))
    bottom.grid(alpha=0.3)
    if ttft_lines:
        bottom.legend(handles=ttft_lines[:1], loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8,
                      borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def with_gaps(points: list[tuple[float, float]], step: float = 1.0) -> tuple[list[float], list[float]]:
    """x and y lists with a NaN where samples are missing (an instance down), so the line breaks there."""
    xs: list[float] = []
    ys: list[float] = []
    for x, y in points:
        if xs and x - xs[-1] > 1.5 * step:
            xs.append(xs[-1] + step)
            ys.append(float("nan"))
        xs.append(x)
        ys.append(y)
    return xs, ys


def _num(text: str) -> str:
    try:
        return f"{float(text):.0f}"
    except ValueError:
        return text or "n/a"


def _ms(values: list[float]) -> str:
    return f"{max(values) * 1000:.0f} ms" if values else "n/a"


def render_report(results: dict[str, Any], png_name: str, command: str) -> str:
    config, counts = results["config"], results["summary"]
    verdict = "PASS" if results["ok"] else "FAIL"
    lines = [
        f"# Rolling-restart rehearsal: mode `{results['mode']}` — {verdict}",
        "",
        f"{results['machine']['date']}, {results['machine']['cpus']} CPUs, {results['machine']['platform']}, "
        f"Python {results['machine']['python']}. Command: `{command}`",
        "",
        f"{config['instances']} gateway instances (`python -m app`, {config['workers']} workers each, built-in mock at "
        f"{config['tokens_per_second']:g} tok/s, max_tokens {config['max_tokens']}: ~{config['stream_seconds']:g} s "
        f"streams) behind Debian's nginx (the chart's Ingress settings), Prometheus scraping each instance every "
        f"second, Locust with {config['users']} users (/stream, /v1/chat/completions, /ws) for "
        f"{results['load_seconds']:g} s. Each instance in turn: out of the upstream (reload), preStop "
        f"{config['prestop']:g} s, SIGTERM, drain (DRAIN_TIMEOUT_SECONDS={config['drain_timeout']:g}), exit, "
        "replacement on the same port, /ready, back in the upstream (reload)."
        + (" RESUME_STORE=redis on a real redis-server." if results["mode"] == "resume" else ""),
        "",
        "## Streams (Locust)",
        "",
        "| started | completed | graceful (server_shutdown) | truncated | refused | errors | aborted by the load "
        "test's stop | reconnects | resent unanswered |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {counts['started']} | {counts['completed']} | {counts['graceful']} | {counts['truncated']} | "
        f"{counts['refused']} | {counts['errors']} | {counts['aborted']} | {counts['reconnects']} | "
        f"{counts['retried']} |",
        "",
    ]
    if results["by_endpoint"]:
        lines += ["| endpoint | started | completed | graceful | truncated | refused | errors | aborted |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for endpoint, c in results["by_endpoint"].items():
            lines.append(f"| `{endpoint}` | {c.get('started', 0)} | {c.get('completed', 0)} | {c.get('graceful', 0)} "
                         f"| {c.get('truncated', 0)} | {c.get('refused', 0)} | {c.get('errors', 0)} | "
                         f"{c.get('aborted', 0)} |")
        lines.append("")
    if results["by_reason"]:
        lines.append("Ends other than `completed`: " + ", ".join(
            f"`{reason}` {n}" for reason, n in results["by_reason"].items()) + ".")
        lines.append("")
    if results["locust_resume"] is not None:
        lines += ["Locust's resuming users: " + ", ".join(f"{key} {n}" for key, n in results["locust_resume"].items())
                  + " (`resume_mismatch` and `not_resumable` are counted in `errors` too).", ""]
    nginx = results["nginx_requests"]
    lines += [
        f"nginx: {nginx['requests']} requests (" + ", ".join(f"{status}: {n}" for status, n in
                                                             nginx["by_status"].items())
        + f"); {nginx['retried_on_another_instance']} sent to a second instance by `proxy_next_upstream`"
        + (" (" + ", ".join(f"upstream statuses {k}: {v}" for k, v in nginx["retries"].items()) + ")"
           if nginx["retries"] else "") + ".",
        "",
    ]
    lines += [
        "## Per instance",
        "",
        "| instance | out of upstream at | SIGTERM at | streams at SIGTERM | drain (SIGTERM → exit) | cut by the drain "
        "| exit code | replacement ready after | back in upstream at |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in results["terminations"]:
        lines.append(
            f"| {t['instance']} | {t['removed_at']:.1f} s | {t['sigterm_at']:.1f} s | {t['in_flight_at_sigterm']} | "
            f"**{t['drain_s']:.2f} s** | {t['cut_by_drain']} | {t['exit_code']} | {t['replacement_ready_s']:.1f} s | "
            f"{t['added_at']:.1f} s |")
    lines += ["", "Times are seconds since the load started; \"cut by the drain\" sums the workers' "
              "`drain finished` log lines (streams still running at the drain deadline).", ""]
    if results["resume_clients"] is not None:
        r = results["resume_clients"]
        lines += [
            "## Resumption (the rehearsal's own resuming SSE clients)",
            "",
            "| streams | completed with the whole text | server_shutdown seen | with a resume id | resumed | failures "
            "| refused |",
            "|---:|---:|---:|---:|---:|---|---:|",
            f"| {r['streams']} | {r['completed']} | {r['shutdowns']} | {r['shutdowns_with_resume']} | {r['resumed']} | "
            f"{', '.join(f'{k} {v}' for k, v in r['failures'].items()) or 'none'} | {r['refused']} |",
            "",
            "Each resumed stream is checked to `done`: status and token ids 0..n once each and in order, the text "
            "equal to the mock's uninterrupted answer, `done.tokens` = max_tokens."
            + (f" Note: {r['done_id_skips']} of the completed streams got a `done` whose id is not n+1 (a skipped "
               "id: the live `done` is encoded once for the resume log and again for the client)."
               if r["done_id_skips"] else ""),
            "",
            f"Gateway side (their logs): {results['handover']['cut_by_drains']} streams were still running at a "
            f"drain deadline; the {results['handover']['cut_resumable']} of them on /stream and /ws were handed to "
            f"the fleet (the /v1/chat/completions ones end with server_shutdown), and claimers on other instances "
            f"continued {results['handover']['continued_elsewhere']} (`{CLAIM_MESSAGE}`).",
            "",
        ]
        if results["locust_resume"] is None:
            lines += [
                "This locustfile's users do not resume (their summary has no `resumed` count): after "
                "`server_shutdown` they count a graceful end and open a new stream.",
                "",
            ]
    ttft = [v for item in results["prometheus"]["ttft_p95"] for _, v in item["values"] if v == v]
    lines += [
        "## Over the rollout",
        "",
        f"![active connections per instance and TTFT p95]({png_name})",
        "",
        f"TTFT p95 from Prometheus (`{results['prometheus']['queries']['ttft_p95']}`): highest {_ms(ttft)}, "
        f"median {(statistics.median(ttft) * 1000 if ttft else 0):.0f} ms (interpolated inside the histogram's "
        "buckets, 50 ms, 100 ms, 250 ms, ...: any p95 between 50 and 100 ms reads as ~97 ms; no line where no "
        "stream started in the last 10 s). Active connections: "
        f"`{results['prometheus']['queries']['active_connections']}`. Locust's own measurements:",
        "",
    ]
    ttft_rows = [row for row in results["locust_stats"] if row["Name"] in ("TTFT", "stream duration")]
    if ttft_rows:
        lines += ["| Locust | count | median | p95 | p99 | max |", "|---|---:|---:|---:|---:|---:|"]
        for row in ttft_rows:
            cells = [_num(row[key]) for key in ("Median Response Time", "95%", "99%", "Max Response Time")]
            lines.append(f"| {row['Type']} {row['Name']} | {row['Request Count']} | "
                         + " | ".join(f"{cell} ms" for cell in cells) + " |")
        lines.append("")
    lines += ["## Checks", ""]
    lines += [f"- [{'x' if c['passed'] else ' '}] {c['check']}" for c in results["checks"]]
    if results["problems"]:
        lines += ["", "Problems: " + "; ".join(results["problems"])]
    lines += ["", "Files: `rehearsal.json` (every number), `locust_*.csv`, `locust_summary.json`, `logs/` (each "
              "gateway process, nginx config and logs, Prometheus, Locust).", ""]
    return "\n".join(lines)


# --- command line ---------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(prog="python -m loadtest.rehearsal", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=MODES, default="full")
    parser.add_argument("--duration", type=float, default=30.0,
                        help="seconds of load at least (longer if the rollout needs it) [30]")
    parser.add_argument("--users", type=int, default=30, help="Locust users [30]")
    parser.add_argument("--instances", type=int, default=3, help="gateway instances (at least 2) [3]")
    parser.add_argument("--drain-timeout", type=float, default=None,
                        help="DRAIN_TIMEOUT_SECONDS [full: 30, short-drain and resume: 2]")
    parser.add_argument("--close-grace", type=float, default=None,
                        help="DRAIN_CLOSE_GRACE_SECONDS [full: 5, short-drain and resume: 2]")
    parser.add_argument("--prestop", type=float, default=2.0, help="preStop seconds between removal and SIGTERM [2]")
    parser.add_argument("--max-tokens", type=int, default=150, help="tokens per stream [150]")
    parser.add_argument("--tokens-per-second", type=float, default=20.0, help="the mock's pace [20]")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of load before the first removal [5]")
    parser.add_argument("--cooldown", type=float, default=3.0,
                        help="seconds of load after the last instance is back [3]")
    parser.add_argument("--workers", type=int, default=2, help="WEB_CONCURRENCY of each instance [2]")
    parser.add_argument("--resume-clients", type=int, default=6,
                        help="resume mode: the rehearsal's own resuming SSE clients (streams of 2 x max_tokens) [6]")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    if args.instances < 2:
        parser.error("--instances must be at least 2 (one is always out of the upstream)")
    if args.users < 1 or args.max_tokens < 1 or args.tokens_per_second <= 0:
        parser.error("--users, --max-tokens and --tokens-per-second must be positive")
    return Config(
        mode=args.mode, duration=args.duration, users=args.users, instances=args.instances,
        drain_timeout=args.drain_timeout if args.drain_timeout is not None else DEFAULT_DRAIN[args.mode],
        close_grace=args.close_grace if args.close_grace is not None else DEFAULT_CLOSE_GRACE[args.mode],
        prestop=args.prestop, max_tokens=args.max_tokens, tokens_per_second=args.tokens_per_second,
        warmup=args.warmup, cooldown=args.cooldown, workers=args.workers, resume_clients=args.resume_clients,
        output_dir=args.output_dir.resolve(),
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
    except (RehearsalError, Interrupted, KeyboardInterrupt) as exc:
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
