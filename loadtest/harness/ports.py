"""Loopback ports without the pick-release-bind race, where the callee allows it.

A port picked with bind(0), released, and bound again later can be taken in between by any process on the
machine. So a server that accepts a listening socket gets one bound here and handed over (gunicorn through
socket activation, the fake upstream with --fd), and a port that must refuse connections stays bound, never
listening, for as long as it is used. Only children that must bind themselves (redis-server, Prometheus,
nginx) get `free_port()`, and their starters retry with a fresh port when it was taken meanwhile.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

LISTEN_BACKLOG = 1024


def loopback_listener(*, inheritable: bool = False) -> socket.socket:
    """A socket listening on 127.0.0.1 at a port the kernel picked, to hand over to a server."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(LISTEN_BACKLOG)
    sock.set_inheritable(inheritable)
    return sock


def free_port() -> int:
    """A loopback port free a moment ago, for a child that binds it itself (retry if it was taken meanwhile)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections (bound, not listening) while the block runs."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])
