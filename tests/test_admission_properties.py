"""The proxy-header parser behind client identity (X-Forwarded-For / Forwarded, app/admission.py), with
arbitrary header values: it never raises, forwarded chains round-trip, and untrusted peers are never overridden."""

from __future__ import annotations

import ipaddress

from hypothesis import example, given, settings
from hypothesis import strategies as st
from starlette.requests import HTTPConnection

from app.admission import client_address, parse_networks

no_deadline = settings(deadline=None)  # run time depends on the machine's load; no test here asserts time

PROXY = "10.0.0.1"
TRUSTED = parse_networks("10.0.0.0/8")
# Header values as they arrive: any byte but CR and LF (which end a header line); Starlette decodes latin-1.
header_value = st.binary(max_size=200).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")) | st.lists(
    st.sampled_from(["for=", '"', "[", "]", ":", ";", ",", " ", "1.2.3.4", "::1", "by=", "unknown", "_hidden"]),
    max_size=20,
).map(lambda parts: "".join(parts).encode())
public_v4 = st.ip_addresses(v=4).filter(lambda ip: ip not in ipaddress.ip_network("10.0.0.0/8"))
public_v6 = st.ip_addresses(v=6)
client_ips = public_v4 | public_v6


def connection(peer: str, headers: list[tuple[str, bytes]]) -> HTTPConnection:
    return HTTPConnection(
        {
            "type": "http",
            "method": "GET",
            "path": "/",
            "query_string": b"",
            "client": (peer, 40000),
            "headers": [(name.encode(), value) for name, value in headers],
        }
    )


@no_deadline
@given(st.sampled_from(["x-forwarded-for", "forwarded"]), st.lists(header_value, max_size=3))
@example("forwarded", [b'for=""'])  # found by this test: an empty identity every such client shared
@example("forwarded", [b'for="[]:1"'])
def test_any_header_value_gives_an_identity_without_an_exception(name: str, values: list[bytes]) -> None:
    headers = [(name, value) for value in values]
    identity = client_address(connection(PROXY, headers), TRUSTED, name)
    ipaddress.ip_address(identity)  # only IP addresses become identities (junk leaves the peer's)
    # From an untrusted peer the headers change nothing.
    assert client_address(connection("203.0.113.9", headers), TRUSTED, name) == "203.0.113.9"


@no_deadline
@given(client_ips, st.lists(st.sampled_from(["10.0.0.2", "10.1.2.3"]), max_size=3))
def test_x_forwarded_for_chain_round_trips(
    client: ipaddress.IPv4Address | ipaddress.IPv6Address, proxies: list[str]
) -> None:
    value = ", ".join([str(client), *proxies]).encode()
    assert client_address(connection(PROXY, [("x-forwarded-for", value)]), TRUSTED) == str(client)


@no_deadline
@given(client_ips, st.booleans(), st.integers(1, 65535))
def test_forwarded_for_round_trips_with_ports_and_quotes(
    client: ipaddress.IPv4Address | ipaddress.IPv6Address, with_port: bool, port: int
) -> None:
    if client.version == 6:
        node = f'"[{client}]:{port}"' if with_port else f'"[{client}]"'
    else:
        node = f'"{client}:{port}"' if with_port else str(client)
    value = f"for={node};proto=https;by=10.0.0.1, for=10.0.0.2".encode()
    assert client_address(connection(PROXY, [("forwarded", value)]), TRUSTED, "forwarded") == str(client)
