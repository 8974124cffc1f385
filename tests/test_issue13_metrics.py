"""Issue 13, point 8: what a drain leaves behind, on the real gateway (gunicorn, two uvicorn workers).

- After a drain that cut streams, /metrics stays served for DRAIN_METRICS_LINGER_SECONDS, so a scrape sees
  `streaming_drain_cut_streams_total` before the pod is gone; a drain that cut nothing exits at once.
- Dead workers' multiprocess files are compacted: restarts do not grow the files every scrape reads, and no
  counter loses or doubles what the dead workers counted.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from pathlib import Path

import httpx
import psutil

from tests.conftest import Gateway, GatewayFactory

RESTART_TIMEOUT_S = 60.0  # guard only: gunicorn replaces a worker in about a second


def _metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of every sample of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if match and all(f'{k}="{v}"' in (match[1] or "") for k, v in labels.items()):
            total += float(match[2])
    return total


def _workers(gateway: Gateway) -> set[int]:
    return {child.pid for child in psutil.Process(gateway.pid).children()}


async def _stream_until_shutdown(client: httpx.AsyncClient) -> str:
    """A long /stream; returns its last data line (the drain cuts it with server_shutdown)."""
    last = ""
    async with client.stream("POST", "/stream", json={"prompt": "long", "max_tokens": 200}) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                last = line.removeprefix("data:").strip()
    return last


def test_metrics_stay_served_after_a_drain_that_cut_streams(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(
        MOCK_TOKENS_PER_SECOND=5,
        MOCK_FIRST_TOKEN_MS=10,
        DRAIN_TIMEOUT_SECONDS=0.5,
        DRAIN_CLOSE_GRACE_SECONDS=1,
        DRAIN_METRICS_LINGER_SECONDS=120,
    )

    async def cut_streams() -> list[str]:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as client:
            streams = [asyncio.create_task(_stream_until_shutdown(client)) for _ in range(4)]
            deadline = time.monotonic() + 30
            while True:  # every stream is relaying before the SIGTERM
                metrics = (await client.get(gateway.metrics_url + "/metrics")).text
                if _metric_sum(metrics, "streaming_active_connections") >= 4:
                    break
                assert time.monotonic() < deadline, "the streams never started"
                await asyncio.sleep(0.05)  # polling interval, not an assertion
            gateway.proc.send_signal(signal.SIGTERM)
            return list(await asyncio.gather(*streams))

    endings = asyncio.run(cut_streams())
    assert all(json.loads(last) == {"type": "server_shutdown"} for last in endings), endings
    # The cut is over; the pod would be gone by now without the linger. Several scrapes in a row find it.
    seen = []
    for _ in range(5):
        with httpx.Client(base_url=gateway.metrics_url, timeout=30) as client:
            response = client.get("/metrics")
            assert response.status_code == 200
            seen.append(_metric_sum(response.text, "streaming_drain_cut_streams_total"))
        time.sleep(0.2)  # spacing between scrapes, not an assertion
    assert seen == [4.0] * 5, seen
    assert gateway.proc.poll() is None  # still lingering
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        refused = client.post("/stream", json={"prompt": "late", "max_tokens": 1})
    assert refused.status_code == 503 and refused.json()["code"] == "draining"
    for worker in psutil.Process(gateway.pid).children():  # a worker that cut nothing is gone already
        worker.send_signal(signal.SIGTERM)  # a second SIGTERM ends the linger (gunicorn's stop waits for workers)
    assert gateway.proc.wait(timeout=60) == 0


def test_a_drain_that_cut_nothing_does_not_linger(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(DRAIN_METRICS_LINGER_SECONDS=600)
    assert httpx.get(gateway.url + "/health").status_code == 200
    gateway.proc.send_signal(signal.SIGTERM)
    assert gateway.proc.wait(timeout=120) == 0  # guard far below the linger: it never started


def _healthy(gateway: Gateway) -> bool:
    try:
        return httpx.get(gateway.url + "/health", timeout=30).is_success
    except httpx.TransportError:  # a connection the last old worker took as it exited
        return False


def _restart_workers(gateway: Gateway) -> None:
    """SIGTERM every worker (what gunicorn's max_requests or a crash does to one) and wait for replacements."""
    old = _workers(gateway)
    for pid in old:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + RESTART_TIMEOUT_S
    while True:
        current = _workers(gateway)
        if len(current) == len(old) and not current & old and _healthy(gateway):
            break
        assert time.monotonic() < deadline, f"gunicorn did not replace the workers: {current}"
        time.sleep(0.1)  # polling interval, not an assertion
    # every new worker has written its files (series are precreated at startup): wait for all of them
    while not all(list(Path(gateway.env["PROMETHEUS_MULTIPROC_DIR"]).glob(f"counter_{pid}.db")) for pid in current):
        assert time.monotonic() < deadline, "the new workers wrote no metrics files"
        time.sleep(0.1)  # polling interval, not an assertion


def _totals(gateway: Gateway) -> dict[str, float]:
    text = httpx.get(gateway.metrics_url + "/metrics", timeout=30).text
    return {
        "done": _metric_sum(text, "streaming_connections_total", status="success"),
        "tokens": _metric_sum(text, "streaming_tokens_total"),
        "ttft": _metric_sum(text, "streaming_ttft_seconds_count"),
        "ttft_fast": _metric_sum(text, "streaming_ttft_seconds_bucket", le="10.0"),
        "limit": _metric_sum(text, "streaming_max_connections"),
        "active": _metric_sum(text, "streaming_active_connections"),
    }


def test_restarts_do_not_grow_the_metrics_files(start_gateway: GatewayFactory, tmp_path: Path) -> None:
    directory = tmp_path / "multiproc"
    gateway = start_gateway(
        PROMETHEUS_MULTIPROC_DIR=directory, MOCK_TOKENS_PER_SECOND=0, MOCK_FIRST_TOKEN_MS=1, MAX_CONNECTIONS=77
    )
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        for _ in range(6):
            response = client.post("/stream", json={"prompt": "count me", "max_tokens": 5})
            assert '"type": "done"' in response.text
    before = _totals(gateway)
    assert before["done"] == 6 and before["tokens"] == 30 and before["ttft"] == 6 and before["limit"] == 77

    counts = []
    for _ in range(4):
        _restart_workers(gateway)
        counts.append(len(list(directory.glob("*.db"))))
        assert _totals(gateway) == before  # nothing lost, nothing counted twice
    assert counts[-1] == counts[0], f"files per restart: {counts}"
    dead = {int(m[1]) for p in directory.glob("*.db") if (m := re.search(r"_(\d+)\.db$", p.name))}
    assert dead <= _workers(gateway) | {gateway.pid}, "files of dead workers remain"
    assert list(directory.glob("counter_archive.db")) and list(directory.glob("histogram_archive.db"))
