"""Limits across replicas: two gateway instances (2 workers each) sharing one real redis-server.

With REDIS_URL set, the rate limit and the per-client stream cap hold for the fleet, not per
instance. When Redis goes away (killed, or hung: stopped with SIGSTOP, so it accepts connections and never
answers) the gateway keeps serving under the documented policy: fail open to each instance's own
limits (burst 5 per instance here), with `streaming_redis_up{store} 0`,
`streaming_redis_fallbacks_total{store}` and one "redis unreachable" warning per worker and store.
When Redis is back (retried once per second per worker) limits are shared again.

The redis-server fixture fails, never skips, when the binary is missing (tests/conftest.py: a
skipped test is a missing test).
"""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis

from app.policies.concurrency_redis import DEFAULT_SLOTS_PREFIX
from loadtest.harness.redis import RedisServer, started_redis
from loadtest.harness.wait import eventually
from tests.conftest import PATIENT_REDIS, SLOT_CAPS, Gateway, GatewayFactory
from tests.slots import SLOT_CHECK_KEYS, UNPACED_MAX_TOKENS, assert_slots_released
from tests.test_upstream_protection import (
    WAIT_S,
    http_client,
    post_stream,
    samples,
)
from tests.workers import only_worker, worker_pids


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    yield from started_redis(tmp_path)


def start_pair(start_gateway: GatewayFactory, redis: RedisServer, **env: Any) -> tuple[Gateway, Gateway]:
    """Two instances of the gateway on one Redis, started side by side (with `PATIENT_REDIS`: a false fallback
    would change the counts these tests check)."""
    env = {"REDIS_URL": redis.url, **PATIENT_REDIS, **SLOT_CAPS, **env}
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(lambda _: start_gateway(**env), range(2))
    return first, second


def fleet_leases(redis: RedisServer, client: str = "127.0.0.1") -> int:
    """Stream leases the client holds in Redis, over all replicas (read straight from Redis)."""
    with Redis.from_url(redis.url, socket_timeout=5) as connection:
        return int(connection.zcard(DEFAULT_SLOTS_PREFIX + client))


def gauge(gateway: Gateway, name: str, **labels: str) -> list[float]:
    return samples(gateway, name, **labels)


def redis_log(gateway: Gateway, prefix: str) -> Counter[tuple[int, str]]:
    """How many log lines starting with `prefix` each (worker pid, store) wrote."""
    found: Counter[tuple[int, str]] = Counter()
    for line in gateway.log().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and str(entry.get("message", "")).startswith(prefix):
            found[entry["pid"], entry.get("store", "")] += 1
    return found


def recovered(client: httpx.Client, gateway: Gateway, pid: int, headers: dict[str, str]) -> bool:
    """One request (it makes the worker try Redis again when its interval is up); True once worker `pid`
    has logged that both its stores reach Redis again."""
    post_stream(client, gateway, max_tokens=1, **headers)
    back = redis_log(gateway, "redis reachable again")
    return back[pid, "ratelimit"] == 1 and back[pid, "slots"] == 1


def rate_limit_refusal(response: httpx.Response) -> None:
    """A 429 from the gateway's own limiter, with Retry-After and the IETF RateLimit headers."""
    assert response.status_code == 429
    assert response.json()["code"] == "rate_limited"
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["ratelimit-policy"] == '"default";q=5;w=300'
    assert response.headers["ratelimit"].startswith('"default";r=0;')


LIMITS = {
    "RATE_LIMIT_BURST": 5,
    "RATE_LIMIT_PER_MINUTE": 1,
    "MOCK_TOKENS_PER_SECOND": 0,
    "MOCK_FIRST_TOKEN_MS": 0,
    "MAX_TOKENS_LIMIT": UNPACED_MAX_TOKENS,
}


def spread(gateways: tuple[Gateway, Gateway], n: int, **headers: str) -> list[httpx.Response]:
    """`n` requests of one client, alternating between the two instances."""
    with http_client() as client:
        return [post_stream(client, gateways[i % 2], max_tokens=2, **headers) for i in range(n)]


