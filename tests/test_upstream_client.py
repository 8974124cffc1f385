"""The OpenAI-compatible upstream client (app/upstream/client.py) inside the real gateway (gunicorn):
the model it sends (UPSTREAM_MODEL), its pool size (UPSTREAM_MAX_CONNECTIONS), redirects it does not
follow, and the egress proxies it uses (HTTPS_PROXY, ALL_PROXY, NO_PROXY), each seen from the other
end: the fake upstream's record of what reached it, or a recording proxy on loopback.
"""

from __future__ import annotations

import json
import socketserver
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import FakeUpstream, Gateway, GatewayFactory
from tests.test_relay_upstream import V1, error_body, relay

NO_RETRIES = {"UPSTREAM_RETRIES": 0, "CIRCUIT_FAILURE_THRESHOLD": 1000}


def chat(gateway_url: str, model: str, max_tokens: int = 3) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "which model"}], "max_tokens": max_tokens}
    return httpx.post(gateway_url + V1, json=body, timeout=30)


def test_upstream_model_replaces_the_clients_model(start_gateway: GatewayFactory, fake_upstream: FakeUpstream) -> None:
    gateway = start_gateway(UPSTREAM_URL=fake_upstream.url, UPSTREAM_MODEL="served-llama", **NO_RETRIES)
    answer = chat(gateway.url, "gpt-4o")
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == "tok0 tok1 tok2 "
    assert [body["model"] for body in fake_upstream.stats()["bodies"]] == ["served-llama"]


def test_without_upstream_model_the_clients_model_passes_through(
    relay_gateway: Gateway, fake_upstream: FakeUpstream
) -> None:
    assert chat(relay_gateway.url, "gpt-4o").status_code == 200
    assert [body["model"] for body in fake_upstream.stats()["bodies"]] == ["gpt-4o"]


def test_upstream_max_connections_bounds_the_pool(start_gateway: GatewayFactory, fake_upstream: FakeUpstream) -> None:
    """A pool of one per worker: while one stream holds the connection, the next waits for it and times out
    (UPSTREAM_CONNECT_TIMEOUT_SECONDS bounds the wait for a pooled connection) without reaching the upstream; the
    wait is told apart from a connect timeout (the gateway's load: no verdict on the upstream's health)."""
    gateway = start_gateway(
        UPSTREAM_URL=fake_upstream.url,
        UPSTREAM_MAX_CONNECTIONS=1,
        WEB_CONCURRENCY=1,
        UPSTREAM_CONNECT_TIMEOUT_SECONDS=1,
        **NO_RETRIES,
    )
    fake_upstream.script({"stall_after": 1})
    body = {"prompt": "hold the connection", "max_tokens": 3}
    with httpx.Client(timeout=30) as client, client.stream("POST", gateway.url + "/stream", json=body) as held:
        lines = held.iter_lines()
        assert any('"type": "token"' in line for line in lines)  # the only pooled connection is in use
        waited = relay(gateway, "/stream")
        assert waited.status == 504
        error = error_body(waited, "/stream")
        assert error["code"] == "timeout" and "upstream pool" in error["message"]
        assert fake_upstream.stats()["requests"] == 1
    # the held stream's client left: its connection is closed, and the pool serves the next stream
    fake_upstream.wait_for(lambda s: s["disconnects"] == 1)
    assert relay(gateway, "/stream", max_tokens=2).status == 200


def test_redirects_are_not_followed(relay_gateway: Gateway, fake_upstream: FakeUpstream) -> None:
    elsewhere = fake_upstream.url + "/chat/completions?redirected=1"  # a working target: following would succeed
    for status in (301, 302, 307, 308):
        fake_upstream.reset()
        fake_upstream.script({"status": status, "location": elsewhere})
        relayed = relay(relay_gateway, "/stream")
        assert relayed.status == 502, relayed.text
        error = error_body(relayed, "/stream")
        assert error["code"] == "upstream_error" and f"(HTTP {status})" in error["message"]
        assert fake_upstream.stats()["requests"] == 1


# --- egress proxies -------------------------------------------------------------------------------------------


class RecordingProxy(socketserver.ThreadingTCPServer):
    """An HTTP proxy on loopback that records each request line. A CONNECT (https) is refused with 403;
    a plain request (http through the proxy) gets one OpenAI stream chunk with the text "via proxy"."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), ProxyHandler)
        self.seen: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class ProxyHandler(socketserver.StreamRequestHandler):
    server: RecordingProxy

    def handle(self) -> None:
        request_line = self.rfile.readline().decode("latin-1").strip()
        length = 0
        while (line := self.rfile.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        body = self.rfile.read(length) if length else b""
        self.server.seen.append(request_line)
        if request_line.startswith("CONNECT "):
            self.wfile.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return
        model = json.loads(body)["model"]
        chunk: dict[str, Any] = {
            "id": "p",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "delta": {"content": "via proxy"}, "finish_reason": "stop"}],
        }
        events = f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode()
        self.wfile.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n"
            b"Content-Length: " + str(len(events)).encode() + b"\r\n\r\n" + events
        )


@pytest.fixture
def proxy() -> Iterator[RecordingProxy]:
    server = RecordingProxy()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_https_proxy_carries_https_upstreams(start_gateway: GatewayFactory, proxy: RecordingProxy) -> None:
    gateway = start_gateway(UPSTREAM_URL="https://llm.upstream.test/v1", HTTPS_PROXY=proxy.url, **NO_RETRIES)
    relayed = relay(gateway, "/stream")
    assert relayed.status == 502  # the proxy refused the tunnel: the gateway never went direct
    assert "could not be reached" in error_body(relayed, "/stream")["message"]
    assert proxy.seen == ["CONNECT llm.upstream.test:443 HTTP/1.1"]


def test_all_proxy_carries_plain_http_upstreams(start_gateway: GatewayFactory, proxy: RecordingProxy) -> None:
    gateway = start_gateway(UPSTREAM_URL="http://llm.upstream.test:8000/v1", ALL_PROXY=proxy.url, **NO_RETRIES)
    relayed = relay(gateway, "/stream", max_tokens=5)
    assert relayed.status == 200, relayed.text
    assert relayed.tokens == ["via proxy"]
    assert relayed.final == {"type": "done", "tokens": 1}
    assert proxy.seen == ["POST http://llm.upstream.test:8000/v1/chat/completions HTTP/1.1"]


def test_no_proxy_goes_direct(
    start_gateway: GatewayFactory, proxy: RecordingProxy, fake_upstream: FakeUpstream
) -> None:
    gateway = start_gateway(UPSTREAM_URL=fake_upstream.url, ALL_PROXY=proxy.url, NO_PROXY="127.0.0.1", **NO_RETRIES)
    relayed = relay(gateway, "/stream", max_tokens=2)
    assert relayed.status == 200 and relayed.tokens == ["tok0 ", "tok1 "]
    assert proxy.seen == []
    assert fake_upstream.stats()["requests"] == 1
