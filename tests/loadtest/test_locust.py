"""The Locust load test: real Locust runs (a subprocess: Locust monkey-patches with gevent on import) against
the real gateway, a stub that breaks the contract, and a gateway drained while a second one takes over its
socket; plus the stream checks, summary and load shapes as pure units.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tests.conftest as conftest
from app.errors import RateLimitedError, ShutdownError, StreamTimeoutError, UpstreamError
from app.streaming.encoders import ChatChunkEncoder, SeedEncoder
from app.upstream.base import Usage
from loadtest import shapes
from loadtest import stream_check as sc
from loadtest.harness.ports import refused_port
from tests.conftest import ROOT, GatewayFactory
from tests.extras import require

LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
STUB = Path(__file__).resolve().parent / "stub_gateway.py"
GUARD_S = 30.0  # guard only: how long past its run time a Locust run may take to exit


@dataclass
class LocustRun:
    returncode: int
    summary: dict[str, Any]
    stats: list[dict[str, str]]
    failures: list[dict[str, str]]
    output: str

    def stat(self, type_: str, name: str) -> dict[str, str] | None:
        return next((row for row in self.stats if row["Type"] == type_ and row["Name"] == name), None)


def locust_command(host: str, csv_prefix: Path, *, users: int, seconds: int) -> list[str]:
    require("load", "locust", "websocket")
    return [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "-u",
        str(users),
        "-r",
        str(users),
        "-t",
        f"{seconds}s",
        "--host",
        host,
        "--csv",
        str(csv_prefix),
        "--only-summary",
    ]


def locust_env(summary_path: Path, **settings: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCUST_")}
    env.update({"LOCUST_SUMMARY_PATH": str(summary_path), "LOCUST_WAIT_MIN": "0.05", "LOCUST_WAIT_MAX": "0.2"})
    env.update({f"LOCUST_{k.upper()}": str(v) for k, v in settings.items()})
    return env


def finish_locust(proc: subprocess.Popen[str], tmp_path: Path, seconds: int) -> LocustRun:
    try:
        output, _ = proc.communicate(timeout=seconds + GUARD_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"locust did not exit within {seconds + GUARD_S}s:\n{output}")
    summary_path = tmp_path / "summary.json"
    assert summary_path.exists(), output
    with (tmp_path / "run_stats.csv").open() as f:
        stats = list(csv.DictReader(f))
    with (tmp_path / "run_failures.csv").open() as f:
        failures = list(csv.DictReader(f))
    summary = json.loads(summary_path.read_text())
    assert summary.pop("final") is True, summary  # written again as Locust quit
    assert summary["in_flight"] == 0, summary
    return LocustRun(proc.returncode, summary, stats, failures, output)


def start_locust(host: str, tmp_path: Path, *, users: int, seconds: int, **settings: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        locust_command(host, tmp_path / "run", users=users, seconds=seconds),
        env=locust_env(tmp_path / "summary.json", **settings),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def assert_consistent(summary: dict[str, Any]) -> None:
    """Every started stream ended exactly one way, overall and per endpoint."""
    ends = ("completed", "graceful", "truncated", "refused", "errors", "aborted")
    assert summary["started"] == sum(summary[key] for key in ends), summary
    for endpoint, counts in summary["by_endpoint"].items():
        assert counts["started"] == sum(counts[key] for key in ends), endpoint


# --- Locust against real processes ------------------------------------------------------------------


def test_locust_streams_complete_against_the_gateway(start_gateway: GatewayFactory, tmp_path: Path) -> None:
    gateway = start_gateway(MOCK_TOKENS_PER_SECOND=100, MOCK_FIRST_TOKEN_MS=5)
    # 3 s: each of the 10 users runs a 0.2 s stream every 0.05-0.2 s, so every endpoint completes dozens
    proc = start_locust(gateway.url, tmp_path, users=10, seconds=3, max_tokens=20)
    run = finish_locust(proc, tmp_path, 3)

    assert run.returncode == 0, run.output
    summary = run.summary
    assert summary["completed"] > 0 and summary["ok"] is True, summary
    assert (summary["truncated"], summary["errors"], summary["refused"], summary["graceful"]) == (0, 0, 0, 0)
    # nothing broke, so nothing was resumed; every /stream and /ws text was the mock's (LOCUST_VERIFY_TEXT=mock)
    assert (summary["resumed"], summary["resume_mismatch"], summary["not_resumable"]) == (0, 0, 0)
    assert_consistent(summary)
    for endpoint in ("/stream", "/v1/chat/completions", "/ws"):
        assert summary["by_endpoint"][endpoint]["completed"] > 0, endpoint
    for type_ in ("SSE", "CHAT", "WS"):
        for name in ("TTFT", "inter-token gap", "stream duration"):
            row = run.stat(type_, name)
            assert row is not None and int(row["Request Count"]) > 0 and row["Failure Count"] == "0", (type_, name)
        # The gap is measured per token, not per buffer read: the 20 tokens of a stream arrived apart (read in
        # one buffer, a stream's gap is 0), and a gap is a part of a stream's duration. Orders, not times.
        gap, duration = run.stat(type_, "inter-token gap"), run.stat(type_, "stream duration")
        assert gap is not None and duration is not None
        assert 0 < float(gap["Median Response Time"]) < float(duration["Median Response Time"])
    assert run.failures == []
    assert run.output.count('"type": "stream_summary"') == 1  # the one-line summary on stdout


@pytest.fixture
def stub_gateway() -> Any:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.set_inheritable(True)
    proc = subprocess.Popen([sys.executable, str(STUB), "--fd", str(sock.fileno())], pass_fds=(sock.fileno(),))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    try:
        conftest._wait_until_up(url, proc, "/missing")  # 404: up
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_locust_counts_truncated_graceful_and_refused_streams(stub_gateway: str, tmp_path: Path) -> None:
    proc = start_locust(
        stub_gateway, tmp_path, users=3, seconds=3, max_retry_after=0.05, max_reconnects=1, verify_text="off"
    )  # the stub is not the mock
    run = finish_locust(proc, tmp_path, 3)

    assert run.returncode == 1, run.output  # truncations fail the run
    summary = run.summary
    assert summary["ok"] is False
    assert_consistent(summary)
    for key in ("completed", "truncated", "graceful", "refused"):
        assert summary[key] > 0, (key, summary)
    assert summary["errors"] == 0, summary  # truncations, refusals and graceful ends are not errors
    assert summary["reconnects"] > 0  # a graceful end is followed by a reconnect
    for endpoint in ("/stream", "/v1/chat/completions", "/ws"):
        counts = summary["by_endpoint"][endpoint]
        assert counts["truncated"] > 0 and counts["graceful"] > 0 and counts["refused"] > 0, endpoint
    assert {"refused:429:rate_limited", "refused:503:draining", "refused:1013:rate_limited"} <= set(
        summary["by_reason"]
    ), summary["by_reason"]
    truncations = {(row["Method"], row["Error"]) for row in run.failures if row["Name"] == "truncated"}
    assert {
        ("SSE", "StreamFailure('ended without done')"),
        ("SSE", "StreamFailure('fewer token events than done.tokens')"),
        ("SSE", "StreamFailure('connection lost before done')"),
        ("CHAT", "StreamFailure('ended without [DONE]')"),
        ("CHAT", "StreamFailure('fewer content chunks than usage.completion_tokens')"),
        ("WS", "StreamFailure('close 1000 without done')"),
    } <= truncations, truncations
    assert {row["Name"] for row in run.failures} == {"truncated"}  # refusals and graceful ends are no failures
    graceful = run.stat("SSE", "graceful:server_shutdown")
    assert graceful is not None and graceful["Failure Count"] == "0"


def metric_sum(url: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`, from the instance answering `url`."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    total = 0.0
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name + "{") and all(label in line for label in wanted):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_metric(url: str, name: str, minimum: float, timeout: float = 15.0, **labels: str) -> float:
    deadline = time.monotonic() + timeout
    value = metric_sum(url, name, **labels)
    while value < minimum and time.monotonic() < deadline:
        time.sleep(0.05)  # polling interval, not an assertion
        value = metric_sum(url, name, **labels)
    return value


def test_locust_reconnects_after_a_drain_and_counts_no_truncation(
    start_gateway: GatewayFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gateway A drains (SIGTERM, 1 s) while B takes over the same listening socket, as a socket-activated
    restart does: A's streams end with server_shutdown, users reconnect and finish on B, none is truncated."""
    shared = conftest._listening_socket()
    monkeypatch.setattr(conftest, "_listening_socket", lambda **_: shared.dup())  # both gateways on one socket
    users = 6
    try:
        # 300 tokens at 100/s: 3 s streams on A, which outlive its 1 s drain; B's take 0.3 s (1000/s)
        first = start_gateway(
            MOCK_TOKENS_PER_SECOND=100, MOCK_FIRST_TOKEN_MS=5, DRAIN_TIMEOUT_SECONDS=1, WEB_CONCURRENCY=1
        )
        proc = start_locust(
            first.url,
            tmp_path,
            users=users,
            seconds=60,
            max_tokens=300,  # -t: a guard only
            max_reconnects=10,
            reconnect_delay=0.1,
            max_retry_after=0.2,
        )
        assert wait_metric(first.metrics_url, "streaming_active_connections", users) >= users
        # its /health may be answered by A, so B may still be booting while A drains: requests then wait
        # in the shared socket's backlog, which is what socket activation is for
        second = start_gateway(MOCK_TOKENS_PER_SECOND=1000, MOCK_FIRST_TOKEN_MS=5, WEB_CONCURRENCY=1)
        assert first.stop() == 0, first.log()  # SIGTERM: drained and exited; only B answers from here on
        for endpoint in ("/stream", "/v1/chat/completions", "/ws"):  # users reconnected and finished on B
            done = wait_metric(second.metrics_url, "streaming_stream_outcomes_total", 1, route=endpoint, outcome="done")
            assert done >= 1
        proc.terminate()  # Locust stops its users (aborted), writes the summary and exits
        run = finish_locust(proc, tmp_path, 0)
        assert second.proc.poll() is None
    finally:
        shared.close()

    assert run.returncode == 0, run.output
    summary = run.summary
    assert_consistent(summary)
    assert summary["graceful"] >= users, summary  # every stream A carried ended gracefully ...
    assert summary["reconnects"] >= users  # ... and its user reconnected
    assert summary["completed"] >= 3  # on B
    assert (summary["truncated"], summary["errors"]) == (0, 0), summary
    # the local store cannot hand a stream over: a plain server_shutdown is a new request, not a resume
    assert (summary["resumed"], summary["not_resumable"]) == (0, 0), summary
    # a reconnect that reached A while it drained was refused (503 on HTTP, 1012 before `status` on /ws)
    drained = {"graceful:server_shutdown", "refused:503:draining", "refused:1012:draining"}
    assert set(summary["by_reason"]) <= drained, summary["by_reason"]


