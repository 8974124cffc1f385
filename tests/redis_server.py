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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """redis-server on 127.0.0.1:`port` without persistence; stop()/kill() then start() keep the port."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.proc is None
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers_ping(self.port):
            if self.proc.poll() is not None:
                code, self.proc = self.proc.returncode, None
                pytest.fail(f"redis-server exited with {code} on port {self.port}")
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"redis-server did not answer PING on port {self.port} within {START_TIMEOUT_S} s")
            time.sleep(0.01)  # polling interval, not an assertion

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
