"""Shared by the security tests: a gateway on the fake upstream that never retries and never opens its
circuit, one per module (a module that defines its own `gateway` uses that instead)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import FakeUpstream, Gateway, launch_gateway


@pytest.fixture(scope="module")
def gateway(fake_upstream_server: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = launch_gateway(
        {"UPSTREAM_URL": fake_upstream_server.url, "UPSTREAM_RETRIES": 0, "CIRCUIT_FAILURE_THRESHOLD": 1000},
        tmp_path_factory.mktemp("gateway") / "gateway.log",
    )
    yield gateway
    gateway.stop()
