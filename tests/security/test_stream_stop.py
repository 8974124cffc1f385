"""Stopping a stream: only its owner can, wherever the generation runs, and it really stops.

Against real gateways (gunicorn, two workers), the fake OpenAI upstream (which counts the requests
whose client hung up) and a real redis-server. A stop cancels the generation and closes the
upstream request at once, gives every reader one final `cancelled` event, leaves a log that
replays up to it, and counts the tokens generated so far. Key B's stop is an unknown id's 404.
"""

from __future__ import annotations

import functools
import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from loadtest.harness.redis import RedisServer, started_redis
from tests.conftest import PATIENT_REDIS, FakeUpstream, Gateway, GatewayFactory
from tests.security.tenants import (
    GUARD_S,
    KEY_A,
    KEY_B,
    TWO_KEYS,
    UNKNOWN_ID,
    auth,
    counters,
    delta,
    ws,
    ws_rest,
)
from tests.test_resume import Event, metric_total, sse_events, tokens_of, wait_for
from tests.workers import connection_to_each_worker, wait_all_draining

RESUMABLE = {"ORPHAN_TIMEOUT_SECONDS": 30, "DRAIN_TIMEOUT_SECONDS": 1, "LOG_LEVEL": "info"}
CANCELLED = {"type": "error", "code": "cancelled", "message": "the stream's owner stopped this generation"}


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    yield from started_redis(tmp_path)


class LiveReader:
    """Key A's `POST /stream`, read in a thread to its end."""

    def __init__(self, gateway: Gateway, max_tokens: int = 5000) -> None:
        self.events: list[Event] = []
        self.stream_id = ""
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(gateway, max_tokens), daemon=True)
        self._thread.start()
        wait_for(lambda: len(tokens_of(self.events)) >= 3, "the stream is under way")

    def _read(self, gateway: Gateway, max_tokens: int) -> None:
        with httpx.stream(
            "POST",
            gateway.url + "/stream",
            headers=auth(KEY_A),
            timeout=GUARD_S,
            json={"prompt": "stop me", "max_tokens": max_tokens},
        ) as r:
            self.stream_id = r.headers["x-stream-id"]
            for event in sse_events(r.iter_lines()):
                self.events.append(event)

    def join(self) -> list[Event]:
        self._thread.join(GUARD_S)
        assert not self._thread.is_alive(), "the stream did not end"
        return self.events


def finished_lines(gateway: Gateway) -> list[dict[str, Any]]:
    return [json.loads(line) for line in gateway.log().splitlines() if '"stream finished"' in line]


def test_the_owner_stops_a_live_generation_and_nobody_else_can(
    start_gateway: GatewayFactory, fake_upstream: FakeUpstream
) -> None:
    gateway = start_gateway(**TWO_KEYS, **RESUMABLE, UPSTREAM_URL=fake_upstream.url, UPSTREAM_RETRIES=0)
    fake_upstream.script({"tokens_per_second": 20})
    reader = LiveReader(gateway)
    sid = reader.stream_id
    assert fake_upstream.stats()["active"] == 1

    # key B: DELETE and a WebSocket stop answer as for an unknown id, and stop nothing
    answers: dict[str, Any] = {}
    for name, target in (("unknown", UNKNOWN_ID), ("other tenant", sid)):
        before = counters(gateway)
        r = httpx.delete(f"{gateway.url}/stream/{target}", headers=auth(KEY_B), timeout=GUARD_S)
        with ws(gateway, KEY_B) as conn:
            conn.send(json.dumps({"stop": target}))
            events, code = ws_rest(conn)
        answers[name] = (
            r.status_code,
            r.content.replace(target.encode(), b"<id>"),
            code,
            json.dumps(events).replace(target, "<id>"),
            delta(before, counters(gateway)),
        )
    assert answers["other tenant"][0] == 404 and answers["other tenant"][2] == 1008
    assert answers["other tenant"] == answers["unknown"]
    assert fake_upstream.stats()["active"] == 1 and fake_upstream.stats()["disconnects"] == 0

    # key A stops it: the answer carries the final event, the upstream request is closed at once
    r = httpx.delete(f"{gateway.url}/stream/{sid}", headers=auth(KEY_A), timeout=GUARD_S)
    assert r.status_code == 200, r.text
    assert r.json() == {"stream_id": sid, "final": CANCELLED}
    stats = fake_upstream.wait_for(lambda s: s["disconnects"] == 1 and s["active"] == 0, timeout=GUARD_S)
    assert stats["disconnects"] == 1 and stats["completed"] == 0

    live = reader.join()
    assert live[-1].data == CANCELLED
    assert [e.data["type"] for e in live].count("error") == 1
    n = len(tokens_of(live))
    assert 3 <= n < 5000
    assert "".join(tokens_of(live)) == "".join(f"tok{i} " for i in range(n))

    # a later resume replays the stream up to that event, from either worker
    for _ in range(2):
        with httpx.stream("GET", f"{gateway.url}/stream/{sid}", headers=auth(KEY_A), timeout=GUARD_S) as resumed:
            replayed = list(sse_events(resumed.iter_lines()))
        assert [e.seq for e in replayed] == list(range(n + 2))
        assert [e.data for e in replayed] == [e.data for e in live]
    # stopping it again changes nothing and says how it ended
    again = httpx.delete(f"{gateway.url}/stream/{sid}", headers=auth(KEY_A), timeout=GUARD_S)
    assert again.status_code == 200 and again.json()["final"] == CANCELLED

    # counted: the tokens generated so far, a cancelled outcome (not an error, not a disconnect)
    wait_for(
        lambda: metric_total(gateway, "streaming_stream_outcomes_total", 'outcome="cancelled"') == 1,
        "the outcome is counted",
    )
    assert metric_total(gateway, "streaming_tokens_total", 'route="/stream"') == n
    assert metric_total(gateway, "streaming_stream_outcomes_total", 'outcome="client_gone"') == 0
    assert metric_total(gateway, "streaming_connections_total", 'route="/stream",status="error"') == 0
    lines = finished_lines(gateway)
    produced = [line for line in lines if line["stream_id"] == sid]
    assert [(line["outcome"], line["tokens"]) for line in produced] == [("cancelled", n)]
    assert sum(line.get("replays") == sid for line in lines) == 2  # each resume names the stream it read


