"""UPSTREAM_DISCOVERY=dns against a real DNS server on loopback (dnslib), its records changed under the gateway.

Two fake model servers listen on the same port of two loopback addresses (127.0.0.2, 127.0.0.3), the
way a headless Service's pods share a port; the DNS server answers the Service's name with whichever
addresses the test sets. The gateway follows each change within its refresh (waited on as a condition:
new streams reach the server that was added), and keeps the last good set while the DNS server fails.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from dnslib import QTYPE, RCODE, RR, A, DNSRecord
from dnslib.server import BaseResolver, DNSHandler, DNSServer

from loadtest.harness.wait import wait_until
from tests.conftest import FakeUpstream, GatewayFactory
from tests.fleet.fakes import fake_server, stream_chat

NAME = "models.fleet.test."
REFRESH_S = 0.2
FOLLOW_TIMEOUT_S = 15.0  # guard only: the gateway follows within a few refreshes


class Records(BaseResolver):  # type: ignore[misc]  # dnslib ships no type information
    """Answers NAME with the current addresses; `failing`: SERVFAIL to everything."""

    def __init__(self) -> None:
        self.addresses: list[str] = []
        self.failing = False
        self.queries = 0

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        self.queries += 1
        reply = request.reply()
        if self.failing:
            reply.header.rcode = RCODE.SERVFAIL
        elif str(request.q.qname) == NAME and request.q.qtype == QTYPE.A:
            for address in self.addresses:
                reply.add_answer(RR(NAME, QTYPE.A, rdata=A(address), ttl=0))
        return reply


@pytest.fixture
def dns_server() -> Iterator[tuple[Records, int]]:
    records = Records()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # a free UDP port; dnslib binds it itself
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = DNSServer(records, port=port, address="127.0.0.1", logger=_Quiet())
    server.start_thread()
    yield records, port
    server.stop()
    server.server.server_close()


class _Quiet:
    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


@pytest.fixture
def twin_fakes() -> Iterator[tuple[FakeUpstream, FakeUpstream]]:
    """Fakes on 127.0.0.2 and 127.0.0.3, the same port."""
    with fake_server("127.0.0.2") as first:
        port = int(first.url.rsplit(":", 1)[1].split("/")[0])
        with fake_server("127.0.0.3", port) as second:
            yield first, second


def _reaches(gateway_url: str, fake: FakeUpstream, client: httpx.Client) -> bool:
    """One more stream through the gateway; has `fake` now served one since its last reset?"""
    stream_chat(gateway_url, 2, client)
    return int(fake.stats()["requests"]) > 0


def _only(gateway_url: str, fake: FakeUpstream, other: FakeUpstream, client: httpx.Client) -> bool:
    """Four streams in a row all reach `fake`, none `other`."""
    fake.reset()
    other.reset()
    for _ in range(4):
        stream_chat(gateway_url, 2, client)
    return bool(fake.stats()["requests"] == 4 and other.stats()["requests"] == 0)


def test_gateway_follows_dns_changes(
    dns_server: tuple[Records, int], twin_fakes: tuple[FakeUpstream, FakeUpstream], start_gateway: GatewayFactory
) -> None:
    records, dns_port = dns_server
    first, second = twin_fakes
    port = first.url.rsplit(":", 1)[1].split("/")[0]
    records.addresses = ["127.0.0.2"]
    gateway = start_gateway(
        UPSTREAM_URL=f"http://{NAME.rstrip('.')}:{port}/v1",
        UPSTREAM_DISCOVERY="dns",
        UPSTREAM_DNS_REFRESH_SECONDS=REFRESH_S,
        UPSTREAM_DNS_NAMESERVER=f"127.0.0.1:{dns_port}",
        UPSTREAM_RETRIES=0,
    )
    with httpx.Client(timeout=30) as client:
        for _ in range(4):
            stream_chat(gateway.url, 2, client)
        assert first.stats()["requests"] == 4 and second.stats()["requests"] == 0
        # the request is addressed to the name, not the address (with https, TLS checks the name too)
        assert set(first.stats()["hosts"]) == {f"{NAME.rstrip('.')}:{port}"}

        records.addresses = ["127.0.0.3"]  # the pod moved
        first.reset()
        wait_until(lambda: _reaches(gateway.url, second, client), FOLLOW_TIMEOUT_S, "streams reach the new address")
        # every worker follows within a few refreshes: then the old address gets nothing
        wait_until(lambda: _only(gateway.url, second, first, client), FOLLOW_TIMEOUT_S, "the old address is left")

        records.failing = True  # the DNS server breaks: the last good set stays
        seen = records.queries
        wait_until(lambda: records.queries > seen + 4, FOLLOW_TIMEOUT_S, "refreshes meet the failing server")
        assert _only(gateway.url, second, first, client)

        records.failing = False
        records.addresses = ["127.0.0.2", "127.0.0.3"]  # scaled out
        first.reset()
        wait_until(lambda: _reaches(gateway.url, first, client), FOLLOW_TIMEOUT_S, "streams reach the added address")
    assert 1 <= gateway.log().count("upstream DNS refresh failed") <= 2  # once per worker, not per refresh
