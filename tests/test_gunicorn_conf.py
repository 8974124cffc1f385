"""app/gunicorn_conf.py as the running gateway applies it: KEEPALIVE_SECONDS is the idle keep-alive
timeout of the uvicorn workers (the server closes an idle kept-alive connection after it)."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

from tests.conftest import GatewayFactory

CLOSE_GUARD_S = 30.0  # guard only: far above the 1 s set here, far below the 75 s default


def test_idle_keepalive_connections_are_closed_after_keepalive_seconds(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(KEEPALIVE_SECONDS=1)
    address = urlsplit(gateway.url)
    with socket.create_connection((address.hostname, address.port), timeout=CLOSE_GUARD_S) as sock:
        for _ in range(2):  # the connection is kept alive between requests
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: gateway\r\n\r\n")
            response = b""
            while not response.endswith(b'{"status":"ok"}'):
                piece = sock.recv(4096)
                assert piece, response
                response += piece
            assert response.startswith(b"HTTP/1.1 200 ")
            assert b"connection: close" not in response.lower()
        # then it idles: the server closes it (recv returns b""); with the setting ignored this read times out
        assert sock.recv(4096) == b""