def _orphan(client: httpx.Client, gateway: Gateway) -> str:
    """Start a stream, read two tokens, leave: the generation runs on (orphaned) on the worker that took it."""
    with client.stream(
        "POST", gateway.url + "/stream", json={"prompt": "orphan", "max_tokens": 5000}, headers={"Connection": "close"}
    ) as r:
        sid = r.headers["x-stream-id"]
        events = []
        for event in sse_events(r.iter_lines()):
            events.append(event)
            if len(tokens_of(events)) >= 2:
                return sid
    raise AssertionError("the stream ended early")


def _pid_of(gateway: Gateway, message: str, sid: str) -> int | None:
    for line in gateway.log().splitlines():
        if message in line:
            record = json.loads(line)
            if record.get("stream_id") == sid:
                return int(record["pid"])
    return None


def test_a_stop_reaches_the_worker_that_runs_the_stream(start_gateway: GatewayFactory) -> None:
    """Without keys the id is the capability: a stop from another address (a new network) works too."""
    gateway = start_gateway(**RESUMABLE, MOCK_TOKENS_PER_SECOND=20, MOCK_FIRST_TOKEN_MS=5)
    elsewhere = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=GUARD_S)
    cross_worker = 0
    with httpx.Client(timeout=GUARD_S) as client, elsewhere:
        for attempt in range(40):
            sid = _orphan(client, gateway)
            if attempt % 2:
                r = elsewhere.delete(f"{gateway.url}/stream/{sid}", headers={"Connection": "close"})
                assert r.status_code == 200, r.text
                final = r.json()["final"]
            else:
                with ws(gateway, None) as conn:
                    conn.send(json.dumps({"stop": sid}))
                    events, code = ws_rest(conn)
                assert code == 1000 and events[0]["type"] == "stopped"
                final = events[0]["final"]
            assert final == CANCELLED
            wait_for(functools.partial(_pid_of, gateway, "stream finished", sid), "the generation ended")
            producer, stopper = _pid_of(gateway, "stream finished", sid), _pid_of(gateway, "stream stop requested", sid)
            cross_worker += producer != stopper
            if cross_worker >= 2 and attempt >= 3:
                break
        assert cross_worker >= 2, "no stop landed on the other worker"
        with client.stream("GET", f"{gateway.url}/stream/{sid}") as r:
            replayed = list(sse_events(r.iter_lines()))
        assert replayed[-1].data == CANCELLED
    wait_for(lambda: metric_total(gateway, "streaming_active_connections") == 0, "every generation stopped")