def test_burst_is_shared_by_two_instances(start_gateway: GatewayFactory, redis_server: RedisServer) -> None:
    gateways = start_pair(start_gateway, redis_server, **LIMITS)
    responses = spread(gateways, 12)
    assert sorted(r.status_code for r in responses) == [200] * 5 + [429] * 7  # exactly the burst, fleet-wide
    admitted_on = [i % 2 for i, r in enumerate(responses) if r.status_code == 200]
    assert admitted_on == [0, 1, 0, 1, 0]  # the burst was spent on both instances, in request order
    for response in responses:
        if response.status_code == 200:
            assert response.headers["ratelimit-policy"] == '"default";q=5;w=300'
        else:
            rate_limit_refusal(response)
    for gateway in gateways:
        assert gauge(gateway, "streaming_redis_fallbacks_total") == []  # Redis never failed
        assert_slots_released(gateway)


def test_client_stream_cap_is_shared_by_two_instances(start_gateway: GatewayFactory, redis_server: RedisServer) -> None:
    gateways = start_pair(
        start_gateway,
        redis_server,
        MAX_CONNECTIONS_PER_CLIENT=3,
        RATE_LIMIT_PER_MINUTE=0,
        MOCK_TOKENS_PER_SECOND=1,
        MOCK_FIRST_TOKEN_MS=0,
    )
    body = {"prompt": "hold the line", "max_tokens": 10_000}

    def open_stream(stack: ExitStack, client: httpx.Client, gateway: Gateway) -> httpx.Response:
        response = stack.enter_context(client.stream("POST", gateway.url + "/stream", json=body))
        if response.status_code != 200:
            response.read()
        return response

    for order in ((0, 1, 0), (1, 1, 0)):  # fill the cap across both, refuse, free it all; then again
        with http_client() as client, ExitStack() as streams:
            opened = [open_stream(streams, client, gateways[i]) for i in order]
            assert [r.status_code for r in opened] == [200, 200, 200]
            assert fleet_leases(redis_server) == 3
            for gateway in gateways:  # a 4th, on either instance, is refused although each holds < 3 itself
                refused = open_stream(streams, client, gateway)
                assert refused.status_code == 503
                assert refused.json()["code"] == "client_connection_limit"
                assert "across the fleet" in refused.json()["detail"]
                assert refused.headers["retry-after"] == "1"
        # leaving the block closed the three streams: slots and fleet-wide leases are given back
        for gateway in gateways:
            assert_slots_released(gateway)
        assert eventually(lambda: fleet_leases(redis_server) == 0)
        assert fleet_leases(redis_server) == 0


