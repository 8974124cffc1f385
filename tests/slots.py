"""Proof that an exit path gave its connection slot back, read from the slots themselves.

`assert_slots_released(gateway)` is the one check every exit-path test ends with (done, client gone,
timeout, slow client, upstream error, drain, bad input, refusal):

- the instance's slot table reads 0 (`streaming_connection_slots_in_use`, read from the shared table at
  scrape time; `streaming_active_connections` is moved by the recorder and can read 0 over a leaked slot);
- the whole cap can be taken again at once: with the small caps of `SLOT_CAPS`, one client gets exactly
  MAX_CONNECTIONS_PER_CLIENT streams and its next one is refused (`client_connection_limit`), other
  clients fill the instance to exactly MAX_CONNECTIONS, and the next one is refused (`connection_limit`).
  A slot leaked by the test before makes one of these refusals come early.

For a gateway that has exited (drain), the master's log is the witness: gunicorn's `child_exit` reclaims
whatever a worker still held when it exited and logs it, and a clean exit reclaims nothing.

The held streams come from their own loopback addresses (127.77.x.y: Linux answers for all of 127/8), so
each is a client of its own for the per-client cap and the rate limit, whatever the test did before.
They are raw sockets with a small receive window that never read: a stream stays in flight (slow, or
held by backpressure until SLOW_CLIENT_TIMEOUT_SECONDS) while the check runs.
"""

from __future__ import annotations

import itertools
import json
import re
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.conftest import SLOT_CAPS, Gateway

__all__ = ["SLOT_CAPS", "SLOT_CHECK_KEYS", "assert_slots_released", "slots_in_use", "wait_slots_in_use"]
MAX_CHECKED_CAP = 16
UNPACED_MAX_TOKENS = 1_000_000  # tens of megabytes of events: more than any socket buffer holds
GUARD_S = 20.0  # guard only: how long the slot count may take to settle before the test fails
POLL_S = 0.02  # polling interval, not an assertion
SLOTS_GAUGE = "streaming_connection_slots_in_use"
_RECLAIMED = "connection slots of dead worker"  # app/gunicorn_conf.py child_exit logs it
# With API_KEYS the client is the key, not the address: a keyed gateway lists these too (fresh ones per check).
SLOT_CHECK_KEYS = [f"slot-check-{i}" for i in range(40)]
_addresses = itertools.count()
_keys = itertools.count()  # one sequence for all gateways: instances sharing Redis share each key's bucket


def slots_in_use(gateway: Gateway) -> float:
    """The instance's slot table, as /metrics reports it (all workers)."""
    text = httpx.get(gateway.metrics_url + "/metrics", timeout=10).text
    values = re.findall(rf"^{SLOTS_GAUGE} (\S+)$", text, re.M)
    assert len(values) == 1, f"{SLOTS_GAUGE} is exported once per instance, got {values}"
    return float(values[0])


def wait_slots_in_use(gateway: Gateway, expected: float, timeout: float = GUARD_S) -> float:
    """Poll until the slot table holds `expected`; returns the last value read (assert on it)."""
    deadline = time.monotonic() + timeout
    value = slots_in_use(gateway)
    while value != expected and time.monotonic() < deadline:
        time.sleep(POLL_S)  # polling interval, not an assertion
        value = slots_in_use(gateway)
    return value


Client = tuple[str, str | None]  # (source address, API key)


def _clients(gateway: Gateway) -> Iterator[Client]:
    """Clients the gateway has not seen: fresh source addresses, or fresh keys on a keyed gateway."""
    keys = {key.strip() for key in gateway.env.get("API_KEYS", "").split(",") if key.strip()}
    while True:
        if keys:
            key = f"slot-check-{next(_keys)}"
            assert key in keys, "a gateway with API_KEYS lists tests.slots.SLOT_CHECK_KEYS for the slot check"
            yield "127.0.0.1", key
        else:
            n = next(_addresses)
            yield f"127.77.{n // 250 % 250}.{n % 250 + 1}", None


