"""Shared fixtures: the real gateway (`python -m app`: gunicorn + uvicorn workers), the fake upstream, an OTLP
receiver (`otlp`) and a real Prometheus (`prometheus_server`).

Each server gets a listening socket the test binds itself on 127.0.0.1:0 and hands over, so
there is no guessed port: gunicorn takes it through systemd socket activation (LISTEN_FDS), the
path it uses in production with socket-activated units; the fake upstream takes it with --fd.
The gateway gets two: its public port and METRICS_PORT (`Gateway.metrics_url`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest

from loadtest.harness.ports import loopback_listener
from loadtest.harness.prometheus import Prometheus, ScrapeTarget, start_prometheus
from loadtest.harness.wait import wait_until
from tests.otlp import OTLPReceiver

ROOT = Path(__file__).resolve().parent.parent
SD_LISTEN_FDS_START = 3  # systemd's first passed descriptor
START_TIMEOUT_S = 30.0  # guard only: how long a server may take to answer before the test fails
# Caps small enough to take whole: gateways whose tests end with tests/slots.py `assert_slots_released`.
SLOT_CAPS: dict[str, Any] = {"MAX_CONNECTIONS": 6, "MAX_CONNECTIONS_PER_CLIENT": 3}
# Gateways on a test Redis wait longer for it than the production 0.25 s: on a loaded test machine (3 test files at
# once on 2 cores) a reply can take longer, and a false "Redis is down" changes what a test checks. The production
# timeout is tests/test_redis_limits.py's subject; a stopped or killed Redis refuses connections at once anyway.
PATIENT_REDIS: dict[str, Any] = {"REDIS_TIMEOUT_SECONDS": 2}
FAILURE_LOG_LINES = 80  # the tail of each gateway's log shown with a failed test

_launched: list[Gateway] = []  # every gateway this pytest process started, for the logs of a failed test


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A skipped test is a missing test: the run fails (CI installs every tool the suite needs)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and reporter.stats.get("skipped") and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test shows the logs of the gateways it used (started in it, or still running): a flake in CI
    is diagnosed from its report, not re-run."""
    report = yield
    if report.failed:
        first = item.stash.get(_first_launch, len(_launched))
        for number, gateway in enumerate(_launched):
            if (number >= first or gateway.proc.poll() is None) and gateway.log_path.exists():
                lines = gateway.log().splitlines()[-FAILURE_LOG_LINES:]
                report.sections.append((f"gateway {gateway.url} (pid {gateway.pid}) log", "\n".join(lines)))
    return report


_first_launch = pytest.StashKey[int]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_first_launch] = len(_launched)


def _listening_socket(*, inheritable: bool = False) -> socket.socket:
    """A gateway's public socket (tests that share one between two gateways replace this function)."""
    return loopback_listener(inheritable=inheritable)


def _wait_until_up(url: str, proc: subprocess.Popen[bytes], path: str) -> None:
    def answers() -> bool:
        try:
            return httpx.get(url + path, timeout=1.0).status_code < 500
        except httpx.TransportError:
            return False

    wait_until(answers, START_TIMEOUT_S, f"{url}{path} answering", alive=lambda: proc.poll() is None)


