"""What bounds resumption, against the real gateway (gunicorn, the local store): `?after=` as the
Last-Event-ID of clients that cannot set headers, RESUME_MAX_EVENTS (a longer stream stops being
resumable; its live client is unaffected), RESUME_TTL_SECONDS (a finished stream is replayable, then
gone) and MAX_ORPHANED_STREAMS (beyond it, a client leaving stops its generation)."""

from __future__ import annotations

import json

import httpx

from tests.conftest import Gateway, GatewayFactory, sse_data
from tests.test_resume import (
    GUARD_S,
    RESUMABLE,
    Event,
    assert_continues,
    interrupted_stream,
    metric_total,
    resume,
    sse_events,
    wait_for,
)


def replay(gateway: Gateway, stream_id: str, **params: str) -> httpx.Response:
    return httpx.get(f"{gateway.url}/stream/{stream_id}", params=params, timeout=GUARD_S)


def not_resumable(response: httpx.Response) -> bool:
    """Refused before the replay (404), or a replay of what was kept that ends with the not_resumable event."""
    if response.status_code == 404:
        return bool(response.json()["code"] == "not_resumable")
    final = json.loads(sse_data(response.text)[-1])
    return response.status_code == 200 and final["type"] == "error" and final["code"] == "not_resumable"


def test_resume_with_the_after_query_parameter(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(MOCK_TOKENS_PER_SECOND=100, **RESUMABLE)
    prompt, max_tokens = "after query", 40
    with httpx.Client(timeout=GUARD_S) as client:
        stream_id, before = interrupted_stream(client, gateway, prompt, max_tokens, keep=5)
    response = replay(gateway, stream_id, after=str(before[-1].id))
    assert response.status_code == 200 and response.headers["x-stream-id"] == stream_id
    assert_continues(before, list(sse_events(response.text.splitlines())), prompt, max_tokens)
    # the header wins when both are sent; a foreign id is refused like the header's
    both = httpx.get(
        f"{gateway.url}/stream/{stream_id}",
        params={"after": f"{stream_id}-0"},
        headers={"Last-Event-ID": f"{stream_id}-{max_tokens}"},
        timeout=GUARD_S,
    )
    assert [e.data for e in sse_events(both.text.splitlines())] == [{"type": "done", "tokens": max_tokens}]
    refused = replay(gateway, stream_id, after="0123456789ab-3")
    assert refused.status_code == 422 and refused.json()["code"] == "invalid_request"


def test_a_stream_longer_than_resume_max_events_is_not_resumable(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(RESUME_MAX_EVENTS=6, MOCK_TOKENS_PER_SECOND=50, MOCK_FIRST_TOKEN_MS=5)

    def finished(max_tokens: int) -> tuple[str, list[Event]]:
        response = httpx.post(
            gateway.url + "/stream", json={"prompt": "max events", "max_tokens": max_tokens}, timeout=GUARD_S
        )
        events = list(sse_events(response.text.splitlines()))
        assert events[-1].data == {"type": "done", "tokens": max_tokens}  # the live client gets all of it
        return response.headers["x-stream-id"], events

    short_id, short = finished(4)  # status + 4 tokens + done: exactly 6 events, all kept
    with httpx.Client(timeout=GUARD_S) as client:
        assert [(e.id, e.data) for e in resume(client, gateway.url, short_id, None)] == [(e.id, e.data) for e in short]
    long_id, _ = finished(5)  # 7 events: one too many
    assert not_resumable(replay(gateway, long_id))


def test_a_finished_stream_is_replayable_until_resume_ttl_seconds(start_gateway: GatewayFactory) -> None:
    # TTL 5 s; expiry is checked every 50 flushes (2.5 s here)
    gateway = start_gateway(
        RESUME_TTL_SECONDS=5, RESUME_FLUSH_INTERVAL_SECONDS=0.05, MOCK_TOKENS_PER_SECOND=0, MOCK_FIRST_TOKEN_MS=5
    )
    response = httpx.post(gateway.url + "/stream", json={"prompt": "ttl", "max_tokens": 3}, timeout=GUARD_S)
    stream_id = response.headers["x-stream-id"]
    replayed = replay(gateway, stream_id)
    assert replayed.status_code == 200 and sse_data(replayed.text) == sse_data(response.text)
    wait_for(lambda: not_resumable(replay(gateway, stream_id)), "the stream expired")


def test_max_orphaned_streams_bounds_the_generations_left_running(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(
        WEB_CONCURRENCY=1,
        MAX_ORPHANED_STREAMS=1,
        ORPHAN_TIMEOUT_SECONDS=60,
        MOCK_TOKENS_PER_SECOND=20,
        MOCK_FIRST_TOKEN_MS=5,
    )
    prompt, max_tokens = "orphans", 100
    with httpx.Client(timeout=GUARD_S) as client:
        first_id, first = interrupted_stream(client, gateway, prompt, max_tokens, keep=2)
        wait_for(lambda: metric_total(gateway, "streaming_orphaned_streams") == 1, "the first generation runs on")
        second_id, second = interrupted_stream(client, gateway, prompt + " 2", max_tokens, keep=2)
        # over the bound: the second generation stopped when its client left, and its log says so
        tail = resume(client, gateway.url, second_id, second[-1].id)
        assert tail[-1].data["type"] == "error" and tail[-1].data["code"] == "not_resumable", tail[-1]
        assert "stopped when its client left" in tail[-1].data["message"]
        assert metric_total(gateway, "streaming_orphaned_streams") == 1
        # the first one ran on: its client comes back and gets the rest of it
        assert_continues(first, resume(client, gateway.url, first_id, first[-1].id), prompt, max_tokens)
