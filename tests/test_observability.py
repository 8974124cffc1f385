"""Metrics are exact for the instance under 2 workers, dead workers stop counting, logs are one JSON line a stream."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import psutil

from tests.conftest import FakeUpstream, Gateway, GatewayFactory
from tests.slots import assert_slots_released, slots_in_use, wait_slots_in_use
from tests.test_admission import HeldStreams
from tests.test_stream_lifecycle import wait_active_streams
from tests.workers import only_worker, worker_pids


def _samples(text: str) -> dict[str, float]:
    """`name{labels}` -> value, for every sample line of an exposition."""
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\w+(?:\{[^}]*\})?) (\S+)$", text, re.M)}


def _scrape(gateway: Gateway) -> dict[str, float]:
    with httpx.Client(timeout=5, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        return _samples(client.get(gateway.metrics_url + "/metrics").text)


def test_instance_totals_are_exact_from_any_worker(start_gateway: GatewayFactory, fake_upstream: FakeUpstream) -> None:
    gateway = start_gateway(UPSTREAM_URL=fake_upstream.url, UPSTREAM_RETRIES=0, CIRCUIT_FAILURE_THRESHOLD=1000)
    first, second = worker_pids(gateway)
    chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "m"}], "max_tokens": 4, "stream": True}
    # The streams on one worker, the refusals and failures on the other: every total below adds both.
    with only_worker(gateway, first), httpx.Client(base_url=gateway.url, timeout=10) as client:
        for _ in range(5):
            assert client.post("/stream", json={"prompt": "ok", "max_tokens": 3}).status_code == 200
        for _ in range(3):
            assert client.post("/v1/chat/completions", json=chat).status_code == 200
    with only_worker(gateway, second), httpx.Client(base_url=gateway.url, timeout=10) as client:
        for _ in range(4):
            assert client.post("/stream", json={"prompt": ""}).status_code == 422
        for _ in range(2):
            assert client.post("/stream", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
        fake_upstream.script({"status": 500}, {"status": 500}, {"reset_after": 1})
        assert client.post("/stream", json={"prompt": "fail"}).status_code == 502
        assert client.post("/stream", json={"prompt": "fail"}).status_code == 502
        broken = client.post("/stream", json={"prompt": "reset", "max_tokens": 5})
        assert (
            '"code": "upstream_error", "message": "the upstream connection broke before the answer ended (request id '
        ) in broken.text  # the kind of failure, never the upstream's own words
    expected = {
        'streaming_connections_total{route="/stream",status="success"}': 5.0,
        'streaming_connections_total{route="/v1/chat/completions",status="success"}': 3.0,
        'streaming_connections_total{route="/stream",status="rejected"}': 6.0,
        'streaming_connections_total{route="/stream",status="error"}': 3.0,
        'streaming_rejections_total{reason="invalid_request",route="/stream"}': 4.0,
        'streaming_rejections_total{reason="unsupported_media_type",route="/stream"}': 2.0,
        'streaming_errors_total{error_type="upstream_error",route="/stream"}': 3.0,
        'streaming_tokens_total{model="gpt-4o-mini",route="/stream"}': 16.0,  # 5 x 3 + 1 before the reset
        'streaming_tokens_total{model="gpt-4o",route="/v1/chat/completions"}': 12.0,
        'streaming_stream_outcomes_total{outcome="done",route="/stream"}': 5.0,
        'streaming_stream_outcomes_total{outcome="error",route="/stream"}': 3.0,
        'streaming_ttft_seconds_count{model="gpt-4o-mini",route="/stream"}': 6.0,
        'streaming_active_connections{route="/stream"}': 0.0,
        "streaming_connection_slots_in_use": 0.0,
    }
    for pid in (first, second):  # each worker answers with the instance's totals
        with only_worker(gateway, pid):
            samples = _scrape(gateway)
        assert {name: samples.get(name) for name in expected} == expected, pid


def _worker_pids(gateway: Gateway) -> list[int]:
    return [child.pid for child in psutil.Process(gateway.pid).children()]


def test_a_killed_workers_streams_stop_counting(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(MOCK_TOKENS_PER_SECOND=5, MAX_CONNECTIONS=10, MAX_CONNECTIONS_PER_CLIENT=8)
    workers = _worker_pids(gateway)
    assert len(workers) == 2
    alive: dict[int, bool] = {}
    stop = threading.Event()

    def hold(i: int) -> None:
        with httpx.Client(timeout=30) as client:
            try:
                with client.stream("POST", gateway.url + "/stream", json={"prompt": f"w{i}", "max_tokens": 5000}) as r:
                    for _ in r.iter_lines():
                        alive[i] = True
                        if stop.is_set():
                            return
            except httpx.HTTPError:
                pass
            alive[i] = False

    threads = [threading.Thread(target=hold, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    assert wait_active_streams(gateway, 8) == 8
    held = {pid: _streams_held(pid, gateway) for pid in workers}
    assert sum(held.values()) == 8
    victim = max(held, key=lambda pid: held[pid])  # the worker holding streams (maybe all of them)
    survivors = 8 - held[victim]
    psutil.Process(victim).send_signal(signal.SIGKILL)
    # The victim's streams break; the master reaps it, drops its gauge and reclaims its slots.
    assert wait_active_streams(gateway, survivors) == survivors
    assert wait_for_clients(alive, survivors) == survivors
    assert wait_slots_in_use(gateway, survivors) == survivors
    assert f"reclaimed {held[victim]} connection slots of dead worker {victim}" in gateway.log()

    # Exactly its slots were reclaimed: beside the survivors, the client holds streams up to its cap again,
    # all at once, and one more is refused.
    async def replace() -> HeldStreams:
        replacements = HeldStreams(gateway)
        try:
            await replacements.open(8 - survivors + 1)
            for pid in worker_pids(gateway):  # each worker reads the instance's table, not its own share
                with only_worker(gateway, pid):
                    assert slots_in_use(gateway) == 8, pid
        finally:
            await replacements.close()
        return replacements

    replacements = asyncio.run(replace())
    assert len(replacements.admitted) == 8 - survivors
    assert [r.json()["code"] for r in replacements.refused] == ["client_connection_limit"]
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    assert wait_active_streams(gateway, 0) == 0
    assert victim not in _worker_pids(gateway)  # replaced by a fresh worker
    assert_slots_released(gateway)


def _streams_held(pid: int, gateway: Gateway) -> int:
    port = int(gateway.url.rsplit(":", 1)[1])
    return sum(
        1
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port
    )


def wait_for_clients(alive: dict[int, bool], expected: int) -> int:
    deadline = time.monotonic() + 20
    while sum(alive.values()) != expected and time.monotonic() < deadline:
        time.sleep(0.05)  # polling interval, not an assertion
    return sum(alive.values())


def _log_lines(gateway: Gateway) -> Iterator[dict[str, object]]:
    for line in gateway.log().splitlines():
        yield json.loads(line)  # every line is one JSON object


def test_one_json_log_line_per_stream(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(LOG_LEVEL="info", MOCK_TOKENS_PER_SECOND=0)
    ids = [f"req-{i}" for i in range(3)]
    for request_id in ids:
        r = httpx.post(
            gateway.url + "/stream",
            json={"prompt": "log me", "max_tokens": 40},
            headers={"x-request-id": request_id},
            timeout=10,
        )
        assert r.headers["x-request-id"] == request_id
    httpx.post(gateway.url + "/stream", json={"prompt": ""}, timeout=10)
    gateway.stop()
    lines = list(_log_lines(gateway))
    finished = [line for line in lines if line["message"] == "stream finished"]
    assert sorted(str(line["request_id"]) for line in finished) == ids  # one line per stream, none per token
    for line in finished:
        assert line["endpoint"] == "/stream"
        assert line["model"] == "gpt-4o-mini"
        assert line["client"] == "127.0.0.1"
        assert line["outcome"] == "done"
        assert line["tokens"] == 40
        assert isinstance(line["ttft_s"], float)
        assert isinstance(line["duration_s"], float)
        assert "trace_id" in line
        assert line["level"] == "info"
    assert any(line["message"] == "drain finished" for line in lines)
