"""Two tenants of one gateway (API_KEYS=keyA,keyB), and what the attack tests compare.

A refusal that must look exactly like an unknown id is compared on everything a client sees
(status, body with the id swapped, close code) and on every counter the gateway exports.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from tests.conftest import Gateway

KEY_A, KEY_B = "keyA", "keyB"
TWO_KEYS = {"API_KEYS": f"{KEY_A},{KEY_B}"}
UNKNOWN_ID = "0123456789abcdef0123456789abcdef"  # well-formed, no such stream
GUARD_S = 30.0  # guard only: how long a read may wait before the test fails
STREAM_ID = re.compile(r"^[0-9a-f]{32}$")


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def ws(gateway: Gateway, key: str | None) -> ClientConnection:
    return ws_connect(
        gateway.url.replace("http://", "ws://") + "/ws",
        additional_headers=auth(key) if key else None,
        open_timeout=GUARD_S,
        # unbounded: a connection closed with a live stream unread would otherwise stop reading at 16
        # messages, miss the server's close reply and wait out close_timeout (10 s) on every close
        max_queue=None,
    )


def ws_rest(conn: ClientConnection) -> tuple[list[dict[str, Any]], int | None]:
    """Every event until the server closes, and its close code."""
    events = []
    try:
        while True:
            events.append(json.loads(conn.recv(timeout=GUARD_S)))
    except ConnectionClosed:
        return events, conn.close_code


def counters(gateway: Gateway) -> dict[str, float]:
    """Every counter sample (`*_total`, histogram `_count`) of /metrics, by series."""
    samples: dict[str, float] = {}
    for line in httpx.get(gateway.metrics_url + "/metrics", timeout=GUARD_S).text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        series, value = line.rsplit(" ", 1)
        name = series.split("{", 1)[0]
        if name.endswith(("_total", "_count")):
            samples[series] = float(value)
    return samples


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


def raw_request(gateway: Gateway, head: str) -> tuple[int, bytes]:
    """Send one request exactly as written (no client-side escaping); the status and body of the answer."""
    parts = urlsplit(gateway.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=GUARD_S) as sock:
        sock.sendall(head.encode("latin-1"))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    _, _, body = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), body


def sse_json(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        if line.startswith("data: "):
            yield json.loads(line[6:])
