"""The whole admission order against the real gateway (gunicorn, 2 workers) and the fake upstream:

    draining ─► API key ─► client identity ─► rate limit ─► circuit ─► (body parsed) ─► connection slot

Each step refuses before the next is consulted, shown from both sides: a request that two steps would
refuse gets the earlier step's answer, and a refusal by a later step has already spent what the earlier
steps count (the rate limit's tokens). Every client is an API key here, so identity is the key; the rate
limit refills one request per ten minutes, so no token comes back during the test.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import ExitStack

import httpx

from loadtest.harness.wait import eventually
from tests.conftest import FakeUpstream, Gateway, GatewayFactory

BURST = 3
VALID = {"prompt": "admission order", "max_tokens": 3}
INVALID = {"prompt": 42}


def code(gateway: Gateway, key: str | None, body: object = VALID) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.post(gateway.url + "/stream", json=body, headers=headers, timeout=30)
    if response.status_code == 200:
        return 200, "stream"
    return response.status_code, str(response.json()["code"])


def hold_stream(stack: ExitStack, gateway: Gateway, key: str) -> Iterator[str]:
    """Open a stream the fake upstream stalls after one token, and keep it open (its slot taken).

    Keep the returned iterator: dropping it closes the connection (httpcore closes a stream whose
    iterator is closed), and the stream with it."""
    client = stack.enter_context(httpx.Client(timeout=30))
    response = stack.enter_context(
        client.stream("POST", gateway.url + "/stream", json=VALID, headers={"Authorization": f"Bearer {key}"})
    )
    assert response.status_code == 200
    lines: Iterator[str] = response.iter_lines()
    assert any('"type": "token"' in line for line in lines)
    return lines


def test_each_step_refuses_before_the_next(start_gateway: GatewayFactory, fake_upstream: FakeUpstream) -> None:
    gateway = start_gateway(
        UPSTREAM_URL=fake_upstream.url,
        API_KEYS="key-a,key-b,key-c",
        RATE_LIMIT_PER_MINUTE=0.1,
        RATE_LIMIT_BURST=BURST,
        MAX_CONNECTIONS_PER_CLIENT=1,
        CIRCUIT_FAILURE_THRESHOLD=1,
        CIRCUIT_OPEN_SECONDS=600,
        UPSTREAM_RETRIES=0,
        DRAIN_TIMEOUT_SECONDS=120,
    )
    fake_upstream.script({"stall_after": 1}, {"stall_after": 1}, {"status": 500})
    with ExitStack() as held:
        # key before identity and rate limit: more refusals than the burst, never a 429
        assert [code(gateway, None) for _ in range(BURST + 1)] == [(401, "missing_api_key")] * (BURST + 1)
        assert [code(gateway, "key-x") for _ in range(BURST + 1)] == [(403, "invalid_api_key")] * (BURST + 1)

        # key-c and key-a each hold their one slot (a token each spent)
        holding = [hold_stream(held, gateway, "key-c"), hold_stream(held, gateway, "key-a")]
        # parsing before the slot: an invalid body is a 422 although no slot is free; then the slot refuses
        assert code(gateway, "key-c", INVALID) == (422, "invalid_request")
        assert code(gateway, "key-c") == (503, "client_connection_limit")
        # identity before the rate limit: key-c's bucket is empty, key-b's (same address) is not
        assert code(gateway, "key-c") == (429, "rate_limited")
        assert code(gateway, "key-b") == (502, "upstream_error")  # and its upstream 500 opens the circuit

        # the circuit before parsing and before the slot (key-a's one slot is taken)
        assert code(gateway, "key-a") == (503, "circuit_open")
        assert code(gateway, "key-a", INVALID) == (503, "circuit_open")
        # the rate limit before the circuit: those refusals spent key-a's last tokens
        assert code(gateway, "key-a") == (429, "rate_limited")
        assert code(gateway, "key-a", INVALID) == (429, "rate_limited")  # junk is rate limited too
        assert [code(gateway, "key-b") for _ in range(BURST - 1)] == [(503, "circuit_open")] * (BURST - 1)
        assert code(gateway, "key-b") == (429, "rate_limited")
        assert fake_upstream.stats()["requests"] == 3  # only the two held streams and key-b's first went upstream

        # draining before everything: the held streams keep the instance draining
        gateway.proc.send_signal(signal.SIGTERM)
        assert eventually(lambda: httpx.get(gateway.url + "/ready", timeout=30).status_code == 503, timeout=30)
        assert code(gateway, None) == (503, "draining")
        assert code(gateway, "key-x") == (503, "draining")
        assert code(gateway, "key-a") == (503, "draining")
        assert len(holding) == 2  # the held streams lived until here
