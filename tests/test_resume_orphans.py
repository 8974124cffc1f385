"""An orphaned generation lives on while a resumed client reads it, wherever that client landed."""

from __future__ import annotations

import json
import re

import httpx

from app.upstream.mock import mock_tokens
from loadtest.harness.wait import eventually
from tests.conftest import GatewayFactory, sse_data

PROMPT = "a long answer read after a reconnect"
TOKENS = 60  # 6 s at 10 tok/s: three orphan timeouts long


def test_a_resumed_reader_keeps_the_generation_alive(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(MOCK_TOKENS_PER_SECOND=10, MOCK_FIRST_TOKEN_MS=0, ORPHAN_TIMEOUT_SECONDS=2)
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        with client.stream("POST", "/stream", json={"prompt": PROMPT, "max_tokens": TOKENS}) as response:
            stream_id = response.headers["x-stream-id"]
            lines = response.iter_lines()
            last_id = next(line for line in lines if line.startswith("id: ") and line.endswith("-3"))[4:]
        # the connection is gone; the client comes back at once and reads the rest
        body = client.get(f"/stream/{stream_id}", headers={"Last-Event-ID": last_id}).text
    events = [json.loads(data) for data in sse_data(body)]
    assert events[-1] == {"type": "done", "tokens": TOKENS}  # not orphan_timeout, 2 s after the leave
    text = "".join(str(e["content"]) for e in events if e["type"] == "token")
    assert text == "".join(mock_tokens(PROMPT, 3, TOKENS))  # tokens 3.. (event 3 was token 2)


def test_an_orphan_nobody_reads_is_stopped(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(MOCK_TOKENS_PER_SECOND=10, MOCK_FIRST_TOKEN_MS=0, ORPHAN_TIMEOUT_SECONDS=1)
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        with client.stream("POST", "/stream", json={"prompt": PROMPT, "max_tokens": TOKENS}) as response:
            stream_id = response.headers["x-stream-id"]
            next(line for line in response.iter_lines() if line.endswith("-2"))
        # nobody comes back in time: the generation is stopped (seen in the metrics), and a late
        # resumer finds the log ended with the reason
        wait_for_orphan_timeout(gateway.metrics_url)
        body = client.get(f"/stream/{stream_id}", headers={"Last-Event-ID": f"{stream_id}-2"}).text
    final = json.loads(sse_data(body)[-1])
    assert final["code"] == "orphan_timeout"


def wait_for_orphan_timeout(url: str) -> None:
    """Give the orphan reaper up to 30 s to count one; if it does not, the caller's assertion on the replay fails."""
    pattern = r'^streaming_errors_total\{error_type="orphan_timeout",route="/stream"\} ([1-9]\S*)$'
    eventually(lambda: re.search(pattern, httpx.get(url + "/metrics").text, re.M), 30, interval=0.1)
