"""Upstream protection against the real gateway (gunicorn, 2 workers) and the fault-injecting fake upstream.

Retries happen only before the first token (connect errors, 429, 5xx; never another 4xx, never
after a token), deadlines end stalled streams with a `timeout` event, and the circuit breaker is
one breaker for the whole instance: failures counted on either worker open it, an open breaker
answers 503 without touching the upstream, half-open lets exactly one probe through, and two
probe successes close it. After every fault no slot is left behind (tests/slots.py).

Which worker serves a request is normally the kernel's choice. Where a test needs it to be a given
worker, it freezes the other one with SIGSTOP (tests/workers.py `only_worker`).
"""

from __future__ import annotations

import json
import re
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from loadtest.harness.ports import refused_port
from loadtest.harness.wait import eventually
from tests.conftest import SLOT_CAPS, FakeUpstream, Gateway, GatewayFactory, launch_gateway
from tests.slots import assert_slots_released
from tests.test_relay_upstream import (
    PROTOCOLS,
    assert_ended_with_upstream_error,
    assert_finished_ok,
    default_tokens,
    error_body,
    relay,
)
from tests.workers import only_worker, worker_pids

WAIT_S = 10.0  # guard only: how long a polled condition may take before the test fails
POLL_S = 0.02  # polling interval, not an assertion
# Every URL here is plain http; one TLS context for all clients spares each new client ~40 ms of CA loading.
TLS = ssl.create_default_context()

# --- helpers shared with tests/test_redis_limits.py ---------------------------------------------------------

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$", re.M)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def http_client(**kwargs: Any) -> httpx.Client:
    return httpx.Client(timeout=30, verify=TLS, **kwargs)


def samples(gateway: Gateway, name: str, **labels: str) -> list[float]:
    """Values of metric `name` whose labels include `labels`, from the instance-wide /metrics (all workers)."""
    with http_client() as client:
        text = client.get(gateway.metrics_url + "/metrics").text
    found = []
    for match in _SAMPLE.finditer(text):
        if match["name"] == name:
            got = dict(_LABEL.findall(match["labels"] or ""))
            if all(got.get(key) == value for key, value in labels.items()):
                found.append(float(match["value"]))
    return found


def metric(gateway: Gateway, name: str, **labels: str) -> float:
    """The sum of the matching samples (0 when none exists yet, as for a counter never incremented)."""
    return sum(samples(gateway, name, **labels))


def wait_metric(gateway: Gateway, name: str, expected: float, timeout: float = WAIT_S, **labels: str) -> float:
    """Poll until the metric equals `expected`; returns the last value read (assert on it)."""
    value = metric(gateway, name, **labels)
    deadline = time.monotonic() + timeout
    while value != expected and time.monotonic() < deadline:
        time.sleep(POLL_S)  # polling interval, not an assertion
        value = metric(gateway, name, **labels)
    return value


def post_stream(client: httpx.Client, gateway: Gateway, max_tokens: int = 4, **headers: str) -> httpx.Response:
    """POST /stream and read the whole answer (a stream to its end, or a plain error)."""
    return client.post(
        gateway.url + "/stream", json={"prompt": "protect me", "max_tokens": max_tokens}, headers=headers
    )


def events(response: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line[len("data: ") :]) for line in response.text.splitlines() if line.startswith("data: ")]


# --- retries and deadlines: one gateway with retries on and the breaker out of the way -------------------------


