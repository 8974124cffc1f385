"""Issue 12: every wait before admission is bounded, and oversized heads and frames are refused early.

Each test plays one hostile peer on a raw socket against the real gateway (2 workers) with a 1 s read
deadline and keep-alive, then waits (guard: raw.GUARD_S) for the gateway to answer and hang up.
"""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from app.protocol import SOCKET_HEADROOM
from tests.conftest import Gateway, GatewayFactory, launch_gateway
from tests.otlp import OTLPReceiver
from tests.security.raw import (
    GUARD_S,
    connect,
    read_head,
    read_until_closed,
    send_until_answered,
    status_of,
    ws_close_code,
    ws_frame_header,
    ws_handshake,
)
from tests.test_upstream_protection import metric, wait_metric

KEY = "sk-tenant-a"
MAX_BODY = 1_048_576


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = launch_gateway(
        {
            "API_KEYS": f"{KEY},sk-tenant-b",
            "REQUEST_READ_TIMEOUT_SECONDS": 1,
            "KEEPALIVE_SECONDS": 1,
            "MAX_BODY_BYTES": MAX_BODY,
            "MOCK_TOKENS_PER_SECOND": 0,
        },
        tmp_path_factory.mktemp("gateway") / "gateway.log",
    )
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def long_keepalive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """Keep-alive outlasts the guard: only the 1 s read deadline can close a connection that carries a request."""
    gateway = launch_gateway(
        {
            "API_KEYS": KEY,
            "WEB_CONCURRENCY": 1,
            "REQUEST_READ_TIMEOUT_SECONDS": 1,
            "KEEPALIVE_SECONDS": 60,
            "MOCK_TOKENS_PER_SECOND": 0,
        },
        tmp_path_factory.mktemp("long_keepalive") / "gateway.log",
    )
    yield gateway
    gateway.stop()


def read_response(sock: socket.socket) -> bytes:
    """One whole response with a Content-Length body; the socket stays open."""
    received = read_head(sock)
    head, _, body = received.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, f"closed mid-body: {received!r}"
        body += chunk
    assert len(body) == length, f"more than one response: {body!r}"
    return head + b"\r\n\r\n" + body


def dribble_until_answered(sock: socket.socket, start: bytes, every_s: float = 0.2) -> bytes:
    """Send `start`, then one more header byte every `every_s` (each in time for any deadline the tests set)
    until the gateway answers or hangs up; then read to the close. Fails if still open after the guard."""
    sock.sendall(start)
    deadline = time.monotonic() + GUARD_S
    while not select.select([sock], [], [], every_s)[0]:  # waits `every_s` for an answer; not an assertion
        assert time.monotonic() < deadline, f"the gateway kept a dribbling request open for {GUARD_S:g}s"
        sock.sendall(b"a")
    return read_until_closed(sock)


def test_a_stalled_second_request_on_a_keep_alive_connection_gets_408(long_keepalive: Gateway) -> None:
    """The deadline's 408 is sent for a request that stalls after an earlier one was answered (review 10)."""
    with connect(long_keepalive.url) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: gateway\r\n\r\n")
        assert status_of(read_response(sock)) == 200
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: gat")
        response = read_until_closed(sock)
    assert status_of(response) == 408
    assert b'"code": "request_timeout"' in response


def test_a_pipelined_partial_head_is_under_the_read_deadline(long_keepalive: Gateway) -> None:
    """A head that begins in the same packet as the request before it, then dribbles a byte at a time, gets
    408 (review 4: the deadline was armed only by a byte starting a request, and each byte reset keep-alive)."""
    with connect(long_keepalive.url) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: gateway\r\n\r\nG")
        assert status_of(read_response(sock)) == 200
        response = dribble_until_answered(sock, b"ET /health HTTP/1.1\r\nHost: gateway\r\nX-Slow: ")
    assert status_of(response) == 408


