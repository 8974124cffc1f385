"""Stream hijack, guessable ids and crashes on bad ids, tried against the real gateway (two workers,
API_KEYS=keyA,keyB) with real clients and raw sockets.

Key B must get, for key A's stream, exactly what an unknown id gets: same status, same body (the
id swapped), same WebSocket close, and the same change in every counter the gateway exports.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from typing import Any

import httpx

from tests.conftest import Gateway, GatewayFactory
from tests.security.tenants import (
    GUARD_S,
    KEY_A,
    KEY_B,
    STREAM_ID,
    TWO_KEYS,
    UNKNOWN_ID,
    auth,
    counters,
    delta,
    raw_request,
    ws,
    ws_rest,
)
from tests.test_resume import sse_events

LIVE = {
    **TWO_KEYS,
    "MOCK_TOKENS_PER_SECOND": 20,
    "MOCK_FIRST_TOKEN_MS": 5,
    "ORPHAN_TIMEOUT_SECONDS": 30,
    "DRAIN_TIMEOUT_SECONDS": 1,
}


def _live_stream(client: httpx.Client, gateway: Gateway, stop: threading.Event) -> tuple[str, threading.Thread]:
    """Key A's stream, kept open and read by key A in a thread until `stop`; its id once it has tokens."""
    found: dict[str, Any] = {}
    ready = threading.Event()

    def read() -> None:
        with client.stream(
            "POST",
            gateway.url + "/stream",
            headers=auth(KEY_A),
            json={"prompt": "tenant A's secret prompt", "max_tokens": 5000},
        ) as r:
            found["id"] = r.headers["x-stream-id"]
            for event in sse_events(r.iter_lines()):
                if event.data["type"] == "token":
                    ready.set()
                if stop.is_set():
                    return

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    assert ready.wait(GUARD_S)
    return found["id"], thread


def _as_unknown(body: bytes, stream_id: str) -> bytes:
    return body.replace(stream_id.encode(), UNKNOWN_ID.encode())


