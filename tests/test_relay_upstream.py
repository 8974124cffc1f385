"""Relaying a real OpenAI-compatible upstream (the fault-injecting fake) to `/stream` and `/v1` clients over HTTP.

Every upstream misbehaviour ends a stream one of two ways: a plain HTTP error before any SSE byte,
or a final error event after the tokens relayed so far. A stream never just stops.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from loadtest.harness.wait import eventually
from tests.conftest import FakeUpstream, Gateway, GatewayFactory, sse_data
from tests.slots import assert_slots_released

V1 = "/v1/chat/completions"
PROTOCOLS = ["/stream", "/v1"]
WAIT_S = 10.0  # guard only: how long a polled condition may take before the test fails


def default_tokens(n: int) -> list[str]:
    return [f"tok{i} " for i in range(n)]  # what the fake generates when not scripted


@dataclass
class Relayed:
    """One stream as its client saw it."""

    status: int
    content_type: str
    text: str
    tokens: list[str]  # content deltas, in order (empty ones included, so a leaked empty delta shows)
    events: list[Any]  # every data payload, JSON-decoded ("[DONE]" kept as the string)

    @property
    def final(self) -> Any:
        return self.events[-1]


def relay(gateway: Gateway, protocol: str, max_tokens: int = 16, **extra: Any) -> Relayed:
    if protocol == "/stream":
        url, body = gateway.url + "/stream", {"prompt": "relay me", "max_tokens": max_tokens, **extra}
    else:
        body = {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "relay me"}],
            "max_tokens": max_tokens,
            "stream": True,
            **extra,
        }
        url = gateway.url + V1
    with httpx.Client(timeout=30) as client:
        response = client.post(url, json=body)
    content_type = response.headers.get("content-type", "")
    if not content_type.startswith("text/event-stream"):
        return Relayed(response.status_code, content_type, response.text, [], [])
    events: list[Any] = [d if d == "[DONE]" else json.loads(d) for d in sse_data(response.text)]
    if protocol == "/stream":
        tokens = [e["content"] for e in events if e.get("type") == "token"]
    else:
        tokens = [
            c["choices"][0]["delta"]["content"]
            for c in events[1:]  # the first chunk is the gateway's own role chunk
            if isinstance(c, dict) and c.get("choices") and "content" in c["choices"][0]["delta"]
        ]
    return Relayed(response.status_code, content_type, response.text, tokens, events)


def assert_finished_ok(relayed: Relayed, protocol: str, n_tokens: int) -> None:
    assert relayed.status == 200
    if protocol == "/stream":
        assert relayed.events[0] == {"type": "status", "message": "Generating..."}
        assert relayed.final == {"type": "done", "tokens": n_tokens}
    else:
        assert relayed.events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert relayed.final == "[DONE]"
        assert not any(isinstance(e, dict) and "error" in e for e in relayed.events)


def assert_ended_with_upstream_error(relayed: Relayed, protocol: str, message_part: str = "") -> str:
    """The stream started (200, SSE) and its last event is the upstream error; returns the error message."""
    assert relayed.status == 200
    assert relayed.content_type.startswith("text/event-stream")
    if protocol == "/stream":
        final = relayed.final
        assert final["type"] == "error"
        assert final["code"] == "upstream_error"
        assert not any(e.get("type") == "done" for e in relayed.events)
        message = final["message"]
    else:
        assert relayed.final == "[DONE]"
        error = relayed.events[-2]["error"]
        assert error["code"] == "upstream_error"
        assert error["type"] == "server_error"
        assert not any(
            isinstance(e, dict) and e.get("choices") and e["choices"][0].get("finish_reason") for e in relayed.events
        )  # no finish chunk: the stream did not finish
        message = error["message"]
    assert isinstance(message, str) and message_part in message
    return message


def error_body(relayed: Relayed, protocol: str) -> dict[str, Any]:
    """A plain (pre-stream) HTTP error: JSON, no SSE; normalized to {message, code}."""
    assert relayed.content_type.startswith("application/json")
    assert "data:" not in relayed.text
    body = json.loads(relayed.text)
    if protocol == "/stream":
        return {"message": body["detail"], "code": body["code"]}
    error: dict[str, Any] = body["error"]
    assert error["message"] and error["type"]
    return error


# --- content arrives intact --------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_utf8_split_across_reads(relay_gateway: Gateway, fake_upstream: FakeUpstream, protocol: str) -> None:
    tokens = ["héllo ", "日本語 ", "🚀 ", "x"]
    fake_upstream.script({"tokens": tokens, "split_bytes": 1})
    relayed = relay(relay_gateway, protocol)
    assert relayed.tokens == tokens
    assert_finished_ok(relayed, protocol, 4)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_crlf_line_endings(relay_gateway: Gateway, fake_upstream: FakeUpstream, protocol: str) -> None:
    fake_upstream.script({"crlf": True, "split_bytes": 7})
    relayed = relay(relay_gateway, protocol, max_tokens=12)
    assert relayed.tokens == default_tokens(12)
    assert_finished_ok(relayed, protocol, 12)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_awkward_text_survives(relay_gateway: Gateway, fake_upstream: FakeUpstream, protocol: str) -> None:
    tokens = ["line\n", "\r\n", "cr\r", '"quoted"', "back\\slash", "data: not an event\n\n", "\u2028", "👩‍💻"]
    fake_upstream.script({"tokens": tokens, "crlf": True, "split_bytes": 3})
    relayed = relay(relay_gateway, protocol)
    assert relayed.tokens == tokens
    assert_finished_ok(relayed, protocol, len(tokens))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_empty_deltas_are_not_tokens(relay_gateway: Gateway, fake_upstream: FakeUpstream, protocol: str) -> None:
    fake_upstream.script({"empty_deltas": True})
    relayed = relay(relay_gateway, protocol, max_tokens=10)
    assert relayed.tokens == default_tokens(10)
    assert_finished_ok(relayed, protocol, 10)


@pytest.mark.parametrize("role_chunk", [True, False])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_role_chunk(relay_gateway: Gateway, fake_upstream: FakeUpstream, protocol: str, role_chunk: bool) -> None:
    fake_upstream.script({"role_chunk": role_chunk})
    relayed = relay(relay_gateway, protocol, max_tokens=5)
    assert relayed.tokens == default_tokens(5)
    assert_finished_ok(relayed, protocol, 5)
    if protocol == "/v1":  # exactly one role delta, the gateway's: the upstream's is not relayed twice
        roles = [
            e for e in relayed.events if isinstance(e, dict) and e.get("choices") and "role" in e["choices"][0]["delta"]
        ]
        assert len(roles) == 1


def test_usage_from_upstream_reaches_v1_client(relay_gateway: Gateway, fake_upstream: FakeUpstream) -> None:
    fake_upstream.script({"tokens": ["a ", "b ", "c "]})
    relayed = relay(relay_gateway, "/v1", max_tokens=50, stream_options={"include_usage": True})
    assert relayed.tokens == ["a ", "b ", "c "]
    usage_chunk = relayed.events[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}  # the fake's
    finish = relayed.events[-3]["choices"][0]
    assert finish["finish_reason"] == "stop"
    assert relayed.final == "[DONE]"


def test_usage_not_asked_is_not_sent(relay_gateway: Gateway, fake_upstream: FakeUpstream) -> None:
    relayed = relay(relay_gateway, "/v1", max_tokens=4)
    assert relayed.tokens == default_tokens(4)
    assert not any(isinstance(e, dict) and e.get("usage") for e in relayed.events)
    assert fake_upstream.stats()["bodies"][0]["stream_options"] == {"include_usage": True}  # the gateway still asks


# --- upstream errors before the stream: plain HTTP errors ---------------------------------------------


@pytest.mark.parametrize("upstream_status", [500, 503])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_upstream_5xx_is_502(
    relay_gateway: Gateway, fake_upstream: FakeUpstream, protocol: str, upstream_status: int
) -> None:
    fake_upstream.script(*[{"status": upstream_status, "message": "model is overloaded"}] * 10)  # outlasts any retry
    relayed = relay(relay_gateway, protocol)
    assert relayed.status == 502
    error = error_body(relayed, protocol)
    assert error["code"] == "upstream_error"
    # the kind of failure and the request id; the upstream's own words stay in the gateway's log
    assert f"HTTP {upstream_status}" in error["message"] and "request id" in error["message"]
    assert "model is overloaded" not in relayed.text


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_upstream_400_is_a_client_error_not_retried(
    relay_gateway: Gateway, fake_upstream: FakeUpstream, protocol: str
) -> None:
    fake_upstream.script({"status": 400, "message": "context length exceeded"})
    relayed = relay(relay_gateway, protocol)
    assert relayed.status == 400
    error = error_body(relayed, protocol)
    assert error["code"] == "upstream_rejected"
    assert "HTTP 400" in error["message"] and "context length exceeded" not in relayed.text
    assert fake_upstream.stats()["requests"] == 1


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_upstream_429_is_429(relay_gateway: Gateway, fake_upstream: FakeUpstream, protocol: str) -> None:
    fake_upstream.script(*[{"status": 429, "retry_after": 7, "message": "slow down"}] * 10)
    relayed = relay(relay_gateway, protocol)
    assert relayed.status == 429
    error = error_body(relayed, protocol)
    assert error["code"] == "upstream_rate_limited"
    assert "HTTP 429" in error["message"] and "slow down" not in relayed.text


# --- upstream failures mid-stream: a final error event, never a silent end ------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_error_chunk_mid_stream(relay_gateway: Gateway, fake_upstream: FakeUpstream, protocol: str) -> None:
    fake_upstream.script({"error_after": 2})
    relayed = relay(relay_gateway, protocol, max_tokens=10)
    assert relayed.tokens == default_tokens(2)
    assert_ended_with_upstream_error(relayed, protocol, "reported an error")
    assert "injected mid-stream error" not in relayed.text
    if protocol == "/stream":
        assert set(relayed.final) == {"type", "code", "message"}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_connection_reset_mid_stream(relay_gateway: Gateway, fake_upstream: FakeUpstream, protocol: str) -> None:
    fake_upstream.script({"reset_after": 2})
    relayed = relay(relay_gateway, protocol, max_tokens=10)
    assert relayed.tokens == default_tokens(2)
    assert_ended_with_upstream_error(relayed, protocol)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_missing_done_is_an_error(relay_gateway: Gateway, fake_upstream: FakeUpstream, protocol: str) -> None:
    fake_upstream.script({"no_done": True})
    relayed = relay(relay_gateway, protocol, max_tokens=5)
    assert relayed.tokens == default_tokens(5)
    assert_ended_with_upstream_error(relayed, protocol)


@pytest.mark.parametrize(
    "fault",
    [{"error_after": 2}, {"reset_after": 2}, {"no_done": True}, {"status": 500}],
    ids=["error_chunk", "reset", "no_done", "status_500"],
)
def test_non_stream_upstream_failure_is_an_openai_502(
    relay_gateway: Gateway, fake_upstream: FakeUpstream, fault: dict[str, Any]
) -> None:
    fake_upstream.script(*[fault] * 10)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5}
    with httpx.Client(timeout=30) as client:
        response = client.post(relay_gateway.url + V1, json=body)
    assert response.status_code == 502
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == "upstream_error" and error["type"] == "server_error" and error["message"]


# --- an upstream that writes several events at once (one read, one HTTP chunk or a plain body) -------------


def sse_body(*payloads: Any) -> bytes:
    return b"".join(b"data: " + (p if isinstance(p, bytes) else json.dumps(p).encode()) + b"\n\n" for p in payloads)


def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {
        "id": "c",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


ROLE = chunk({"role": "assistant", "content": ""})


class OneWriteUpstream(BaseHTTPRequestHandler):
    """Answers every chat completion with `body`, written in one piece (no chunking: Content-Length)."""

    protocol_version = "HTTP/1.1"
    body = b""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Content-Length", str(len(self.body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def one_write_gateway(start_gateway: GatewayFactory) -> Iterator[tuple[Gateway, type[OneWriteUpstream]]]:
    handler = type("Handler", (OneWriteUpstream,), {})
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            gateway = start_gateway(UPSTREAM_URL=f"http://127.0.0.1:{server.server_address[1]}/v1", UPSTREAM_RETRIES=0)
            yield gateway, handler
        finally:
            server.shutdown()
            thread.join()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_events_in_one_read_are_all_relayed(
    one_write_gateway: tuple[Gateway, type[OneWriteUpstream]], protocol: str
) -> None:
    gateway, upstream = one_write_gateway
    upstream.body = sse_body(
        ROLE, chunk({"content": "tok0 "}), chunk({"content": "tok1 "}), chunk({}, "stop"), b"[DONE]"
    )
    relayed = relay(gateway, protocol)
    assert relayed.tokens == default_tokens(2)
    assert_finished_ok(relayed, protocol, 2)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_tokens_before_an_error_chunk_in_the_same_read_are_relayed(
    one_write_gateway: tuple[Gateway, type[OneWriteUpstream]], protocol: str
) -> None:
    gateway, upstream = one_write_gateway
    upstream.body = sse_body(
        ROLE,
        chunk({"content": "tok0 "}),
        chunk({"content": "tok1 "}),
        {"error": {"message": "injected mid-stream error"}},
    )
    relayed = relay(gateway, protocol)
    assert relayed.tokens == default_tokens(2)  # the upstream delivered them before it failed
    assert_ended_with_upstream_error(relayed, protocol, "reported an error")
    assert "injected mid-stream error" not in relayed.text


# --- client disconnects reach the upstream ---------------------------------------------------------------


def active_streams(gateway: Gateway) -> float:
    text = httpx.get(gateway.metrics_url + "/metrics", timeout=5).text
    return sum(float(v) for v in re.findall(r"^streaming_active_connections\{[^}]*\} (\S+)$", text, re.M))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_client_disconnect_mid_stream_reaches_upstream(
    relay_gateway: Gateway, fake_upstream: FakeUpstream, protocol: str
) -> None:
    if protocol == "/stream":
        url, body = relay_gateway.url + "/stream", {"prompt": "long", "max_tokens": 20000}
    else:
        url = relay_gateway.url + V1
        body = {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "long"}],
            "max_tokens": 20000,
            "stream": True,
        }
    with httpx.Client(timeout=30) as client, client.stream("POST", url, json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()  # held: dropping a half-read line iterator closes the connection
        seen = 0
        for line in lines:
            seen += line.startswith("data: ") and "tok" in line
            if seen >= 3:
                break
        assert active_streams(relay_gateway) >= 1
        assert fake_upstream.stats()["active"] == 1
    # leaving the block closed the half-read response, and with it the connection
    stats = fake_upstream.wait_for(lambda s: s["disconnects"] >= 1, timeout=WAIT_S)
    assert stats["disconnects"] == 1
    assert stats["completed"] == 0
    assert stats["active"] == 0
    assert eventually(lambda: active_streams(relay_gateway) == 0)
    assert_slots_released(relay_gateway)


def test_client_disconnect_while_waiting_for_non_stream_reaches_upstream(
    relay_gateway: Gateway, fake_upstream: FakeUpstream
) -> None:
    body = json.dumps(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "long"}], "max_tokens": 20000}
    ).encode()
    host, port = relay_gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST " + V1.encode() + b" HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        # the answer comes only at the end; wait until the upstream is generating, then hang up
        assert fake_upstream.wait_for(lambda s: s["active"] == 1, timeout=WAIT_S)["active"] == 1
        assert eventually(lambda: active_streams(relay_gateway) >= 1)
    stats = fake_upstream.wait_for(lambda s: s["disconnects"] >= 1, timeout=WAIT_S)
    assert stats["disconnects"] == 1
    assert stats["completed"] == 0
    assert eventually(lambda: active_streams(relay_gateway) == 0)
    assert_slots_released(relay_gateway)


# --- the upstream pool ------------------------------------------------------------------------------------


def test_finished_streams_reuse_upstream_connections(relay_gateway: Gateway, fake_upstream: FakeUpstream) -> None:
    """A stream that ended with `[DONE]` returns its connection to the worker's pool: no TCP connect per stream."""
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "pool"}], "max_tokens": 3}
    for protocol in PROTOCOLS:  # warm: each worker's pool holds a live connection
        relay(relay_gateway, protocol, max_tokens=3)
    fake_upstream.reset()
    with httpx.Client(base_url=relay_gateway.url, timeout=30) as client:
        for i in range(12):  # one after another: a worker never needs a second connection
            if i % 3 == 0:
                assert_finished_ok(relay(relay_gateway, "/stream", max_tokens=3), "/stream", 3)
            elif i % 3 == 1:
                assert_finished_ok(relay(relay_gateway, "/v1", max_tokens=3), "/v1", 3)
            else:
                response = client.post(V1, json=chat)  # non-streaming answers are relayed from a stream too
                assert response.status_code == 200, response.text
    stats = fake_upstream.stats()
    assert stats["requests"] == 12
    assert stats["completed"] == 12
    # One pooled connection per worker (2), plus rarely a second one when the next request reaches a worker
    # before the previous stream handed its connection back (right after its last event). Before the fix
    # every stream opened its own (12).
    assert stats["connections"] <= 4, stats["connections"]


