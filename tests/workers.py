"""Which gunicorn worker serves a request: find the workers, steer connections to one, reach each one.

Which worker accepts a connection is normally the kernel's choice (12 fresh connections were seen split
12/0), so a test that claims something about both workers steers them:

- `only_worker(gateway, pid)` freezes the other workers with SIGSTOP: a frozen worker cannot accept, so
  every new connection lands on the chosen one. The others are resumed when the block ends.
- `connection_to_each_worker(gateway)` opens connections until each worker has accepted one, and keeps
  one per worker: requests on it are served by that worker (keep-alive).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil

from tests.conftest import Gateway

WAIT_S = 10.0  # guard only: how long the workers may take to appear, or a worker to accept
POLL_S = 0.01  # polling interval, not an assertion


def worker_pids(gateway: Gateway) -> list[int]:
    """The gateway's gunicorn workers (children of the master), once all of them are forked."""
    deadline = time.monotonic() + WAIT_S
    while True:
        workers = sorted(child.pid for child in psutil.Process(gateway.pid).children())
        if len(workers) == int(gateway.env["WEB_CONCURRENCY"]):
            return workers
        assert time.monotonic() < deadline, workers
        time.sleep(POLL_S)  # polling interval, not an assertion


@contextmanager
def only_worker(gateway: Gateway, pid: int) -> Iterator[None]:
    """Every connection opened inside the block is served by worker `pid`: the others are frozen.

    Close the connections opened inside the block before it ends, or hold them only once their streams
    are past admission and the upstream's start (a token received): a worker frozen with requests
    half-admitted could hold a lock on the instance's shared tables."""
    others = [worker for worker in worker_pids(gateway) if worker != pid]
    assert len(others) + 1 == len(worker_pids(gateway))
    for worker in others:
        os.kill(worker, signal.SIGSTOP)
    try:
        yield
    finally:
        for worker in others:
            os.kill(worker, signal.SIGCONT)


def _worker_of(workers: list[int], client_port: int) -> int | None:
    for pid in workers:
        for conn in psutil.Process(pid).net_connections("tcp"):
            if conn.raddr and conn.raddr.port == client_port:
                return pid
    return None


@contextmanager
def connection_to_each_worker(gateway: Gateway) -> Iterator[dict[int, socket.socket]]:
    """An idle connection accepted by each worker (whichever worker accepts a connection serves it), closed when
    the block ends, however it ends (a socket left to the collector fails whichever test runs then)."""
    workers = worker_pids(gateway)
    address = ("127.0.0.1", int(gateway.url.rsplit(":", 1)[1]))
    chosen: dict[int, socket.socket] = {}
    try:
        for _attempt in range(100):  # each connection goes to either worker: a handful of tries gets both
            sock = socket.create_connection(address, timeout=WAIT_S)
            deadline = time.monotonic() + WAIT_S
            while (owner := _worker_of(workers, sock.getsockname()[1])) is None:
                if time.monotonic() >= deadline:
                    sock.close()
                    raise AssertionError("no worker accepted the connection")
                time.sleep(POLL_S)  # polling interval, not an assertion
            if owner in chosen:
                sock.close()
            else:
                chosen[owner] = sock
            if len(chosen) == len(workers):
                break
        else:
            raise AssertionError("every connection went to the same worker")
        yield chosen
    finally:
        for sock in chosen.values():
            sock.close()


class ConnectionClosedByWorkerError(Exception):
    """The worker closed a kept-alive connection before it answered."""


def get_status(sock: socket.socket, path: str) -> int:
    """GET `path` on a kept-alive connection; the status (the body is read, so the connection can go on)."""
    try:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: gateway\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionClosedByWorkerError(data)
            data += chunk
    except ConnectionError as exc:
        raise ConnectionClosedByWorkerError(str(exc)) from exc
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = int(dict(line.lower().split(": ", 1) for line in lines[1:]).get("content-length", 0))
    while len(body) < length:
        chunk = sock.recv(4096)
        assert chunk, "the body was cut short"
        body += chunk
    return int(lines[0].split()[1])


def wait_all_draining(connections: dict[int, socket.socket]) -> None:
    """Poll /ready on each worker's own connection until every one answers 503: each has begun its drain.

    A worker with no stream to wait for ends its drain at once, and its shutdown closes idle connections (the
    kernel may have given every stream to the other worker): a closed connection counts when its worker exits."""
    for pid, sock in connections.items():
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                if get_status(sock, "/ready") == 503:
                    break
            except ConnectionClosedByWorkerError:
                assert _exits(pid), f"worker {pid} closed its connection but did not exit"
                break
            assert time.monotonic() < deadline, f"worker {pid} did not start draining"
            time.sleep(POLL_S)  # polling interval, not an assertion


def _exits(pid: int) -> bool:
    """Does process `pid` exit (or has it exited) within WAIT_S?"""
    try:
        _gone, alive = psutil.wait_procs([psutil.Process(pid)], timeout=WAIT_S)
    except psutil.NoSuchProcess:
        return True
    return not alive