# --- the stream checks, on bodies the gateway's own encoders produce -----------------------------------


def seed_body(tokens: list[str], end: bytes) -> bytes:
    encoder = SeedEncoder()
    return encoder.opening() + encoder.tokens(tokens) + end


def chat_body(tokens: list[str], end: bytes, *, include_usage: bool = True) -> bytes:
    encoder = ChatChunkEncoder(completion_id="chatcmpl-1", model="m", created=0, include_usage=include_usage)
    return encoder.opening() + encoder.tokens(tokens) + end


def chat_done(n: int, *, include_usage: bool = True, usage: Usage | None = None) -> bytes:
    encoder = ChatChunkEncoder(completion_id="chatcmpl-1", model="m", created=0, include_usage=include_usage)
    return encoder.done(n, "length", usage)


def sse_check(body: bytes, check: sc.SeedCheck | sc.ChatCheck, *, lost: bool = False) -> sc.Verdict:
    decoder = sc.SSEDecoder()
    tokens = 0
    for line in body.splitlines(keepends=True):
        data = decoder.feed_line(line)
        if data is not None:
            tokens += check.feed(data)
    if isinstance(check, sc.SeedCheck):
        assert tokens == check.tokens
        return check.sse_verdict(connection_lost=lost)
    assert tokens == check.content_chunks
    return check.verdict(connection_lost=lost)