@pytest.fixture(scope="module")
def retry_gateway(fake_upstream_server: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = launch_gateway(
        {
            "UPSTREAM_URL": fake_upstream_server.url,
            "UPSTREAM_RETRIES": 2,
            "RETRY_BASE_SECONDS": 0.05,
            "RETRY_MAX_SECONDS": 0.2,
            "CIRCUIT_FAILURE_THRESHOLD": 1000,  # every test here is an upstream fault; the breaker has its own
            "FIRST_TOKEN_TIMEOUT_SECONDS": 1,
            "INTER_TOKEN_TIMEOUT_SECONDS": 1,
            "DEADLINE_CHECK_INTERVAL_SECONDS": 0.05,
            **SLOT_CAPS,
        },
        tmp_path_factory.mktemp("gateway") / "gateway.log",
    )
    yield gateway
    gateway.stop()


def retries(gateway: Gateway, reason: str | None = None) -> float:
    """streaming_upstream_retries_total, for one reason or all (a counter: tests compare before and after)."""
    labels = {"reason": reason} if reason else {}
    return metric(gateway, "streaming_upstream_retries_total", **labels)


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections for the whole test (held bound, never listening)."""
    with refused_port() as port:
        yield port


def test_connection_refused_is_retried_twice_then_502(start_gateway: GatewayFactory, closed_port: int) -> None:
    gateway = start_gateway(
        UPSTREAM_URL=f"http://127.0.0.1:{closed_port}/v1",
        UPSTREAM_RETRIES=2,
        RETRY_BASE_SECONDS=0.05,
        RETRY_MAX_SECONDS=0.2,
        CIRCUIT_FAILURE_THRESHOLD=1000,
        **SLOT_CAPS,
    )
    relayed = relay(gateway, "/stream")
    assert relayed.status == 502
    error = error_body(relayed, "/stream")
    assert error["code"] == "upstream_error"
    assert "could not be reached" in error["message"]
    # 3 attempts = the first + 2 retries; a refused port cannot count them, the gateway's counter can
    assert retries(gateway, "connect") == 2
    assert retries(gateway) == 2
    assert_slots_released(gateway, take_cap=False)  # nothing listens upstream: no stream could hold a slot


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_5xx_once_then_success_is_retried(retry_gateway: Gateway, fake_upstream: FakeUpstream, protocol: str) -> None:
    before = retries(retry_gateway, "server")
    fake_upstream.script({"status": 500})
    relayed = relay(retry_gateway, protocol, max_tokens=6)
    assert relayed.tokens == default_tokens(6)
    assert_finished_ok(relayed, protocol, 6)
    assert fake_upstream.stats()["requests"] == 2
    assert retries(retry_gateway, "server") - before == 1
    assert_slots_released(retry_gateway)


def test_5xx_every_time_gives_up_after_two_retries(retry_gateway: Gateway, fake_upstream: FakeUpstream) -> None:
    before = retries(retry_gateway, "server")
    fake_upstream.script(*[{"status": 503, "message": "overloaded"}] * 5)
    relayed = relay(retry_gateway, "/stream")
    assert relayed.status == 502
    assert error_body(relayed, "/stream")["code"] == "upstream_error"
    assert fake_upstream.stats()["requests"] == 3  # the first attempt and exactly 2 retries
    assert retries(retry_gateway, "server") - before == 2
    fake_upstream.reset()  # the two faults left unused would refuse the slot check's streams
    assert_slots_released(retry_gateway)


def test_429_with_retry_after_is_retried(retry_gateway: Gateway, fake_upstream: FakeUpstream) -> None:
    before = retries(retry_gateway, "rate_limited")
    fake_upstream.script({"status": 429, "retry_after": 0, "message": "slow down"})
    relayed = relay(retry_gateway, "/stream", max_tokens=5)
    assert relayed.tokens == default_tokens(5)
    assert_finished_ok(relayed, "/stream", 5)
    assert fake_upstream.stats()["requests"] == 2
    assert retries(retry_gateway, "rate_limited") - before == 1
    assert_slots_released(retry_gateway)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_400_is_never_retried(retry_gateway: Gateway, fake_upstream: FakeUpstream, protocol: str) -> None:
    before = retries(retry_gateway)
    fake_upstream.script(*[{"status": 400, "message": "context length exceeded"}] * 3)
    relayed = relay(retry_gateway, protocol)
    assert relayed.status == 400
    assert error_body(relayed, protocol)["code"] == "upstream_rejected"
    assert fake_upstream.stats()["requests"] == 1
    assert retries(retry_gateway) == before
    fake_upstream.reset()  # the two faults left unused would refuse the slot check's streams
    assert_slots_released(retry_gateway)


@pytest.mark.parametrize("fault", [{"reset_after": 2}, {"error_after": 2}], ids=["reset", "error_chunk"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_failure_after_the_first_token_is_not_retried(
    retry_gateway: Gateway, fake_upstream: FakeUpstream, protocol: str, fault: dict[str, Any]
) -> None:
    before = retries(retry_gateway)
    fake_upstream.script(fault, *[{}] * 3)  # a retry would find a healthy upstream and replay the answer
    relayed = relay(retry_gateway, protocol, max_tokens=10)
    assert relayed.tokens == default_tokens(2)
    assert_ended_with_upstream_error(relayed, protocol)
    assert fake_upstream.stats()["requests"] == 1
    assert retries(retry_gateway) == before
    assert_slots_released(retry_gateway)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_reset_before_the_first_token_is_retried_transparently(
    retry_gateway: Gateway, fake_upstream: FakeUpstream, protocol: str
) -> None:
    before = retries(retry_gateway, "connect")
    fake_upstream.script({"reset_after": 0})  # headers and the role chunk went out, no token did
    relayed = relay(retry_gateway, protocol, max_tokens=8)
    assert relayed.tokens == default_tokens(8)  # once each: nothing of the broken attempt reached the client
    assert_finished_ok(relayed, protocol, 8)
    assert fake_upstream.stats()["requests"] == 2
    assert retries(retry_gateway, "connect") - before == 1
    assert_slots_released(retry_gateway)


def test_stall_before_the_first_token_times_out(retry_gateway: Gateway, fake_upstream: FakeUpstream) -> None:
    before = retries(retry_gateway)
    fake_upstream.script({"first_token_ms": 60_000})
    relayed = relay(retry_gateway, "/stream", max_tokens=10)
    assert relayed.status == 200
    assert [e["type"] for e in relayed.events] == ["status", "error"]
    assert relayed.final == {"type": "error", "code": "timeout", "message": "first token deadline of 1s exceeded"}
    stats = fake_upstream.wait_for(lambda s: s["disconnects"] == 1)
    assert stats["disconnects"] == 1  # the stalled upstream request was closed
    assert stats["requests"] == 1  # a spent deadline is not retried
    assert retries(retry_gateway) == before
    assert_slots_released(retry_gateway)


def test_stall_mid_stream_times_out(retry_gateway: Gateway, fake_upstream: FakeUpstream) -> None:
    fake_upstream.script({"stall_after": 3})
    relayed = relay(retry_gateway, "/stream", max_tokens=10)
    assert relayed.tokens == default_tokens(3)
    assert relayed.final == {"type": "error", "code": "timeout", "message": "inter-token deadline of 1s exceeded"}
    stats = fake_upstream.wait_for(lambda s: s["disconnects"] == 1)
    assert stats["disconnects"] == 1
    assert stats["requests"] == 1
    assert_slots_released(retry_gateway)


def test_slow_trickle_is_not_a_stall(retry_gateway: Gateway, fake_upstream: FakeUpstream) -> None:
    fake_upstream.script({"tokens_per_second": 4})  # a token every 250 ms, under the 1 s inter-token deadline
    relayed = relay(retry_gateway, "/stream", max_tokens=6)
    assert relayed.tokens == default_tokens(6)
    assert_finished_ok(relayed, "/stream", 6)
    assert fake_upstream.stats()["requests"] == 1
    assert_slots_released(retry_gateway)


# --- the circuit breaker ----------------------------------------------------------------------------------


def breaker_state(gateway: Gateway) -> float:
    return metric(gateway, "streaming_circuit_breaker_state", upstream="127.0.0.1")


def wait_breaker_state(gateway: Gateway, expected: int) -> float:
    return wait_metric(gateway, "streaming_circuit_breaker_state", expected, upstream="127.0.0.1")


def close_breaker(gateway: Gateway) -> None:
    """Successful probes (the fake upstream answers again) until the breaker is closed: the slot check
    that ends a test needs every stream admitted."""
    assert eventually(lambda: breaker_state(gateway) != 1)  # the open period passes
    with http_client() as client:
        for _ in range(10):  # CIRCUIT_SUCCESS_THRESHOLD probes, one after another
            if breaker_state(gateway) == 0:
                break
            response = post_stream(client, gateway)
            assert response.status_code == 200 and events(response)[-1]["type"] == "done", response.text
    assert breaker_state(gateway) == 0


def assert_circuit_open_refusal(response: httpx.Response) -> None:
    assert response.status_code == 503
    assert response.json()["code"] == "circuit_open"
    assert int(response.headers["retry-after"]) >= 1


def test_breaker_opens_refuses_fast_probes_once_and_closes(
    start_gateway: GatewayFactory, fake_upstream: FakeUpstream
) -> None:
    gateway = start_gateway(
        UPSTREAM_URL=fake_upstream.url,
        UPSTREAM_RETRIES=0,
        CIRCUIT_FAILURE_THRESHOLD=3,
        CIRCUIT_OPEN_SECONDS=2,
        CIRCUIT_SUCCESS_THRESHOLD=2,
        **SLOT_CAPS,
        CIRCUIT_MAX_FAILURES_PER_CLIENT=3,  # one test client plays every client here (tests/security: the cap)
    )
    first, second = worker_pids(gateway)
    assert breaker_state(gateway) == 0

    # Closed: three upstream 500s open it, counted on two different workers (one breaker per instance).
    fake_upstream.script(*[{"status": 500}] * 3)
    with only_worker(gateway, first), http_client() as client:
        assert [post_stream(client, gateway).status_code for _ in range(2)] == [502, 502]
        assert breaker_state(gateway) == 0  # 2 of 3
    with only_worker(gateway, second), http_client() as client:
        assert post_stream(client, gateway).status_code == 502
        assert breaker_state(gateway) == 1
    assert fake_upstream.stats()["requests"] == 3

    # Open: every worker refuses at admission, fast, and the upstream sees nothing.
    refused_before = metric(gateway, "streaming_rejections_total", route="/stream", reason="circuit_open")
    for pid in (first, second):
        with only_worker(gateway, pid), http_client() as client:
            for _ in range(2):
                assert_circuit_open_refusal(post_stream(client, gateway))
    assert fake_upstream.stats()["requests"] == 3
    refused = metric(gateway, "streaming_rejections_total", route="/stream", reason="circuit_open")
    assert refused - refused_before == 4

    # Half-open (the open period passed; the gauge is read at scrape time): exactly one probe at a time.
    fake_upstream.script({"first_token_ms": 1500})  # the probe holds its first token while the others arrive
    assert wait_breaker_state(gateway, 2) == 2
    assert fake_upstream.stats()["requests"] == 3
    concurrent = 5
    barrier = threading.Barrier(concurrent)
    responses: list[httpx.Response] = []

    def send() -> None:
        with http_client() as client:
            barrier.wait()
            responses.append(post_stream(client, gateway))

    threads = [threading.Thread(target=send) for _ in range(concurrent)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] + [503] * (concurrent - 1)
    for response in responses:
        if response.status_code == 503:
            assert_circuit_open_refusal(response)
        else:
            assert events(response)[-1] == {"type": "done", "tokens": 4}
    assert fake_upstream.stats()["requests"] == 4  # exactly one reached the upstream

    # One success of two: still half-open. The second probe closes it, and traffic flows.
    assert breaker_state(gateway) == 2
    with http_client() as client:
        response = post_stream(client, gateway)
        assert response.status_code == 200 and events(response)[-1]["type"] == "done"
        assert wait_breaker_state(gateway, 0) == 0
        for _ in range(4):
            response = post_stream(client, gateway)
            assert response.status_code == 200 and events(response)[-1] == {"type": "done", "tokens": 4}
    assert fake_upstream.stats()["requests"] == 9
    assert_slots_released(gateway)


def test_mid_stream_failures_open_it_and_a_failed_probe_reopens(
    start_gateway: GatewayFactory, fake_upstream: FakeUpstream
) -> None:
    gateway = start_gateway(
        UPSTREAM_RETRIES=0,
        UPSTREAM_URL=fake_upstream.url,
        CIRCUIT_FAILURE_THRESHOLD=3,
        CIRCUIT_OPEN_SECONDS=2,
        INTER_TOKEN_TIMEOUT_SECONDS=1,
        DEADLINE_CHECK_INTERVAL_SECONDS=0.05,
        **SLOT_CAPS,
    )
    # Streams that broke after their first token: a reset, an error chunk, a stall. Each counts once.
    fake_upstream.script({"reset_after": 2}, {"error_after": 2}, {"stall_after": 2}, {"status": 500})
    with http_client() as client:
        for expected in ("upstream_error", "upstream_error", "timeout"):
            assert breaker_state(gateway) == 0
            response = post_stream(client, gateway, max_tokens=10)
            assert response.status_code == 200
            assert [e["type"] for e in events(response)][-3:] == ["token", "token", "error"]
            assert events(response)[-1]["code"] == expected
        assert wait_breaker_state(gateway, 1) == 1
        assert_circuit_open_refusal(post_stream(client, gateway))
        assert fake_upstream.stats()["requests"] == 3
        # Half-open: the probe gets a 500, and the breaker opens again for another period.
        assert wait_breaker_state(gateway, 2) == 2
        assert post_stream(client, gateway).status_code == 502
        assert breaker_state(gateway) == 1
        assert_circuit_open_refusal(post_stream(client, gateway))
    assert fake_upstream.stats()["requests"] == 4
    close_breaker(gateway)
    assert_slots_released(gateway)


def test_an_upstream_withholding_its_answer_counts_against_the_breaker(
    start_gateway: GatewayFactory, fake_upstream: FakeUpstream
) -> None:
    """No response headers before the first-token deadline: as much an upstream failure as a stall mid-stream."""
    gateway = start_gateway(
        UPSTREAM_RETRIES=0,
        UPSTREAM_URL=fake_upstream.url,
        CIRCUIT_FAILURE_THRESHOLD=2,
        CIRCUIT_OPEN_SECONDS=2,
        FIRST_TOKEN_TIMEOUT_SECONDS=0.5,
        DEADLINE_CHECK_INTERVAL_SECONDS=0.05,
        **SLOT_CAPS,
    )
    fake_upstream.script(*[{"headers_delay_ms": 60_000}] * 3)
    with http_client() as client:
        for _ in range(2):
            assert breaker_state(gateway) == 0
            response = post_stream(client, gateway)
            assert response.status_code == 504, response.text  # nothing was sent yet: a plain HTTP answer
            assert response.json()["code"] == "timeout"
            assert "first token" in response.json()["detail"]
        assert breaker_state(gateway) == 1
        assert_circuit_open_refusal(post_stream(client, gateway))
        # Half-open: the probe is held the same way; its failure opens the breaker again.
        assert wait_breaker_state(gateway, 2) == 2
        assert post_stream(client, gateway).status_code == 504
        assert breaker_state(gateway) == 1
        assert_circuit_open_refusal(post_stream(client, gateway))
    stats = fake_upstream.wait_for(lambda s: s["disconnects"] == 3)
    assert stats["requests"] == 3 and stats["disconnects"] == 3  # every held request was closed
    close_breaker(gateway)
    assert_slots_released(gateway)


def test_half_open_refusal_is_an_admission_rejection(
    start_gateway: GatewayFactory, fake_upstream: FakeUpstream
) -> None:
    """Issue 4: every admission refusal comes before any slot is taken and counts as a rejection. With the
    probe out, a half-open breaker refuses like an open one, not as a stream that started and failed."""
    gateway = start_gateway(
        UPSTREAM_URL=fake_upstream.url,
        UPSTREAM_RETRIES=0,
        CIRCUIT_FAILURE_THRESHOLD=1,
        CIRCUIT_OPEN_SECONDS=1,
        **SLOT_CAPS,
    )
    fake_upstream.script({"status": 500}, {"first_token_ms": 1500})
    with http_client() as client:
        assert post_stream(client, gateway).status_code == 502
    assert wait_breaker_state(gateway, 2) == 2
    probe: list[httpx.Response] = []

    def send_probe() -> None:
        with http_client() as client:
            probe.append(post_stream(client, gateway))

    thread = threading.Thread(target=send_probe)
    thread.start()
    try:
        assert fake_upstream.wait_for(lambda s: s["requests"] == 2)["requests"] == 2  # the probe is upstream
        with http_client() as client:
            assert_circuit_open_refusal(post_stream(client, gateway))
    finally:
        thread.join()
    assert probe[0].status_code == 200
    assert fake_upstream.stats()["requests"] == 2
    assert metric(gateway, "streaming_rejections_total", route="/stream", reason="circuit_open") == 1
    assert metric(gateway, "streaming_errors_total", route="/stream", error_type="circuit_open") == 0
    close_breaker(gateway)
    assert_slots_released(gateway)