def test_key_b_cannot_read_key_a_stream_over_http(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(**LIVE)
    stop = threading.Event()
    with httpx.Client(timeout=GUARD_S) as client:
        stream_id, reader = _live_stream(client, gateway, stop)
        try:
            answers: dict[str, list[Any]] = {}
            for name, sid in (("unknown", UNKNOWN_ID), ("hijack", stream_id), ("unknown again", UNKNOWN_ID)):
                before = counters(gateway)
                for headers in ({}, {"Last-Event-ID": f"{sid}-3"}):
                    r = client.get(f"{gateway.url}/stream/{sid}", headers={**auth(KEY_B), **headers})
                    answers.setdefault(name, []).append((r.status_code, _as_unknown(r.content, sid)))
                answers[name].append(delta(before, counters(gateway)))
            assert answers["hijack"][0][0] == 404
            assert json.loads(answers["hijack"][0][1])["code"] == "not_resumable"
            assert answers["hijack"] == answers["unknown"] == answers["unknown again"]
            # the owner itself still resumes it (a reader on another connection)
            with client.stream("GET", f"{gateway.url}/stream/{stream_id}", headers=auth(KEY_A)) as r:
                assert r.status_code == 200
                first = next(sse_events(r.iter_lines()))
                assert first.data["type"] == "status"
        finally:
            stop.set()
            reader.join(GUARD_S)


def test_key_b_cannot_read_key_a_stream_over_websocket(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(**LIVE)
    with ws(gateway, KEY_A) as owner:
        owner.send(json.dumps({"prompt": "tenant A's secret prompt", "max_tokens": 5000}))
        status = json.loads(owner.recv(timeout=GUARD_S))
        stream_id = status["stream_id"]
        assert json.loads(owner.recv(timeout=GUARD_S))["type"] == "token"  # live
        answers: dict[str, Any] = {}
        for name, sid in (("unknown", UNKNOWN_ID), ("hijack", stream_id), ("unknown again", UNKNOWN_ID)):
            before = counters(gateway)
            for message in ({"resume": sid, "received": 0}, {"resume": sid, "last_event_id": f"{sid}-2"}):
                with ws(gateway, KEY_B) as thief:
                    thief.send(json.dumps(message))
                    events, code = ws_rest(thief)
                answers.setdefault(name, []).append((code, _as_unknown(json.dumps(events).encode(), sid)))
            answers[name].append(delta(before, counters(gateway)))
        assert answers["hijack"][0][0] == 1008
        assert answers["hijack"] == answers["unknown"] == answers["unknown again"]
        assert "secret" not in str(answers["hijack"])
        with ws(gateway, KEY_A) as again:  # its owner resumes it from another connection
            again.send(json.dumps({"resume": stream_id, "received": 1}))
            assert json.loads(again.recv(timeout=GUARD_S))["type"] == "token"


def test_stream_ids_are_128_random_bits_on_every_worker(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(**TWO_KEYS, MOCK_TOKENS_PER_SECOND=0, MOCK_FIRST_TOKEN_MS=0, LOG_LEVEL="info")
    ids: list[str] = []
    lock = threading.Lock()

    def produce(count: int) -> None:
        for _ in range(count):  # a new connection each time: the workers take turns accepting
            r = httpx.post(
                gateway.url + "/stream",
                headers={**auth(KEY_A), "Connection": "close"},
                json={"prompt": "id", "max_tokens": 1},
                timeout=GUARD_S,
            )
            assert r.status_code == 200
            with lock:
                ids.append(r.headers["x-stream-id"])

    def workers_seen() -> set[int]:
        lines = [json.loads(line) for line in gateway.log().splitlines() if '"stream finished"' in line]
        return {line["pid"] for line in lines if line.get("stream_id") in set(ids)}

    deadline = time.monotonic() + GUARD_S
    while len(ids) < 64 or len(workers_seen()) < 2:
        threads = [threading.Thread(target=produce, args=(8,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert time.monotonic() < deadline, "the streams never reached both workers"
    assert all(STREAM_ID.match(sid) for sid in ids), ids[:4]  # 32 hex digits: 128 bits
    assert len(set(ids)) == len(ids)
    numbers = [int(sid, 16) for sid in ids]
    # every one of the 128 bits takes both values: no pid, prefix or counter region stays fixed
    varying = 0
    for bit in range(128):
        values = {(n >> bit) & 1 for n in numbers}
        varying += len(values) == 2
    assert varying == 128
    # consecutive ids share no more than chance: a counter would leave them one digit apart
    for a, b in itertools.pairwise(ids):
        assert sum(x == y for x, y in zip(a, b, strict=True)) < 16, (a, b)
        assert abs(int(a, 16) - int(b, 16)) > 2**64


BAD_IDS = ["%00", "abc%00def", "x" * 300, "Z" * 32, "0" * 31, "0" * 33, "%C3%A9" * 16, "%20"]


def test_bad_ids_are_a_clear_4xx_never_a_500(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(**TWO_KEYS, LOG_LEVEL="info")
    before = counters(gateway)
    for bad in BAD_IDS:
        for method in ("GET", "DELETE"):
            status, body = raw_request(
                gateway,
                f"{method} /stream/{bad} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {KEY_A}\r\n"
                "Connection: close\r\n\r\n",
            )
            assert status == 400, (method, bad, status, body)
            assert json.loads(body)["code"] == "invalid_stream_id"
    for bad in ["\u0000", "a\u0000b", "x" * 300, "Z" * 32, "../../etc/passwd", "é" * 32]:
        for message in ({"resume": bad, "received": 0}, {"stop": bad}):
            with ws(gateway, KEY_A) as conn:
                conn.send(json.dumps(message))
                events, code = ws_rest(conn)
            assert code == 1008, (message, code, events)
            assert [e["code"] for e in events] == ["invalid_stream_id"]
    after = delta(before, counters(gateway))
    assert not [series for series in after if "resume_store_errors" in series], after
    assert not [series for series in after if 'status="error"' in series], after
    assert "Traceback" not in gateway.log()
