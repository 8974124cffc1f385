"""How discovered addresses and EndpointSlice conditions become endpoints (pure functions, no servers)."""

from __future__ import annotations

from urllib.parse import urlsplit

from app.upstream.discovery import Endpoint, with_address
from app.upstream.k8s_discovery import slice_endpoints
from loadtest.harness.fake_apiserver import READY, TERMINATING, endpoint_slice


def test_an_address_replaces_the_host_and_keeps_the_rest() -> None:
    parts = urlsplit("https://models.example:8443/v1")
    assert with_address(parts, "10.0.0.7", None) == "https://10.0.0.7:8443/v1"
    assert with_address(parts, "fd00::7", None) == "https://[fd00::7]:8443/v1"
    assert with_address(urlsplit("http://llm/v1"), "10.0.0.7", 9000) == "http://10.0.0.7:9000/v1"


def test_conditions_as_kubernetes_reads_them() -> None:
    base = "http://llm.models.svc/v1"
    obj = endpoint_slice(
        "models",
        "llm",
        "llm-1",
        9000,
        [
            ("10.0.0.1", READY),
            ("10.0.0.2", TERMINATING),
            ("10.0.0.3", {}),  # unset: ready, serving, not terminating
            ("10.0.0.4", {"ready": False}),  # serving unset: as ready
        ],
    )
    endpoints = slice_endpoints(obj, base)
    assert [(e.url, e.accepts_new) for e in endpoints] == [
        ("http://10.0.0.1:9000/v1", True),
        ("http://10.0.0.2:9000/v1", False),
        ("http://10.0.0.3:9000/v1", True),
        ("http://10.0.0.4:9000/v1", False),
    ]
    assert endpoints[1] == Endpoint(
        "http://10.0.0.2:9000/v1", "llm.models.svc", ready=False, serving=True, terminating=True
    )
    assert endpoints[3].serving is False
    assert {e.server_name for e in endpoints} == {"llm.models.svc"}


def test_the_slice_port_matching_the_url_wins() -> None:
    obj = endpoint_slice("models", "llm", "llm-1", 9000, [("10.0.0.1", READY)])
    obj["ports"] = [
        {"name": "metrics", "port": 9100, "protocol": "TCP"},
        {"name": "http", "port": 9000, "protocol": "TCP"},
    ]
    assert [e.url for e in slice_endpoints(obj, "http://llm:9000/v1")] == ["http://10.0.0.1:9000/v1"]
    assert [e.url for e in slice_endpoints(obj, "http://llm/v1")] == ["http://10.0.0.1:9100/v1"]  # else the first
