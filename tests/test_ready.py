"""`/ready` against the real gateway (gunicorn, 2 workers) and the fault-injecting fake upstream.

READY_REQUIRES_CLOSED_CIRCUIT=true: while the instance's breaker is open, `/ready` answers 503 on
every worker (the pod leaves the Service instead of answering 503s), `/health` stays 200; once the
open period ends it is ready again. Unset (the default), an open circuit leaves `/ready` at 200 while
streams get the fast 503.
"""

from __future__ import annotations

import httpx

from loadtest.harness.wait import eventually
from tests.conftest import FakeUpstream, Gateway, GatewayFactory
from tests.test_upstream_protection import metric
from tests.workers import only_worker, worker_pids

BREAKER = {"CIRCUIT_FAILURE_THRESHOLD": 1, "UPSTREAM_RETRIES": 0}


def trip(gateway: Gateway, fake: FakeUpstream, *, then_refused: bool = True) -> None:
    """One upstream 500 opens the breaker (threshold 1); the next stream is refused without the upstream."""
    fake.script({"status": 500})
    body = {"prompt": "trip", "max_tokens": 2}
    assert httpx.post(gateway.url + "/stream", json=body, timeout=30).status_code == 502
    if not then_refused:  # a short open period may end before a second request
        return
    refused = httpx.post(gateway.url + "/stream", json=body, timeout=30)
    assert refused.status_code == 503 and refused.json()["code"] == "circuit_open", refused.text
    assert fake.stats()["requests"] == 1


def ready_on_each_worker(gateway: Gateway) -> list[tuple[int, str]]:
    answers = []
    for pid in worker_pids(gateway):
        with only_worker(gateway, pid):
            response = httpx.get(gateway.url + "/ready", timeout=30)
            assert httpx.get(gateway.url + "/health", timeout=30).status_code == 200
        answers.append((response.status_code, response.json()["status"]))
    return answers


def test_ready_fails_on_every_worker_while_the_circuit_is_open(
    start_gateway: GatewayFactory, fake_upstream: FakeUpstream
) -> None:
    gateway = start_gateway(
        UPSTREAM_URL=fake_upstream.url, READY_REQUIRES_CLOSED_CIRCUIT="true", CIRCUIT_OPEN_SECONDS=600, **BREAKER
    )
    assert ready_on_each_worker(gateway) == [(200, "ready")] * 2
    trip(gateway, fake_upstream)
    assert ready_on_each_worker(gateway) == [(503, "circuit_open")] * 2
    assert metric(gateway, "streaming_circuit_breaker_state") == 1
    assert metric(gateway, "streaming_circuit_breaker_transitions_total", state="open") == 1


def test_ready_comes_back_when_the_open_period_ends(start_gateway: GatewayFactory, fake_upstream: FakeUpstream) -> None:
    gateway = start_gateway(
        UPSTREAM_URL=fake_upstream.url, READY_REQUIRES_CLOSED_CIRCUIT="true", CIRCUIT_OPEN_SECONDS=1, **BREAKER
    )
    trip(gateway, fake_upstream, then_refused=False)
    assert eventually(lambda: ready_on_each_worker(gateway) == [(200, "ready")] * 2, timeout=30)


def test_by_default_an_open_circuit_leaves_ready_alone(
    start_gateway: GatewayFactory, fake_upstream: FakeUpstream
) -> None:
    gateway = start_gateway(UPSTREAM_URL=fake_upstream.url, CIRCUIT_OPEN_SECONDS=600, **BREAKER)
    trip(gateway, fake_upstream)
    assert ready_on_each_worker(gateway) == [(200, "ready")] * 2
    assert metric(gateway, "streaming_circuit_breaker_state") == 1
