"""A throwaway redis-server on loopback for the tests that need a real one (limits, resume, handover).

Never skipped: CI installs Debian's redis-server, and a missing binary fails the test.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

START_TIMEOUT_S = 10.0  # guard only: how long redis-server may take to answer PING


BIND_ATTEMPTS = 5  # fresh ports tried when another process took the one picked (redis-server binds its own)


def free_port() -> int:
    """A port free a moment ago. redis-server cannot take a socket handed over, so it binds the port itself,
    and another process may take it first: `RedisServer.start` then picks another (EADDRINUSE)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
    """redis-server on 127.0.0.1:`port` without persistence; stop()/kill() then start() keep the port."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_once = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start on `port`. On the first start, a port another process took meanwhile is replaced by a
        fresh one; a restart keeps the port (clients hold the URL), as a restarted Redis does."""
        assert self.proc is None
        for _ in range(BIND_ATTEMPTS):
            if self._start_once():
                self.started_once = True
                return
            if self.started_once:
                break
            self.port = free_port()
        pytest.fail(f"redis-server could not bind a port: {self._log().strip()[-500:]}")

    def _log(self) -> str:
        path = self.workdir / "redis-server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _start_once(self) -> bool:
        """True once it answers PING; False if it exited because the port was in use."""
        log = (self.workdir / "redis-server.log").open("wb")
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers(self.port, self.proc.pid):
            if self.proc.poll() is not None:
                code, self.proc = self.proc.returncode, None
                if "Address already in use" in self._log():
                    return False
                pytest.fail(f"redis-server exited with {code} on port {self.port}: {self._log().strip()[-500:]}")
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"redis-server did not answer PING on port {self.port} within {START_TIMEOUT_S} s")
            time.sleep(0.01)  # polling interval, not an assertion
        return True

    def stop(self) -> None:
        """Terminate (a clean shutdown)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL: Redis vanishes without a word, as in a crash."""
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.kill()
            proc.wait()


def started_redis(workdir: Path) -> Iterator[RedisServer]:
    """For fixtures: `yield from started_redis(tmp_path)`."""
    binary = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/bin:/usr/sbin")
    if binary is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server); these tests never skip")
    server = RedisServer(binary, workdir)
    server.start()
    yield server
    server.kill()
