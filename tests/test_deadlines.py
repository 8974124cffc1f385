"""Deadlines bound every wait, and a client that stops reading is cut; each ends with a final event."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import SLOT_CAPS, FakeUpstream, Gateway, GatewayFactory, launch_gateway, sse_data
from tests.slots import assert_slots_released


@pytest.fixture(scope="module")
def strict_gateway(fake_upstream_server: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = launch_gateway(
        {
            "UPSTREAM_URL": fake_upstream_server.url,
            "FIRST_TOKEN_TIMEOUT_SECONDS": 1,
            "INTER_TOKEN_TIMEOUT_SECONDS": 1,
            "TOTAL_TIMEOUT_SECONDS": 5,  # also how long the slot check's streams may live: a generous bound
            "DEADLINE_CHECK_INTERVAL_SECONDS": 0.05,
            "CIRCUIT_FAILURE_THRESHOLD": 1000,  # every test here is an upstream fault; the breaker is tested apart
            **SLOT_CAPS,
        },
        tmp_path_factory.mktemp("gateway") / "gateway.log",
    )
    yield gateway
    gateway.stop()


def _stream(gateway: Gateway, max_tokens: int = 50) -> list[dict[str, object]]:
    r = httpx.post(gateway.url + "/stream", json={"prompt": "deadline", "max_tokens": max_tokens}, timeout=30)
    assert r.status_code == 200, r.text
    return [json.loads(d) for d in sse_data(r.text)]


def test_stalled_upstream_trips_inter_token_deadline(strict_gateway: Gateway, fake_upstream: FakeUpstream) -> None:
    fake_upstream.script({"stall_after": 3})
    events = _stream(strict_gateway)
    assert [e["type"] for e in events] == ["status", "token", "token", "token", "error"]
    assert events[-1]["code"] == "timeout"
    assert events[-1]["message"] == "inter-token deadline of 1s exceeded"
    # the stalled upstream request was closed, and the stream released
    assert fake_upstream.wait_for(lambda s: s["disconnects"] == 1)["disconnects"] == 1
    assert_slots_released(strict_gateway)


def test_first_token_deadline(strict_gateway: Gateway, fake_upstream: FakeUpstream) -> None:
    fake_upstream.script({"first_token_ms": 5000})
    events = _stream(strict_gateway)
    assert [e["type"] for e in events] == ["status", "error"]
    assert events[-1]["message"] == "first token deadline of 1s exceeded"
    assert fake_upstream.wait_for(lambda s: s["disconnects"] == 1)["disconnects"] == 1
    assert_slots_released(strict_gateway)


def test_first_token_deadline_while_upstream_withholds_headers(
    strict_gateway: Gateway, fake_upstream: FakeUpstream
) -> None:
    """Nothing was sent yet, so the deadline is a plain HTTP 504, in each protocol's shape."""
    fake_upstream.script({"headers_delay_ms": 5000}, {"headers_delay_ms": 5000})
    r = httpx.post(strict_gateway.url + "/stream", json={"prompt": "x"}, timeout=30)
    assert r.status_code == 504
    assert r.json() == {"detail": "first token deadline of 1s exceeded", "code": "timeout"}
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "stream": True}
    r = httpx.post(strict_gateway.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "timeout"
    assert_slots_released(strict_gateway)


def test_total_deadline(strict_gateway: Gateway, fake_upstream: FakeUpstream) -> None:
    fake_upstream.script({"tokens_per_second": 5})
    events = _stream(strict_gateway, max_tokens=100)
    assert events[-1] == {"type": "error", "code": "timeout", "message": "total deadline of 5s exceeded"}
    assert 5 <= sum(e["type"] == "token" for e in events) < 100
    assert_slots_released(strict_gateway)


def test_deadline_in_openai_stream_is_an_error_chunk(strict_gateway: Gateway, fake_upstream: FakeUpstream) -> None:
    fake_upstream.script({"stall_after": 2})
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "stream": True, "max_tokens": 10}
    data = sse_data(httpx.post(strict_gateway.url + "/v1/chat/completions", json=body, timeout=30).text)
    assert data[-1] == "[DONE]"
    assert json.loads(data[-2])["error"]["code"] == "timeout"
    assert_slots_released(strict_gateway)


def _errors_by_type(gateway: Gateway, error_type: str) -> float:
    text = httpx.get(gateway.metrics_url + "/metrics", timeout=5).text
    pattern = rf'^streaming_errors_total\{{error_type="{error_type}",route="/stream"\}} (\S+)$'
    return sum(float(v) for v in re.findall(pattern, text, re.M))


def test_client_that_stops_reading_is_cut(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(  # the default SLOW_CLIENT_TIMEOUT_SECONDS: the slot check's streams do not read either
        MOCK_TOKENS_PER_SECOND=0,
        MOCK_FIRST_TOKEN_MS=0,
        MAX_TOKENS_LIMIT=1_000_000,
        DEADLINE_CHECK_INTERVAL_SECONDS=0.05,
        **SLOT_CAPS,
    )
    host, port = gateway.url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "flood", "max_tokens": 1_000_000}).encode()
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window fills fast
        sock.connect((host, int(port)))
        sock.sendall(
            b"POST /stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        assert sock.recv(1024).startswith(b"HTTP/1.1 200")
        # ...and never read again. The gateway must cut the stream and free it.
        deadline = time.monotonic() + 30
        while _errors_by_type(gateway, "backpressure") < 1 and time.monotonic() < deadline:
            time.sleep(0.1)  # polling interval, not an assertion
        assert _errors_by_type(gateway, "backpressure") == 1
        assert_slots_released(gateway)
    assert httpx.get(gateway.url + "/health", timeout=5).status_code == 200