def test_upstream_through_an_http_proxy(start_gateway: GatewayFactory, fake_upstream: FakeUpstream) -> None:
    """HTTP_PROXY is honoured (read once at start): the request goes to the proxy, for the upstream's URL."""
    proxy = fake_upstream.url.removesuffix("/v1")  # the fake answers absolute-form requests like a proxy would
    with socket.socket() as closed:  # bound, never listening: a direct connection is refused at once
        closed.bind(("127.0.0.1", 0))
        upstream = f"http://127.0.0.1:{closed.getsockname()[1]}/v1"
        gateway = start_gateway(UPSTREAM_URL=upstream, HTTP_PROXY=proxy, UPSTREAM_RETRIES=0)
        assert_finished_ok(relay(gateway, "/v1", max_tokens=4), "/v1", 4)
        assert fake_upstream.stats()["requests"] == 1
        # NO_PROXY exempts the upstream: the gateway connects to it itself, and is refused
        gateway = start_gateway(UPSTREAM_URL=upstream, HTTP_PROXY=proxy, NO_PROXY="127.0.0.1", UPSTREAM_RETRIES=0)
        refused = relay(gateway, "/v1", max_tokens=4)
    assert refused.status == 502, refused.text
    assert "could not be reached" in error_body(refused, "/v1")["message"]
    assert fake_upstream.stats()["requests"] == 1


def test_seed_protocol_relays_only_the_text_of_a_tool_calling_answer(
    relay_gateway: Gateway, fake_upstream: FakeUpstream
) -> None:
    """/stream has no place for tool calls: its clients get the text, and `done` counts the token events."""
    fake_upstream.script({"tokens": ["a ", "b "], "tool_calls": [{"name": "f", "arguments": '{"x": 1}'}]})
    relayed = relay(relay_gateway, "/stream", max_tokens=16)
    assert relayed.tokens == ["a ", "b "]
    assert relayed.final == {"type": "done", "tokens": 2}
