"""`WebSocket /ws`: the `/stream` events as text frames, then a normal close; refusals close with a code."""

from __future__ import annotations

import json

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.conftest import Gateway
from tests.slots import assert_slots_released


def _ws_url(gateway: Gateway) -> str:
    return gateway.url.replace("http://", "ws://") + "/ws"


def _receive_all(ws: ClientConnection) -> list[dict[str, object]]:
    events = []
    try:
        while True:
            events.append(json.loads(ws.recv(timeout=10)))
    except ConnectionClosed:
        return events


def test_ws_streams_seed_events_then_closes_normally(mock_gateway: Gateway) -> None:
    with connect(_ws_url(mock_gateway)) as ws:
        ws.send(json.dumps({"prompt": "hello websocket", "max_tokens": 6}))
        events = _receive_all(ws)
        assert ws.close_code == 1000
    status = dict(events[0])
    assert isinstance(status.pop("stream_id"), str)  # for resuming; otherwise the seed's status event
    assert status == {"type": "status", "message": "Generating..."}
    assert [e["type"] for e in events[1:-1]] == ["token"] * 6
    assert events[-1] == {"type": "done", "tokens": 6}


def test_ws_text_matches_sse_text(mock_gateway: Gateway) -> None:
    request = {"prompt": "same prompt, two protocols", "max_tokens": 40}
    with connect(_ws_url(mock_gateway)) as ws:
        ws.send(json.dumps(request))
        ws_text = "".join(str(e["content"]) for e in _receive_all(ws) if e["type"] == "token")
    body = httpx.post(mock_gateway.url + "/stream", json=request, timeout=10).text
    sse_text = "".join(
        json.loads(line[6:])["content"] for line in body.splitlines() if line.startswith('data: {"type": "token"')
    )
    assert ws_text == sse_text
    assert len(ws_text.split(" ")) == 41  # 40 words, each followed by a space


@pytest.mark.parametrize(
    ("message", "code", "needle"),
    [
        ("not json", 1007, "not valid JSON"),
        (json.dumps({"max_tokens": 3}), 1007, "prompt: Field required"),
        (json.dumps({"prompt": "x", "max_tokens": 10**9}), 1007, "above this gateway's limit"),
    ],
    ids=["malformed", "missing-prompt", "absurd-max-tokens"],
)
def test_ws_bad_request_gets_error_event_and_close_code(
    mock_gateway: Gateway, message: str, code: int, needle: str
) -> None:
    with connect(_ws_url(mock_gateway), max_size=None) as ws:
        ws.send(message)
        events = _receive_all(ws)
        assert ws.close_code == code
    assert len(events) == 1
    assert events[0]["type"] == "error"
    assert needle in str(events[0]["message"])


@pytest.mark.parametrize(
    "request_",
    [
        {"prompt": "stop", "max_tokens": 3},
        {"prompt": "resume", "max_tokens": 3},
        {"prompt": 'say "stop", then "resume"', "max_tokens": 3},
    ],
    ids=["stop", "resume", "both-quoted"],
)
def test_ws_a_prompt_that_says_stop_or_resume_is_a_stream(mock_gateway: Gateway, request_: dict[str, object]) -> None:
    """The message type is its keys, not words in its text."""
    with connect(_ws_url(mock_gateway)) as ws:
        ws.send(json.dumps(request_))
        events = _receive_all(ws)
        assert ws.close_code == 1000
    assert [e["type"] for e in events] == ["status", "token", "token", "token", "done"]


def test_ws_a_model_named_resume_is_checked_as_a_model(mock_gateway: Gateway) -> None:
    with connect(_ws_url(mock_gateway)) as ws:
        ws.send(json.dumps({"prompt": "x", "model": "resume", "max_tokens": 3}))
        events = _receive_all(ws)
        assert ws.close_code == 1007
    assert [(e["type"], e["code"]) for e in events] == [("error", "model_not_found")]


def test_ws_message_over_max_body_bytes_is_closed_1009(mock_gateway: Gateway) -> None:
    """The server's frame limit is MAX_BODY_BYTES: it closes from the frame header, before any event."""
    with connect(_ws_url(mock_gateway), max_size=None) as ws:
        ws.send(json.dumps({"prompt": "x" * 1_100_000}))
        events = _receive_all(ws)
        assert ws.close_code == 1009
    assert events == []


def test_ws_client_leaving_mid_stream_releases_the_stream(mock_gateway: Gateway) -> None:
    with connect(_ws_url(mock_gateway)) as ws:
        ws.send(json.dumps({"prompt": "long", "max_tokens": 5000}))
        for _ in range(5):
            ws.recv(timeout=10)
    # The gateway's registry empties once it notices the close, and the slot is back.
    from tests.test_stream_lifecycle import wait_active_streams

    assert wait_active_streams(mock_gateway, 0) == 0
    assert_slots_released(mock_gateway)
