"""Upstream failures are reported, not relayed: the client learns the kind of failure and its request id;
the upstream's own words (an error body naming server paths, an exception naming its address) go to
the gateway's log only. Before the first token and mid-stream, on /stream, /v1 (stream and not) and /ws.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from loadtest.harness.ports import refused_port
from tests.conftest import FakeUpstream, Gateway, GatewayFactory

SECRET = "internal at /srv/model/shard-3/worker.py line 88: CUDA OOM for tenant b"
REQUEST_ID = "req-security-42"
PROTOCOLS = ["/stream", "/v1 stream", "/v1", "/ws"]


def call(gateway: Gateway, protocol: str, max_tokens: int = 8) -> tuple[int, str]:
    """Status (the WS close code) and everything the client received, as text."""
    headers = {"X-Request-ID": REQUEST_ID}
    messages = [{"role": "user", "content": "hi"}]
    if protocol == "/ws":
        received = []
        with connect(gateway.url.replace("http://", "ws://") + "/ws", additional_headers=headers) as ws:
            ws.send(json.dumps({"prompt": "hi", "max_tokens": max_tokens}))
            try:
                while True:
                    received.append(str(ws.recv(timeout=30)))
            except ConnectionClosed:
                pass
            assert ws.close_reason is not None
            received.append(ws.close_reason)
        assert ws.close_code is not None
        return ws.close_code, "\n".join(received)
    body: dict[str, Any]
    if protocol == "/stream":
        url, body = "/stream", {"prompt": "hi", "max_tokens": max_tokens}
    else:
        url = "/v1/chat/completions"
        body = {
            "model": "gpt-4o-mini",
            "messages": messages,
            "max_tokens": max_tokens,
            "stream": protocol == "/v1 stream",
        }
    response = httpx.post(gateway.url + url, json=body, headers=headers, timeout=30)
    return response.status_code, response.text


@pytest.mark.parametrize("status", [500, 400, 429])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_an_error_answer_is_reported_not_relayed(
    gateway: Gateway, fake_upstream: FakeUpstream, protocol: str, status: int
) -> None:
    fake_upstream.script({"status": status, "message": SECRET})
    code, text = call(gateway, protocol)
    assert code == ({500: 1011, 400: 1008, 429: 1011}[status] if protocol == "/ws" else {500: 502}.get(status, status))
    assert "/srv/model" not in text and "CUDA" not in text
    assert f"HTTP {status}" in text and f"request id {REQUEST_ID}" in text
    assert "/srv/model/shard-3" in gateway.log()  # the operator still gets the upstream's words


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_an_error_event_mid_stream_is_reported_not_relayed(
    gateway: Gateway, fake_upstream: FakeUpstream, protocol: str
) -> None:
    fake_upstream.script({"error_after": 2})  # the fake's error event says "injected mid-stream error"
    code, text = call(gateway, protocol)
    assert code == (1011 if protocol == "/ws" else 200 if protocol != "/v1" else 502)
    assert "tok1 " in text or protocol == "/v1"  # the tokens before it were relayed
    assert "injected mid-stream error" not in text
    assert "reported an error" in text and f"request id {REQUEST_ID}" in text


def test_an_unreachable_upstream_is_not_described(start_gateway: GatewayFactory) -> None:
    with refused_port() as port:
        gateway = start_gateway(UPSTREAM_URL=f"http://127.0.0.1:{port}/v1", UPSTREAM_RETRIES=0)
        for protocol in PROTOCOLS:
            code, text = call(gateway, protocol)
            assert code == (1011 if protocol == "/ws" else 502)
            assert str(port) not in text and "127.0.0.1" not in text and "Cannot connect" not in text
            assert "could not be reached" in text and f"request id {REQUEST_ID}" in text
    assert str(port) in gateway.log()
