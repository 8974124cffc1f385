"""Issue 12: with the proxy trusted, only FORWARDED_HEADER names the client, and only an IP address does.

The rate limit (burst 3, no refill to speak of) shows which identity the gateway used: requests that
share one run out after 3; requests that each minted a new identity would all pass.
"""

from __future__ import annotations

import httpx

from tests.conftest import Gateway, GatewayFactory
from tests.security.raw import GUARD_S

LIMITED = {"TRUSTED_PROXIES": "127.0.0.0/8", "RATE_LIMIT_PER_MINUTE": 0.001, "RATE_LIMIT_BURST": 3}
STREAM = {"prompt": "who am I", "max_tokens": 1}


def _statuses(gateway: Gateway, headers: list[dict[str, str]]) -> list[int]:
    with httpx.Client(timeout=GUARD_S, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        return [client.post(gateway.url + "/stream", json=STREAM, headers=h).status_code for h in headers]


def test_junk_x_forwarded_for_does_not_override_forwarded(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(FORWARDED_HEADER="forwarded", **LIMITED)
    forged = [{"Forwarded": "for=192.0.2.1", "X-Forwarded-For": f"junk-{i}"} for i in range(6)]
    assert _statuses(gateway, forged) == [200] * 3 + [429] * 3  # one client: 192.0.2.1
    other = [{"Forwarded": 'for="[2001:db8::7]:443"', "X-Forwarded-For": "192.0.2.1"}]
    assert _statuses(gateway, other) == [200]  # a different client, named by Forwarded alone


def test_values_that_are_not_addresses_never_become_identities(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(**LIMITED)  # FORWARDED_HEADER: x-forwarded-for
    junk = [{"X-Forwarded-For": value} for value in ("junk-1", "junk-2", "unknown", "_hidden", "1.2.3", "a" * 300)]
    assert _statuses(gateway, junk) == [200] * 3 + [429] * 3  # every one falls back to the peer, the proxy
    # a real address behind the proxy is its own client (with or without the port some proxies append),
    # and Forwarded is not read
    named = [
        {"X-Forwarded-For": address, "Forwarded": f"for=203.0.113.{i}"}
        for i, address in enumerate(["198.51.100.9", "198.51.100.9:4711", "junk, 198.51.100.9:80", "198.51.100.9"])
    ]
    assert _statuses(gateway, named) == [200] * 3 + [429]