def test_an_early_answer_is_not_followed_by_a_408(long_keepalive: Gateway) -> None:
    """A request answered before its body (413 from Content-Length) whose body then stalls is closed at the
    deadline without a second, unasked-for response."""
    with connect(long_keepalive.url) as sock:
        sock.sendall(
            b"POST /stream HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
            b'Content-Length: 2000000\r\n\r\n{"prompt": '
        )
        response = read_until_closed(sock)
    assert status_of(response) == 413
    assert response.count(b"HTTP/1.1 ") == 1, response


def assert_408_is_a_rejection(gateway: Gateway, route: str) -> None:
    """A body cut short by the read deadline is the rejection request_timeout, not a client that left (P3-c)."""
    labels = {"route": route}
    rejected = metric(gateway, "streaming_rejections_total", reason="request_timeout", **labels)
    gone = metric(gateway, "streaming_stream_outcomes_total", outcome="client_gone", **labels)
    with connect(gateway.url) as sock:
        sock.sendall(
            b"POST " + route.encode() + b" HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + KEY.encode() + b'\r\nContent-Length: 100\r\n\r\n{"prompt": '
        )
        assert status_of(read_until_closed(sock)) == 408
    assert (
        wait_metric(
            gateway, "streaming_rejections_total", rejected + 1, timeout=GUARD_S, reason="request_timeout", **labels
        )
        == rejected + 1
    )
    assert metric(gateway, "streaming_stream_outcomes_total", outcome="client_gone", **labels) == gone


@pytest.mark.parametrize("route", ["/stream", "/v1/chat/completions"])
def test_a_408_counts_as_a_rejection_not_client_gone(long_keepalive: Gateway, route: str) -> None:
    assert_408_is_a_rejection(long_keepalive, route)


def test_a_408_counts_as_a_rejection_with_tracing_on(start_gateway: GatewayFactory) -> None:
    """With tracing on, streams go through FastAPI's stack: its ClientDisconnect handler tells a 408 apart too."""
    collector = OTLPReceiver()
    try:
        gateway = start_gateway(
            API_KEYS=KEY,
            WEB_CONCURRENCY=1,
            REQUEST_READ_TIMEOUT_SECONDS=1,
            KEEPALIVE_SECONDS=60,
            MOCK_TOKENS_PER_SECOND=0,
            OTEL_EXPORTER_OTLP_ENDPOINT=collector.url,
        )
        assert_408_is_a_rejection(gateway, "/stream")
        gateway.stop()  # while the collector answers: the spans flushed at exit are taken at once
    finally:
        collector.server.shutdown()
        collector.server.server_close()


def test_a_socket_that_sends_nothing_is_closed(gateway: Gateway) -> None:
    with connect(gateway.url) as sock:
        assert read_until_closed(sock) == b""


def test_half_sent_headers_get_408(gateway: Gateway) -> None:
    with connect(gateway.url) as sock:
        sock.sendall(b"POST /stream HTTP/1.1\r\nHost: gateway\r\nContent-")
        response = read_until_closed(sock)
    assert status_of(response) == 408
    assert b'"code": "request_timeout"' in response


def test_a_partial_body_gets_408(gateway: Gateway) -> None:
    with connect(gateway.url) as sock:
        sock.sendall(
            b"POST /stream HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
            b"X-API-Key: " + KEY.encode() + b'\r\nContent-Length: 100\r\n\r\n{"prompt": '
        )
        response = read_until_closed(sock)
    assert status_of(response) == 408
    # the deadline costs a prompt client nothing: a keep-alive connection serves request after request
    with httpx.Client(base_url=gateway.url, headers={"X-API-Key": KEY}, timeout=GUARD_S) as client:
        for _ in range(3):
            served = client.post("/stream", json={"prompt": "in time", "max_tokens": 2})
            assert served.status_code == 200
            assert served.text.rstrip().endswith('"tokens": 2}')


def test_an_unfinished_chunked_body_gets_408(gateway: Gateway) -> None:
    with connect(gateway.url) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'5\r\n{"mod\r\n'
        )
        response = read_until_closed(sock)
    assert status_of(response) == 408