def test_a_stop_reaches_another_replica(start_gateway: GatewayFactory, redis_server: RedisServer) -> None:
    shared = {
        **TWO_KEYS,
        **RESUMABLE,
        "RESUME_STORE": "redis",
        "REDIS_URL": redis_server.url,
        **PATIENT_REDIS,
        "MOCK_TOKENS_PER_SECOND": 20,
        "MOCK_FIRST_TOKEN_MS": 5,
    }
    a, b = start_gateway(**shared), start_gateway(**shared)
    with ws(a, KEY_A) as owner:
        owner.send(json.dumps({"prompt": "stop me elsewhere", "max_tokens": 5000}))
        sid = json.loads(owner.recv(timeout=GUARD_S))["stream_id"]
        for _ in range(3):
            assert json.loads(owner.recv(timeout=GUARD_S))["type"] == "token"
        refused = httpx.delete(f"{b.url}/stream/{sid}", headers=auth(KEY_B), timeout=GUARD_S)
        unknown = httpx.delete(f"{b.url}/stream/{UNKNOWN_ID}", headers=auth(KEY_B), timeout=GUARD_S)
        assert refused.status_code == unknown.status_code == 404
        assert refused.json() == {**unknown.json(), "detail": unknown.json()["detail"].replace(UNKNOWN_ID, sid)}
        r = httpx.delete(f"{b.url}/stream/{sid}", headers=auth(KEY_A), timeout=GUARD_S)
        assert r.status_code == 200 and r.json()["final"] == CANCELLED, r.text
        rest, code = ws_rest(owner)
    assert rest[-1] == CANCELLED and code == 1000
    assert all(e["type"] == "token" for e in rest[:-1])
    with httpx.stream("GET", f"{b.url}/stream/{sid}", headers=auth(KEY_A), timeout=GUARD_S) as resumed:
        replayed = list(sse_events(resumed.iter_lines()))
    assert replayed[-1].data == CANCELLED
    n = len(tokens_of(replayed))
    wait_for(lambda: metric_total(a, "streaming_stream_outcomes_total", 'outcome="cancelled"') == 1, "counted")
    assert metric_total(a, "streaming_tokens_total", 'route="/ws"') == n


