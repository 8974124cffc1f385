"""The servers the benchmark measures, each a supervised process tree (loadtest/harness/process.py) on a free
loopback port, with psutil views of its master and workers for CPU and RSS."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import psutil

from loadtest.bench.plan import GENEROUS_ENV, PACE_TOKENS_PER_SECOND, READY_TIMEOUT_S, ROOT, STOP_TIMEOUT_S, WORKERS
from loadtest.harness.ports import free_port, loopback_listener
from loadtest.harness.process import Child, socket_activation


class Server:
    """A server process tree started for one phase; psutil views of the master and its workers."""

    def __init__(
        self,
        name: str,
        child: Child,
        *,
        port: int,
        workers: int,
        ready_path: str = "/health",
        metrics_port: int | None = None,
    ) -> None:
        self.name, self.child, self.port, self.workers, self.ready_path = name, child, port, workers, ready_path
        self.metrics_port = metrics_port or port  # a gateway serves /metrics on a port of its own
        self.log_dir = child.log_path.parent
        self.master = psutil.Process(child.pid)

    @classmethod
    def start(
        cls,
        name: str,
        argv: list[str],
        *,
        port: int,
        env: dict[str, str],
        log_dir: Path,
        workers: int,
        ready_path: str = "/health",
        inherit_env: bool = True,
        cwd: Path = ROOT,
        pass_fds: tuple[int, ...] = (),
    ) -> Server:
        child = Child(
            name,
            argv,
            log_path=log_dir / f"{name}.log",
            env={**os.environ, **env} if inherit_env else env,
            cwd=cwd,
            pass_fds=pass_fds,
            append_log=False,
        )
        return cls(
            name,
            child,
            port=port,
            workers=workers,
            ready_path=ready_path,
            metrics_port=int(env.get("METRICS_PORT", port)),
        )

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
        def ready() -> bool:
            return len(self.master.children()) >= self.workers and http_status(self.port, self.ready_path) == 200

        self.child.wait_ready(ready, READY_TIMEOUT_S, f"{self.name} ready", interval=0.1)

    def stop(self, *, kill: bool = False) -> None:
        """SIGTERM (the gateway drains: up to DRAIN_TIMEOUT_SECONDS while streams run); kill: SIGKILL at once."""
        self.child.stop(signal.SIGKILL if kill else signal.SIGTERM, STOP_TIMEOUT_S)


def http_status(port: int, path: str) -> int | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()  # also when the server is not answering yet


S = TypeVar("S", bound="Server")


@contextlib.contextmanager
def running(server: S, *, kill: bool = False) -> Iterator[S]:
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop(kill=kill)


def clean_env() -> dict[str, str]:
    """This process's environment without any gateway setting: a caller's REDIS_URL or API_KEYS stays out."""
    from app.settings import Settings

    names = {name.upper() for name in Settings.model_fields} | {"GATEWAY_SHARED_STATE", "PROMETHEUS_MULTIPROC_DIR"}
    return {k: v for k, v in os.environ.items() if k.upper() not in names}


def gateway(log_dir: Path, work_dir: Path, name: str, **env: str) -> Server:
    """This tree's gateway, `env` on top of the shipped defaults."""
    return gateway_from(ROOT, log_dir, work_dir, name, env)


def gateway_from(src: Path, log_dir: Path, work_dir: Path, name: str, env: dict[str, str]) -> Server:
    """`python -m app` from checkout `src` (cwd and PYTHONPATH) on two sockets bound here and handed over
    (public on fd 3, metrics on fd 4)."""
    sockets = [loopback_listener(), loopback_listener()]
    port, metrics_port = (int(sock.getsockname()[1]) for sock in sockets)
    argv, activation = socket_activation([sys.executable, "-m", "app"], sockets)
    # Our own directories, removed at the end, instead of the app's defaults in /tmp.
    full_env = {
        **clean_env(),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "METRICS_PORT": str(metrics_port),
        "WEB_CONCURRENCY": str(WORKERS),
        "PYTHONPATH": str(src),
        **activation,
        "PROMETHEUS_MULTIPROC_DIR": str(work_dir / f"metrics-{name}"),
        "RESUME_DIR": str(work_dir / f"resume-{name}"),
        **GENEROUS_ENV,
        **env,
    }
    try:
        return Server.start(
            name,
            argv,
            port=port,
            env=full_env,
            log_dir=log_dir,
            workers=WORKERS,
            inherit_env=False,
            cwd=src,
            pass_fds=tuple(sock.fileno() for sock in sockets),
        )
    finally:
        for sock in sockets:  # the gateway holds its own copies
            sock.close()


def raw_app(log_dir: Path, name: str = "raw_asgi") -> Server:
    port = free_port()  # gunicorn binds it itself: the raw app is measured as gunicorn runs it by default
    argv = [
        sys.executable,
        "-m",
        "gunicorn",
        "loadtest.raw_asgi_app:app",
        "-k",
        "loadtest.raw_asgi_app.RawWorker",
        "-w",
        str(WORKERS),
        "-b",
        f"127.0.0.1:{port}",
        "--log-level",
        "warning",
        "--backlog",
        "2048",
    ]
    env = {"RAW_TOKENS_PER_SECOND": str(PACE_TOKENS_PER_SECOND)}
    return Server.start(name, argv, port=port, env=env, log_dir=log_dir, workers=WORKERS)


def fake_openai(
    log_dir: Path,
    name: str = "fake_openai",
    *,
    tokens_per_second: float = PACE_TOKENS_PER_SECOND,
    first_token_ms: float = 0.0,
) -> Server:
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "loadtest.fake_openai",
        "--port",
        str(port),
        "--tokens-per-second",
        f"{tokens_per_second:g}",
        "--first-token-ms",
        f"{first_token_ms:g}",
    ]
    return Server.start(name, argv, port=port, env={}, log_dir=log_dir, workers=0, ready_path="/v1/models")


def watched(name: str, child: Child, port: int) -> Server:
    """A psutil view of a process started elsewhere (the benchmark's redis-server), so its CPU counts."""
    return Server(name, child, port=port, workers=0)