@dataclass
class Gateway:
    url: str
    proc: subprocess.Popen[bytes]
    env: dict[str, str]
    log_path: Path
    metrics_url: str = ""  # GET {metrics_url}/metrics: the metrics port (the public url does not serve it)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_up(self) -> Gateway:
        """Wait until a worker answers /health; a gateway that cannot start fails the test with its log."""
        try:
            _wait_until_up(self.url, self.proc, "/health")
        except RuntimeError:
            self.stop(signal.SIGKILL)
            raise RuntimeError(self.log()) from None
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.reap(timeout)

    def reap(self, timeout: float = 60.0) -> int:
        """Wait for the gateway to exit (SIGKILL after `timeout`); its exit code."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode


PROXY_VARIABLES = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}  # the machine's proxy stays out of tests


class GatewayFactory(Protocol):
    def __call__(self, **env: Any) -> Gateway: ...


def launch_gateway(env_overrides: dict[str, Any], log_path: Path, *, wait: bool = True) -> Gateway:
    """Start the gateway and wait until it serves (`wait=False`: return at once, the caller calls `wait_up`)."""
    sock, metrics_sock = _listening_socket(), loopback_listener()  # each gateway its own metrics port
    port, metrics_port = sock.getsockname()[1], metrics_sock.getsockname()[1]
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("UPSTREAM_", "MOCK_", "PROMETHEUS_")) and k.lower() not in PROXY_VARIABLES
    }
    env.update(
        {
            "WEB_CONCURRENCY": "2",
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "METRICS_PORT": str(metrics_port),
            "LOG_LEVEL": "warning",
        }
    )
    # Tests of other features send many requests from one address; the protection tests set these back.
    env.update({"RATE_LIMIT_PER_MINUTE": "0", "MAX_CONNECTIONS_PER_CLIENT": "500"})
    # A client leaving stops its generation at once (the resume tests turn orphaned generations back on).
    env["ORPHAN_TIMEOUT_SECONDS"] = "0"
    env.update({k.upper(): str(v) for k, v in env_overrides.items()})
    fds = (os.dup(sock.fileno()), os.dup(metrics_sock.fileno()))
    sock.close()
    metrics_sock.close()

    def hand_over_sockets() -> None:  # runs in the child between fork and exec: public on fd 3, metrics on 4
        moved = [os.dup(fd) for fd in fds]  # both copied before either is placed: fd 3 may hold the other one
        for offset, fd in enumerate(moved):
            os.dup2(fd, SD_LISTEN_FDS_START + offset)
            os.set_inheritable(SD_LISTEN_FDS_START + offset, True)
        os.environ.update(env)
        os.environ["LISTEN_FDS"] = str(len(moved))
        os.environ["LISTEN_PID"] = str(os.getpid())

    log = log_path.open("wb")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app"],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=hand_over_sockets,
            close_fds=False,
            env=None,  # fds 3, 4 must survive; CLOEXEC fds close
        )
    finally:
        for fd in fds:
            os.close(fd)
    log.close()
    gateway = Gateway(
        url=f"http://127.0.0.1:{port}",
        proc=proc,
        env=env,
        log_path=log_path,
        metrics_url=f"http://127.0.0.1:{metrics_port}",
    )
    _launched.append(gateway)
    return gateway.wait_up() if wait else gateway


def _gateways(tmp_path_factory: pytest.TempPathFactory, *, wait: bool) -> Iterator[GatewayFactory]:
    started: list[Gateway] = []

    def factory(**env: Any) -> Gateway:
        log_path = tmp_path_factory.mktemp("gateway") / "gateway.log"
        gateway = launch_gateway(env, log_path, wait=wait)
        started.append(gateway)
        return gateway

    yield factory
    for gateway in started:  # every one signalled first: they shut down side by side
        if gateway.proc.poll() is None:
            gateway.proc.send_signal(signal.SIGTERM)
    for gateway in started:
        gateway.reap()


@pytest.fixture
def start_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayFactory]:
    """Factory: start the real gateway with extra env vars; every one started is stopped after the test."""
    yield from _gateways(tmp_path_factory, wait=True)


@pytest.fixture
def spawn_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayFactory]:
    """`start_gateway` that returns while the gateway boots: start what else the test needs (another gateway,
    Prometheus) meanwhile, then `gateway.wait_up()`."""
    yield from _gateways(tmp_path_factory, wait=False)


@contextmanager
def gateway_running(env: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway for a fixture wider than one test (a module's): started with `env`, stopped at the end."""
    gateway = launch_gateway(env, tmp_path_factory.mktemp("gateway") / "gateway.log")
    try:
        yield gateway
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
def mock_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One gateway on the built-in mock, shared by a module's read-only tests (fast pace keeps tests short)."""
    with gateway_running(
        {"MOCK_TOKENS_PER_SECOND": 200, "MOCK_FIRST_TOKEN_MS": 5, **SLOT_CAPS}, tmp_path_factory
    ) as gw:
        yield gw


