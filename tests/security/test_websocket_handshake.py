"""Issue 12: a WebSocket is refused before the upgrade when its Origin or key is wrong, and a key it carries
in the URL (browsers cannot set headers there) never reaches a log line or a span."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.sync.client import connect as ws_connect

from tests.conftest import Gateway, GatewayFactory, launch_gateway
from tests.otlp import OTLPReceiver
from tests.security.raw import GUARD_S, connect, read_head, read_until_closed, status_of, ws_handshake

KEY_A, KEY_B = "sk-tenant-a", "sk-tenant-b"
APP_ORIGIN = "https://app.example.com"
REQUEST = {"prompt": "handshake", "max_tokens": 2}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = launch_gateway(
        {"API_KEYS": f"{KEY_A},{KEY_B}", "ALLOWED_ORIGINS": APP_ORIGIN},
        tmp_path_factory.mktemp("gateway") / "gateway.log",
    )
    yield gateway
    gateway.stop()


def _upgrade(gateway: Gateway, headers: dict[str, str], path: str = "/ws") -> tuple[int, bytes]:
    with connect(gateway.url) as sock:
        sock.sendall(ws_handshake(path, headers))
        head = read_head(sock)
        rest = b"" if status_of(head) == 101 else read_until_closed(sock)
    return status_of(head), head + rest


def _code(response: bytes) -> str:
    return str(json.loads(response.split(b"\r\n\r\n", 1)[1])["code"])


def test_a_foreign_origin_gets_403_before_the_upgrade(gateway: Gateway, start_gateway: GatewayFactory) -> None:
    status, response = _upgrade(gateway, {"X-API-Key": KEY_A, "Origin": "https://evil.example"})
    assert status == 403
    assert _code(response) == "origin_not_allowed"
    assert _upgrade(gateway, {"X-API-Key": KEY_A, "Origin": "null"})[0] == 403  # sandboxed pages, file://
    # a listed origin (any case, a trailing slash) and clients that send no Origin are served
    assert _upgrade(gateway, {"X-API-Key": KEY_A, "Origin": APP_ORIGIN})[0] == 101
    assert _upgrade(gateway, {"X-API-Key": KEY_A, "Origin": APP_ORIGIN.upper() + "/"})[0] == 101
    assert _upgrade(gateway, {"X-API-Key": KEY_A})[0] == 101
    # `*` lets any page in
    anywhere = start_gateway(ALLOWED_ORIGINS="*")
    assert _upgrade(anywhere, {"Origin": "https://elsewhere.example"})[0] == 101


def test_the_key_is_checked_before_the_upgrade(gateway: Gateway) -> None:
    status, response = _upgrade(gateway, {})
    assert status == 401
    assert _code(response) == "missing_api_key"
    assert _upgrade(gateway, {"Authorization": "Bearer sk-nobody"})[0] == 403
    assert _upgrade(gateway, {"Sec-WebSocket-Protocol": "bearer.sk-nobody"})[0] == 403


def _stream(url: str, chosen: str | None = None, **options: Any) -> list[dict[str, Any]]:
    with ws_connect(url, open_timeout=GUARD_S, **options) as ws:
        ws.send(json.dumps(REQUEST))
        events = [json.loads(ws.recv(timeout=GUARD_S)) for _ in range(4)]
        assert ws.subprotocol == chosen  # `gateway.v1` when offered; the key is never echoed back
    return events


def test_browsers_send_the_key_as_a_subprotocol_or_in_the_query(gateway: Gateway) -> None:
    url = gateway.url.replace("http://", "ws://") + "/ws"
    browser = ["gateway.v1", f"bearer.{KEY_A}"]  # what a page passes to `new WebSocket(url, protocols)`
    for events in (
        _stream(url, "gateway.v1", subprotocols=browser, origin=APP_ORIGIN),
        _stream(url, subprotocols=[f"bearer.{KEY_A}"]),
        _stream(f"{url}?api_key={KEY_B}", origin=APP_ORIGIN),
    ):
        assert events[-1] == {"type": "done", "tokens": 2}


def test_the_upgrade_answers_with_the_gateway_subprotocol_never_the_key(gateway: Gateway) -> None:
    """Browsers fail a handshake that offered protocols and got no Sec-WebSocket-Protocol back (Fetch spec)."""
    status, head = _upgrade(gateway, {"Sec-WebSocket-Protocol": f"bearer.{KEY_A}, gateway.v1", "Origin": APP_ORIGIN})
    assert status == 101
    fields = [line.split(b":", 1) for line in head.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]]
    protocols = [value.strip() for name, value in fields if name.strip().lower() == b"sec-websocket-protocol"]
    assert protocols == [b"gateway.v1"]
    assert KEY_A.encode() not in head


def test_a_query_key_never_reaches_logs_or_spans(otlp: OTLPReceiver, start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(
        API_KEYS=KEY_A,
        WEB_CONCURRENCY=1,
        LOG_LEVEL="info",
        OTEL_EXPORTER_OTLP_ENDPOINT=otlp.url,
        OTEL_BSP_SCHEDULE_DELAY=50,
    )
    events = _stream(gateway.url.replace("http://", "ws://") + f"/ws?api_key={KEY_A}&trace=1")
    assert events[-1]["type"] == "done"
    assert gateway.stop() == 0  # workers flush their span queues on the way out
    ws_spans = [span for span in otlp.spans if "/ws" in json.dumps(span["attributes"])]
    assert ws_spans, otlp.spans
    assert KEY_A not in json.dumps(otlp.spans)
    assert any("api_key=REDACTED" in json.dumps(span["attributes"]) for span in ws_spans)
    log = gateway.log()
    assert "/ws" in log  # uvicorn logs the accepted WebSocket at info
    assert KEY_A not in log