def test_the_websocket_that_runs_a_stream_can_stop_it(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(**TWO_KEYS, **RESUMABLE, MOCK_TOKENS_PER_SECOND=20, MOCK_FIRST_TOKEN_MS=5)
    with ws(gateway, KEY_A) as conn:
        conn.send(json.dumps({"prompt": "stop on the same socket", "max_tokens": 2000}))
        sid = json.loads(conn.recv(timeout=GUARD_S))["stream_id"]
        assert json.loads(conn.recv(timeout=GUARD_S))["type"] == "token"
        conn.send(json.dumps({"stop": UNKNOWN_ID}))  # not this stream's id: ignored
        conn.send(json.dumps({"stop": sid}))
        rest, code = ws_rest(conn)
    assert rest[-1] == CANCELLED and code == 1000
    assert all(e["type"] == "token" for e in rest[:-1]) and len(rest) < 2000
    with httpx.stream("GET", f"{gateway.url}/stream/{sid}", headers=auth(KEY_A), timeout=GUARD_S) as resumed:
        replayed = list(sse_events(resumed.iter_lines()))
    assert replayed[-1].data == CANCELLED


def test_the_owner_survives_a_handover_and_can_stop_the_claimed_generation(
    start_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    fleet = {
        **TWO_KEYS,
        **RESUMABLE,
        "RESUME_STORE": "redis",
        "REDIS_URL": redis_server.url,
        **PATIENT_REDIS,
        "MOCK_TOKENS_PER_SECOND": 20,
        "MOCK_FIRST_TOKEN_MS": 5,
    }
    a, b = start_gateway(**fleet), start_gateway(**fleet)
    reader = LiveReader(a, max_tokens=2000)
    a.proc.send_signal(signal.SIGTERM)  # drain: at its 1 s deadline A hands the stream to the fleet
    before = reader.join()
    assert before[-1].data["type"] == "server_shutdown" and before[-1].data["resume"] == before[-2].id
    sid, last_id = reader.stream_id, str(before[-2].id)
    wait_for(lambda: metric_total(b, "streaming_handovers_total", 'result="claimed"') == 1, "B claimed it")

    # the claimed stream still belongs to key A: key B is told it does not exist
    for headers in ({}, {"Last-Event-ID": last_id}):
        theirs = httpx.get(f"{b.url}/stream/{sid}", headers={**auth(KEY_B), **headers}, timeout=GUARD_S)
        unknown = httpx.get(
            f"{b.url}/stream/{UNKNOWN_ID}",
            timeout=GUARD_S,
            headers={**auth(KEY_B), **{k: v.replace(sid, UNKNOWN_ID) for k, v in headers.items()}},
        )
        assert theirs.status_code == unknown.status_code == 404
        assert theirs.content.replace(sid.encode(), UNKNOWN_ID.encode()) == unknown.content
    assert httpx.delete(f"{b.url}/stream/{sid}", headers=auth(KEY_B), timeout=GUARD_S).status_code == 404

    # key A follows it on B, then stops the generation B runs now
    events: list[Event] = []
    with httpx.stream(
        "GET", f"{b.url}/stream/{sid}", headers={**auth(KEY_A), "Last-Event-ID": last_id}, timeout=GUARD_S
    ) as r:
        assert r.status_code == 200
        for event in sse_events(r.iter_lines()):
            events.append(event)
            if len(events) == 3:
                stop = httpx.delete(f"{b.url}/stream/{sid}", headers=auth(KEY_A), timeout=GUARD_S)
                assert stop.status_code == 200 and stop.json()["final"] == CANCELLED, stop.text
    assert events[-1].data == CANCELLED
    whole = before[:-1] + events
    assert [e.seq for e in whole] == list(range(len(whole)))  # no gap, no duplicate, across both instances
    assert len(tokens_of(whole)) < 2000


def test_an_open_circuit_does_not_keep_the_owner_from_stopping(
    start_gateway: GatewayFactory, fake_upstream: FakeUpstream
) -> None:
    gateway = start_gateway(
        **TWO_KEYS,
        **RESUMABLE,
        UPSTREAM_URL=fake_upstream.url,
        UPSTREAM_RETRIES=0,
        CIRCUIT_FAILURE_THRESHOLD=1,
        CIRCUIT_OPEN_SECONDS=120,
        CIRCUIT_WINDOW_SECONDS=120,
    )
    fake_upstream.script({"tokens_per_second": 20})
    reader = LiveReader(gateway)
    failed = httpx.post(
        f"{gateway.url}/stream", headers=auth(KEY_B), timeout=GUARD_S, json={"prompt": "[[fail:503]]", "max_tokens": 3}
    )
    assert failed.status_code == 502
    refused = httpx.post(
        f"{gateway.url}/stream", headers=auth(KEY_B), timeout=GUARD_S, json={"prompt": "a new stream", "max_tokens": 3}
    )
    assert refused.status_code == 503 and refused.json()["code"] == "circuit_open"
    # the circuit refuses new generations; the one still running can be stopped by its owner
    r = httpx.delete(f"{gateway.url}/stream/{reader.stream_id}", headers=auth(KEY_A), timeout=GUARD_S)
    assert r.status_code == 200 and r.json()["final"] == CANCELLED, r.text
    assert reader.join()[-1].data == CANCELLED
    assert fake_upstream.wait_for(lambda s: s["active"] == 0, timeout=GUARD_S)["active"] == 0


def test_a_draining_instance_still_takes_stops(start_gateway: GatewayFactory) -> None:
    """One worker, so both streams keep it draining until the last stop (a worker without streams exits at once,
    and a connection it accepted on its way out is closed: 1012)."""
    gateway = start_gateway(
        **TWO_KEYS,
        **{**RESUMABLE, "DRAIN_TIMEOUT_SECONDS": 120},
        WEB_CONCURRENCY=1,
        MOCK_TOKENS_PER_SECOND=20,
        MOCK_FIRST_TOKEN_MS=5,
    )
    with connection_to_each_worker(gateway) as probes:
        reader = LiveReader(gateway)
        with ws(gateway, KEY_A) as owner:
            owner.send(json.dumps({"prompt": "stop me while draining", "max_tokens": 5000}))
            ws_sid = json.loads(owner.recv(timeout=GUARD_S))["stream_id"]
            gateway.proc.send_signal(signal.SIGTERM)
            wait_all_draining(probes)
            refused = httpx.post(
                f"{gateway.url}/stream",
                headers=auth(KEY_A),
                timeout=GUARD_S,
                json={"prompt": "too late", "max_tokens": 3},
            )
            assert refused.status_code == 503 and refused.json()["code"] == "draining"
            # new streams are refused; the owner can still stop the ones the drain waits for
            with ws(gateway, KEY_A) as stopper:
                stopper.send(json.dumps({"stop": ws_sid}))
                events, code = ws_rest(stopper)
            assert code == 1000 and events == [{"type": "stopped", "stream_id": ws_sid, "final": CANCELLED}]
            rest, code = ws_rest(owner)
        assert rest[-1] == CANCELLED and code == 1000
        r = httpx.delete(f"{gateway.url}/stream/{reader.stream_id}", headers=auth(KEY_A), timeout=GUARD_S)
        assert r.status_code == 200 and r.json()["final"] == CANCELLED, r.text
        assert reader.join()[-1].data == CANCELLED
        assert gateway.proc.wait(timeout=GUARD_S) == 0  # nothing left to wait for: the drain ends
