"""Issue 12: keys live in headers, and nothing but streaming answers on the public port without one.

The gateway runs with two tenants' keys (API_KEYS=keyA,keyB) relaying from the fake upstream on
127.0.0.1, so a leak of the upstream's host would show in /v1/models.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import FakeUpstream, Gateway, GatewayFactory, launch_gateway
from tests.otlp import OTLPReceiver
from tests.security.raw import GUARD_S

KEY_A, KEY_B = "sk-tenant-a", "sk-tenant-b"
STREAM = {"prompt": "keys", "max_tokens": 2}


@pytest.fixture(scope="module")
def gateway(fake_upstream_server: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = launch_gateway(
        {"API_KEYS": f"{KEY_A},{KEY_B}", "UPSTREAM_URL": fake_upstream_server.url},
        tmp_path_factory.mktemp("gateway") / "gateway.log",
    )
    yield gateway
    gateway.stop()


@pytest.mark.parametrize("parameter", ["api_key", "key", "token", "access_token"])
def test_a_key_in_the_url_gets_401_saying_where_it_belongs(gateway: Gateway, parameter: str) -> None:
    for method, path, body in (
        ("POST", "/stream", STREAM),
        (
            "POST",
            "/v1/chat/completions",
            {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
        ),
        ("GET", "/v1/models", None),
    ):
        response = httpx.request(method, f"{gateway.url}{path}?{parameter}={KEY_A}", json=body, timeout=GUARD_S)
        assert response.status_code == 401, (path, response.text)
        assert "Authorization: Bearer" in response.text and "X-API-Key" in response.text
        assert KEY_A not in response.text
    # the same key in a header works
    ok = httpx.post(gateway.url + "/stream", json=STREAM, headers={"X-API-Key": KEY_A}, timeout=GUARD_S)
    assert ok.status_code == 200


def test_models_need_a_key_and_do_not_name_the_upstream(gateway: Gateway) -> None:
    assert httpx.get(gateway.url + "/v1/models", timeout=GUARD_S).status_code == 401
    wrong = httpx.get(gateway.url + "/v1/models", headers={"Authorization": "Bearer sk-nobody"}, timeout=GUARD_S)
    assert wrong.status_code == 403
    listed = httpx.get(gateway.url + "/v1/models", headers={"Authorization": f"Bearer {KEY_B}"}, timeout=GUARD_S)
    assert listed.status_code == 200
    models = listed.json()["data"]
    assert [m["id"] for m in models] == ["gpt-4o-mini", "gpt-4o"]
    assert all("127.0.0.1" not in str(m["owned_by"]) for m in models)


def test_api_docs_are_off_unless_turned_on(gateway: Gateway, start_gateway: GatewayFactory) -> None:
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        assert httpx.get(gateway.url + path, timeout=GUARD_S).status_code == 404, path
    documented = start_gateway(DOCS_ENABLED="true")
    openapi = httpx.get(documented.url + "/openapi.json", timeout=GUARD_S).json()
    assert openapi["info"]["title"] == "Streaming Gateway"
    assert httpx.get(documented.url + "/docs", timeout=GUARD_S).status_code == 200


def test_metrics_only_on_the_metrics_port(gateway: Gateway) -> None:
    public = httpx.get(gateway.url + "/metrics", timeout=GUARD_S)
    assert public.status_code == 404
    assert "streaming_" not in public.text
    scraped = httpx.get(gateway.metrics_url + "/metrics", timeout=GUARD_S)
    assert scraped.status_code == 200
    assert "streaming_active_connections" in scraped.text
    # the metrics port serves nothing else: no streams, no health, no models
    assert (
        httpx.post(
            gateway.metrics_url + "/stream", json=STREAM, headers={"X-API-Key": KEY_A}, timeout=GUARD_S
        ).status_code
        == 404
    )
    assert (
        httpx.get(gateway.metrics_url + "/v1/models", headers={"X-API-Key": KEY_A}, timeout=GUARD_S).status_code == 404
    )


def test_metrics_only_on_the_metrics_port_when_traced_too(otlp: OTLPReceiver, start_gateway: GatewayFactory) -> None:
    """Traced, the app runs FastAPI's instrumented stack instead of the stream router: same split."""
    gateway = start_gateway(WEB_CONCURRENCY=1, OTEL_EXPORTER_OTLP_ENDPOINT=otlp.url)
    assert httpx.get(gateway.url + "/metrics", timeout=GUARD_S).status_code == 404
    assert "streaming_active_connections" in httpx.get(gateway.metrics_url + "/metrics", timeout=GUARD_S).text
    assert httpx.post(gateway.metrics_url + "/stream", json={"prompt": "x"}, timeout=GUARD_S).status_code == 404
