"""Graceful drain from SIGTERM to the gunicorn master (what Kubernetes sends), with two workers.

No stream ever ends silently: each ends with `done`, or, past the drain timeout, with
`server_shutdown` (/stream), an OpenAI error chunk then `[DONE]` (/v1), or close 1012 (/ws).
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
from typing import Any

import httpx
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import Gateway, GatewayFactory, sse_data
from tests.slots import assert_slots_released
from tests.workers import connection_to_each_worker, wait_all_draining

TOKENS = 200  # at 20 tok/s: 10 s streams


async def _sse_stream(client: httpx.AsyncClient, i: int, relaying: list[int] | None = None) -> list[str]:
    """The stream's data lines; appends `i` to `relaying` once its first token arrived."""
    lines: list[str] = []
    async with client.stream("POST", "/stream", json={"prompt": f"drain {i}", "max_tokens": TOKENS}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                lines.append(line)
                if relaying is not None and len(lines) == 2:  # the status event, then the first token
                    relaying.append(i)
    return sse_data("\n".join(lines))


async def _chat_stream(client: httpx.AsyncClient, i: int) -> list[str]:
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": f"drain {i}"}],
        "max_tokens": TOKENS,
        "stream": True,
    }
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        await r.aread()
        return sse_data(r.text)


async def _ws_stream(gateway: Gateway, i: int) -> tuple[list[dict[str, Any]], int | None]:
    events: list[dict[str, Any]] = []
    async with ws_connect(gateway.url.replace("http://", "ws://") + "/ws") as ws:
        await ws.send(json.dumps({"prompt": f"drain {i}", "max_tokens": TOKENS}))
        try:
            async for message in ws:
                events.append(json.loads(message))
        except ConnectionClosed:
            pass
        return events, ws.close_code


async def _wait_streams_open(client: httpx.AsyncClient, gateway: Gateway, count: int) -> None:
    while True:  # guarded by the test timeout
        streams = sum(float(v) for v in _active_lines((await client.get(gateway.metrics_url + "/metrics")).text))
        if streams >= count:
            return
        await asyncio.sleep(0.05)


def _active_lines(text: str) -> list[str]:
    return [line.rsplit(" ", 1)[1] for line in text.splitlines() if line.startswith("streaming_active_connections{")]


async def _probe_during_drain(gateway: Gateway) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=5) as fresh:
        refused = await fresh.post("/stream", json={"prompt": "late", "max_tokens": 3})
        ready = await fresh.get("/ready")
        health = await fresh.get("/health")
    return {"refused": refused, "ready": ready.status_code, "health": health.status_code}


def test_drain_lets_every_stream_finish(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(MOCK_TOKENS_PER_SECOND=20, MOCK_FIRST_TOKEN_MS=10, DRAIN_TIMEOUT_SECONDS=30)

    async def scenario(probes: dict[int, socket.socket]) -> tuple[list[list[str]], dict[str, Any]]:
        limits = httpx.Limits(max_connections=50)
        relaying: list[int] = []
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60, limits=limits) as client:
            streams = [asyncio.create_task(_sse_stream(client, i, relaying)) for i in range(20)]
            while len(relaying) < 20:  # the scenario: SIGTERM once every stream is under way (guard: the timeout)
                await asyncio.sleep(0.05)  # polling interval, not an assertion
            gateway.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(wait_all_draining, probes)  # the master forwarded it to every worker
            probe = await _probe_during_drain(gateway)
            return list(await asyncio.gather(*streams)), probe

    with connection_to_each_worker(gateway) as probes:  # an idle connection to each worker, to ask it /ready
        results, probe = asyncio.run(scenario(probes))
    for data in results:
        assert json.loads(data[-1]) == {"type": "done", "tokens": TOKENS}
        assert sum('"type": "token"' in d for d in data) == TOKENS
    assert probe["refused"].status_code == 503
    assert probe["refused"].headers["retry-after"] == "1"
    assert probe["refused"].headers["connection"] == "close"
    assert probe["refused"].json()["code"] == "draining"
    assert probe["ready"] == 503
    assert probe["health"] == 200
    assert gateway.proc.wait(timeout=30) == 0  # the master exits after the last stream
    assert_slots_released(gateway)


def test_drain_deadline_ends_streams_with_server_shutdown(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(MOCK_TOKENS_PER_SECOND=20, MOCK_FIRST_TOKEN_MS=10, DRAIN_TIMEOUT_SECONDS=3)

    async def scenario() -> tuple[list[Any], list[Any], list[Any]]:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as client:
            sse = [asyncio.create_task(_sse_stream(client, i)) for i in range(4)]
            chat = [asyncio.create_task(_chat_stream(client, i)) for i in range(4)]
            ws = [asyncio.create_task(_ws_stream(gateway, i)) for i in range(4)]
            await _wait_streams_open(client, gateway, 12)
            gateway.proc.send_signal(signal.SIGTERM)
            return list(await asyncio.gather(*sse)), list(await asyncio.gather(*chat)), list(await asyncio.gather(*ws))

    sse, chat, ws = asyncio.run(scenario())
    for data in sse:
        assert json.loads(data[-1]) == {"type": "server_shutdown"}
        assert 0 < sum('"type": "token"' in d for d in data) < TOKENS
    for data in chat:
        assert data[-1] == "[DONE]"
        error = json.loads(data[-2])["error"]
        assert error["code"] == "server_shutdown"
        assert "shutting down" in error["message"]
    for events, close_code in ws:
        assert events[-1] == {"type": "server_shutdown"}
        assert close_code == 1012
    assert gateway.proc.wait(timeout=30) == 0
    assert_slots_released(gateway)  # the streams cut at the deadline gave their slots back before exit
