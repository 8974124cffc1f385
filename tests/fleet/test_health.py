"""A fleet's health against real processes: the gateway (gunicorn, 2 workers) and `loadtest/fake_openai.py` fakes.

An endpoint that refuses or resets is ejected at once for the whole instance, streams that had not started fail
over to another endpoint, the gateway answers "circuit open" only when every endpoint is out, the active probe
ejects and lets back, and the per-endpoint series are read from the instance's tables. Asserted on what the fakes
counted and what the gateway's /metrics says, never on times.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager

import httpx

from app.upstream.endpoint_metrics import endpoint_label
from loadtest.harness.wait import eventually, wait_until
from tests.conftest import Gateway, GatewayFactory
from tests.fleet.fakes import fake_fleet, fake_server, stream_chat
from tests.test_ready import ready_on_each_worker
from tests.test_upstream_protection import metric, samples
from tests.workers import only_worker, worker_pids

WAIT_S = 30.0  # guard only
CONCURRENT = 30
TOKENS = 20
BEFORE_KILL = 60  # streams finished before the kill: the load is flowing on every endpoint
AFTER_KILL = 60  # streams started after the kill and finished
ATTEMPTS = 40  # guard: streams sent until one met the dead endpoint (each does with probability 1/2)
OPEN_S = 6  # the open period of the "all dead" test: long enough to look at /ready before it half-opens

CHAT = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


def chat(gateway_url: str, client: httpx.Client, max_tokens: int = TOKENS) -> tuple[bool, int]:
    """One streamed /v1 chat completion: (completed without an error, tokens received)."""
    tokens = 0
    try:
        with client.stream(
            "POST", gateway_url + "/v1/chat/completions", json={**CHAT, "max_tokens": max_tokens}
        ) as response:
            if response.status_code != 200:
                response.read()
                return False, 0
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return True, tokens
                event = json.loads(line.removeprefix("data: "))
                if "error" in event:
                    return False, tokens
                tokens += sum(1 for choice in event.get("choices") or () if (choice.get("delta") or {}).get("content"))
    except httpx.HTTPError:
        return False, tokens
    return False, tokens


def refusing_socket(stack: ExitStack) -> tuple[socket.socket, str]:
    """A bound socket that does not listen (connections are refused until a fake takes it), and its base URL."""
    sock = stack.enter_context(socket.socket())
    sock.bind(("127.0.0.1", 0))
    return sock, f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def test_a_killed_endpoint_under_load_fails_no_stream_that_had_not_started(start_gateway: GatewayFactory) -> None:
    """SIGKILL one of three endpoints under 30 concurrent streams. Streams mid-flight on it may fail (continuing
    them is another part's job): each failed stream must have received tokens. Every other stream, being opened
    at the kill or started after it, completes; and afterwards the dead endpoint gets no attempt at all."""
    with fake_fleet(*[{"tokens_per_second": 50}] * 3) as fakes:
        survivors, victim = fakes[:2], fakes[2]
        gateway = start_gateway(UPSTREAM_URL=",".join(fake.url for fake in fakes), CIRCUIT_OPEN_SECONDS=600)
        results: list[tuple[bool, bool, int]] = []  # (started after the kill, completed, tokens received)
        killed = threading.Event()
        stop = threading.Event()

        def load(client: httpx.Client) -> None:
            while not stop.is_set():
                after = killed.is_set()
                results.append((after, *chat(gateway.url, client)))

        with (
            httpx.Client(timeout=WAIT_S, limits=httpx.Limits(max_connections=CONCURRENT)) as client,
            ThreadPoolExecutor(CONCURRENT) as pool,
        ):
            futures = [pool.submit(load, client) for _ in range(CONCURRENT)]
            try:
                wait_until(lambda: len(results) >= BEFORE_KILL, WAIT_S, "streams before the kill")
                wait_until(lambda: victim.stats()["active"] > 0, WAIT_S, "streams in flight on the victim")
                victim.proc.kill()
                victim.proc.wait()
                killed.set()
                wait_until(lambda: sum(after for after, _, _ in results) >= AFTER_KILL, WAIT_S, "streams after")
            finally:
                stop.set()
                for future in futures:
                    future.result()
        assert all(tokens > 0 for _, completed, tokens in results if not completed), "a stream failed unstarted"
        assert all(completed for after, completed, _ in results if after)
        assert all(fake.stats()["requests"] > 0 for fake in survivors)

        label = endpoint_label(victim.url)
        assert metric(gateway, "streaming_upstream_endpoint_circuit_state", upstream_endpoint=label) == 1
        assert metric(gateway, "streaming_upstream_endpoint_failures_total", upstream_endpoint=label) >= 1
        assert metric(gateway, "streaming_upstream_endpoints", state="unhealthy") == 1
        assert metric(gateway, "streaming_upstream_endpoints", state="healthy") == 2
        # from now on the dead endpoint is not even tried: no retry, no new failure, every stream on a survivor
        retries = metric(gateway, "streaming_upstream_retries_total")
        failures = metric(gateway, "streaming_upstream_endpoint_failures_total", upstream_endpoint=label)
        served = sum(fake.stats()["requests"] for fake in survivors)
        with httpx.Client(timeout=WAIT_S) as client:  # short streams: which endpoint each meets is the point
            assert all(chat(gateway.url, client, max_tokens=2)[0] for _ in range(20))
        assert sum(fake.stats()["requests"] for fake in survivors) == served + 20
        assert metric(gateway, "streaming_upstream_retries_total") == retries
        assert metric(gateway, "streaming_upstream_endpoint_failures_total", upstream_endpoint=label) == failures
        assert metric(gateway, "streaming_upstream_endpoint_active_streams", upstream_endpoint=label) == 0


def test_an_ejection_is_instance_wide(start_gateway: GatewayFactory) -> None:
    """One worker meets the refusing endpoint B (and fails over to A: the stream completes, counted as a retry);
    the other worker then never tries B: every one of its streams goes to A, with no retry."""
    with fake_server() as a, ExitStack() as stack:
        _, b_url = refusing_socket(stack)
        gateway = start_gateway(UPSTREAM_URL=f"{a.url},{b_url}", CIRCUIT_OPEN_SECONDS=600)
        first, second = worker_pids(gateway)
        with only_worker(gateway, first):
            with httpx.Client(timeout=WAIT_S) as client:
                for _ in range(ATTEMPTS):
                    assert chat(gateway.url, client)[0]
                    if metric(gateway, "streaming_upstream_retries_total"):
                        break
            assert metric(gateway, "streaming_upstream_retries_total", reason="connect") == 1
            b_label = endpoint_label(b_url)
            assert metric(gateway, "streaming_upstream_endpoint_circuit_state", upstream_endpoint=b_label) == 1
        served = a.stats()["requests"]
        with only_worker(gateway, second):
            with httpx.Client(timeout=WAIT_S) as client:
                assert all(chat(gateway.url, client)[0] for _ in range(20))
            assert metric(gateway, "streaming_upstream_retries_total") == 1  # the second worker never tried B
        assert a.stats()["requests"] == served + 20


def post_stream(client: httpx.Client, gateway: Gateway) -> httpx.Response:
    return client.post(gateway.url + "/stream", json={"prompt": "hi", "max_tokens": 4})


def test_all_endpoints_dead_answer_circuit_open_until_one_is_back(start_gateway: GatewayFactory) -> None:
    with ExitStack() as stack:
        (a_sock, a_url), (_, b_url) = refusing_socket(stack), refusing_socket(stack)
        gateway = start_gateway(
            UPSTREAM_URL=f"{a_url},{b_url}",
            READY_REQUIRES_CLOSED_CIRCUIT="true",
            CIRCUIT_OPEN_SECONDS=OPEN_S,
            RETRY_BASE_SECONDS=0.05,  # backoffs far shorter than the open period: once both are out, no wait
            RETRY_MAX_SECONDS=0.1,
        )
        with httpx.Client(timeout=WAIT_S) as client:
            first = post_stream(client, gateway)  # tries A and B (each ejected), then finds both open
            assert first.status_code == 503 and first.json()["code"] == "circuit_open", first.text
            refused = post_stream(client, gateway)  # refused at admission, no upstream tried
            assert refused.status_code == 503 and refused.json()["code"] == "circuit_open"
            assert int(refused.headers["retry-after"]) >= 1
            assert ready_on_each_worker(gateway) == [(503, "circuit_open")] * 2
            assert metric(gateway, "streaming_circuit_breaker_state") == 1
            assert metric(gateway, "streaming_upstream_endpoints", state="unhealthy") == 2
            with fake_server(sock=a_sock) as a:  # A comes back; B stays dead
                assert eventually(lambda: post_stream(client, gateway).status_code == 200, WAIT_S)
                assert a.stats()["completed"] >= 1
                assert eventually(lambda: ready_on_each_worker(gateway) == [(200, "ready")] * 2, WAIT_S)
                assert all(post_stream(client, gateway).status_code == 200 for _ in range(5))


def test_the_active_probe_ejects_and_lets_back(start_gateway: GatewayFactory) -> None:
    with fake_fleet({}, {}) as (a, b):
        gateway = start_gateway(
            UPSTREAM_URL=f"{a.url},{b.url}", UPSTREAM_PROBE_INTERVAL_SECONDS=0.2, CIRCUIT_OPEN_SECONDS=600
        )
        label = endpoint_label(a.url)
        assert eventually(lambda: a.stats()["health_checks"] >= 2, WAIT_S)  # probed (by each worker)
        a.set_healthy(False)
        assert eventually(
            lambda: metric(gateway, "streaming_upstream_endpoint_circuit_state", upstream_endpoint=label) == 1, WAIT_S
        )
        assert metric(gateway, "streaming_upstream_endpoint_failures_total", upstream_endpoint=label, reason="probe")
        checks = a.stats()["health_checks"]  # a passing probe answered before the switch lands before these
        assert eventually(lambda: a.stats()["health_checks"] >= checks + 4, WAIT_S)
        assert metric(gateway, "streaming_upstream_endpoint_circuit_state", upstream_endpoint=label) == 1
        served_a, served_b = a.stats()["requests"], b.stats()["requests"]
        with httpx.Client(timeout=WAIT_S) as client:
            assert all(stream_chat(gateway.url, 2, client).rstrip().endswith("[DONE]") for _ in range(20))
            assert (a.stats()["requests"], b.stats()["requests"]) == (served_a, served_b + 20)
            a.set_healthy(True)
            assert eventually(
                lambda: metric(gateway, "streaming_upstream_endpoint_circuit_state", upstream_endpoint=label) != 1,
                WAIT_S,
            )
            assert eventually(
                lambda: stream_chat(gateway.url, 2, client) and a.stats()["requests"] > served_a, WAIT_S, interval=0
            )
        assert a.stats()["completed"] > 0


@contextmanager
def open_streams(gateway: Gateway, n: int) -> Iterator[None]:
    """`n` long streams held open, each past its first token (so its worker may be frozen afterwards)."""
    readers = []  # a line iterator dropped would close its response: each is kept until the block ends
    with ExitStack() as stack:
        for _ in range(n):
            client = stack.enter_context(httpx.Client(timeout=WAIT_S))
            response = stack.enter_context(
                client.stream("POST", gateway.url + "/v1/chat/completions", json={**CHAT, "max_tokens": 1000})
            )
            readers.append(response.iter_lines())
            while '"content":"tok' not in next(readers[-1]).replace(" ", ""):
                pass
        yield


def test_endpoint_metrics_under_two_workers_with_the_label_cap(start_gateway: GatewayFactory) -> None:
    with fake_fleet(*[{"tokens_per_second": 5}] * 3) as fakes:
        gateway = start_gateway(UPSTREAM_URL=",".join(fake.url for fake in fakes), UPSTREAM_ENDPOINT_LABELS_MAX=2)
        by_label = {endpoint_label(fake.url): fake for fake in fakes}
        named = sorted(by_label)[:2]
        other = [fake for label, fake in by_label.items() if label not in named]

        def labels(name: str) -> set[str]:
            text = httpx.get(gateway.metrics_url + "/metrics", timeout=WAIT_S).text
            return {
                line.split('upstream_endpoint="')[1].split('"')[0]
                for line in text.splitlines()
                if line.startswith(name + "{")
            }

        assert labels("streaming_upstream_endpoint_active_streams") == {*named, "other"}
        assert labels("streaming_upstream_endpoint_circuit_state") == {*named, "other"}
        assert metric(gateway, "streaming_upstream_endpoints", state="healthy") == 3
        assert metric(gateway, "streaming_upstream_endpoints", state="unhealthy") == 0
        assert metric(gateway, "streaming_upstream_endpoints", state="not_ready") == 0
        assert metric(gateway, "streaming_upstream_endpoint_circuit_state") == 0
        first, second = worker_pids(gateway)
        with ExitStack() as stack:
            for worker in (first, second):  # three streams held by each worker
                with only_worker(gateway, worker):
                    stack.enter_context(open_streams(gateway, 3))
            active = samples(gateway, "streaming_upstream_endpoint_active_streams")
            assert sum(active) == 6  # each stream once, whichever worker holds it and answers the scrape
            for label in named:
                active_on = metric(gateway, "streaming_upstream_endpoint_active_streams", upstream_endpoint=label)
                assert active_on == by_label[label].stats()["active"]
            expected_other = sum(fake.stats()["active"] for fake in other)
            assert metric(gateway, "streaming_upstream_endpoint_active_streams", upstream_endpoint="other") == (
                expected_other
            )
        assert eventually(lambda: sum(samples(gateway, "streaming_upstream_endpoint_active_streams")) == 0, WAIT_S)


def test_a_hung_endpoint_is_cut_by_the_deadlines_and_counted_against_it(start_gateway: GatewayFactory) -> None:
    """Whichever endpoint takes the stream hangs: before its answer (first-token deadline, cut while opening),
    or after two tokens (inter-token deadline). The cut counts against that endpoint, and only that one."""
    with fake_fleet({}, {}) as fakes:
        gateway = start_gateway(
            UPSTREAM_URL=",".join(fake.url for fake in fakes),
            UPSTREAM_RETRIES=0,
            FIRST_TOKEN_TIMEOUT_SECONDS=0.5,
            INTER_TOKEN_TIMEOUT_SECONDS=0.5,
            CIRCUIT_FAILURE_THRESHOLD=1000,
        )
        expected = {endpoint_label(fake.url): 0 for fake in fakes}
        with httpx.Client(timeout=WAIT_S) as client:
            for hang in ({"headers_delay_ms": 60_000}, {"stall_after": 2}):
                for fake in fakes:
                    fake.reset()
                    fake.script(hang)
                assert not chat(gateway.url, client)[0]
                hung = [fake for fake in fakes if fake.stats()["requests"]]
                assert len(hung) == 1
                expected[endpoint_label(hung[0].url)] += 1
                for label, timeouts in expected.items():
                    assert (
                        metric(
                            gateway,
                            "streaming_upstream_endpoint_failures_total",
                            upstream_endpoint=label,
                            reason="timeout",
                        )
                        == timeouts
                    )


def test_a_full_connection_pool_ejects_no_endpoint(start_gateway: GatewayFactory) -> None:
    """The worker's own pool (UPSTREAM_MAX_CONNECTIONS) is taken by held streams: a stream that waits for a
    connection in vain is refused, and neither that wait nor the active probe (its own connections) counts against
    an endpoint: an overload must not eject a healthy fleet."""
    with fake_fleet({"tokens_per_second": 5}, {"tokens_per_second": 5}) as fakes:
        gateway = start_gateway(
            UPSTREAM_URL=",".join(fake.url for fake in fakes),
            WEB_CONCURRENCY=1,
            UPSTREAM_MAX_CONNECTIONS=2,
            UPSTREAM_CONNECT_TIMEOUT_SECONDS=0.3,
            UPSTREAM_PROBE_INTERVAL_SECONDS=0.2,
            UPSTREAM_RETRIES=0,
            CIRCUIT_OPEN_SECONDS=600,
        )
        with open_streams(gateway, 2), httpx.Client(timeout=WAIT_S) as client:
            assert sum(fake.stats()["active"] for fake in fakes) == 2  # the pool is full
            checks = sum(fake.stats()["health_checks"] for fake in fakes)
            assert chat(gateway.url, client) == (False, 0)  # no pooled connection came free in time
            assert eventually(lambda: sum(fake.stats()["health_checks"] for fake in fakes) >= checks + 4, WAIT_S)
            assert sum(fake.stats()["requests"] for fake in fakes) == 2  # the refused stream reached no endpoint
            assert metric(gateway, "streaming_upstream_endpoint_failures_total") == 0
            assert metric(gateway, "streaming_upstream_endpoints", state="healthy") == 2
        with httpx.Client(timeout=WAIT_S) as client:  # the held streams are gone: a stream goes through again
            assert eventually(lambda: chat(gateway.url, client, max_tokens=2)[0], WAIT_S)