TOKENS = ["Hello ", "wörld ", "🚀 ", '"quoted"\n']


@pytest.mark.parametrize(
    ("body", "lost", "expected"),
    [
        (seed_body(TOKENS, SeedEncoder().done(4, "length", None)), False, ("completed", "completed")),
        (seed_body(TOKENS, b""), False, ("truncated", "ended without done")),
        (seed_body(TOKENS, b""), True, ("truncated", "connection lost before done")),
        (
            seed_body(TOKENS[:3], SeedEncoder().done(4, "length", None)),
            False,
            ("truncated", "fewer token events than done.tokens"),
        ),
        (
            seed_body(TOKENS, b'data: {"type": "done", "tokens": 4}\n'),
            True,
            ("truncated", "connection lost before done"),
        ),
        (seed_body(TOKENS, SeedEncoder().error(ShutdownError("draining"))), False, ("graceful", "server_shutdown")),
        (
            seed_body(TOKENS, SeedEncoder().error(StreamTimeoutError("inter-token", 1))),
            False,
            ("error", "error event timeout"),
        ),
        (
            seed_body(TOKENS, b": ping\n\n" + SeedEncoder().done(4, "length", None)).replace(b"\n", b"\r\n"),
            False,
            ("completed", "completed"),
        ),
    ],
    ids=["done", "no-done", "reset", "fewer-tokens", "cut-inside-done", "server-shutdown", "error", "crlf-ping"],
)
def test_seed_check_sse(body: bytes, lost: bool, expected: tuple[str, str]) -> None:
    verdict = sse_check(body, sc.SeedCheck(), lost=lost)
    assert (verdict.kind, verdict.detail or verdict.name) == expected


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (chat_body(TOKENS, chat_done(4)), ("completed", "completed")),
        (chat_body(TOKENS, chat_done(4, include_usage=False), include_usage=False), ("completed", "completed")),
        (chat_body(TOKENS, chat_done(4).replace(b"data: [DONE]\n\n", b"")), ("truncated", "ended without [DONE]")),
        (
            chat_body(TOKENS[:2], chat_done(2, usage=Usage(7, 4))),
            ("truncated", "fewer content chunks than usage.completion_tokens"),
        ),
        (chat_body(TOKENS, b"data: [DONE]\n\n"), ("truncated", "[DONE] without a finish_reason")),
        (chat_body(TOKENS, ShutdownError("draining").openai_chunk_bytes()), ("graceful", "server_shutdown")),
        (chat_body(TOKENS, UpstreamError("gone").openai_chunk_bytes()), ("error", "error chunk upstream_error")),
    ],
    ids=["done", "no-usage", "no-done", "fewer-chunks", "no-finish-reason", "server-shutdown", "error"],
)
def test_chat_check(body: bytes, expected: tuple[str, str]) -> None:
    verdict = sse_check(body, sc.ChatCheck())
    assert (verdict.kind, verdict.detail or verdict.name) == expected


