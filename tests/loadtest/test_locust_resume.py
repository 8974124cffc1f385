"""The resuming Locust users: real Locust runs against real gateways (a client that drops its connection and
resumes on the same instance with the local store; an instance drained while a second one takes over its socket
with the Redis store), and the pieces as pure units: the copy of the mock's word function, the seq checker, the
SSE ids, the text assembled across connections and the summary counts.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tests.conftest as conftest
from app.errors import NotResumableError, ShutdownError
from app.streaming.encoders import SeedEncoder
from app.upstream import mock
from loadtest import stream_check as sc
from loadtest.harness.redis import RedisServer, started_redis
from tests.conftest import PATIENT_REDIS, GatewayFactory
from tests.loadtest.test_locust import assert_consistent, finish_locust, start_locust, wait_metric

PROMPT = "Explain how a streaming gateway relays tokens."  # the locustfile's default prompt
SID = "3f9a0c21d8e1"
RESUMING = {"weight_chat": 0, "max_retry_after": 0.2, "reconnect_delay": 0.05}  # /v1 has no resumption


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    yield from started_redis(tmp_path)


def assert_resumed_cleanly(summary: dict[str, Any]) -> None:
    assert_consistent(summary)
    assert (summary["resume_mismatch"], summary["not_resumable"]) == (0, 0), summary
    assert (summary["truncated"], summary["errors"]) == (0, 0), summary
    assert summary["ok"] is True, summary
    for endpoint in ("/stream", "/ws"):
        counts = summary["by_endpoint"][endpoint]
        assert counts["resumed"] > 0 and counts["completed"] > 0, (endpoint, counts)


# --- Locust against real gateways --------------------------------------------------------------------


def test_locust_resumes_dropped_streams_on_the_same_instance(start_gateway: GatewayFactory, tmp_path: Path) -> None:
    """Every user closes its connection after 5 tokens, once per stream, and resumes on the same instance (local
    store): each stream is resumed, reassembled without a gap or duplicate, and equals the mock's text."""
    gateway = start_gateway(ORPHAN_TIMEOUT_SECONDS=30, MOCK_TOKENS_PER_SECOND=200, MOCK_FIRST_TOKEN_MS=5)
    proc = start_locust(gateway.url, tmp_path, users=6, seconds=4, max_tokens=40, drop_after_tokens=5, **RESUMING)
    run = finish_locust(proc, tmp_path, 4)

    assert run.returncode == 0, run.output
    summary = run.summary
    assert_resumed_cleanly(summary)
    for endpoint in ("/stream", "/ws"):  # 40 tokens > 5: every finished stream was dropped and resumed once
        counts = summary["by_endpoint"][endpoint]
        assert counts["resumed"] >= counts["completed"], (endpoint, counts)
    assert summary["graceful"] == summary["refused"] == 0, summary
    for type_ in ("SSE", "WS"):
        row = run.stat(type_, "resumed")
        assert row is not None and int(row["Request Count"]) > 0 and row["Failure Count"] == "0", type_
    resume_requests = run.stat("GET", "/stream/{id}")
    assert resume_requests is not None and resume_requests["Failure Count"] == "0"
    assert run.failures == []
    assert wait_metric(gateway.metrics_url, "streaming_resumptions_total", 1) >= summary["resumed"]


