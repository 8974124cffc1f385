"""One client cannot open the circuit for everyone; a dead upstream still opens it with one client calling.

The real gateway (2 workers, one shared breaker) with three API keys, so three client identities,
and the fake upstream, which answers a prompt holding `[[fail:NNN]]` with that status: a poisoned
prompt. CIRCUIT_FAILURE_THRESHOLD=3 and the default CIRCUIT_MAX_FAILURES_PER_CLIENT=2.
"""

from __future__ import annotations

import httpx
import pytest

from loadtest.harness.ports import refused_port
from tests.conftest import FakeUpstream, Gateway, GatewayFactory
from tests.test_upstream_protection import breaker_state

KEYS = ("key-a", "key-b", "key-c")
BREAKER = {
    "API_KEYS": ",".join(KEYS),
    "UPSTREAM_RETRIES": 0,
    "CIRCUIT_FAILURE_THRESHOLD": 3,
    "CIRCUIT_OPEN_SECONDS": 120,
    "CIRCUIT_WINDOW_SECONDS": 120,
}


@pytest.fixture
def gateway(start_gateway: GatewayFactory, fake_upstream: FakeUpstream) -> Gateway:
    return start_gateway(UPSTREAM_URL=fake_upstream.url, **BREAKER)


def stream(gateway: Gateway, key: str, prompt: str = "hello") -> httpx.Response:
    return httpx.post(
        gateway.url + "/stream",
        json={"prompt": prompt, "max_tokens": 3},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )


def v1(gateway: Gateway, key: str, prompt: str) -> httpx.Response:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}], "max_tokens": 3}
    return httpx.post(
        gateway.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )


def test_one_clients_poisoned_prompts_cannot_open_it_for_everyone(
    gateway: Gateway, fake_upstream: FakeUpstream
) -> None:
    for i in range(8):
        call = stream if i % 2 else v1
        assert call(gateway, "key-a", f"please [[fail:500]] #{i}").status_code == 502
    assert breaker_state(gateway) == 0
    assert fake_upstream.stats()["requests"] == 8  # every one reached the upstream: nothing was refused early
    ok = stream(gateway, "key-b")
    assert ok.status_code == 200 and '"type": "done"' in ok.text


def test_poisoned_streams_mid_way_count_per_client_too(gateway: Gateway, fake_upstream: FakeUpstream) -> None:
    fake_upstream.script(*[{"error_after": 1}] * 6)  # the model server sends an error event after a token
    for _ in range(6):
        response = stream(gateway, "key-a")
        assert response.status_code == 200 and '"code": "upstream_error"' in response.text
    assert breaker_state(gateway) == 0
    assert stream(gateway, "key-b").status_code == 200


def test_upstream_4xx_never_count(gateway: Gateway) -> None:
    for key in KEYS:
        for _ in range(3):
            assert stream(gateway, key, "too long [[fail:400]]").status_code == 400
    assert breaker_state(gateway) == 0


def test_failures_from_several_clients_still_open_it(gateway: Gateway, fake_upstream: FakeUpstream) -> None:
    """A model server failing everyone's requests is an upstream failure: the breaker opens."""
    assert v1(gateway, "key-a", "[[fail:503]]").status_code == 502
    assert v1(gateway, "key-a", "[[fail:503]]").status_code == 502
    assert breaker_state(gateway) == 0
    assert v1(gateway, "key-b", "[[fail:503]]").status_code == 502
    assert breaker_state(gateway) == 1
    refused = stream(gateway, "key-c")
    assert refused.status_code == 503 and refused.json()["code"] == "circuit_open"
    assert fake_upstream.stats()["requests"] == 3


def test_a_dead_upstream_opens_it_with_a_single_client(start_gateway: GatewayFactory) -> None:
    with refused_port() as port:
        gateway = start_gateway(UPSTREAM_URL=f"http://127.0.0.1:{port}/v1", **BREAKER)
        for _ in range(3):
            assert stream(gateway, "key-a").status_code == 502  # connection refused: no content causes that
        assert breaker_state(gateway) == 1
        refused = stream(gateway, "key-a")
        assert refused.status_code == 503 and refused.json()["code"] == "circuit_open"


def test_an_upstream_that_never_answers_opens_it_with_a_single_client(
    start_gateway: GatewayFactory, fake_upstream: FakeUpstream
) -> None:
    gateway = start_gateway(
        UPSTREAM_URL=fake_upstream.url, FIRST_TOKEN_TIMEOUT_SECONDS=0.5, DEADLINE_CHECK_INTERVAL_SECONDS=0.05, **BREAKER
    )
    fake_upstream.script(*[{"headers_delay_ms": 60_000}] * 3)
    for _ in range(3):
        response = stream(gateway, "key-a")
        assert response.status_code == 504 and response.json()["code"] == "timeout"
    assert breaker_state(gateway) == 1
