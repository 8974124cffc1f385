"""UPSTREAM_DISCOVERY=kubernetes against a small API server speaking the real list/watch protocol
(loadtest/harness/fake_apiserver.py: real EndpointSlice objects, each validated against the Kubernetes schema).

Two fake model servers are the Service's pods (127.0.0.2 and 127.0.0.3, one port). The gateway finds the
API server through KUBECONFIG, as the official client does outside a pod.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loadtest.harness.fake_apiserver import READY, TERMINATING, FakeApiServer, endpoint_slice, serving
from loadtest.harness.wait import wait_until
from tests.conftest import FakeUpstream, GatewayFactory
from tests.fleet.fakes import fake_server, stream_chat
from tests.fleet.test_dns_discovery import _only, _reaches

NAMESPACE, SERVICE = "models", "llm"
FOLLOW_TIMEOUT_S = 15.0  # guard only: a watch event reaches the gateway at once
LONG_TOKENS = 400  # a stream in flight while its endpoint goes terminating: 1 s at 400 tok/s


@pytest.fixture
def twin_fakes() -> Iterator[tuple[FakeUpstream, FakeUpstream, int]]:
    with fake_server("127.0.0.2") as first:
        port = int(first.url.rsplit(":", 1)[1].split("/")[0])
        with fake_server("127.0.0.3", port) as second:
            yield first, second, port


def _kubeconfig(path: Path, server: str) -> Path:
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: test\n"
        f"clusters: [{{name: test, cluster: {{server: '{server}'}}}}]\n"
        "users: [{name: test, user: {token: test-token}}]\n"
        "contexts: [{name: test, context: {cluster: test, user: test, namespace: models}}]\n"
    )
    return path


def test_gateway_follows_endpointslices(
    twin_fakes: tuple[FakeUpstream, FakeUpstream, int], tmp_path: Path, start_gateway: GatewayFactory
) -> None:
    first, second, port = twin_fakes
    api = FakeApiServer(NAMESPACE, SERVICE)

    def slice_of(*endpoints: tuple[str, dict[str, bool]]) -> dict[str, object]:
        return endpoint_slice(NAMESPACE, SERVICE, f"{SERVICE}-abcde", port, list(endpoints))

    api.put(slice_of(("127.0.0.2", READY)))
    with serving(api) as server, httpx.Client(timeout=30) as client:
        gateway = start_gateway(
            UPSTREAM_URL=f"http://{SERVICE}.{NAMESPACE}.svc:{port}/v1",
            UPSTREAM_DISCOVERY="kubernetes",
            UPSTREAM_K8S_SERVICE=f"{NAMESPACE}/{SERVICE}",
            KUBECONFIG=_kubeconfig(tmp_path / "kubeconfig", server),
            UPSTREAM_RETRIES=0,
        )
        assert _only(gateway.url, first, second, client)
        assert set(first.stats()["hosts"]) == {f"{SERVICE}.{NAMESPACE}.svc:{port}"}
        wait_until(lambda: api.watches >= 2, FOLLOW_TIMEOUT_S, "both workers watch")

        # a stream in flight on the first pod when it goes terminating and a second pod comes up
        first.reset()
        texts: list[str] = []
        long_stream = threading.Thread(target=lambda: texts.append(stream_chat(gateway.url, LONG_TOKENS, client)))
        long_stream.start()
        wait_until(lambda: first.stats()["active"] == 1, FOLLOW_TIMEOUT_S, "the long stream started")
        api.put(slice_of(("127.0.0.2", TERMINATING), ("127.0.0.3", READY)))
        wait_until(lambda: _only(gateway.url, second, first, client), FOLLOW_TIMEOUT_S, "terminating gets nothing")
        long_stream.join(timeout=30)
        assert texts and texts[0].rstrip().endswith("data: [DONE]")  # its stream in flight finished
        assert '"finish_reason":"length"' in texts[0].replace(" ", "")

        api.put(slice_of(("127.0.0.2", READY), ("127.0.0.3", READY)))  # back, and ready again
        first.reset()
        wait_until(lambda: _reaches(gateway.url, first, client), FOLLOW_TIMEOUT_S, "streams reach the pod again")

        # a change the watchers miss, then the watch breaks with 410 Gone: only a re-list can show it
        lists = api.lists
        api.put_silently(slice_of(("127.0.0.3", READY)))
        api.expire_watches()
        wait_until(lambda: api.lists >= lists + 2, FOLLOW_TIMEOUT_S, "each worker re-lists after the watch error")
        wait_until(lambda: _only(gateway.url, second, first, client), FOLLOW_TIMEOUT_S, "the re-listed set is used")
