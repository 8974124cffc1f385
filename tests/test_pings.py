"""SSE_PING_INTERVAL_SECONDS against the real gateway: an idle stream gets `: ping` comments, before
its first token as well as between tokens, on `/stream` and `/v1`; a client that reads only `data:`
lines never sees them.

Every wait is a read: the test reads lines until the pings it expects arrive. The client's read
timeout is the guard: it is far above the 0.2 s interval set here and below the 15 s default, so
a gateway that ignored the setting (or pinged only after the first token) fails the test.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import FakeUpstream, Gateway, GatewayFactory, launch_gateway
from tests.test_relay_upstream import V1, default_tokens

PING = ": ping"
READ_GUARD_S = 12.0  # no byte for this long fails the read: 60 ping intervals, below the 15 s default
FAST_PINGS = {"SSE_PING_INTERVAL_SECONDS": 0.2, "DEADLINE_CHECK_INTERVAL_SECONDS": 0.05}


def body_for(protocol: str, max_tokens: int) -> tuple[str, dict[str, object]]:
    if protocol == "/stream":
        return "/stream", {"prompt": "idle stream", "max_tokens": max_tokens}
    return V1, {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "idle stream"}],
        "max_tokens": max_tokens,
        "stream": True,
    }


def lines_until_pings(
    gateway: Gateway, protocol: str, *, max_tokens: int, tokens_first: int, pings: int = 2
) -> list[str]:
    """The stream's non-empty lines, read until `pings` pings came after the first `tokens_first` tokens."""
    path, body = body_for(protocol, max_tokens)
    seen: list[str] = []
    timeout = httpx.Timeout(30, read=READ_GUARD_S)
    with httpx.Client(timeout=timeout) as client, client.stream("POST", gateway.url + path, json=body) as response:
        assert response.status_code == 200
        lines: Iterator[str] = response.iter_lines()
        tokens = late_pings = 0
        for line in lines:
            if not line:
                continue
            seen.append(line)
            if line == PING:
                late_pings += tokens >= tokens_first
                if late_pings == pings:
                    return seen
            elif line.startswith("data: ") and is_token(line[6:]):
                tokens += 1
    raise AssertionError(f"the stream ended before {pings} pings: {seen}")


def is_token(data: str) -> bool:
    if data == "[DONE]":
        return False
    event = json.loads(data)
    if "type" in event:
        return bool(event["type"] == "token")
    return bool(event.get("choices") and event["choices"][0]["delta"].get("content"))


def test_pings_before_the_first_token_on_the_mock(start_gateway: GatewayFactory) -> None:
    # The mock's first token is ten minutes away: only pings can arrive.
    gateway = start_gateway(MOCK_FIRST_TOKEN_MS=600_000, FIRST_TOKEN_TIMEOUT_SECONDS=120, **FAST_PINGS)
    seen = lines_until_pings(gateway, "/stream", max_tokens=3, tokens_first=0, pings=3)
    assert seen[0].startswith("id: ") and json.loads(seen[1][6:]) == {"type": "status", "message": "Generating..."}
    assert seen[2:] == [PING] * 3


@pytest.fixture(scope="module")
def ping_gateway(fake_upstream_server: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = launch_gateway(
        {"UPSTREAM_URL": fake_upstream_server.url, "UPSTREAM_RETRIES": 0, **FAST_PINGS},
        tmp_path_factory.mktemp("gateway") / "gateway.log",
    )
    yield gateway
    gateway.stop()


@pytest.mark.parametrize("protocol", ["/stream", "/v1"])
@pytest.mark.parametrize("stall_after", [0, 2], ids=["before-first-token", "between-tokens"])
def test_idle_streams_get_pings(
    ping_gateway: Gateway, fake_upstream: FakeUpstream, protocol: str, stall_after: int
) -> None:
    fake_upstream.script({"stall_after": stall_after})  # the upstream sends `stall_after` tokens, then nothing
    seen = lines_until_pings(ping_gateway, protocol, max_tokens=5, tokens_first=stall_after)
    tokens = [json.loads(line[6:]) for line in seen if line.startswith("data: ") and is_token(line[6:])]
    texts = [t["content"] if protocol == "/stream" else t["choices"][0]["delta"]["content"] for t in tokens]
    assert texts == default_tokens(stall_after)
    assert seen[-2:] == [PING, PING]
    # the client left: the gateway closes the stalled upstream request
    assert fake_upstream.wait_for(lambda s: s["disconnects"] == 1)["disconnects"] == 1
