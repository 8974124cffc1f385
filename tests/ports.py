"""Loopback ports for tests, without the pick-release-bind race.

A port picked with bind(0), released, and bound again later by someone else can be taken in
between by any process on the machine. So a server started for a test gets the listening socket
itself (tests/conftest.py hands it over), and a port that must refuse connections stays bound,
never listening, for as long as the test uses it: nothing else can bind it, and every connection
to it is refused.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections (bound, not listening) while the block runs."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])
