"""WebSocket resumption: a client that lost its socket sends a resume message and gets the rest."""

from __future__ import annotations

import json

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from app.upstream.mock import mock_tokens
from tests.conftest import Gateway, GatewayFactory

PROMPT = "resume over websocket"
TOKENS = 60
UNKNOWN = "0" * 32  # a well-formed id of no stream


def _ws(gateway: Gateway) -> ClientConnection:
    return ws_connect(gateway.url.replace("http://", "ws://") + "/ws")


def _rest(ws: ClientConnection) -> list[dict[str, object]]:
    events = []
    try:
        while True:
            events.append(json.loads(ws.recv(timeout=15)))
    except ConnectionClosed:
        return events


def test_ws_client_resumes_where_it_left_off(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(MOCK_TOKENS_PER_SECOND=40, ORPHAN_TIMEOUT_SECONDS=30)
    with _ws(gateway) as ws:
        ws.send(json.dumps({"prompt": PROMPT, "max_tokens": TOKENS}))
        first = [json.loads(ws.recv(timeout=10)) for _ in range(11)]  # status + 10 tokens, then the line drops
    stream_id = first[0]["stream_id"]
    assert first[0]["type"] == "status"
    with _ws(gateway) as ws:
        ws.send(json.dumps({"resume": stream_id, "received": len(first)}))
        rest = _rest(ws)
        assert ws.close_code == 1000
    events = first + rest
    assert events[-1] == {"type": "done", "tokens": TOKENS}
    text = "".join(str(e["content"]) for e in events if e["type"] == "token")
    assert text == "".join(mock_tokens(PROMPT, 0, TOKENS))  # no gap, no duplicate


def test_ws_resume_of_an_unknown_stream(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway()
    with _ws(gateway) as ws:
        ws.send(json.dumps({"resume": UNKNOWN, "received": 3}))
        events = _rest(ws)
        assert ws.close_code == 1008
    assert events == [
        {
            "type": "error",
            "code": "not_resumable",
            "message": f"stream {UNKNOWN} cannot be resumed: unknown, expired, or past its replay window",
        }
    ]