def test_a_websocket_that_never_sends_its_request_is_closed_1008(gateway: Gateway) -> None:
    url = gateway.url.replace("http://", "ws://") + "/ws"
    with ws_connect(url, additional_headers={"X-API-Key": KEY}, open_timeout=GUARD_S) as ws:
        event = json.loads(ws.recv(timeout=GUARD_S))
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=GUARD_S)
    assert event["code"] == "request_timeout"
    assert ws.close_code == 1008


def test_an_8_mib_header_gets_431(gateway: Gateway) -> None:
    with connect(gateway.url) as sock:
        head = [b"GET /health HTTP/1.1\r\nHost: gateway\r\nX-Big: "]
        response = send_until_answered(sock, head + [b"a" * 65536] * 128 + [b"\r\n\r\n"])
    assert status_of(response) == 431
    assert b'"code": "headers_too_large"' in response


def test_20000_headers_get_431(gateway: Gateway) -> None:
    fields = [b"".join(b"X-H%d: v\r\n" % (i + j) for j in range(500)) for i in range(0, 20_000, 500)]
    with connect(gateway.url) as sock:
        response = send_until_answered(sock, [b"GET /health HTTP/1.1\r\nHost: gateway\r\n", *fields, b"\r\n"])
    assert status_of(response) == 431


def test_a_15_mib_websocket_frame_is_refused_from_its_header(gateway: Gateway) -> None:
    with connect(gateway.url) as sock:
        sock.sendall(ws_handshake("/ws", {"X-API-Key": KEY}))
        assert status_of(read_head(sock)) == 101
        # the header announces 15 MiB; only 64 KiB follow, so a server that waits for the payload never answers
        sock.sendall(ws_frame_header(15 * 1024 * 1024) + b" " * 65536)
        data = read_until_closed(sock)
    assert ws_close_code(data) == 1009


def test_idle_sockets_cannot_hold_every_descriptor(start_gateway: GatewayFactory) -> None:
    """One worker holds MAX_CONNECTIONS + 100 sockets: one more closes the longest-idle one (nginx's reuse of
    idle keep-alive connections), and a legitimate client is served. Keep-alive (60 s) outlasts the guard, so
    only the cap can close the first socket (the read deadline is as long)."""
    gateway = start_gateway(WEB_CONCURRENCY=1, MAX_CONNECTIONS=1, KEEPALIVE_SECONDS=60, REQUEST_READ_TIMEOUT_SECONDS=60)
    with ExitStack() as stack:
        first = stack.enter_context(connect(gateway.url))
        first.sendall(b"GET /hea")  # half a request line: idle as far as the app is concerned
        assert httpx.get(gateway.url + "/health", timeout=GUARD_S).status_code == 200  # `first` was accepted
        for _ in range(1 + SOCKET_HEADROOM):
            stack.enter_context(connect(gateway.url))
        assert read_until_closed(first) == b""
        assert httpx.get(gateway.url + "/health", timeout=GUARD_S).status_code == 200


def test_sockets_that_all_carry_requests_cannot_be_outnumbered(start_gateway: GatewayFactory) -> None:
    """When every socket a worker holds carries a request (here: bodies that stop short), one more socket gets
    503 at once instead of a descriptor; the held requests are still bounded by the read deadline."""
    gateway = start_gateway(WEB_CONCURRENCY=1, MAX_CONNECTIONS=1, KEEPALIVE_SECONDS=60, REQUEST_READ_TIMEOUT_SECONDS=60)
    head = (
        b"POST /stream HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\nExpect: 100-continue\r\n\r\n"
    )
    with ExitStack() as stack:
        for _ in range(1 + SOCKET_HEADROOM):
            sock = stack.enter_context(connect(gateway.url))
            sock.sendall(head)
            assert status_of(read_head(sock)) == 100  # the app reads the body: this request is in flight
            sock.sendall(b'{"prompt": ')
        # every socket carries a request; a probe on a fresh socket is refused, not held
        response = read_until_closed(stack.enter_context(connect(gateway.url)))
        assert status_of(response) == 503
