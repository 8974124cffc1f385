"""WebSocket close codes against the real gateway (gunicorn, 2 workers) and the fake upstream.

An upstream failure, before or after the first token, is an `error` event and close 1011; a refusal
that says "try again later" (rate limit, circuit open, connection limit) is an `error` event and
close 1013, and the rate limit on `/ws` is the instance's, shared by both workers and with `/stream`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.conftest import FakeUpstream, Gateway, GatewayFactory, launch_gateway
from tests.test_relay_upstream import default_tokens
from tests.workers import only_worker, worker_pids

RECV_GUARD_S = 30.0  # guard only: how long one frame may take


def ws_url(gateway: Gateway) -> str:
    return gateway.url.replace("http://", "ws://") + "/ws"


def receive_all(ws: ClientConnection) -> list[dict[str, Any]]:
    events = []
    try:
        while True:
            events.append(json.loads(ws.recv(timeout=RECV_GUARD_S)))
    except ConnectionClosed:
        return events


def ws_stream(gateway: Gateway, max_tokens: int = 4) -> tuple[list[dict[str, Any]], int | None]:
    with connect(ws_url(gateway)) as ws:
        ws.send(json.dumps({"prompt": "close codes", "max_tokens": max_tokens}))
        events = receive_all(ws)
        return events, ws.close_code


@pytest.fixture(scope="module")
def ws_gateway(fake_upstream_server: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = launch_gateway(
        {
            "UPSTREAM_URL": fake_upstream_server.url,
            "UPSTREAM_RETRIES": 0,
            "CIRCUIT_FAILURE_THRESHOLD": 1000,
            "MAX_CONNECTIONS_PER_CLIENT": 1,
        },
        tmp_path_factory.mktemp("gateway") / "gateway.log",
    )
    yield gateway
    gateway.stop()


def test_upstream_failure_before_the_first_token_closes_1011(ws_gateway: Gateway, fake_upstream: FakeUpstream) -> None:
    fake_upstream.script({"status": 500})
    events, code = ws_stream(ws_gateway)
    assert code == 1011
    assert [e["type"] for e in events] == ["error"] and events[0]["code"] == "upstream_error", events


def test_upstream_failure_mid_stream_closes_1011(ws_gateway: Gateway, fake_upstream: FakeUpstream) -> None:
    fake_upstream.script({"error_after": 2})
    events, code = ws_stream(ws_gateway, max_tokens=6)
    assert code == 1011
    assert [e["type"] for e in events] == ["status", "token", "token", "error"], events
    assert [e["content"] for e in events[1:3]] == default_tokens(2)
    assert events[-1]["code"] == "upstream_error"


def test_connection_limit_closes_1013_and_the_held_stream_goes_on(
    ws_gateway: Gateway, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.script({"stall_after": 1})
    with connect(ws_url(ws_gateway)) as held:
        held.send(json.dumps({"prompt": "hold", "max_tokens": 3}))
        assert json.loads(held.recv(timeout=RECV_GUARD_S))["type"] == "status"
        assert json.loads(held.recv(timeout=RECV_GUARD_S))["type"] == "token"  # the slot is surely taken
        events, code = ws_stream(ws_gateway)
        assert code == 1013
        assert [(e["type"], e["code"]) for e in events] == [("error", "client_connection_limit")]
    assert fake_upstream.wait_for(lambda s: s["disconnects"] == 1)["requests"] == 1  # the refusal never went upstream


def test_rate_limit_on_ws_is_shared_by_both_workers_and_with_stream(start_gateway: GatewayFactory) -> None:
    # Burst 2, one token back per minute: the third request within the test is refused.
    gateway = start_gateway(
        RATE_LIMIT_PER_MINUTE=1, RATE_LIMIT_BURST=2, MOCK_FIRST_TOKEN_MS=5, MOCK_TOKENS_PER_SECOND=0
    )
    first, second = worker_pids(gateway)
    with only_worker(gateway, first):
        events, code = ws_stream(gateway)
        assert code == 1000 and events[-1] == {"type": "done", "tokens": 4}
    with only_worker(gateway, second):
        events, code = ws_stream(gateway)
        assert code == 1000 and events[-1] == {"type": "done", "tokens": 4}
        events, code = ws_stream(gateway)
        assert code == 1013
        assert [(e["type"], e["code"]) for e in events] == [("error", "rate_limited")]
    with only_worker(gateway, first):
        events, code = ws_stream(gateway)
        assert code == 1013 and events[0]["code"] == "rate_limited"
        refused = httpx.post(gateway.url + "/stream", json={"prompt": "x", "max_tokens": 1}, timeout=30)
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1


def test_circuit_open_closes_1013_without_the_upstream(
    start_gateway: GatewayFactory, fake_upstream: FakeUpstream
) -> None:
    gateway = start_gateway(
        UPSTREAM_URL=fake_upstream.url, UPSTREAM_RETRIES=0, CIRCUIT_FAILURE_THRESHOLD=1, CIRCUIT_OPEN_SECONDS=600
    )
    fake_upstream.script({"status": 503})
    events, code = ws_stream(gateway)
    assert code == 1011 and events[0]["code"] == "upstream_error"
    events, code = ws_stream(gateway)
    assert code == 1013
    assert [(e["type"], e["code"]) for e in events] == [("error", "circuit_open")]
    assert fake_upstream.stats()["requests"] == 1
