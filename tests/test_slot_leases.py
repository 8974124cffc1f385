"""MAX_STREAM_AGE_SECONDS reclaims a slot, against real gateways sharing a real redis-server.

With REDIS_URL, a client's slot is also a lease in Redis that lives MAX_STREAM_AGE_SECONDS. An instance
killed with SIGKILL releases nothing: its client's lease stays, and every replica refuses that client
(per-client cap 1) until the lease's age runs out; then the slot is the fleet's again.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loadtest.harness.redis import RedisServer, started_redis
from loadtest.harness.wait import eventually
from tests.conftest import PATIENT_REDIS, GatewayFactory
from tests.test_handover import kill_instance
from tests.test_redis_limits import fleet_leases

AGE_S = 8  # long enough for the refusal to be seen first on a loaded machine, short for the test
GUARD_S = 60.0  # guard only: the lease must be gone well before this (the default age is 300 s)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    yield from started_redis(tmp_path)


def test_a_dead_instances_slot_is_reclaimed_after_max_stream_age(
    start_gateway: GatewayFactory, redis_server: RedisServer
) -> None:
    fleet = {
        "REDIS_URL": redis_server.url,
        **PATIENT_REDIS,
        "MAX_CONNECTIONS_PER_CLIENT": 1,
        "MAX_STREAM_AGE_SECONDS": AGE_S,
        "TOTAL_TIMEOUT_SECONDS": AGE_S,
    }
    dying = start_gateway(**fleet, MOCK_FIRST_TOKEN_MS=600_000, FIRST_TOKEN_TIMEOUT_SECONDS=AGE_S)
    survivor = start_gateway(**fleet, MOCK_FIRST_TOKEN_MS=5, MOCK_TOKENS_PER_SECOND=0)
    body = {"prompt": "leases", "max_tokens": 2}
    with httpx.Client(timeout=30) as client, client.stream("POST", dying.url + "/stream", json=body) as held:
        assert held.status_code == 200
        assert fleet_leases(redis_server) == 1
        kill_instance(dying)  # SIGKILL: nothing is released
    refused = httpx.post(survivor.url + "/stream", json=body, timeout=30)
    assert refused.status_code == 503 and refused.json()["code"] == "client_connection_limit", refused.text
    assert "across the fleet" in refused.json()["detail"]

    def admitted() -> bool:
        response = httpx.post(survivor.url + "/stream", json=body, timeout=30)
        return response.status_code == 200 and '"type": "done"' in response.text

    assert eventually(admitted, timeout=GUARD_S)
    assert fleet_leases(redis_server) == 0  # the survivor's own stream released its lease