STATUS = json.dumps({"type": "status", "message": "Generating..."})
TOKEN = json.dumps({"type": "token", "content": "x "})
DONE2 = json.dumps({"type": "done", "tokens": 2})


@pytest.mark.parametrize(
    ("frames", "close_code", "expected"),
    [
        ([STATUS, TOKEN, TOKEN, DONE2], 1000, "completed"),
        ([STATUS, TOKEN, TOKEN, DONE2], None, "truncated"),  # no close frame after done
        ([STATUS, TOKEN, TOKEN], 1000, "truncated"),
        ([STATUS, TOKEN, TOKEN], None, "truncated"),
        ([STATUS, TOKEN, DONE2], 1000, "truncated"),  # fewer tokens than done.tokens
        ([STATUS, TOKEN, json.dumps({"type": "server_shutdown"})], 1012, "graceful:server_shutdown"),
        ([STATUS, TOKEN], 1012, "graceful:server_shutdown"),
        ([json.dumps(RateLimitedError(3, {}).sse_event())], 1013, "refused:1013:rate_limited"),
        ([json.dumps({"type": "error", "code": "draining", "message": "m"})], 1012, "refused:1012:draining"),
        ([STATUS, TOKEN, json.dumps(StreamTimeoutError("total", 1).sse_event())], 1011, "error:timeout"),
    ],
)
def test_seed_check_websocket(frames: list[str], close_code: int | None, expected: str) -> None:
    check = sc.SeedCheck()
    for frame in frames:
        check.feed(frame)
    assert check.ws_verdict(close_code).name == expected


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (429, RateLimitedError(2, {}).detail_body(), "refused:429:rate_limited"),
        (
            503,
            {"error": {"message": "m", "type": "server_error", "param": None, "code": "draining"}},
            "refused:503:draining",
        ),
        (503, ShutdownError("m").detail_body(), "graceful:server_shutdown"),
        (502, UpstreamError("m").openai_body(), "error:http_502:upstream_error"),
        (500, "not json", "error:http_500:unknown"),
    ],
)
def test_classify_status(status: int, body: Any, expected: str) -> None:
    raw = body if isinstance(body, str) else json.dumps(body)
    assert sc.classify_status(status, raw.encode()).name == expected


@settings(deadline=None)
@given(
    payloads=st.lists(
        st.text(st.characters(exclude_characters="\r\n", exclude_categories=["Cs"]), max_size=20), max_size=8
    ),
    eol=st.sampled_from(["\n", "\r\n"]),
    pings=st.booleans(),
)
def test_sse_decoder_returns_every_event_whole(payloads: list[str], eol: str, pings: bool) -> None:
    body = "".join((f": ping{eol}{eol}" if pings else "") + f"data: {p}{eol}{eol}" for p in payloads).encode()
    decoder = sc.SSEDecoder()
    seen = [data for line in body.splitlines(keepends=True) if (data := decoder.feed_line(line)) is not None]
    assert seen == payloads