@dataclass
class FakeUpstream:
    url: str  # the OpenAI base URL, ending in /v1
    proc: subprocess.Popen[bytes]
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=self.url.removesuffix("/v1"), timeout=10)

    def script(self, *faults: dict[str, Any]) -> None:
        self.client.post("/_script", json={"faults": list(faults)}).raise_for_status()

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.client.get("/_stats").json()
        return stats

    def reset(self) -> None:
        self.client.post("/_reset").raise_for_status()

    def set_healthy(self, healthy: bool) -> None:
        """What the fake's /health answers from now on (200, or 503)."""
        self.client.post("/_health", json={"healthy": healthy}).raise_for_status()

    def set_load(self, **load: float) -> None:
        """What the fake's /metrics reports from now on (waiting, kv_cache, metrics_status)."""
        self.client.post("/_load", json=load).raise_for_status()

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        stats = self.stats()
        while not predicate(stats) and time.monotonic() < deadline:
            time.sleep(0.02)  # polling interval, not an assertion
            stats = self.stats()
        return stats


@pytest.fixture(scope="module")
def fake_upstream_server() -> Iterator[FakeUpstream]:
    sock = _listening_socket(inheritable=True)
    port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadtest.fake_openai", "--fd", str(sock.fileno()), "--tokens-per-second", "200"],
        cwd=ROOT,
        pass_fds=(sock.fileno(),),
    )
    sock.close()
    url = f"http://127.0.0.1:{port}"
    _wait_until_up(url, proc, "/_stats")
    fake = FakeUpstream(url=url + "/v1", proc=proc)
    yield fake
    fake.client.close()
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def fake_upstream(fake_upstream_server: FakeUpstream) -> FakeUpstream:
    """The module's fake upstream, with its script and stats cleared for this test."""
    fake_upstream_server.reset()
    return fake_upstream_server


@pytest.fixture(scope="module")
def relay_gateway(fake_upstream_server: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway relaying from the module's fake upstream."""
    gateway = launch_gateway(
        {
            "UPSTREAM_URL": fake_upstream_server.url,
            "UPSTREAM_API_KEY": "sk-upstream-secret",
            # relay tests inject failures one after another; breaker and retries have their own tests
            "CIRCUIT_FAILURE_THRESHOLD": 1000,
            "UPSTREAM_RETRIES": 0,
            **SLOT_CAPS,
        },
        tmp_path_factory.mktemp("gateway") / "gateway.log",
    )
    yield gateway
    gateway.stop()


@pytest.fixture
def otlp() -> Iterator[OTLPReceiver]:
    """An OTLP/HTTP receiver on loopback collecting the spans exported to `otlp.url`.

    Request it before `start_gateway` (pytest tears fixtures down in reverse): then it still answers when the
    gateways flush their spans at exit. Gone first, every traced gateway's exit would wait out the exporter's
    retries (seconds)."""
    receiver = OTLPReceiver()
    yield receiver
    receiver.server.shutdown()
    receiver.server.server_close()


class PrometheusFactory(Protocol):
    def __call__(
        self,
        scrape_targets: Sequence[ScrapeTarget | str] = (),
        rule_files: Iterable[Path | str] = (),
        *,
        interval: str = "1s",
    ) -> Prometheus: ...


@pytest.fixture
def prometheus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusFactory]:
    """Factory: a real Prometheus on loopback scraping `scrape_targets` every `interval` (default 1 s) and
    evaluating `rule_files` as often; its TSDB lives in a temp dir. Every one started stops after the test.

    A target is `ScrapeTarget(address, labels)` (labels as a Kubernetes scrape would add them, e.g. `pod`,
    `namespace`) or a bare "host:port" / URL. The returned `Prometheus` has `query(expr)`, `api(path)`,
    `rules()`, `targets()`, `wait_for_scrapes(n)`, `reload()` and `log()`.
    """
    started: list[Prometheus] = []

    def factory(
        scrape_targets: Sequence[ScrapeTarget | str] = (),
        rule_files: Iterable[Path | str] = (),
        *,
        interval: str = "1s",
    ) -> Prometheus:
        server = start_prometheus(scrape_targets, rule_files, tmp_path_factory.mktemp("prometheus"), interval=interval)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


def sse_data(body: str) -> list[str]:
    """The `data:` payloads of an SSE body, the way a client that reads only data lines sees them."""
    return [line[len("data: ") :] for line in body.splitlines() if line.startswith("data: ")]
