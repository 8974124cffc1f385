"""Faults are classified: a client hanging up mid-body is `client_gone`, malformed upstream data is
`upstream_error`; neither is logged as the gateway's own failure (no traceback, no `internal_error`)."""

from __future__ import annotations

import json
import socket
from typing import Any

import httpx
import pytest

from tests.conftest import FakeUpstream, Gateway, GatewayFactory, sse_data
from tests.otlp import OTLPReceiver
from tests.test_upstream_protection import metric, wait_metric

V1 = "/v1/chat/completions"


def assert_no_server_fault(gateway: Gateway) -> None:
    log = gateway.log()
    assert "Traceback" not in log and "unhandled error" not in log and "relay failed" not in log, log[-3000:]
    assert metric(gateway, "streaming_rejections_total", reason="internal_error") == 0
    assert metric(gateway, "streaming_errors_total", error_type="internal_error") == 0


def hang_up_mid_body(gateway: Gateway, route: str, framing: str) -> None:
    before = metric(gateway, "streaming_stream_outcomes_total", route=route, outcome="client_gone")
    host, port = gateway.url.removeprefix("http://").split(":")
    length = b"Content-Length: 100\r\n" if framing == "content-length" else b"Transfer-Encoding: chunked\r\n"
    first_piece = b'{"prompt": "hel' if framing == "content-length" else b'f\r\n{"prompt": "hel\r\n'
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST "
            + route.encode()
            + b" HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            + length
            + b"\r\n"
            + first_piece
        )
    # closed with the body unfinished
    expected = before + 1
    assert (
        wait_metric(gateway, "streaming_stream_outcomes_total", expected, route=route, outcome="client_gone")
        == expected
    )
    assert_no_server_fault(gateway)


@pytest.mark.parametrize("route", ["/stream", V1])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_client_leaving_mid_body_is_client_gone(gateway: Gateway, route: str, framing: str) -> None:
    hang_up_mid_body(gateway, route, framing)


def test_a_client_leaving_mid_body_with_tracing_on(
    otlp: OTLPReceiver,
    start_gateway: GatewayFactory,
    fake_upstream: FakeUpstream,
) -> None:
    """With tracing on, streams go through FastAPI's stack: its exception handler classifies the same way."""
    gateway = start_gateway(UPSTREAM_URL=fake_upstream.url, OTEL_EXPORTER_OTLP_ENDPOINT=otlp.url)
    hang_up_mid_body(gateway, "/stream", "content-length")


TOOL_CALL_SURROGATE = (
    r'{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function",'
    r'"function":{"name":"get_\ud800weather","arguments":""}}]},"finish_reason":null}]}'
)
MALFORMED = {
    "lone surrogate in a tool-call name": TOOL_CALL_SURROGATE,
    "lone surrogate in content": r'{"choices":[{"index":0,"delta":{"content":"a\udc00b"},"finish_reason":null}]}',
    "content sent as a list": {"choices": [{"index": 0, "delta": {"content": [{"type": "text", "text": "x"}]}}]},
    "non-JSON data line": "this is not json",
    "a JSON array": [1, 2, 3],
    "choices as a string": {"choices": "abc"},
    "a choice as a number": {"choices": [7]},
    "delta as a string": {"choices": [{"index": 0, "delta": "hi"}]},
    "finish_reason as a number": {"choices": [{"index": 0, "delta": {}, "finish_reason": 3}]},
    "tool calls as an object": {"choices": [{"index": 0, "delta": {"tool_calls": {"index": 0}}}]},
    "tool-call index as a string": {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": "x"}]}}]},
    "tool-call arguments as a number": {
        "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": 5}}]}}]
    },
}


def final_error(protocol: str, response: httpx.Response) -> dict[str, Any]:
    if protocol == "/v1 non-stream":
        assert response.status_code == 502, response.text
        error: dict[str, Any] = response.json()["error"]
        return error
    assert response.status_code == 200, response.text
    events: list[Any] = [d if d == "[DONE]" else json.loads(d) for d in sse_data(response.text)]
    if protocol == "/stream":
        assert events[-1]["type"] == "error"
        assert [e["content"] for e in events if e["type"] == "token"] == ["fine "]
        error = events[-1]
        return error
    assert events[-1] == "[DONE]"
    assert "fine " in response.text
    error = events[-2]["error"]
    return error


@pytest.mark.parametrize("protocol", ["/stream", "/v1", "/v1 non-stream"])
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_upstream_data_is_an_upstream_error(
    gateway: Gateway, fake_upstream: FakeUpstream, case: str, protocol: str
) -> None:
    fake_upstream.script({"tokens": ["fine "], "raw": [MALFORMED[case]]})
    if protocol == "/stream":
        response = httpx.post(gateway.url + "/stream", json={"prompt": "hi", "max_tokens": 5}, timeout=30)
    else:
        body = {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 5,
            "stream": protocol == "/v1",
        }
        response = httpx.post(gateway.url + V1, json=body, timeout=30)
    error = final_error(protocol, response)
    assert error["code"] == "upstream_error"
    assert "not an OpenAI chat completion stream" in error["message"]
    assert_no_server_fault(gateway)
