"""Handover on drain, against real gateways (gunicorn, 2 workers each) sharing a real redis-server.

A draining instance hands every stream still running at its drain deadline to the fleet: its
clients get `server_shutdown` with a `resume` id, reconnect to another instance and finish with
the whole text, no token lost or repeated. A claimer killed with SIGKILL stops renewing its lease;
after the lease a new instance finishes the stream. Instances differ only in their mock's pace:
the mock's text depends on (prompt, token index), never on who generates it.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import httpx
import psutil
import pytest
import redis

from loadtest.harness.redis import RedisServer, started_redis
from tests.conftest import PATIENT_REDIS, FakeUpstream, Gateway, GatewayFactory
from tests.test_resume import (
    GUARD_S,
    Event,
    SSEParser,
    assert_continues,
    metric_total,
    resume,
    sse_events,
    tokens_of,
    wait_for,
)

STREAMS = 6
TOKENS = 120  # at 20 tok/s the streams outlive a 1 s drain by far


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    yield from started_redis(tmp_path)


def fleet_env(redis_server: RedisServer, **extra: object) -> dict[str, object]:
    return {
        "RESUME_STORE": "redis",
        "REDIS_URL": redis_server.url,
        **PATIENT_REDIS,
        "ORPHAN_TIMEOUT_SECONDS": 30,
        "DRAIN_TIMEOUT_SECONDS": 1,
        "MOCK_FIRST_TOKEN_MS": 5,
        **extra,
    }


async def until_shutdown(
    client: httpx.AsyncClient, gateway: Gateway, prompt: str, started: asyncio.Queue[None], max_tokens: int = TOKENS
) -> tuple[str, list[Event], Event]:
    """One /stream on a draining instance: its events, and the server_shutdown that ended them."""
    events: list[Event] = []
    parser = SSEParser()
    async with client.stream("POST", gateway.url + "/stream", json={"prompt": prompt, "max_tokens": max_tokens}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            event = parser.feed(line)
            if event is None:
                continue
            events.append(event)
            if len(tokens_of(events)) == 3:
                started.put_nowait(None)
    *before, shutdown = events
    return r.headers["x-stream-id"], before, shutdown


def drain_with_streams(
    gateway: Gateway, prompts: list[str], max_tokens: int = TOKENS
) -> list[tuple[str, list[Event], Event]]:
    """Open the streams, SIGTERM the instance once each has tokens, collect how each one ended."""

    async def scenario() -> list[tuple[str, list[Event], Event]]:
        started: asyncio.Queue[None] = asyncio.Queue()
        async with httpx.AsyncClient(timeout=GUARD_S) as client:
            tasks = [asyncio.create_task(until_shutdown(client, gateway, p, started, max_tokens)) for p in prompts]
            for _ in prompts:
                await started.get()
            gateway.proc.send_signal(signal.SIGTERM)
            return list(await asyncio.gather(*tasks))

    return asyncio.run(scenario())


def assert_handed_over(before: list[Event], shutdown: Event, max_tokens: int = TOKENS) -> None:
    assert shutdown.id is None  # belongs to the connection, not the stream: EventSource keeps the last id
    assert shutdown.data == {"type": "server_shutdown", "resume": before[-1].id}
    assert 3 <= len(tokens_of(before)) < max_tokens


def test_drained_streams_finish_on_another_instance(start_gateway: GatewayFactory, redis_server: RedisServer) -> None:
    a = start_gateway(**fleet_env(redis_server, MOCK_TOKENS_PER_SECOND=20))
    b = start_gateway(**fleet_env(redis_server, MOCK_TOKENS_PER_SECOND=200))
    prompts = [f"handover {i}" for i in range(STREAMS)]
    ended = drain_with_streams(a, prompts)
    assert a.proc.wait(timeout=GUARD_S) == 0
    records = redis.Redis.from_url(redis_server.url, decode_responses=True)
    consumers = {c["name"] for c in records.xinfo_consumers("gw:handover", "gw:claimers")}
    records.close()
    b_workers = {p.pid for p in psutil.Process(b.pid).children(recursive=True)}
    assert {int(name.rsplit(":", 1)[1]) for name in consumers} <= b_workers  # A's workers left the group
    with httpx.Client(timeout=GUARD_S) as client:
        for prompt, (stream_id, before, shutdown) in zip(prompts, ended, strict=True):
            assert_handed_over(before, shutdown)
            after = resume(client, b.url, stream_id, shutdown.data["resume"])
            assert_continues(before, after, prompt, TOKENS)  # zero truncated, zero duplicated
    wait_for(
        lambda: metric_total(b, "streaming_handovers_total", 'result="completed"') == STREAMS,
        "B acknowledged every stream",
    )
    assert metric_total(b, "streaming_handovers_total", 'result="claimed"') == STREAMS
    assert metric_total(b, "streaming_handovers_total", 'result="failed"') == 0


def kill_instance(gateway: Gateway) -> None:
    """SIGKILL the gunicorn master first (so it respawns nothing), then its workers."""
    master = psutil.Process(gateway.pid)
    workers = master.children(recursive=True)
    master.kill()
    for worker in workers:
        worker.kill()
    psutil.wait_procs([master, *workers], timeout=GUARD_S)
    gateway.proc.wait()


def test_killed_claimer_is_replaced_after_its_lease(start_gateway: GatewayFactory, redis_server: RedisServer) -> None:
    lease = {"HANDOVER_LEASE_SECONDS": 2}
    prompt, max_tokens = "claimer crash", 400
    a = start_gateway(**fleet_env(redis_server, MOCK_TOKENS_PER_SECOND=20, **lease))
    b = start_gateway(**fleet_env(redis_server, MOCK_TOKENS_PER_SECOND=20, **lease))
    [(stream_id, before, shutdown)] = drain_with_streams(a, [prompt], max_tokens)
    assert_handed_over(before, shutdown, max_tokens)
    records = redis.Redis.from_url(redis_server.url, decode_responses=True)
    record = f"gw:ho:{stream_id}"
    claimer = wait_for(lambda: records.hget(record, "claimer"), "B claimed the stream")
    claimer_pid = int(str(claimer).rsplit(":", 1)[1])
    assert claimer_pid in {p.pid for p in psutil.Process(b.pid).children(recursive=True)}

    # The client follows the stream on B until B has generated some of it, then B dies mid-stream.
    events = list(before)
    parser = SSEParser()
    with httpx.Client(timeout=GUARD_S) as client:
        last_id = before[-1].id
        assert last_id is not None
        with client.stream("GET", f"{b.url}/stream/{stream_id}", headers={"Last-Event-ID": last_id}) as r:
            assert r.status_code == 200
            try:
                for line in r.iter_lines():
                    event = parser.feed(line)
                    if event is None:
                        continue
                    events.append(event)
                    if len(tokens_of(events)) == len(tokens_of(before)) + 5:
                        kill_instance(b)
            except httpx.TransportError:
                pass  # the instance is gone: the connection breaks without a final event
        assert events[-1].data["type"] == "token"

        c = start_gateway(**fleet_env(redis_server, MOCK_TOKENS_PER_SECOND=0, **lease))
        after = resume(client, c.url, stream_id, events[-1].id)
    assert_continues(events, after, prompt, max_tokens)
    wait_for(lambda: records.exists(record) == 0, "C acknowledged the stream")
    assert metric_total(c, "streaming_handovers_total", 'result="completed"') == 1
    records.close()


def test_without_continuation_the_log_ends_not_resumable(
    start_gateway: GatewayFactory, redis_server: RedisServer, fake_upstream: FakeUpstream
) -> None:
    """An OpenAI upstream that cannot continue (UPSTREAM_CONTINUATION=none): the drain cuts as before."""
    gateway = start_gateway(**fleet_env(redis_server, UPSTREAM_URL=fake_upstream.url))
    [(stream_id, before, shutdown)] = drain_with_streams(gateway, ["no continuation"], max_tokens=5000)
    assert shutdown.data == {"type": "server_shutdown"}
    assert gateway.proc.wait(timeout=GUARD_S) == 0
    records = redis.Redis.from_url(redis_server.url)
    # redis-py types every reply as the union of sync/async and raw/decoded; a sync raw client returns bytes
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], records.xrange(f"gw:rs:{stream_id}"))
    stored = b"".join(fields[b"d"] for _, fields in entries)
    records.close()
    *events, final = sse_events(stored.decode().splitlines())
    assert [e.id for e in events[: len(before)]] == [e.id for e in before]
    assert final.seq == events[-1].seq + 1
    assert final.data["type"] == "error" and final.data["code"] == "not_resumable"
    assert "shut down" in final.data["message"]


def test_vllm_continuation_sends_continue_final_message(
    start_gateway: GatewayFactory, redis_server: RedisServer, fake_upstream: FakeUpstream
) -> None:
    """UPSTREAM_CONTINUATION=vllm: the claimer asks the upstream to extend the partial assistant message."""
    env = fleet_env(redis_server, UPSTREAM_URL=fake_upstream.url, UPSTREAM_CONTINUATION="vllm")
    a, b = start_gateway(**env), start_gateway(**env)
    rest = ["and ", "that ", "is ", "all."]
    fake_upstream.script({}, {"tokens": rest})  # A's request runs at the fake's pace; the continuation is short
    prompt, max_tokens = "continue me", 5000
    [(stream_id, before, shutdown)] = drain_with_streams(a, [prompt], max_tokens=max_tokens)
    assert_handed_over(before, shutdown, max_tokens)
    with httpx.Client(timeout=GUARD_S) as client:
        after = resume(client, b.url, stream_id, shutdown.data["resume"])
    sent = tokens_of(before)
    assert tokens_of(after) == rest
    assert after[-1].data == {"type": "done", "tokens": len(sent) + len(rest)}
    assert [e.seq for e in before + after] == list(range(len(before) + len(after)))
    first, continuation = fake_upstream.stats()["bodies"]
    assert first["messages"] == [{"role": "user", "content": prompt}] and "continue_final_message" not in first
    assert continuation["messages"] == [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": "".join(sent)},
    ]
    assert continuation["continue_final_message"] is True and continuation["add_generation_prompt"] is False
    assert continuation["max_tokens"] == max_tokens - len(sent)
