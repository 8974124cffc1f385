"""What a stream takes it gives back, on every exit path, and the operational endpoints around it."""

from __future__ import annotations

import re
import time

import httpx

from tests.conftest import Gateway, GatewayFactory, sse_data
from tests.slots import assert_slots_released
from tests.workers import only_worker, worker_pids


def active_streams(gateway: Gateway) -> float:
    text = httpx.get(gateway.metrics_url + "/metrics", timeout=5).text
    return sum(float(v) for v in re.findall(r"^streaming_active_connections\{[^}]*\} (\S+)$", text, re.M))


def wait_active_streams(gateway: Gateway, expected: float, timeout: float = 10.0) -> float:
    deadline = time.monotonic() + timeout
    value = active_streams(gateway)
    while value != expected and time.monotonic() < deadline:
        time.sleep(0.05)  # polling interval, not an assertion
        value = active_streams(gateway)
    return value


def test_health_ready_metrics(mock_gateway: Gateway) -> None:
    assert httpx.get(mock_gateway.url + "/health", timeout=5).json() == {"status": "ok"}
    ready = httpx.get(mock_gateway.url + "/ready", timeout=5)
    assert ready.status_code == 200
    metrics = httpx.get(mock_gateway.metrics_url + "/metrics", timeout=5)
    assert metrics.headers["content-type"].startswith("text/plain")


def test_stream_headers(mock_gateway: Gateway) -> None:
    with httpx.stream("POST", mock_gateway.url + "/stream", json={"prompt": "h", "max_tokens": 1}, timeout=5) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        assert r.headers["x-accel-buffering"] == "no"
        assert r.headers["x-stream-id"]
        r.read()


def test_mock_is_deterministic_and_exact(mock_gateway: Gateway) -> None:
    texts = set()
    for pid in worker_pids(mock_gateway):  # the same answer from each worker's mock
        with only_worker(mock_gateway, pid):
            for _ in range(2):
                body = httpx.post(
                    mock_gateway.url + "/stream", json={"prompt": "determinism", "max_tokens": 50}, timeout=10
                )
                tokens = [d for d in sse_data(body.text) if '"type": "token"' in d]
                assert len(tokens) == 50
                texts.add("".join(tokens))
    assert len(texts) == 1


def test_client_disconnect_releases_the_stream(mock_gateway: Gateway) -> None:
    with httpx.Client(timeout=10) as client:
        for _ in range(3):
            with client.stream("POST", mock_gateway.url + "/stream", json={"prompt": "x", "max_tokens": 10000}) as r:
                lines = r.iter_lines()
                seen = 0
                for line in lines:
                    seen += line.startswith("data: ")
                    if seen >= 3:
                        break
                assert active_streams(mock_gateway) >= 1
    assert wait_active_streams(mock_gateway, 0) == 0
    assert_slots_released(mock_gateway)


def test_finished_streams_are_counted(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(MOCK_TOKENS_PER_SECOND=0, MOCK_FIRST_TOKEN_MS=0)
    for _ in range(6):
        httpx.post(gateway.url + "/stream", json={"prompt": "count me", "max_tokens": 5}, timeout=10)
    text = httpx.get(gateway.metrics_url + "/metrics", timeout=5).text
    assert 'streaming_connections_total{route="/stream",status="success"} 6.0' in text
    assert 'streaming_tokens_total{model="gpt-4o-mini",route="/stream"} 30.0' in text
    assert 'streaming_ttft_seconds_count{model="gpt-4o-mini",route="/stream"} 6.0' in text
