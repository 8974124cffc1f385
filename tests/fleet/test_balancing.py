"""A fleet of three model servers behind one gateway: new streams go where the fewest are in flight.

A slow server keeps each of its streams longer, so it holds more of them at any moment and gets
fewer new ones. Asserted on what each fake counted, never on times.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from pydantic import ValidationError

from app.policies.inflight import SharedInFlightTable
from app.settings import Settings
from tests.conftest import GatewayFactory
from tests.fleet.fakes import fake_fleet, stream_chat

STREAMS = 60
CONCURRENT = 12
TOKENS = 40  # slow server: 2 s per stream at 20 tok/s; fast ones: 0.1 s at 400 tok/s


def test_slow_endpoint_gets_fewer_streams(start_gateway: GatewayFactory) -> None:
    with fake_fleet({"tokens_per_second": 400}, {"tokens_per_second": 400}, {"tokens_per_second": 20}) as fakes:
        gateway = start_gateway(UPSTREAM_URL=",".join(fake.url for fake in fakes), UPSTREAM_RETRIES=0)
        with httpx.Client(timeout=30, limits=httpx.Limits(max_connections=CONCURRENT)) as client, \
                ThreadPoolExecutor(CONCURRENT) as pool:
            bodies = list(pool.map(lambda _: stream_chat(gateway.url, TOKENS, client), range(STREAMS)))
        assert all(body.rstrip().endswith("data: [DONE]") for body in bodies)
        fast_a, fast_b, slow = (fake.stats() for fake in fakes)
        assert fast_a["requests"] + fast_b["requests"] + slow["requests"] == STREAMS
        assert slow["requests"] < fast_a["requests"]
        assert slow["requests"] < fast_b["requests"]
        assert fast_a["requests"] > 0 and fast_b["requests"] > 0 and slow["requests"] > 0  # nobody starved


def test_counts_are_shared_across_processes_and_reclaimed() -> None:
    """A worker's streams count for the instance; a dead worker's are forgotten with its cell."""
    table = SharedInFlightTable()
    keys = ["http://a/v1", "http://b/v1"]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a "worker": two streams on whichever is least loaded, then it dies without releasing
        os.close(read)
        picked = [table.acquire_least(keys), table.acquire_least(keys)]
        os.write(write, ",".join(picked).encode())
        os._exit(0)
    os.close(write)
    picked = os.read(read, 100).decode().split(",")
    os.waitpid(pid, 0)
    assert sorted(picked) == keys  # the second pick saw the first
    assert table.counts(keys) == [1, 1]
    mine = table.acquire_least(keys)
    assert sum(table.counts(keys)) == 3
    table.release(mine)
    assert table.reclaim(pid)
    assert table.counts(keys) == [0, 0]
    table.close()


@pytest.mark.parametrize(
    "url, problem",
    [("http://a:1/v1,http://a:1/v1", "twice"), ("http://a/v1,ftp://b/v1", "http://"),
     ("http://a/v1,http://b/v1", "exactly one")],
)
def test_upstream_url_is_checked(url: str, problem: str) -> None:
    discovery = "dns" if problem == "exactly one" else "static"
    with pytest.raises(ValidationError, match=problem):
        Settings(upstream_url=url, upstream_discovery=discovery)