def test_locust_resumes_streams_handed_over_by_a_drained_instance(
    start_gateway: GatewayFactory, tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A (Redis store) is SIGTERMed with a 1 s drain while its streams run, B serves the same socket: A hands its
    streams over, the users get server_shutdown with a resume id, resume on B and finish with the whole text."""
    shared = conftest._listening_socket()
    monkeypatch.setattr(conftest, "_listening_socket", lambda **_: shared.dup())  # both gateways on one socket
    fleet = {
        "RESUME_STORE": "redis",
        "REDIS_URL": redis_server.url,
        **PATIENT_REDIS,
        "ORPHAN_TIMEOUT_SECONDS": 30,
        "MOCK_FIRST_TOKEN_MS": 5,
        "WEB_CONCURRENCY": 1,
    }
    users = 6
    try:
        # 300 tokens at 100/s: 3 s streams on A, which outlive its 1 s drain; B continues them at 1000/s
        first = start_gateway(MOCK_TOKENS_PER_SECOND=100, DRAIN_TIMEOUT_SECONDS=1, **fleet)
        # 8 resume attempts: their jittered backoff spans ~6 s, so a user whose first attempts meet A still draining
        # (503) outlasts A's shutdown on a loaded machine; the default 5 span ~1 s at this test's 0.05 s base.
        proc = start_locust(first.url, tmp_path, users=users, seconds=7, max_tokens=300, resume_attempts=8, **RESUMING)
        assert wait_metric(first.metrics_url, "streaming_active_connections", users) >= users
        second = start_gateway(MOCK_TOKENS_PER_SECOND=1000, **fleet)
        first.proc.send_signal(signal.SIGTERM)
        assert first.proc.wait(timeout=30) == 0, first.log()
        run = finish_locust(proc, tmp_path, 7)
        assert second.proc.poll() is None
    finally:
        shared.close()

    assert run.returncode == 0, run.output
    summary = run.summary
    assert_resumed_cleanly(summary)
    assert summary["resumed"] >= users, summary  # every stream A carried at its deadline was resumed on B
    assert summary["graceful"] == 0, summary  # handed over, so resumed: no stream had to start again
    drained = {"refused:503:draining", "refused:1012:draining"}  # a resume that reached A while it drained
    assert set(summary["by_reason"]) <= drained, summary["by_reason"]


# --- the mock's text, copied ---------------------------------------------------------------------------


def test_mock_vocabulary_is_the_gateways() -> None:
    assert sc.MOCK_VOCABULARY == mock.VOCABULARY


@settings(deadline=None, max_examples=200)
@given(prompt=st.text(max_size=80), start=st.integers(0, 300), length=st.integers(0, 60))
def test_mock_words_match_the_gateways_mock(prompt: str, start: int, length: int) -> None:
    assert sc.mock_words(prompt, start, start + length) == mock.mock_tokens(prompt, start, start + length)
    assert sc.mock_text(prompt, length) == "".join(mock.mock_tokens(prompt, 0, length))


# --- seqs -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seqs", "final", "expected"),
    [
        ([0, 1, 2, 3], 3, None),
        ([0], 0, None),
        ([0, 1, 1, 2, 3], 3, "duplicate event seq"),
        ([0, 2, 3], 3, "gap in event seqs"),
        ([1, 2, 3], 3, "gap in event seqs"),
        ([0, 1, 2, 4], 4, "final event seq skips ahead"),
        ([0, 2, 1, 3], 3, "event seqs out of order"),
        ([0, 1, 5, 2], 2, "event seq past the final event"),
    ],
    ids=["whole", "status-only", "duplicate", "gap", "no-status", "final-skips", "out-of-order", "past-final"],
)
def test_seq_problem(seqs: list[int], final: int, expected: str | None) -> None:
    assert sc.seq_problem(seqs, final) == expected


def test_sse_decoder_reports_each_events_id() -> None:
    body = SeedEncoder(SID).opening() + SeedEncoder(SID, seq=1).tokens(["a "]) + SeedEncoder.shutdown_resume(f"{SID}-1")
    decoder = sc.SSEDecoder()
    seen = []
    for line in body.splitlines(keepends=True):
        data = decoder.feed_line(line)
        if data is not None:
            seen.append((json.loads(data)["type"], decoder.event_id, decoder.last_event_id))
    assert seen == [
        ("status", f"{SID}-0", f"{SID}-0"),
        ("token", f"{SID}-1", f"{SID}-1"),
        ("server_shutdown", None, f"{SID}-1"),  # no id of its own: EventSource keeps the last one
    ]


# --- a stream assembled over connections (bodies from the gateway's own encoder) ----------------------------

WORDS = sc.mock_words(PROMPT, 0, 12)


def feed_sse(check: sc.SeedCheck, body: bytes) -> None:
    decoder = sc.SSEDecoder()
    for line in body.splitlines(keepends=True):
        data = decoder.feed_line(line)
        if data is not None:
            check.feed(data, decoder.event_id)


def first_connection(kept: int, end: bytes = b"") -> sc.SeedCheck:
    """A check after a first connection that carried the status and `kept` tokens, then `end`."""
    check = sc.SeedCheck(expected=lambda n: sc.mock_text(PROMPT, n))
    encoder = SeedEncoder(SID)
    feed_sse(check, encoder.opening() + encoder.tokens(WORDS[:kept]) + end)
    return check


def replay(after: int, words: list[str], tokens: int | None = None) -> bytes:
    """What `GET /stream/{id}` sends after seq `after`: the rest of the tokens, then done."""
    encoder = SeedEncoder(SID, seq=after + 1)
    return encoder.tokens(words) + encoder.done(len(WORDS) if tokens is None else tokens, "length", None)


def test_a_resumed_stream_assembles_the_uninterrupted_text() -> None:
    check = first_connection(4)  # then the connection broke: no final event
    assert check.sse_verdict(connection_lost=True).name == "truncated"
    assert check.should_resume() and check.last_event_id == f"{SID}-4"
    check.new_connection()
    feed_sse(check, replay(4, WORDS[4:]))
    assert check.sse_verdict() == sc.completed()
    assert check.text == sc.mock_text(PROMPT, len(WORDS)) and check.tokens == len(WORDS)
    assert check.seqs == list(range(len(WORDS) + 2))


def test_resumed_twice_after_a_handover_and_a_lost_replay() -> None:
    check = first_connection(3, SeedEncoder.shutdown_resume(f"{SID}-3"))
    assert check.should_resume()  # handed over: server_shutdown with a resume id
    check.new_connection()
    feed_sse(check, SeedEncoder(SID, seq=4).tokens(WORDS[3:7]) + SeedEncoder().error(ShutdownError("m")))
    assert check.should_resume()  # a plain server_shutdown ending a *resumed* connection: resume again
    assert check.last_event_id == f"{SID}-7"
    check.new_connection()
    feed_sse(check, replay(7, WORDS[7:]))
    assert check.sse_verdict() == sc.completed()
    assert check.resumes == 2


@pytest.mark.parametrize(
    ("after", "words", "tokens", "detail"),
    [
        (3, WORDS[3:], None, "duplicate event seq"),  # the replay repeats seq 4
        (5, WORDS[5:], None, "gap in event seqs"),  # the replay skips seq 5
        (4, WORDS[5:], len(WORDS) - 1, "text differs from the uninterrupted text"),  # seqs whole, a word lost
        (4, [*WORDS[4:], "x "], len(WORDS) + 1, "text differs from the uninterrupted text"),
    ],
    ids=["duplicate", "gap", "wrong-text", "extra-word"],
)
def test_a_bad_resume_is_a_resume_mismatch(after: int, words: list[str], tokens: int | None, detail: str) -> None:
    check = first_connection(4)
    check.new_connection()
    if detail.startswith("text"):  # renumber so that only the text is wrong
        body = SeedEncoder(SID, seq=5).tokens(words) + SeedEncoder(SID, seq=5 + len(words)).done(
            len(words) + 4, "length", None
        )
    else:
        body = replay(after, words, tokens)
    feed_sse(check, body)
    verdict = check.sse_verdict()
    assert (verdict.kind, verdict.name, verdict.detail) == ("error", "resume_mismatch", detail)


def test_ends_that_are_not_resumed() -> None:
    plain = first_connection(3, SeedEncoder().error(ShutdownError("m")))
    assert not plain.should_resume()  # not handed over: the gateway says "send the request again"
    assert plain.sse_verdict() == sc.graceful()

    no_ids = sc.SeedCheck()
    encoder = SeedEncoder()  # resumption off: no id lines
    feed_sse(no_ids, encoder.opening() + encoder.tokens(WORDS[:3]))
    assert no_ids.stream_id is None and not no_ids.should_resume()

    gone = first_connection(3)
    gone.new_connection()
    feed_sse(gone, SeedEncoder().error(NotResumableError("expired")))
    assert not gone.should_resume()
    verdict = gone.sse_verdict()
    assert (verdict.kind, verdict.name) == ("error", "not_resumable")
    assert sc.classify_status(404, json.dumps(NotResumableError("m").detail_body())) == sc.not_resumable(
        "http 404 not_resumable"
    )


def test_websocket_resume_counts_events_and_checks_the_text() -> None:
    check = sc.SeedCheck(expected=lambda n: sc.mock_text(PROMPT, n))
    check.feed(json.dumps({"type": "status", "message": "Generating...", "stream_id": SID}))
    for word in WORDS[:5]:
        check.feed(json.dumps({"type": "token", "content": word}))
    assert check.should_resume(ws_close=None)  # dropped without a close frame
    assert (check.stream_id, check.position) == (SID, 6)  # the resume message: {"resume": SID, "received": 6}

    check.new_connection()  # refused while that instance drains: a refusal, retried
    check.feed(json.dumps({"type": "error", "code": "draining", "message": "m"}))
    assert check.ws_verdict(1012).name == "refused:1012:draining"

    check.new_connection()
    for word in WORDS[5:]:
        check.feed(json.dumps({"type": "token", "content": word}))
    check.feed(json.dumps({"type": "done", "tokens": len(WORDS)}))
    assert check.ws_verdict(1000) == sc.completed()

    doubled = sc.SeedCheck()
    doubled.feed(json.dumps({"type": "status", "message": "Generating...", "stream_id": SID}))
    doubled.feed(json.dumps({"type": "token", "content": "a "}))
    doubled.new_connection()
    for _ in range(2):  # replayed twice
        doubled.feed(json.dumps({"type": "token", "content": "b "}))
    doubled.feed(json.dumps({"type": "done", "tokens": 2}))
    assert doubled.ws_verdict(1000) == sc.resume_mismatch("more token events than done.tokens")

    first_close = sc.SeedCheck()
    first_close.feed(json.dumps({"type": "status", "message": "Generating...", "stream_id": SID}))
    assert not first_close.should_resume(ws_close=1012)  # a drain's close on the first connection: graceful
    assert first_close.ws_verdict(1012).kind == "graceful"


def test_tally_counts_resumes_and_their_failures() -> None:
    tally = sc.Tally()
    for verdict in (sc.completed(), sc.resume_mismatch("gap in event seqs"), sc.not_resumable("http 404")):
        tally.started("/stream")
        tally.record("/stream", verdict)
    tally.resumed("/stream")
    tally.resumed("/ws")
    worker = sc.Tally()
    worker.resumed("/ws")
    tally.merge(worker.take())
    summary = tally.summary()
    assert (summary["resumed"], summary["resume_mismatch"], summary["not_resumable"]) == (3, 1, 1)
    assert summary["errors"] == 2 and summary["ok"] is False and summary["in_flight"] == 0
    assert summary["by_reason"] == {"not_resumable": 1, "resume_mismatch": 1}
    assert summary["by_endpoint"]["/ws"]["resumed"] == 2
    assert summary["by_endpoint"]["/stream"]["resume_mismatch"] == 1