def test_tally_merges_worker_reports_into_one_summary(tmp_path: Path) -> None:
    master, worker = sc.Tally(), sc.Tally()
    for tally in (master, worker):
        tally.started("/stream")
        tally.record("/stream", sc.completed())
        tally.started("/ws")
        tally.record("/ws", sc.truncated("close 1000 without done"))
    worker.started("/stream")
    worker.record("/stream", sc.refused(429, "rate_limited"))
    master.merge(worker.take())
    assert worker.summary()["started"] == 0  # taken: the next report starts from zero
    summary = master.summary()
    assert {k: summary[k] for k in sc.SUMMARY_KEYS} == {
        "started": 5,
        "completed": 2,
        "graceful": 0,
        "truncated": 2,
        "refused": 1,
        "errors": 0,
        "aborted": 0,
    }
    assert summary["in_flight"] == 0
    assert summary["ok"] is False
    assert summary["by_reason"] == {"refused:429:rate_limited": 1, "truncated": 2}
    assert summary["by_endpoint"]["/ws"]["truncated"] == 2
    path = tmp_path / "out" / "summary.json"
    sc.write_summary(str(path), summary)
    assert json.loads(path.read_text()) == summary
    assert path.read_text().count("\n") == 1 and list(path.parent.iterdir()) == [path]


# --- load shapes ----------------------------------------------------------------------------------


def plan(**env: str) -> list[shapes.Stage]:
    picked = shapes.plan_from_env({f"LOCUST_{k.upper()}": v for k, v in env.items()})
    assert picked is not None and picked[0] == env["shape"].lower()
    return picked[1]


def test_shapes_from_env() -> None:
    assert shapes.plan_from_env({}) is None
    ramp = plan(shape="ramp", ramp_users="20", ramp_seconds="10", ramp_hold_seconds="5")
    assert [shapes.tick(ramp, t) for t in (0, 14.9, 15)] == [(20, 2.0), (20, 2.0), None]

    spike = plan(
        shape="spike",
        spike_base_users="5",
        spike_users="50",
        spike_at_seconds="10",
        spike_seconds="5",
        spike_spawn_rate="25",
        spike_total_seconds="20",
    )
    assert [shapes.tick(spike, t) for t in (0, 10, 14.9, 15, 19.9, 20)] == [
        (5, 25),
        (50, 25),
        (50, 25),
        (5, 25),
        (5, 25),
        None,
    ]

    soak = plan(shape="SOAK", soak_users="30")  # defaults: 60 s ramp, 3600 s hold
    assert shapes.tick(soak, 3659) == (30, 0.5) and shapes.tick(soak, 3660) is None

    with pytest.raises(ValueError, match="LOCUST_SHAPE='wave'"):
        shapes.plan_from_env({"LOCUST_SHAPE": "wave"})
    with pytest.raises(ValueError, match="LOCUST_SPIKE_TOTAL_SECONDS"):
        plan(shape="spike", spike_total_seconds="10")
    with pytest.raises(ValueError, match="LOCUST_RAMP_USERS='many' is not a number"):
        plan(shape="ramp", ramp_users="many")


def test_locustfile_shape_is_picked_by_env(tmp_path: Path) -> None:
    """With LOCUST_SHAPE set, Locust runs the shape's stages (and stops itself) instead of -u/-r/-t."""
    env = locust_env(
        tmp_path / "summary.json",
        shape="ramp",
        ramp_users=2,
        ramp_seconds=0.5,
        ramp_hold_seconds=0.5,
        weight_ws=0,
        weight_chat=0,
    )
    require("load", "locust", "websocket")
    with refused_port() as port:  # held bound, never listening: every connection is refused
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "locust",
                "-f",
                str(LOCUSTFILE),
                "--headless",
                "--host",
                f"http://127.0.0.1:{port}",
                "--only-summary",
            ],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=GUARD_S,
        )
    assert "Shape test updating to 2 users at 4.00 spawn rate" in result.stderr, result.stderr
    assert "Shape test stopping" in result.stderr, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["by_endpoint"]) <= {"/stream"}  # weights 0 leave the other protocols out
    assert summary["errors"] == summary["started"] - summary["aborted"] > 0  # a refused port
    assert result.returncode == 1  # errors fail the run
