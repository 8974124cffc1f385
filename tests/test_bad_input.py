"""Every kind of bad input gets a readable 4xx in its protocol's shape; none leaks a stream."""

from __future__ import annotations

import json
import socket
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway
from tests.slots import assert_slots_released

BAD_STREAM_BODIES: list[tuple[str, bytes, int, str]] = [
    ("malformed json", b'{"prompt": "x"', 422, "not valid JSON"),
    ("not an object", b'["prompt"]', 422, "JSON object"),
    ("missing prompt", b'{"max_tokens": 5}', 422, "prompt: Field required"),
    ("empty prompt", b'{"prompt": ""}', 422, "prompt"),
    ("blank prompt", b'{"prompt": "   \\n"}', 422, "non-whitespace"),
    ("prompt wrong type", b'{"prompt": 5}', 422, "prompt: Input should be a valid string"),
    ("max_tokens as string", b'{"prompt": "x", "max_tokens": "10"}', 422, "max_tokens: Input should be a valid int"),
    ("max_tokens bool", b'{"prompt": "x", "max_tokens": true}', 422, "max_tokens"),
    ("max_tokens zero", b'{"prompt": "x", "max_tokens": 0}', 422, "greater than or equal to 1"),
    ("max_tokens negative", b'{"prompt": "x", "max_tokens": -3}', 422, "greater than or equal to 1"),
    ("max_tokens absurd", b'{"prompt": "x", "max_tokens": 10000000000}', 422, "above this gateway's limit"),
    ("unknown field", b'{"prompt": "x", "temperature": 2}', 422, "temperature: Extra inputs are not permitted"),
    ("empty body", b"", 422, "empty"),
    ("invalid utf-8", b'{"prompt": "\xff\xfe"}', 422, "JSON"),
]


JSON_HEADERS = {"content-type": "application/json"}
STREAM_IDS = [c[0] for c in BAD_STREAM_BODIES]


@pytest.mark.parametrize(("case", "body", "status", "message"), BAD_STREAM_BODIES, ids=STREAM_IDS)
def test_stream_rejects_bad_body(mock_gateway: Gateway, case: str, body: bytes, status: int, message: str) -> None:
    r = httpx.post(mock_gateway.url + "/stream", content=body, headers=JSON_HEADERS, timeout=5)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    payload = r.json()
    assert message in payload["detail"]
    assert payload["code"] == "invalid_request"


M = "gpt-4o-mini"  # a model in the default MODELS
CHAT_BODIES: list[tuple[str, dict[str, Any], str, str]] = [
    ("no messages", {"model": M, "messages": []}, "messages", "at least 1 item"),
    ("missing model", {"messages": [{"role": "user", "content": "hi"}]}, "model", "Field required"),
    ("bad role", {"model": M, "messages": [{"role": "wizard", "content": "hi"}]}, "messages", "role"),
    (
        "stream not bool",
        {"model": M, "messages": [{"role": "user", "content": "hi"}], "stream": "yes"},
        "stream",
        "valid boolean",
    ),
    (
        "max_tokens absurd",
        {"model": M, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9},
        "max_tokens",
        "above this gateway's limit",
    ),
    (
        "max_completion_tokens absurd",
        {"model": M, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10**9},
        "max_completion_tokens",
        "above this gateway's limit",
    ),
    ("n > 1", {"model": M, "messages": [{"role": "user", "content": "hi"}], "n": 3}, "n", "less than or equal to 1"),
]


@pytest.mark.parametrize(("case", "body", "param", "message"), CHAT_BODIES, ids=[c[0] for c in CHAT_BODIES])
def test_chat_rejects_bad_body_openai_shaped(
    mock_gateway: Gateway, case: str, body: dict[str, Any], param: str, message: str
) -> None:
    r = httpx.post(mock_gateway.url + "/v1/chat/completions", json=body, timeout=5)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_request"
    assert error["param"] == param
    assert message in error["message"]


@pytest.mark.parametrize("path", ["/stream", "/v1/chat/completions"])
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_wrong_content_type_is_415(mock_gateway: Gateway, path: str, content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {}
    r = httpx.post(mock_gateway.url + path, content=b'{"prompt": "x"}', headers=headers, timeout=5)
    assert r.status_code == 415, r.text
    text = r.text
    assert "application/json" in text


def test_json_with_charset_is_accepted(mock_gateway: Gateway) -> None:
    r = httpx.post(
        mock_gateway.url + "/stream",
        content=b'{"prompt": "x", "max_tokens": 2}',
        headers={"content-type": "application/json; charset=utf-8"},
        timeout=5,
    )
    assert r.status_code == 200
    assert '"type": "done"' in r.text


@pytest.mark.parametrize("path", ["/stream", "/v1/chat/completions"])
def test_oversized_body_declared_is_413(mock_gateway: Gateway, path: str) -> None:
    body = json.dumps({"prompt": "x" * 2_000_000}).encode()
    r = httpx.post(mock_gateway.url + path, content=body, headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 413
    text = r.text
    assert "larger than this gateway's limit of 1048576 bytes" in text
    if path.startswith("/v1"):
        assert r.json()["error"]["code"] == "payload_too_large"


def test_oversized_body_chunked_is_413(mock_gateway: Gateway) -> None:
    """No Content-Length (chunked upload): the cap is enforced while the body streams in."""

    def body() -> Any:
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}'

    r = httpx.post(
        mock_gateway.url + "/stream", content=body(), headers={"content-type": "application/json"}, timeout=10
    )
    assert r.status_code == 413
    assert r.json()["code"] == "payload_too_large"


def test_prompt_too_long_is_422(start_gateway: Any) -> None:
    gateway = start_gateway(MAX_PROMPT_CHARS=100, WEB_CONCURRENCY=1)
    r = httpx.post(gateway.url + "/stream", json={"prompt": "y" * 101}, timeout=5)
    assert r.status_code == 422
    assert "prompt is 101 characters, above this gateway's limit of 100" in r.json()["detail"]


def test_unknown_route_and_method(mock_gateway: Gateway) -> None:
    r = httpx.get(mock_gateway.url + "/v1/nope", timeout=5)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"
    r = httpx.get(mock_gateway.url + "/stream", timeout=5)
    assert r.status_code == 405
    assert "GET is not allowed on /stream" in r.json()["detail"]


def test_garbage_http_does_not_break_the_server(mock_gateway: Gateway) -> None:
    host, port = mock_gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        reply = sock.recv(1024)
    assert reply.startswith(b"HTTP/1.1 400")
    assert httpx.get(mock_gateway.url + "/health", timeout=5).status_code == 200


def test_bad_input_leaks_no_stream(mock_gateway: Gateway) -> None:
    for _, body, _, _ in BAD_STREAM_BODIES:
        httpx.post(mock_gateway.url + "/stream", content=body, headers=JSON_HEADERS, timeout=5)
    assert_slots_released(mock_gateway)  # none took a slot, none kept one
    # and the gateway still streams
    r = httpx.post(mock_gateway.url + "/stream", json={"prompt": "after", "max_tokens": 3}, timeout=5)
    assert r.text.rstrip().endswith('{"type": "done", "tokens": 3}')
    assert "Traceback" not in mock_gateway.log()
