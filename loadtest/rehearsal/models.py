"""The rehearsal's `models` mode: a fleet of model servers (loadtest/fake_openai.py) behind a Kubernetes Service,
rolled like a model Deployment while the gateways stay up.

The gateways watch the Service's EndpointSlices (UPSTREAM_DISCOVERY=kubernetes) on a small API server in this
process (loadtest/harness/fake_apiserver.py: the real list/watch protocol, every slice validated against the
Kubernetes schema). Each model server listens on a port of its own and has a slice of its own (a slice's
endpoints share their ports). A roll replaces one server as a rollout replaces a pod:

    replacement started on a new port → /v1/models answers → its slice added, ready → min-ready seconds (a
    Deployment's minReadySeconds: the replacement takes new streams while the old one keeps its own)
    → the old one's endpoint marked terminating (no new streams) → grace → SIGKILL (a server that does not
    drain: its streams in flight die mid-stream) → its slice deleted
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from loadtest import fake_openai
from loadtest.harness.fake_apiserver import READY, TERMINATING, FakeApiServer, endpoint_slice, serving
from loadtest.harness.ports import loopback_listener
from loadtest.harness.process import Child, Supervisor

NAMESPACE, SERVICE = "models", "llm"
# the gateways' UPSTREAM_URL: its scheme and path are every endpoint's, its host the name they answer to
SERVICE_URL = f"http://{SERVICE}.{NAMESPACE}.svc/v1"
START_GUARD_S = 30.0  # guard only: a fake model server answering after its start
FIRST_TOKEN_MS = 50


@dataclass
class ModelRoll:
    """One model server replaced (times: seconds since the load started)."""

    server: str
    replacement: str
    added_at: float = 0.0  # the replacement's slice, ready
    terminating_at: float = 0.0
    killed_at: float = 0.0
    deleted_at: float = 0.0
    in_flight_at_kill: int | None = None  # streams the old server was generating when it was killed
    requests_served: int | None = None  # by the old server over its life


class ModelServer:
    """One "pod": a fake OpenAI-compatible server on a loopback socket bound here, and its EndpointSlice."""

    def __init__(self, name: str, supervisor: Supervisor, logdir: Path, tokens_per_second: float) -> None:
        self.name = name
        sock = loopback_listener(inheritable=True)
        self.port = int(sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        argv = fake_openai.command(sock.fileno(), tokens_per_second=tokens_per_second, first_token_ms=FIRST_TOKEN_MS)
        try:
            self.child: Child = supervisor.spawn(
                name,
                argv,
                log_path=logdir / f"{name}.log",
                pass_fds=(sock.fileno(),),
                stop_signal=signal.SIGKILL,  # a model server that does not drain
            )
        finally:
            sock.close()  # the server holds its own copy

    def wait_ready(self) -> float:
        def answers() -> bool:
            try:
                return httpx.get(self.url + "/v1/models", timeout=2.0).status_code == 200
            except httpx.HTTPError:
                return False

        return self.child.wait_ready(answers, START_GUARD_S, f"{self.name} /v1/models", interval=0.1)

    def stats(self) -> dict[str, Any] | None:
        try:
            stats: dict[str, Any] = httpx.get(self.url + "/_stats", timeout=2.0).json()
        except (httpx.HTTPError, ValueError):
            return None
        return stats

    def endpoint_slice(self, conditions: dict[str, bool]) -> dict[str, Any]:
        return endpoint_slice(NAMESPACE, SERVICE, f"{SERVICE}-{self.name}", self.port, [("127.0.0.1", conditions)])


def kubeconfig(path: Path, server: str) -> Path:
    """What the official client reads outside a pod (KUBECONFIG): the API server and a token."""
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: rehearsal\n"
        f"clusters: [{{name: rehearsal, cluster: {{server: '{server}'}}}}]\n"
        "users: [{name: rehearsal, user: {token: rehearsal-token}}]\n"
        f"contexts: [{{name: rehearsal, context: {{cluster: rehearsal, user: rehearsal, namespace: {NAMESPACE}}}}}]\n"
    )
    return path


class ModelFleet:
    """The model servers, the API server that lists them, and their roll."""

    def __init__(
        self, count: int, tokens_per_second: float, supervisor: Supervisor, workdir: Path, logdir: Path
    ) -> None:
        self.count = count
        self.tokens_per_second = tokens_per_second
        self.supervisor = supervisor
        self.logdir = logdir
        self.api = FakeApiServer(NAMESPACE, SERVICE)
        self._stack = contextlib.ExitStack()
        self.api_url = self._stack.enter_context(serving(self.api))
        self.kubeconfig = kubeconfig(workdir / "kubeconfig", self.api_url)
        self.servers: list[ModelServer] = []
        self._generation = 0

    def gateway_env(self) -> dict[str, str]:
        return {
            "UPSTREAM_URL": SERVICE_URL,
            "UPSTREAM_DISCOVERY": "kubernetes",
            "UPSTREAM_K8S_SERVICE": f"{NAMESPACE}/{SERVICE}",
            "KUBECONFIG": str(self.kubeconfig),
            "UPSTREAM_CONTINUATION": "vllm",
        }

    def _start(self, index: int) -> ModelServer:
        self._generation += 1
        server = ModelServer(f"model-{index}.{self._generation}", self.supervisor, self.logdir, self.tokens_per_second)
        server.wait_ready()
        self.api.put(server.endpoint_slice(READY))
        return server

    def start(self) -> None:
        self.servers = [self._start(i) for i in range(self.count)]

    def roll(self, index: int, min_ready: float, grace: float, since: Callable[[], float]) -> ModelRoll:
        """Replace server `index`: the replacement ready in the slice, `min_ready` seconds later the old one
        terminating, SIGKILLed after `grace` seconds, its slice deleted. `since()` gives the run's clock."""
        old = self.servers[index]
        new = self._start(index)
        record = ModelRoll(old.name, new.name, added_at=since())
        time.sleep(min_ready)
        self.api.put(old.endpoint_slice(TERMINATING))
        record.terminating_at = since()
        time.sleep(grace)
        stats = old.stats()
        record.in_flight_at_kill = stats["active"] if stats else None
        record.requests_served = stats["requests"] if stats else None
        old.child.stop(signal.SIGKILL, 1.0)
        self.supervisor.reaped(old.child)
        record.killed_at = since()
        self.api.delete(f"{SERVICE}-{old.name}")
        record.deleted_at = since()
        self.servers[index] = new
        return record

    def close(self) -> None:
        self._stack.close()