class _Held:
    """One POST /stream from `source`: its status and error code; a 200's socket stays open, unread."""

    def __init__(self, gateway: Gateway, client: Client, max_tokens: int) -> None:
        source, key = client
        host, port = gateway.url.removeprefix("http://").rsplit(":", 1)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # backpressure comes soon, holds the stream
        self.sock.settimeout(GUARD_S)
        self.sock.bind((source, 0))
        self.sock.connect((host, int(port)))
        body = json.dumps({"prompt": "slot check", "max_tokens": max_tokens}).encode()
        auth = f"Authorization: Bearer {key}\r\n".encode() if key else b""
        self.sock.sendall(
            b"POST /stream HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n%s"
            b"Content-Length: %d\r\n\r\n%s" % (auth, len(body), body)
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            assert chunk, f"the gateway closed the connection before answering: {head!r}"
            head += chunk
        head, _, rest = head.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.code = "200"
        if self.status != 200:
            headers = dict(line.lower().split(": ", 1) for line in lines[1:])
            length = int(headers["content-length"])
            while len(rest) < length:
                chunk = self.sock.recv(4096)
                assert chunk, "the refusal's body was cut short"
                rest += chunk
            self.code = str(json.loads(rest)["code"])
            self.close()

    def close(self) -> None:
        self.sock.close()


def _open_at_once(gateway: Gateway, clients: list[Client], max_tokens: int) -> list[_Held]:
    with ThreadPoolExecutor(max_workers=len(clients)) as pool:
        return list(pool.map(lambda client: _Held(gateway, client, max_tokens), clients))


def _codes(held: list[_Held]) -> list[str]:
    return sorted(h.code for h in held)


def assert_cap_can_be_taken(gateway: Gateway) -> None:
    """Exactly MAX_CONNECTIONS_PER_CLIENT for one client, exactly MAX_CONNECTIONS for the instance, at once."""
    total = int(gateway.env.get("MAX_CONNECTIONS", 500))
    per_client = int(gateway.env.get("MAX_CONNECTIONS_PER_CLIENT", 10))
    assert total <= MAX_CHECKED_CAP, f"MAX_CONNECTIONS={total}: start this gateway with small caps (SLOT_CAPS)"
    assert float(gateway.env.get("ORPHAN_TIMEOUT_SECONDS", 30)) == 0, "orphaned generations would keep their slots"
    max_tokens = int(gateway.env.get("MAX_TOKENS_LIMIT", 32768))
    unpaced = "UPSTREAM_URL" not in gateway.env and float(gateway.env.get("MOCK_TOKENS_PER_SECOND", 50)) == 0
    # An unpaced mock writes a short stream into the socket buffers (megabytes) and ends: it must be longer.
    assert not unpaced or max_tokens >= UNPACED_MAX_TOKENS, f"unpaced mock: set MAX_TOKENS_LIMIT={UNPACED_MAX_TOKENS}"
    held: list[_Held] = []
    try:
        clients = _clients(gateway)
        taken = 0
        if per_client < total:  # one client up to its cap, and one more (a per-client cap >= the total is moot)
            first = _open_at_once(gateway, [next(clients)] * (per_client + 1), max_tokens)
            held += first
            assert _codes(first) == sorted(["200"] * per_client + ["client_connection_limit"]), _codes(first)
            taken = per_client
        others: list[Client] = []
        while len(others) < total - taken:
            others += [next(clients)] * min(per_client, total - taken - len(others))
        rest = _open_at_once(gateway, others, max_tokens)
        held += rest
        assert _codes(rest) == ["200"] * len(others), _codes(rest)
        assert wait_slots_in_use(gateway, total) == total  # every admitted stream holds exactly one slot
        over = _Held(gateway, next(clients), max_tokens)
        held.append(over)
        assert over.code == "connection_limit", over.code
    finally:
        for h in held:
            h.close()
    assert wait_slots_in_use(gateway, 0) == 0


def assert_slots_released(gateway: Gateway, *, take_cap: bool = True) -> None:
    """No slot leaked: the table is back to 0 and the whole cap can be taken again (or, once the gateway
    has exited, its master reclaimed nothing from its workers).

    `take_cap=False` only where no stream can be admitted, e.g. an upstream that refuses every connection."""
    if gateway.proc.poll() is not None:
        reclaimed = [line for line in gateway.log().splitlines() if _RECLAIMED in line]
        assert reclaimed == [], reclaimed
        return
    assert wait_slots_in_use(gateway, 0) == 0
    if take_cap:
        assert_cap_can_be_taken(gateway)
