"""MEMORY_BUDGET_BYTES against the real gateway (2 workers) and clients that stop reading (raw sockets).

A stream whose client reads nothing fills the kernel's socket buffers, then the server's transport buffer
up to its 64 KiB high-water mark; from then on its write is blocked and it counts a full buffer
(app/streaming/memory.py). One-token batches keep each full buffer at 64 KiB and a few hundred bytes.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import httpx

from loadtest.harness.wait import eventually
from tests.conftest import FakeUpstream, Gateway, GatewayFactory, sse_data
from tests.security.raw import ws_frame_header
from tests.test_stream_lifecycle import wait_active_streams

FULL = 65_536  # a full buffer holds at least the transport's high-water mark
GUARD_S = 60.0  # guard only: how long a condition may take on a loaded machine
SLOW_READER_ENV = {
    "MOCK_TOKENS_PER_SECOND": 0,
    "MOCK_FIRST_TOKEN_MS": 0,
    "MAX_TOKENS_LIMIT": 10_000_000,
    "STREAM_BUFFER_SIZE": 1,
    "SLOW_CLIENT_TIMEOUT_SECONDS": 100,
    "DEADLINE_CHECK_INTERVAL_SECONDS": 0.05,
}


def _metric(gateway: Gateway, name: str, labels: str = "") -> float:
    text = httpx.get(gateway.metrics_url + "/metrics", timeout=5).text
    total = 0.0
    for found, value in re.findall(rf"^{name}(?:\{{([^}}]*)\}})? (\S+)$", text, re.M):
        if all(part in found for part in labels.split(",") if part):
            total += float(value)
    return total


def _wait_metric(gateway: Gateway, name: str, reached: float, labels: str = "") -> float:
    deadline = time.monotonic() + GUARD_S
    value = _metric(gateway, name, labels)
    while value < reached and time.monotonic() < deadline:
        time.sleep(0.05)  # polling interval, not an assertion
        value = _metric(gateway, name, labels)
    return value


V1_FLOOD = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "flood"}],
    "max_tokens": 10_000_000,
    "stream": True,
}


def _ws_text_frame(text: str) -> bytes:
    """One client text frame (mask key 0: the payload goes as is)."""
    payload = text.encode()
    return ws_frame_header(len(payload)) + payload


@contextmanager
def slow_reader(gateway: Gateway, path: str = "/stream") -> Iterator[tuple[socket.socket, str]]:
    """A /stream (or /v1/chat/completions, not resumable) client that reads the response head, then nothing:
    (its socket, the stream id)."""
    host, port = gateway.url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "flood", "max_tokens": 10_000_000} if path == "/stream" else V1_FLOOD).encode()
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window fills fast
        sock.settimeout(GUARD_S)
        sock.connect((host, int(port)))
        sock.sendall(
            b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body)
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1024)
        assert head.startswith(b"HTTP/1.1 200"), head
        stream_id = re.search(rb"x-stream-id: (\S+)", head, re.I)
        assert stream_id is not None
        yield sock, stream_id.group(1).decode()


def _read_to_end(sock: socket.socket) -> bytes:
    """The response's last bytes, read until the connection closes or the chunked body ends (the final event
    reaches a cut client only if its socket takes it at once; then the response is complete and kept alive)."""
    tail = b""
    while chunk := sock.recv(1 << 20):
        tail = (tail + chunk)[-4096:]
        if tail.endswith(b"\r\n0\r\n\r\n"):
            break
    return tail


def _assert_cut(tail: bytes) -> None:
    assert b'"type": "done"' not in tail  # the stream ended unfinished ...
    if b'"type": "error"' in tail:  # ... with the memory_pressure event, when its socket took it
        assert b'"code": "memory_pressure"' in tail


def test_budget_refuses_new_streams_and_cuts_the_oldest_full_buffer(start_gateway: GatewayFactory) -> None:
    # Resume off: the only buffered data are the full buffers, so the totals below are exact to a few hundred bytes.
    # Three slots: the end of the test needs all three again, so the cut stream's slot must have been released.
    gateway = start_gateway(**SLOW_READER_ENV, RESUME_ENABLED="false", MEMORY_BUDGET_BYTES=150_000, MAX_CONNECTIONS=3)
    with ExitStack() as stack:
        oldest, _ = stack.enter_context(slow_reader(gateway))
        assert FULL <= _wait_metric(gateway, "streaming_buffered_bytes", FULL) < 150_000
        second, _ = stack.enter_context(slow_reader(gateway))
        assert 2 * FULL <= _wait_metric(gateway, "streaming_buffered_bytes", 2 * FULL) < 150_000  # under budget
        third, _ = stack.enter_context(slow_reader(gateway))
        # The third full buffer takes the instance over its budget: the oldest full buffer is cut, only it.
        assert _wait_metric(gateway, "streaming_errors_total", 1, 'error_type="memory_pressure"') == 1
        try:
            _assert_cut(_read_to_end(oldest))
        except TimeoutError:
            raise AssertionError("the cut stream's connection stayed open:\n" + gateway.log()[-6000:]) from None
        assert wait_active_streams(gateway, 2) == 2
        # Two full buffers (131 KB) stay above 80 % of the budget: new streams are still refused, by every worker
        # (new connections land on either), also one that never saw the peak the other one cut away.
        for _ in range(8):
            refused = httpx.post(gateway.url + "/stream", json={"prompt": "x", "max_tokens": 5}, timeout=10)
            assert refused.status_code == 503, refused.text
            assert refused.json()["code"] == "memory_pressure"
            assert refused.headers["retry-after"] == "1"
        assert _metric(gateway, "streaming_rejections_total", 'reason="memory_pressure"') == 8
        assert _metric(gateway, "streaming_errors_total", 'error_type="memory_pressure"') == 1
        second.close()
        third.close()
    # Everything is given back: slots, the buffered bytes, admission.
    assert wait_active_streams(gateway, 0) == 0
    eventually(lambda: _metric(gateway, "streaming_buffered_bytes") <= 0, GUARD_S)
    assert _metric(gateway, "streaming_buffered_bytes") == 0
    done = httpx.post(gateway.url + "/stream", json={"prompt": "x", "max_tokens": 5}, timeout=10)
    assert json.loads(sse_data(done.text)[-1]) == {"type": "done", "tokens": 5}
    with ExitStack() as stack:
        for _ in range(3):  # each is admitted (200) or slow_reader fails: every slot is free again
            stack.enter_context(slow_reader(gateway))
    assert "Traceback" not in gateway.log()


def test_cut_stream_ends_with_a_memory_pressure_event(start_gateway: GatewayFactory) -> None:
    # One full buffer is over this budget. Its client reads nothing, so the final event cannot reach it on
    # that connection; the stream's resume log ends with it, and that is what a reconnecting client reads.
    gateway = start_gateway(**SLOW_READER_ENV, MEMORY_BUDGET_BYTES=65_536, RESUME_MAX_EVENTS=10_000_000)
    with slow_reader(gateway) as (sock, stream_id):
        assert _wait_metric(gateway, "streaming_errors_total", 1, 'error_type="memory_pressure"') == 1
        _assert_cut(_read_to_end(sock))
    assert wait_active_streams(gateway, 0) == 0
    with httpx.stream("GET", f"{gateway.url}/stream/{stream_id}", timeout=GUARD_S) as replay:
        assert replay.status_code == 200
        *tokens, last = sse_data(replay.read().decode())
    assert json.loads(last)["code"] == "memory_pressure"
    assert json.loads(last)["type"] == "error"
    message = json.loads(last)["message"]  # the generation is gone: resuming cannot continue it
    assert "retry the request" in message and "resume" not in message
    assert tokens and all(json.loads(t)["type"] in ("status", "token") for t in tokens[:3])


def test_websocket_reader_that_stops_is_cut_and_gives_its_slot_back(start_gateway: GatewayFactory) -> None:
    # One slot: the stream after the cut is admitted only if the cut WebSocket stream released it, which needs
    # its final event to give up on a client that reads nothing.
    gateway = start_gateway(**SLOW_READER_ENV, MEMORY_BUDGET_BYTES=65_536, MAX_CONNECTIONS=1)
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(GUARD_S)
        sock.connect((host, int(port)))
        sock.sendall(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)  # byte by byte: nothing after the handshake is read
        assert head.startswith(b"HTTP/1.1 101"), head
        sock.sendall(_ws_text_frame(json.dumps({"prompt": "flood", "max_tokens": 10_000_000})))
        assert _wait_metric(gateway, "streaming_errors_total", 1, 'error_type="memory_pressure",route="/ws"') == 1
        assert wait_active_streams(gateway, 0) == 0
        done = httpx.post(gateway.url + "/stream", json={"prompt": "x", "max_tokens": 5}, timeout=GUARD_S)
        assert done.status_code == 200, done.text  # the slot is free again
        assert json.loads(sse_data(done.text)[-1]) == {"type": "done", "tokens": 5}
    assert "Traceback" not in gateway.log()


def test_at_the_budget_a_resume_and_a_stop_are_still_answered(start_gateway: GatewayFactory) -> None:
    """The budget refuses new streams; a resume starts no generation and a stop frees memory: neither is refused."""
    gateway = start_gateway(**SLOW_READER_ENV, MEMORY_BUDGET_BYTES=150_000)
    finished = httpx.post(gateway.url + "/stream", json={"prompt": "x", "max_tokens": 5}, timeout=GUARD_S)
    stream_id = finished.headers["x-stream-id"]
    with ExitStack() as stack:  # the pressure: /v1 streams, which keep no resume events
        for n in range(1, 4):
            stack.enter_context(slow_reader(gateway, "/v1/chat/completions"))
            if n < 3:
                assert _wait_metric(gateway, "streaming_buffered_bytes", n * FULL) >= n * FULL
        assert _wait_metric(gateway, "streaming_errors_total", 1, 'error_type="memory_pressure"') == 1
        refused = httpx.post(gateway.url + "/stream", json={"prompt": "x", "max_tokens": 5}, timeout=GUARD_S)
        assert refused.status_code == 503 and refused.json()["code"] == "memory_pressure"
        resumed = httpx.get(f"{gateway.url}/stream/{stream_id}", timeout=GUARD_S)
        assert resumed.status_code == 200, resumed.text
        assert [json.loads(d) for d in sse_data(resumed.text)] == [json.loads(d) for d in sse_data(finished.text)]
        stopped = httpx.delete(f"{gateway.url}/stream/{stream_id}", timeout=GUARD_S)
        assert stopped.status_code == 200, stopped.text
        assert stopped.json() == {"stream_id": stream_id, "final": {"type": "done", "tokens": 5}}
        assert _metric(gateway, "streaming_buffered_bytes") >= 2 * FULL  # still at the budget: nothing was freed


WIDE = "€" * 1000 + "a"  # 1001 characters, 3001 bytes in UTF-8
NO_CUTS = {
    "MEMORY_BUDGET_BYTES": 10**9,
    "RESUME_ENABLED": "false",
    "WEB_CONCURRENCY": 1,
    "INTER_TOKEN_TIMEOUT_SECONDS": 100,
    "DEADLINE_CHECK_INTERVAL_SECONDS": 0.05,
}


def test_a_held_answer_counts_its_utf8_bytes(start_gateway: GatewayFactory, fake_upstream: FakeUpstream) -> None:
    """A non-streamed completion holds its answer until it ends: two wide tokens hold 2 * 3001 bytes."""
    gateway = start_gateway(**NO_CUTS, UPSTREAM_URL=fake_upstream.url, UPSTREAM_RETRIES=0)
    fake_upstream.script({"tokens": [WIDE, WIDE, "never sent"], "stall_after": 2})
    host, port = gateway.url.removeprefix("http://").split(":")
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()
    with socket.create_connection((host, int(port)), timeout=GUARD_S) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        held = _wait_metric(gateway, "streaming_buffered_bytes", 2 * 3001)
        assert held == 2 * 3001  # in characters it would be 2 * 1001


def test_a_blocked_websocket_write_counts_the_bytes_of_its_frames(
    start_gateway: GatewayFactory, fake_upstream: FakeUpstream
) -> None:
    """A /ws client that stops reading: its full buffer counts twice the blocked batch, in bytes sent."""
    gateway = start_gateway(**{**SLOW_READER_ENV, **NO_CUTS}, UPSTREAM_URL=fake_upstream.url, UPSTREAM_RETRIES=0)
    fake_upstream.script({"tokens": [WIDE] * 5000, "tokens_per_second": 500})
    frame = len('{"type": "token", "content": ' + json.dumps(WIDE) + "}")  # "\u20ac" per euro sign: 6007
    host, port = gateway.url.removeprefix("http://").split(":")
    fixed = FULL + 2 * 65_536  # the transport's high-water mark and the upstream client's read-ahead
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window fills fast
        sock.settimeout(GUARD_S)
        sock.connect((host, int(port)))
        key = base64.b64encode(os.urandom(16))
        sock.sendall(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\n\r\n"
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101"), head
        sock.sendall(_ws_text_frame(json.dumps({"prompt": "flood", "max_tokens": 10_000})))
        full = _wait_metric(gateway, "streaming_buffered_bytes", fixed + 1)  # from here on nothing is read
        batch = (full - fixed) / 2
        assert batch > 0 and batch % frame == 0, full  # whole frames (1001 characters of text each)
