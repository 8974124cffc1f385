"""Admission against the real gateway (2 workers): limits hold for the instance, refusals are fast and clear."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Iterator

import httpx
import openai
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from tests.conftest import SLOT_CAPS, Gateway, GatewayFactory, launch_gateway
from tests.slots import assert_slots_released
from tests.workers import only_worker, worker_pids

SHORT = {"prompt": "admission", "max_tokens": 1}
LONG = {"prompt": "hold the slot", "max_tokens": 5000}


def _fresh_connections() -> httpx.Client:
    """No keep-alive: every request is a new connection, so both workers' accept loops take turns."""
    return httpx.Client(timeout=10, limits=httpx.Limits(max_keepalive_connections=0))


def _statuses(gateway: Gateway, count: int, headers: list[dict[str, str]] | None = None) -> list[httpx.Response]:
    """`count` requests, each on a new connection (whichever worker accepts it serves it)."""
    with _fresh_connections() as client:
        return [
            client.post(gateway.url + "/stream", json=SHORT, headers=(headers or [{}] * count)[i]) for i in range(count)
        ]


def _rejections(gateway: Gateway) -> dict[str, float]:
    text = httpx.get(gateway.metrics_url + "/metrics", timeout=5).text
    found: dict[str, float] = {}
    for reason, value in re.findall(
        r'^streaming_rejections_total\{reason="(\w+)",route="/stream"\} (\S+)$', text, re.M
    ):
        found[reason] = found.get(reason, 0) + float(value)
    return {reason: count for reason, count in found.items() if count}  # every known reason exists, at 0


