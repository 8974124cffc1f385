"""`X-Request-ID` against the real gateway: a client's id is echoed and logged when it is short and safe;
a too long or unsafe one is replaced by a generated id (never truncated, never written to the logs);
a request without one gets a fresh generated id."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from loadtest.harness.wait import eventually
from tests.conftest import Gateway, GatewayFactory

GENERATED = re.compile(r"^[0-9a-f]{16}$")  # what the gateway makes up: 8 random bytes in hex
SAFE_ID = "req-42.alpha:beta/gamma+delta=eps@zeta_" + "x" * 89  # every allowed character class, 128 chars


@pytest.fixture(scope="module")
def gateway(mock_gateway: Gateway) -> Gateway:
    return mock_gateway


def stream_request_id(gateway: Gateway, **headers: str | bytes) -> str:
    raw = [
        (name.encode("ascii"), value.encode("ascii") if isinstance(value, str) else value)  # as httpx encodes
        for name, value in headers.items()
    ]
    response = httpx.post(
        gateway.url + "/stream", json={"prompt": "request ids", "max_tokens": 2}, headers=raw, timeout=30
    )
    assert response.status_code == 200, response.text
    return response.headers["x-request-id"]


def test_a_safe_client_id_is_echoed(gateway: Gateway) -> None:
    assert len(SAFE_ID) == 128
    assert stream_request_id(gateway, **{"X-Request-ID": SAFE_ID}) == SAFE_ID
    assert httpx.get(gateway.url + "/health", headers={"X-Request-ID": "ops-1"}).headers["x-request-id"] == "ops-1"


@pytest.mark.parametrize(
    "bad",
    ["x" * 129, "two words", 'quote"d', "semi;colon", "tab\there", "ünïcode"],
    ids=["too-long", "space", "quote", "semicolon", "tab", "non-ascii"],
)
def test_a_long_or_unsafe_id_is_replaced_not_cut(gateway: Gateway, bad: str) -> None:
    got = stream_request_id(gateway, **{"X-Request-ID": bad.encode()})  # raw UTF-8 bytes on the wire
    assert GENERATED.match(got), got
    assert got not in bad  # replaced whole: a truncated prefix would let two clients collide


def test_without_an_id_each_request_gets_its_own(gateway: Gateway) -> None:
    ids = {stream_request_id(gateway) for _ in range(3)}
    assert len(ids) == 3 and all(GENERATED.match(i) for i in ids), ids
    health = httpx.get(gateway.url + "/health").headers["x-request-id"]
    assert GENERATED.match(health) and health not in ids


def test_the_stream_log_line_carries_the_id_and_never_an_unsafe_one(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(LOG_LEVEL="info", MOCK_FIRST_TOKEN_MS=5, MOCK_TOKENS_PER_SECOND=0)
    assert stream_request_id(gateway, **{"X-Request-ID": "trace-me-7"}) == "trace-me-7"
    generated = stream_request_id(gateway, **{"X-Request-ID": 'inject"} forged'})

    def finished() -> dict[str, dict[str, object]]:
        lines = [json.loads(line) for line in gateway.log().splitlines() if line.startswith("{")]
        return {str(e["request_id"]): e for e in lines if e.get("message") == "stream finished"}

    assert eventually(lambda: {"trace-me-7", generated} <= finished().keys(), timeout=30), gateway.log()
    assert finished()["trace-me-7"]["outcome"] == "done"
    assert "forged" not in gateway.log()
