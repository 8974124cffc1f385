"""Session affinity across a fleet: a session's streams prefer one endpoint (so its prefix cache keeps
hitting) while that endpoint's load stays within UPSTREAM_AFFINITY_LOAD_FACTOR of the mean; a hot session
spreads. Asserted on what each fake counted."""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import FakeUpstream, Gateway
from tests.fleet.fakes import gateway_on_fleet

HEADER = "X-Session-Id"
HOT_STREAMS = 12  # at once, one session: 20 tokens at 20 tok/s keep every one in flight while the others start
LOAD_FACTOR = 1.25


def _chat(
    gateway_url: str, client: httpx.Client, max_tokens: int, *, session: str | None = None, user: str | None = None
) -> None:
    body: dict[str, object] = {
        "model": "gpt-4o-mini",
        "stream": True,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "hi"}],
    }
    if user is not None:
        body["user"] = user
    headers = {HEADER: session} if session is not None else {}
    with client.stream("POST", gateway_url + "/v1/chat/completions", json=body, headers=headers) as response:
        response.raise_for_status()
        response.read()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, list[FakeUpstream]]]:
    """One gateway and three fakes for the module; each test clears the fakes' stats and scripts it needs."""
    with gateway_on_fleet(
        tmp_path_factory,
        UPSTREAM_AFFINITY_HEADER=HEADER,
        UPSTREAM_AFFINITY_USER=True,
        UPSTREAM_AFFINITY_LOAD_FACTOR=LOAD_FACTOR,
    ) as fleet:
        yield fleet


def test_a_session_keeps_its_endpoint_and_sessions_spread(fleet: tuple[Gateway, list[FakeUpstream]]) -> None:
    gateway, fakes = fleet
    with httpx.Client(timeout=30) as client:
        for session in ("alpha", "beta"):
            for fake in fakes:
                fake.reset()
            for _ in range(6):
                _chat(gateway.url, client, 2, session=session)
            assert sorted(fake.stats()["requests"] for fake in fakes) == [0, 0, 6], session
        for fake in fakes:  # OpenAI's `user` names a session too (and is still not forwarded)
            fake.reset()
        for _ in range(6):
            _chat(gateway.url, client, 2, user="user-7")
        assert sorted(fake.stats()["requests"] for fake in fakes) == [0, 0, 6]
        assert all("user" not in body for fake in fakes for body in fake.stats()["bodies"])
        for fake in fakes:  # many sessions use every endpoint
            fake.reset()
        for n in range(30):
            _chat(gateway.url, client, 2, session=f"session-{n}")
        assert all(fake.stats()["requests"] > 0 for fake in fakes)


def test_a_hot_session_is_bounded(fleet: tuple[Gateway, list[FakeUpstream]]) -> None:
    gateway, fakes = fleet
    for fake in fakes:
        fake.reset()
        fake.script(*[{"tokens_per_second": 20}] * HOT_STREAMS)  # each stream in flight for a second
    with (
        httpx.Client(timeout=30, limits=httpx.Limits(max_connections=HOT_STREAMS)) as client,
        ThreadPoolExecutor(HOT_STREAMS) as pool,
    ):
        list(pool.map(lambda _: _chat(gateway.url, client, 20, session="hot"), range(HOT_STREAMS)))
    counts = sorted(fake.stats()["requests"] for fake in fakes)
    assert sum(counts) == HOT_STREAMS
    assert counts[-1] <= math.ceil(LOAD_FACTOR * HOT_STREAMS / len(fakes)), counts  # the bound held
    assert counts[0] > 0, counts
