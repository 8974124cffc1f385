"""A throwaway redis-server on loopback: no persistence, data and log in a directory of its own.

redis-server cannot take a socket handed over, so it binds a `free_port()` itself; when another process took
that port first, the first start picks another one. A restart keeps the port (clients hold the URL), as a
restarted Redis does.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from loadtest.harness.errors import HarnessError
from loadtest.harness.ports import free_port
from loadtest.harness.process import Child, require_binary, tail

START_TIMEOUT_S = 10.0  # guard only: how long redis-server may take to answer
BIND_ATTEMPTS = 5  # fresh ports tried when another process took the one picked

Spawn = Callable[..., Child]  # Child itself, or a Supervisor's spawn


def _answers(port: int, pid: int) -> bool:
    """Does redis-server process `pid` answer on `port` (not another server that got the port first)?"""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"INFO server\r\n")
            info = b""
            while b"process_id:" not in info or not info.endswith(b"\r\n"):
                piece = sock.recv(65536)
                if not piece:
                    return False
                info += piece
            return f"process_id:{pid}\r\n".encode() in info
    except OSError:
        return False


class RedisServer:
    """redis-server on 127.0.0.1:`port`; stop()/kill() then start() keep the port."""

    def __init__(
        self, workdir: Path, *, spawn: Spawn = Child, name: str = "redis-server", log_path: Path | None = None
    ) -> None:
        self.binary = require_binary("redis-server")
        self.workdir = workdir
        self.log_path = log_path or workdir / "redis-server.log"
        self.spawn = spawn
        self.name = name
        self.port = free_port()
        self.proc: Child | None = None
        self.started_once = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start on `port` and wait until it answers; on the first start, a taken port is replaced."""
        assert self.proc is None
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _ in range(BIND_ATTEMPTS):
            if self._start_once():
                self.started_once = True
                return
            if self.started_once:
                break
            self.port = free_port()
        raise HarnessError(f"redis-server could not bind a port: {tail(self.log_path)[-500:]}")

    def _start_once(self) -> bool:
        """True once it answers; False if it exited because the port was in use."""
        argv: Sequence[str] = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
        ]
        proc = self.proc = self.spawn(self.name, argv, log_path=self.log_path, append_log=False)
        try:
            proc.wait_ready(
                lambda: _answers(self.port, proc.pid),
                START_TIMEOUT_S,
                f"redis-server on port {self.port}",
                interval=0.01,
            )
        except HarnessError:
            self.kill()
            if "Address already in use" in tail(self.log_path):
                return False
            raise
        return True

    def command(self, *args: str) -> bytes:
        """One command, its (first) reply line."""
        payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(payload.encode())
            return sock.recv(65536).split(b"\r\n", 1)[0]

    def stop(self) -> None:
        """SIGTERM (a clean shutdown)."""
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.stop(signal.SIGTERM, START_TIMEOUT_S)

    def kill(self) -> None:
        """SIGKILL: Redis vanishes without a word, as in a crash."""
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.stop(signal.SIGKILL)


def started_redis(workdir: Path, **kwargs: Any) -> Iterator[RedisServer]:
    """For fixtures: `yield from started_redis(tmp_path)`; killed afterwards."""
    server = RedisServer(workdir, **kwargs)
    server.start()
    try:
        yield server
    finally:
        server.kill()