def test_redis_killed_falls_back_to_instance_limits_and_recovers(
    start_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    keys = ["k-shared", "k-down", "k-back", "k-poll-0", "k-poll-1", "k-poll-2", "k-poll-3"]
    gateways = start_pair(
        start_gateway, redis_server, **LIMITS, LOG_LEVEL="info", API_KEYS=",".join(keys + SLOT_CHECK_KEYS)
    )

    def bearer(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    # Redis up: one burst for the fleet.
    statuses = [r.status_code for r in spread(gateways, 12, **bearer("k-shared"))]
    assert sorted(statuses) == [200] * 5 + [429] * 7

    redis_server.kill()  # SIGKILL: gone without a word, as in a crash

    # Redis down: every worker of both instances serves (no 5xx), each instance under its own burst of 5.
    # Worker by worker, so each one finds Redis gone for both stores (rate limit, then stream slot).
    per_instance: list[list[int]] = []
    for gateway in gateways:
        first, second = worker_pids(gateway)
        codes: list[int] = []
        for pid, n in ((first, 3), (second, 9)):
            with only_worker(gateway, pid), http_client() as client:
                for _ in range(n):
                    response = post_stream(client, gateway, max_tokens=2, **bearer("k-down"))
                    codes.append(response.status_code)
                    assert response.status_code in (200, 429), (response.status_code, response.text)
                    if response.status_code == 429:
                        rate_limit_refusal(response)  # the instance's own bucket
        per_instance.append(codes)
    for codes in per_instance:
        assert codes == [200] * 5 + [429] * 7  # 3 on the first worker, 2 on the second: 5 per instance
    for gateway in gateways:
        workers = worker_pids(gateway)
        assert gauge(gateway, "streaming_redis_up", store="ratelimit") == [0]
        assert gauge(gateway, "streaming_redis_up", store="slots") == [0]
        assert gauge(gateway, "streaming_redis_fallbacks_total", store="ratelimit") == [2]  # one per worker
        assert gauge(gateway, "streaming_redis_fallbacks_total", store="slots") == [2]
        warnings = redis_log(gateway, "redis unreachable")
        assert warnings == {(pid, store): 1 for pid in workers for store in ("ratelimit", "slots")}
        assert_slots_released(gateway)

    redis_server.start()  # same port, empty

    # Back: each worker tries Redis again once per second; poll every worker until both its stores are back.
    index = 0
    for gateway in gateways:
        for pid in worker_pids(gateway):
            key = f"k-poll-{index}"  # a worker's own key: its polls spend no one else's tokens
            index += 1
            with only_worker(gateway, pid), http_client() as client:
                assert eventually(lambda: recovered(client, gateway, pid, bearer(key)), WAIT_S)  # noqa: B023
    for gateway in gateways:
        assert gauge(gateway, "streaming_redis_up", store="ratelimit") == [1]
        assert gauge(gateway, "streaming_redis_up", store="slots") == [1]
        back = redis_log(gateway, "redis reachable again")
        assert back == {(pid, store): 1 for pid in worker_pids(gateway) for store in ("ratelimit", "slots")}
        assert sum(redis_log(gateway, "redis unreachable").values()) == 4  # still one per worker and store

    # Shared again: one burst for the fleet.
    responses = spread(gateways, 12, **bearer("k-back"))
    assert sorted(r.status_code for r in responses) == [200] * 5 + [429] * 7
    for response in responses:
        if response.status_code == 429:
            rate_limit_refusal(response)
    for gateway in gateways:
        assert_slots_released(gateway)


def test_redis_hung_falls_back_at_the_production_timeout(
    start_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    """Redis stopped with SIGSTOP: connections are accepted (the kernel's backlog) and never answered. With the
    production REDIS_TIMEOUT_SECONDS (0.25) every worker gives up on it, serves under the instance's own limits,
    and shares limits again once Redis answers."""
    polls = [f"k-poll-{i}" for i in range(400)]  # a fresh key per poll: a poll is never refused by the rate limit
    keys = ["k-hung", *polls]
    gateway = start_gateway(
        REDIS_URL=redis_server.url, **LIMITS, **SLOT_CAPS, LOG_LEVEL="info", API_KEYS=",".join(keys + SLOT_CHECK_KEYS)
    )
    assert "REDIS_TIMEOUT_SECONDS" not in gateway.env  # the default, as shipped

    def bearer(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    assert redis_server.proc is not None
    hung = redis_server.proc.pid
    os.kill(hung, signal.SIGSTOP)
    try:
        codes: list[int] = []
        workers = worker_pids(gateway)
        for pid, n in zip(workers, (3, 9), strict=True):  # every worker meets the hung Redis
            with only_worker(gateway, pid), http_client() as client:
                for _ in range(n):
                    response = post_stream(client, gateway, max_tokens=2, **bearer("k-hung"))
                    codes.append(response.status_code)
                    if response.status_code == 429:
                        rate_limit_refusal(response)  # the instance's own bucket
        assert codes == [200] * 5 + [429] * 7  # no 5xx, no hang: one burst for the instance
        for store in ("ratelimit", "slots"):
            assert gauge(gateway, "streaming_redis_up", store=store) == [0]
        warned = redis_log(gateway, "redis unreachable")
        assert {(pid, store) for pid in workers for store in ("ratelimit", "slots")} <= set(warned)
        assert_slots_released(gateway)  # streams ended while Redis hung gave every slot back
        back_before = redis_log(gateway, "redis reachable again")
    finally:
        os.kill(hung, signal.SIGCONT)

    fresh = iter(polls)
    for pid in worker_pids(gateway):  # answering again: each worker shares limits again

        def back(pid: int = pid) -> bool:
            # One admitted request: the worker tries Redis for both stores once their retry interval is up.
            with only_worker(gateway, pid), http_client() as client:
                assert post_stream(client, gateway, max_tokens=1, **bearer(next(fresh))).status_code == 200
            now = redis_log(gateway, "redis reachable again")
            return all(now[pid, store] > back_before[pid, store] for store in ("ratelimit", "slots"))

        assert eventually(back, 60)  # guard only: each poll pauses a worker and streams, slow on a loaded machine
