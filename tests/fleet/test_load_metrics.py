"""UPSTREAM_LOAD_METRICS=vllm through the real gateway (two workers) and three fake vLLM servers: an endpoint
that reports a long queue or a full KV cache gets no new streams while the others are idle, gets them again once
its load drops, and one whose /metrics fails is balanced on streams in flight. Asserted on what each fake
counted, after waiting until both workers have scraped the load under test (the fake counts the distinct
clients that scraped it since its load was set: one connection per worker)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from app.upstream.client import OpenAIUpstream
from app.upstream.load import Load, parse_vllm
from loadtest.harness.wait import wait_until
from tests.conftest import FakeUpstream, Gateway
from tests.fleet.fakes import fake_server, gateway_on_fleet, stream_chat

STREAMS = 12  # sequential: a worker starts at most 6 on each idle endpoint between two scrapes (score <= 7)
ATTEMPTS = 30  # streams sent until the endpoint whose load dropped gets one
WORKERS = 2


@pytest.fixture(scope="module")
def shared_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, list[FakeUpstream]]]:
    """One gateway and its three fakes for the module: each test starts from `fleet`'s state."""
    with gateway_on_fleet(
        tmp_path_factory, UPSTREAM_LOAD_METRICS="vllm", UPSTREAM_LOAD_METRICS_INTERVAL_SECONDS=0.5
    ) as fleet:
        yield fleet


@pytest.fixture
def fleet(shared_fleet: tuple[Gateway, list[FakeUpstream]]) -> tuple[Gateway, list[FakeUpstream]]:
    """The shared fleet with every fake's stats and load cleared, the third one reporting a queue of 50, seen by
    every worker: whatever ran before, no worker sees it idle."""
    gateway, fakes = shared_fleet
    for fake in fakes:
        fake.reset()
    fakes[2].set_load(waiting=50)
    _scraped_by_every_worker(fakes[2])
    return gateway, fakes


def _scraped_by_every_worker(fake: FakeUpstream) -> None:
    wait_until(lambda: fake.stats()["metrics_clients"] >= WORKERS, 20, "every worker scraped the load")


def _send(gateway: Gateway, count: int) -> None:
    with httpx.Client(timeout=30) as client:
        for _ in range(count):
            assert stream_chat(gateway.url, 5, client).rstrip().endswith("data: [DONE]")


def _requests(fakes: list[FakeUpstream]) -> list[int]:
    return [fake.stats()["requests"] for fake in fakes]


@pytest.mark.parametrize("load", [{"waiting": 50}, {"waiting": 0, "kv_cache": 1.0}], ids=["queue", "kv_cache"])
def test_a_loaded_endpoint_gets_no_new_streams_until_its_load_drops(
    fleet: tuple[Gateway, list[FakeUpstream]], load: dict[str, float]
) -> None:
    gateway, fakes = fleet
    loaded = fakes[2]
    loaded.set_load(**load)
    _scraped_by_every_worker(loaded)
    _send(gateway, STREAMS)
    a, b, c = _requests(fakes)
    assert c == 0 and a + b == STREAMS and a > 0 and b > 0, (a, b, c)

    loaded.set_load(waiting=0, kv_cache=0.0)
    _scraped_by_every_worker(loaded)
    for _ in range(ATTEMPTS):
        _send(gateway, 1)
        if loaded.stats()["requests"] > 0:
            break
    assert loaded.stats()["requests"] > 0


def test_an_endpoint_whose_scrape_fails_is_balanced_on_streams_in_flight(
    fleet: tuple[Gateway, list[FakeUpstream]],
) -> None:
    gateway, fakes = fleet
    failing = fakes[2]
    failing.set_load(metrics_status=503)  # every worker has seen its queue of 50 (`fleet`), and now cannot read it
    _scraped_by_every_worker(failing)
    _send(gateway, STREAMS)
    assert failing.stats()["requests"] > 0, _requests(fakes)
    assert sum(_requests(fakes)) == STREAMS


def test_a_scrape_is_bounded_and_reads_the_fakes_gauges() -> None:
    """The client's scrape against a real fake: its page parsed, an error status or a page over the bound is no
    load."""

    async def scrape(client: OpenAIUpstream, max_bytes: int = 4096) -> Load | None:
        body = await client.scrape("/metrics", 5.0, max_bytes)
        return None if body is None else parse_vllm(body.decode())

    async def scenario(fake: FakeUpstream) -> None:
        client = OpenAIUpstream(fake.url, api_key=None, model_override=None, connect_timeout_s=5.0, pool_size=4)
        try:
            assert await scrape(client) == Load(running=0, waiting=7, kv_cache_usage=0.5)
            assert await scrape(client, max_bytes=64) is None  # the page is longer
            fake.set_load(metrics_status=503)
            assert await scrape(client) is None
        finally:
            await client.aclose()

    with fake_server() as fake:
        fake.set_load(waiting=7, kv_cache=0.5)
        asyncio.run(scenario(fake))
