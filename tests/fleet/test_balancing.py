"""A fleet of three model servers behind one gateway: new streams go where the fewest are in flight.

A slow server keeps each of its streams longer, so it holds more of them at any moment and gets
fewer new ones. Asserted on what each fake counted, never on times.
"""

from __future__ import annotations

import os
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from pydantic import ValidationError

from app.policies.inflight import InFlightTable, MemoryInFlightTable, SharedInFlightTable
from app.settings import Settings
from loadtest.harness.wait import wait_until
from tests.conftest import GatewayFactory
from tests.fleet.fakes import fake_fleet, fake_server, stream_chat

STREAMS = 60
CONCURRENT = 12
TOKENS = 40
TIED_STREAMS = 30  # slow server: 2 s per stream at 20 tok/s; fast ones: 0.1 s at 400 tok/s


def test_slow_endpoint_gets_fewer_streams(start_gateway: GatewayFactory) -> None:
    with fake_fleet({"tokens_per_second": 400}, {"tokens_per_second": 400}, {"tokens_per_second": 20}) as fakes:
        gateway = start_gateway(UPSTREAM_URL=",".join(fake.url for fake in fakes), UPSTREAM_RETRIES=0)
        with (
            httpx.Client(timeout=30, limits=httpx.Limits(max_connections=CONCURRENT)) as client,
            ThreadPoolExecutor(CONCURRENT) as pool,
        ):
            bodies = list(pool.map(lambda _: stream_chat(gateway.url, TOKENS, client), range(STREAMS)))
        assert all(body.rstrip().endswith("data: [DONE]") for body in bodies)
        fast_a, fast_b, slow = (fake.stats() for fake in fakes)
        assert fast_a["requests"] + fast_b["requests"] + slow["requests"] == STREAMS
        assert slow["requests"] < fast_a["requests"]
        assert slow["requests"] < fast_b["requests"]
        assert fast_a["requests"] > 0 and fast_b["requests"] > 0 and slow["requests"] > 0  # nobody starved


def test_round_robin_gives_the_slow_endpoint_its_turn(start_gateway: GatewayFactory) -> None:
    """UPSTREAM_BALANCE=round_robin, the benchmark's baseline: each worker takes the endpoints in turn, whatever
    their load. However the streams fall on the two workers, each worker's rotation gives every endpoint its
    third (give or take one per worker), the slow one included."""
    with fake_fleet({"tokens_per_second": 400}, {"tokens_per_second": 400}, {"tokens_per_second": 20}) as fakes:
        gateway = start_gateway(
            UPSTREAM_URL=",".join(fake.url for fake in fakes), UPSTREAM_BALANCE="round_robin", UPSTREAM_RETRIES=0
        )
        with httpx.Client(timeout=30) as client:
            for _ in range(TIED_STREAMS):
                assert stream_chat(gateway.url, 2, client).rstrip().endswith("data: [DONE]")
        counts = [fake.stats()["requests"] for fake in fakes]
        assert sum(counts) == TIED_STREAMS
        assert max(counts) - min(counts) <= 2, counts  # two workers, each at most one turn ahead on an endpoint


# (fault scripted on A, the client leaves after the first bytes): every way a stream ends but completion
EXITS = (
    ({"status": 500}, False),
    ({"reset_after": 2}, False),
    ({"error_after": 2}, False),
    ({"stall_after": 2}, False),
    ({"stall_after": 2}, True),
)
ATTEMPTS = 50  # guard: streams sent until endpoint A has served one with the fault


def _send(gateway_url: str, client: httpx.Client, *, leave: bool) -> None:
    """One stream read to its end (an error status, an error event, the deadline's), or left after its first bytes."""
    body = {"model": "gpt-4o-mini", "stream": True, "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
    with client.stream("POST", gateway_url + "/v1/chat/completions", json=body) as response:
        if leave:
            next(response.iter_bytes())
        else:
            response.read()


def test_every_exit_gives_its_count_back(start_gateway: GatewayFactory) -> None:
    """Every way a stream ends gives its count back. Endpoint B refuses connections (an exit at opening) while
    endpoint A serves streams that end by an upstream error, a reset, an error event, a deadline and the client
    leaving. Then B comes up: if every count came back, A and B are tied at 0 and, one stream after another, the
    random tie-break sends some to each; a count kept by any exit would make A lose every pick."""
    with fake_server() as a, socket.socket() as b_sock:
        b_sock.bind(("127.0.0.1", 0))  # bound, not listening: B refuses connections until its fake takes it
        b_url = f"http://127.0.0.1:{b_sock.getsockname()[1]}/v1"
        gateway = start_gateway(
            UPSTREAM_URL=f"{a.url},{b_url}",
            UPSTREAM_RETRIES=0,
            INTER_TOKEN_TIMEOUT_SECONDS=0.5,
            CIRCUIT_FAILURE_THRESHOLD=1000,
            CIRCUIT_OPEN_SECONDS=0.001,  # a refused or reset endpoint is ejected: back (half-open) at the next stream
        )
        with httpx.Client(timeout=30) as client:
            for fault, leave in EXITS:
                a.reset()
                a.script(*[fault] * ATTEMPTS)
                for _ in range(ATTEMPTS):  # until A served one (the others met B's refusal)
                    _send(gateway.url, client, leave=leave)
                    if a.stats()["requests"]:
                        break
                assert a.stats()["requests"] == 1
            wait_until(lambda: a.stats()["active"] == 0, 10, "the left stream's upstream request closed")
            a.reset()
            with fake_server(sock=b_sock) as b:
                for _ in range(TIED_STREAMS):
                    stream_chat(gateway.url, 2, client)
                counts = [a.stats()["requests"], b.stats()["requests"]]
        assert sum(counts) == TIED_STREAMS
        assert min(counts) > 0, counts  # 1 in 2**29 by chance with both tied at 0


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


@pytest.mark.parametrize("make", [MemoryInFlightTable, SharedInFlightTable])
def test_round_robin_takes_keys_in_turn_whatever_their_load(make: type[InFlightTable]) -> None:
    """UPSTREAM_BALANCE=round_robin (the benchmark's baseline): in turn, blind to the counts, yet counted."""
    table = make()
    keys = ["http://a/v1", "http://b/v1", "http://c/v1"]
    picked = [table.acquire_next(keys) for _ in range(6)]
    assert picked == keys + keys  # a loaded key gets its turn all the same
    assert table.counts(keys) == [2, 2, 2]
    for key in picked:
        table.release(key)
    assert table.counts(keys) == [0, 0, 0]
    assert table.acquire_next(keys[:2]) == "http://a/v1"  # the set shrank: the cursor wraps over what is left
    if isinstance(table, SharedInFlightTable):
        table.close()


@pytest.mark.parametrize(
    "env, problem",
    [
        ({"upstream_url": "http://a:1/v1,http://a:1/v1"}, "twice"),
        ({"upstream_url": "http://a/v1,ftp://b/v1"}, "http://"),
        ({"upstream_url": "http://a/v1,http://b/v1", "upstream_discovery": "dns"}, "exactly one"),
        ({"upstream_url": "http://llm.models.svc/v1", "upstream_discovery": "kubernetes"}, "namespace/name"),
        (
            {"upstream_url": "http://llm/v1", "upstream_discovery": "kubernetes", "upstream_k8s_service": "llm"},
            "namespace/name",
        ),
    ],
)
def test_upstream_settings_are_checked(env: dict[str, str], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        Settings(**env)  # type: ignore[arg-type]