def test_burst_is_exact_for_the_instance(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(RATE_LIMIT_PER_MINUTE=1, RATE_LIMIT_BURST=5, MOCK_FIRST_TOKEN_MS=0, **SLOT_CAPS)
    first, second = worker_pids(gateway)
    with only_worker(gateway, first):  # 3 of the burst spent on one worker ...
        responses = _statuses(gateway, 3)
    with only_worker(gateway, second):  # ... leave 2 on the other: not 5 per worker
        responses += _statuses(gateway, 9)
    assert [r.status_code for r in responses] == [200] * 5 + [429] * 7
    refused = [r for r in responses if r.status_code == 429]
    assert len(refused) == 7
    for r in refused:
        assert int(r.headers["retry-after"]) >= 1
        assert r.headers["ratelimit-policy"] == '"default";q=5;w=300'
        assert r.headers["ratelimit"].startswith('"default";r=0;')
        assert r.json()["code"] == "rate_limited"
    admitted = next(r for r in responses if r.status_code == 200)
    assert "ratelimit" in admitted.headers
    assert _rejections(gateway) == {"rate_limited": 7.0}
    assert_slots_released(gateway)


def test_forged_forwarded_for_from_an_untrusted_peer_changes_nothing(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(RATE_LIMIT_PER_MINUTE=1, RATE_LIMIT_BURST=5)
    forged = [{"x-forwarded-for": f"203.0.113.{i}"} for i in range(12)]
    assert [r.status_code for r in _statuses(gateway, 12, forged)].count(200) == 5


def test_forwarded_for_from_a_trusted_proxy_names_the_client(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(RATE_LIMIT_PER_MINUTE=1, RATE_LIMIT_BURST=5, TRUSTED_PROXIES="127.0.0.0/8, ::1/128")
    distinct = [{"x-forwarded-for": f"198.51.100.7, 203.0.113.{i}"} for i in range(12)]
    assert [r.status_code for r in _statuses(gateway, 12, distinct)].count(200) == 12
    # the same client behind the proxy, even when it prepends its own forged entries
    same = [{"x-forwarded-for": f"10.9.9.{i}, 203.0.113.77"} for i in range(8)]
    assert [r.status_code for r in _statuses(gateway, 8, same)].count(200) == 5


def test_rfc7239_forwarded_from_a_trusted_proxy_names_the_client(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(
        RATE_LIMIT_PER_MINUTE=1,
        RATE_LIMIT_BURST=5,
        TRUSTED_PROXIES="127.0.0.0/8, ::1/128",
        FORWARDED_HEADER="forwarded",
    )
    rfc = [{"forwarded": f'for="[2001:db8::{i}]:4711";proto=https'} for i in range(6)]
    assert [r.status_code for r in _statuses(gateway, 6, rfc)].count(200) == 6
    same = [{"forwarded": f"for=10.9.9.{i}, for=203.0.113.77"} for i in range(8)]
    assert [r.status_code for r in _statuses(gateway, 8, same)].count(200) == 5


class HeldStreams:
    """Long streams opened `count` at a time; the admitted ones stay open until `close()`."""

    def __init__(self, gateway: Gateway) -> None:
        self.client = httpx.AsyncClient(
            base_url=gateway.url, timeout=30, limits=httpx.Limits(max_connections=50, max_keepalive_connections=0)
        )
        self.admitted: list[httpx.Response] = []
        self.refused: list[httpx.Response] = []
        self._readers: list[AsyncIterator[str]] = []

    async def open(self, count: int) -> list[httpx.Response]:
        """Open `count` at once; returns their refusals. Each admitted one has sent a token when this returns
        (past admission and the upstream's start: a worker frozen now holds no shared lock)."""

        async def one() -> httpx.Response:
            response = await self.client.send(self.client.build_request("POST", "/stream", json=LONG), stream=True)
            if response.status_code == 200:
                lines = response.aiter_lines()
                self._readers.append(lines)  # held: a half-read line iterator, once collected, closes its stream
                async for line in lines:
                    if '"type": "token"' in line:
                        break
            return response

        refused = []
        for response in await asyncio.gather(*(one() for _ in range(count))):
            if response.status_code == 200:
                self.admitted.append(response)
            else:
                await response.aread()
                await response.aclose()
                refused.append(response)
        self.refused += refused
        return refused

    async def close(self) -> None:
        for response in self.admitted:
            await response.aclose()
        await self.client.aclose()


def held_on_both_workers(gateway: Gateway, first: int, then: int) -> HeldStreams:
    """`first` streams opened at once on one worker and held, then `then` at once on the other; all closed."""
    one, other = worker_pids(gateway)

    async def scenario() -> HeldStreams:
        held = HeldStreams(gateway)
        try:
            with only_worker(gateway, one):
                assert await held.open(first) == []
            with only_worker(gateway, other):
                await held.open(then)
        finally:
            await held.close()
        return held

    return asyncio.run(scenario())


def test_per_client_slots_are_exact_for_the_instance(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(MAX_CONNECTIONS=12, MAX_CONNECTIONS_PER_CLIENT=10, MOCK_TOKENS_PER_SECOND=5)
    held = held_on_both_workers(gateway, 6, 8)  # a per-worker table would admit all 8 on the second worker
    assert len(held.admitted) == 10
    assert len(held.refused) == 4
    for r in held.refused:
        assert r.status_code == 503
        assert r.json()["code"] == "client_connection_limit"
        assert r.headers["retry-after"] == "1"
    assert_slots_released(gateway)  # the slots came back: the whole cap is taken again


def test_global_slots(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(MAX_CONNECTIONS=3, MOCK_TOKENS_PER_SECOND=5)
    held = held_on_both_workers(gateway, 2, 3)  # a per-worker table would admit all 3 on the second worker
    assert len(held.admitted) == 3
    assert [r.json()["code"] for r in held.refused] == ["connection_limit"] * 2
    assert_slots_released(gateway)


@pytest.fixture(scope="module")
def keyed_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = launch_gateway(
        {"API_KEYS": "sk-alpha, sk-beta", "MOCK_TOKENS_PER_SECOND": 0},
        tmp_path_factory.mktemp("gateway") / "gateway.log",
    )
    yield gateway
    gateway.stop()


def test_api_keys(keyed_gateway: Gateway) -> None:
    url = keyed_gateway.url
    missing = httpx.post(url + "/stream", json=SHORT, timeout=5)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["code"] == "missing_api_key"
    wrong = httpx.post(url + "/stream", json=SHORT, headers={"authorization": "Bearer sk-gamma"}, timeout=5)
    assert wrong.status_code == 403
    assert wrong.json()["code"] == "invalid_api_key"
    for headers in ({"authorization": "Bearer sk-beta"}, {"x-api-key": "sk-alpha"}):
        ok = httpx.post(url + "/stream", json=SHORT, headers=headers, timeout=5)
        assert ok.status_code == 200
        assert ok.text.rstrip().endswith('"tokens": 1}')
    # health, readiness and metrics stay open to probes and scrapers
    assert httpx.get(url + "/health", timeout=5).status_code == 200
    assert httpx.get(url + "/ready", timeout=5).status_code == 200


def test_api_keys_with_the_openai_sdk(keyed_gateway: Gateway) -> None:
    with openai.OpenAI(base_url=keyed_gateway.url + "/v1", api_key="sk-alpha", max_retries=0) as client:
        reply = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert reply.usage is not None and reply.usage.completion_tokens == 3
    with openai.OpenAI(base_url=keyed_gateway.url + "/v1", api_key="sk-nope", max_retries=0) as client:
        with pytest.raises(openai.PermissionDeniedError) as raised:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert raised.value.code == "invalid_api_key"


def test_api_keys_on_websocket(keyed_gateway: Gateway) -> None:
    """The key is checked before the upgrade: no WebSocket opens without one."""
    ws_url = keyed_gateway.url.replace("http://", "ws://") + "/ws"
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(ws_url)
    assert refused.value.response.status_code == 401
    assert json.loads(refused.value.response.body or b"{}")["code"] == "missing_api_key"
    with ws_connect(ws_url + "?api_key=sk-alpha") as ws:
        ws.send(json.dumps(SHORT))
        events = [json.loads(ws.recv(timeout=5)) for _ in range(3)]
    assert events[-1] == {"type": "done", "tokens": 1}


def test_refusals_hold_no_slot(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(
        RATE_LIMIT_PER_MINUTE=1,
        RATE_LIMIT_BURST=2,
        MAX_CONNECTIONS=3,
        MAX_CONNECTIONS_PER_CLIENT=1,
        MOCK_TOKENS_PER_SECOND=5,
    )
    with _fresh_connections() as client:
        with client.stream("POST", gateway.url + "/stream", json=LONG) as held:
            assert held.status_code == 200
            second = client.post(gateway.url + "/stream", json=SHORT)
            assert second.json()["code"] == "client_connection_limit"
            third = client.post(gateway.url + "/stream", json=SHORT)
            assert third.status_code == 429
            bad = client.post(gateway.url + "/stream", content=b"{", headers={"content-type": "application/json"})
            assert bad.status_code == 429  # the rate limit comes before parsing: floods of junk are limited too
    assert_slots_released(gateway)  # each of the three refusals gave back what it held: nothing
