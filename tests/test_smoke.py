from __future__ import annotations

import json

import httpx

from tests.conftest import Gateway, sse_data


def test_stream_seed_sequence(mock_gateway: Gateway) -> None:
    r = httpx.post(mock_gateway.url + "/stream", json={"prompt": "hello", "max_tokens": 7}, timeout=10)
    events = [json.loads(d) for d in sse_data(r.text)]
    assert events[0] == {"type": "status", "message": "Generating..."}
    assert [e["type"] for e in events[1:-1]] == ["token"] * 7
    assert events[-1] == {"type": "done", "tokens": 7}
