"""Every dashboard query and every rule expression returns data from a real Prometheus scraping the real gateway.

The gateway (2 workers, relaying from the fake upstream) gets a short load with everything the panels
show: streams on two endpoints, upstream errors and retries, a per-client burst over the rate limit, a
burst over the instance's connection limit, Redis unreachable (limits fall back), and both workers
drained with streams in flight (streams cut at the deadline, requests refused while draining; gunicorn
starts new workers). A second gateway runs a fleet of three fake model servers (the per-endpoint series exist only
then) and one of them is SIGKILLed while it relays streams: they continue on the others, its failures are counted
and its circuit opens. Debian's Prometheus scrapes both every second the way prometheus-operator scrapes a
ServiceMonitor: `honor_labels: false`, and the target labels the operator attaches to every target (`namespace`,
`service`, `pod`, `container`, `endpoint`, `job` = the Service's name, `instance`), plus the `cluster` label a
multi-cluster Prometheus (Thanos, Mimir) adds: the two gateways are two pods of one Service. It evaluates
dashboards/prometheus-rules.yaml every second.

Then, through the HTTP API (instant queries):
- no scraped label collides with a target label (none is kept as `exported_*`), and every series carries them;
- every dashboard target and annotation, with `$__rate_interval` / `$__interval` / `$__range` as 30s and every template
  variable as `.*` (the lint test guarantees variables only appear in `=~` matchers), must succeed and
  return at least one sample (NaN counts: a quantile over an idle window is still an answer);
- every template variable's `label_values(selector, label)` must find series carrying that label;
- every recording rule's expression and its recorded series must return data;
- every alert expression must succeed. A healthy system keeps alert conditions false, so an empty result
  is expected; instead each *signal* must have data: the expression split on its top-level
  `and`/`or`/`unless`, each operand without its top-level comparison (`signal > threshold` -> `signal`);
- the alerts for what really happened (streams cut by drains, Redis fallback) are pending.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import psutil

from loadtest.harness.prometheus import PromQLError, ScrapeTarget
from tests.conftest import FakeUpstream, Gateway, GatewayFactory, PrometheusFactory
from tests.dashboards.promql import (
    dashboard_panels,
    dashboard_variables,
    instantiate,
    label_values_query,
    signals,
    variable_query,
)
from tests.fleet.fakes import fake_fleet
from tests.workers import connection_to_each_worker, wait_all_draining

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "dashboards" / "prometheus-rules.yaml"
DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))
WINDOW = "30s"  # stands in for Grafana's $__rate_interval, $__interval and $__range
# What prometheus-operator attaches to a ServiceMonitor's target (the Service `streaming-gateway`, port `http`;
# `instance` is the scraped address), and the `cluster` label of a multi-cluster setup.
TARGET_LABELS = {
    "namespace": "streaming-test",
    "service": "streaming-gateway",
    "pod": "gateway-0",
    "container": "gateway",
    "endpoint": "http",
    "job": "streaming-gateway",
    "cluster": "test-cluster",
}
FLEET_POD = "gateway-1"  # the gateway relaying to a fleet: a second pod of the same Service
MAX_CONNECTIONS = 12
FLEET_STREAMS = 6  # concurrent 2 s streams over three model servers: least-in-flight gives each two
FLEET_PACE = 40  # tokens per second of each model server (the six streams after the death: 1/8 s each)
FLEET_TOKENS = 2 * FLEET_PACE  # per concurrent stream: 2 s
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}


def _code(response: httpx.Response) -> str:
    """`200`, or the refusal's error code (`rate_limited`, `connection_limit`, `draining`, ...)."""
    if response.status_code == 200:
        return "200"
    body = response.json()
    return str(body.get("code") or body.get("error", {}).get("code") or response.status_code)


def _in_parallel(count: int, task: Callable[[int], Counter[str]]) -> Counter[str]:
    with ThreadPoolExecutor(max_workers=count) as pool:
        return sum((future.result() for future in [pool.submit(task, i) for i in range(count)]), Counter())


def _load(gateway: Gateway, seconds: float, clients: int = 4) -> Counter[str]:
    """Streams on /stream and /v1/chat/completions; each request from its own address, so none is rate limited."""
    stop = time.monotonic() + seconds

    def run(t: int) -> Counter[str]:
        codes: Counter[str] = Counter()
        with httpx.Client(base_url=gateway.url, timeout=10) as client:
            n = 0
            while time.monotonic() < stop:
                n += 1
                headers = {"X-Forwarded-For": f"10.{t}.{n // 250 % 250}.{n % 250}"}
                if n % 2:
                    response = client.post("/stream", json={"prompt": "load", "max_tokens": 5}, headers=headers)
                else:
                    response = client.post("/v1/chat/completions", json=CHAT, headers=headers)
                codes[_code(response)] += 1
        return codes

    return _in_parallel(clients, run)


def _faults(gateway: Gateway, fake: FakeUpstream) -> Counter[str]:
    """An upstream failing twice (error after the one retry), once (retried, then fine), mid-stream (an error it
    sent), and its connection dropped mid-stream (continued)."""
    codes: Counter[str] = Counter()
    with httpx.Client(base_url=gateway.url, timeout=10, headers={"X-Forwarded-For": "10.99.0.1"}) as client:
        fake.script({"status": 500}, {"status": 500})
        codes[_code(client.post("/stream", json={"prompt": "fail", "max_tokens": 5}))] += 1
        fake.script({"status": 500})
        codes[_code(client.post("/stream", json={"prompt": "retried", "max_tokens": 5}))] += 1
        fake.script({"error_after": 2})
        codes["mid-stream " + _code(client.post("/v1/chat/completions", json=CHAT))] += 1
        fake.script({"reset_after": 2})
        response = client.post("/stream", json={"prompt": "continued", "max_tokens": 5})
        codes["continued " + _code(response)] += '"type": "done", "tokens": 5' in response.text
    return codes


def _rate_limit_burst(gateway: Gateway) -> Counter[str]:
    """One client over its burst of 5."""
    with httpx.Client(base_url=gateway.url, timeout=10, headers={"X-Forwarded-For": "192.0.2.10"}) as client:
        return Counter(_code(client.post("/stream", json={"prompt": "burst", "max_tokens": 1})) for _ in range(9))


def _connection_limit_burst(gateway: Gateway) -> Counter[str]:
    """More concurrent half-second streams than the instance's MAX_CONNECTIONS, all at once."""
    clients = MAX_CONNECTIONS + 8
    barrier = threading.Barrier(clients)

    def run(i: int) -> Counter[str]:
        with httpx.Client(base_url=gateway.url, timeout=10, headers={"X-Forwarded-For": f"10.98.0.{i}"}) as client:
            barrier.wait()
            return Counter([_code(client.post("/stream", json={"prompt": "many", "max_tokens": 100}))])

    return _in_parallel(clients, run)


def _worker_pids(gateway: Gateway) -> set[int]:
    return {child.pid for child in psutil.Process(gateway.pid).children()}


def _start_slow_stream(sock: socket.socket, fake: FakeUpstream, i: int) -> None:
    """A 10 s stream on this connection; returns once it is relaying."""
    fake.script({"tokens_per_second": 5})
    body = json.dumps({"prompt": "drain", "max_tokens": 50}).encode()
    head = (
        f"POST /stream HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nX-Forwarded-For: 10.97.0.{i}\r\nConnection: close\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    first = sock.recv(65536)
    assert first.startswith(b"HTTP/1.1 200"), first


def _drain_both_workers(gateway: Gateway, fake: FakeUpstream) -> Counter[str]:
    """SIGTERM each worker while it relays a stream: the drain deadline cuts them; new requests get 503."""
    with (
        connection_to_each_worker(gateway) as connections,
        connection_to_each_worker(gateway) as probes,  # a second, idle connection to each worker, for /ready
    ):
        for i, sock in enumerate(connections.values()):
            _start_slow_stream(sock, fake, i)
        for pid in connections:
            os.kill(pid, signal.SIGTERM)  # what gunicorn forwards on a pod's SIGTERM, one worker at a time here
        wait_all_draining(probes)  # both drains have started (DRAIN_TIMEOUT_SECONDS=1), so every request is refused
        with httpx.Client(base_url=gateway.url, timeout=10, limits=httpx.Limits(max_keepalive_connections=0)) as c:
            codes = Counter(_code(c.post("/stream", json={"prompt": "late", "max_tokens": 1})) for _ in range(6))
        _gone, alive = psutil.wait_procs([psutil.Process(pid) for pid in connections], timeout=15)
        assert not alive, "a worker did not exit after its drain"
    deadline = time.monotonic() + 30
    while True:  # gunicorn replaces the workers
        workers = _worker_pids(gateway)
        if len(workers) == 2 and not workers & set(connections) and httpx.get(gateway.url + "/health").is_success:
            return codes
        assert time.monotonic() < deadline, "gunicorn did not start new workers"
        time.sleep(0.1)  # polling interval, not an assertion


def _model_server_dies(gateway: Gateway, fakes: list[FakeUpstream]) -> Counter[str]:
    """Streams over three model servers; the last is SIGKILLed (a model pod's death) once every stream has its
    first token, so it dies holding its share: those continue on the others (UPSTREAM_CONTINUATION) or end with
    an error event. Then more streams, which the dead one's open circuit keeps off it."""
    victim = fakes[-1]
    relaying = threading.Barrier(FLEET_STREAMS + 1)

    def run(i: int) -> Counter[str]:
        headers = {"X-Forwarded-For": f"10.96.0.{i}"}
        with (
            httpx.Client(base_url=gateway.url, timeout=30, headers=headers) as client,
            client.stream("POST", "/v1/chat/completions", json={**CHAT, "max_tokens": FLEET_TOKENS}) as response,
        ):
            lines = response.iter_lines()
            before_first_token = list(itertools.takewhile(lambda line: "tok0" not in line, lines))
            relaying.wait()
            body = "\n".join([*before_first_token, *lines])
        return Counter(["fleet error event" if 'data: {"error"' in body else "fleet 200"])

    with ThreadPoolExecutor(max_workers=FLEET_STREAMS) as pool:
        streams = [pool.submit(run, i) for i in range(FLEET_STREAMS)]
        relaying.wait(timeout=30)  # every stream relays its first token
        assert victim.stats()["active"] > 0, "the model server to kill carried no stream"
        victim.proc.kill()
        victim.proc.wait(timeout=10)
        codes = sum((stream.result() for stream in streams), Counter())
    with httpx.Client(base_url=gateway.url, timeout=30, headers={"X-Forwarded-For": "10.96.1.1"}) as client:
        codes += Counter("fleet after " + _code(client.post("/v1/chat/completions", json=CHAT)) for _ in range(6))
    return codes


def _unreachable_redis_url() -> tuple[str, socket.socket]:
    """A loopback port that is bound but not listening: connections are refused at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return f"redis://127.0.0.1:{sock.getsockname()[1]}/0", sock


def _dashboard_queries() -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
    """(where, expr) of every panel target, and (where, selector, label) of every label_values variable."""
    targets: list[tuple[str, str]] = []
    variables: list[tuple[str, str, str]] = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        names = [v["name"] for v in dashboard_variables(board)]
        for annotation in board.get("annotations", {}).get("list", []):
            if "expr" in annotation:  # an event marker: its signal must have data, the condition need not hold
                for part in signals(instantiate(annotation["expr"], names, window=WINDOW)):
                    targets.append((f"{path.name} / annotation {annotation['name']}", part))
        for panel in dashboard_panels(board):
            for target in panel.get("targets", []):
                where = f"{path.name} / {panel['title']} / {target['refId']}"
                targets.append((where, instantiate(target["expr"], names, window=WINDOW)))
        for variable in dashboard_variables(board):
            if variable["type"] == "query":
                parsed = label_values_query(variable_query(variable))
                assert parsed is not None, variable_query(variable)
                variables.append((f"{path.name} / ${variable['name']}", instantiate(parsed[0], names), parsed[1]))
    return targets, variables


def test_every_dashboard_and_rule_query_returns_data(
    spawn_gateway: GatewayFactory,
    fake_upstream: FakeUpstream,
    prometheus_server: PrometheusFactory,
) -> None:
    redis_url, redis_port = _unreachable_redis_url()
    with ExitStack() as stack:
        stack.callback(redis_port.close)
        fakes = stack.enter_context(fake_fleet(*[{"tokens_per_second": FLEET_PACE}] * 3))
        fleet = spawn_gateway(
            UPSTREAM_URL=",".join(fake.url for fake in fakes),
            UPSTREAM_CONTINUATION="vllm",  # fake_openai continues a partial answer as vLLM does
            UPSTREAM_RETRIES=1,
            RETRY_BASE_SECONDS=0.01,
            CIRCUIT_FAILURE_THRESHOLD=1,  # the dead model server's circuit opens at its first failure
            CIRCUIT_OPEN_SECONDS=600,  # and stays open (not half-open) until the queries below
            TRUSTED_PROXIES="127.0.0.0/8",
        )
        gateway = spawn_gateway(
            UPSTREAM_URL=fake_upstream.url,
            UPSTREAM_RETRIES=1,
            RETRY_BASE_SECONDS=0.01,
            UPSTREAM_CONTINUATION="vllm",  # a connection dropped mid-stream is continued (the panel counts it)
            CIRCUIT_FAILURE_THRESHOLD=1000,  # errors are injected on purpose; the breaker stays closed
            RATE_LIMIT_PER_MINUTE=60,
            RATE_LIMIT_BURST=5,
            TRUSTED_PROXIES="127.0.0.0/8",
            MAX_CONNECTIONS=MAX_CONNECTIONS,
            DRAIN_TIMEOUT_SECONDS=1,
            DRAIN_CLOSE_GRACE_SECONDS=1,
            REDIS_URL=redis_url,
            REDIS_TIMEOUT_SECONDS=0.1,
        )
        prometheus = prometheus_server(
            [
                ScrapeTarget(gateway.metrics_url, TARGET_LABELS),
                ScrapeTarget(fleet.metrics_url, {**TARGET_LABELS, "pod": FLEET_POD}),
            ],
            [RULES],
        )
        # Prometheus applies its targets seconds after start (5 s), which the two gateways spend booting.
        fleet.wait_up()
        gateway.wait_up()
        # Counters must be seen at 0 before the load (as a pod is scraped from its start), or `increase()`
        # finds no rise and the alerts stay silent.
        prometheus.wait_for_scrapes(1)

        codes = _load(gateway, seconds=3)
        codes += _faults(gateway, fake_upstream)
        codes += _rate_limit_burst(gateway)
        codes += _connection_limit_burst(gateway)
        codes += _drain_both_workers(gateway, fake_upstream)
        codes += _load(gateway, seconds=1)  # the new workers carry streams (live gauges of dead workers are gone)
        codes += _model_server_dies(fleet, fakes)
    for code in (
        "200",
        "upstream_error",
        "mid-stream 200",
        "continued 200",
        "rate_limited",
        "connection_limit",
        "draining",
    ):
        assert codes[code] > 0, f"the load produced no {code}: {codes}"
    assert codes["fleet after 200"] == 6, codes  # the two model servers left take every new stream
    prometheus.wait_for_scrapes(3)  # every series, even the last to appear, has samples for rate()

    failures: list[str] = []

    def check(where: str, expr: str, *, need_data: bool = True) -> list[dict[str, Any]]:
        try:
            result = prometheus.query(expr)
        except PromQLError as exc:
            failures.append(f"{where}: {exc}\n    {expr}")
            return []
        if need_data and not result:
            failures.append(f"{where}: no data\n    {expr}")
        return result

    # scraped as prometheus-operator scrapes: the gateway's labels never collide with the target labels
    names = prometheus.api("labels", **{"match[]": '{__name__=~"streaming_.*"}'})
    assert not [n for n in names if n.startswith("exported_")], names
    for sample in prometheus.query('{__name__=~"streaming_.*"}'):
        missing = {*TARGET_LABELS, "instance"} - set(sample["metric"])
        if missing:
            failures.append(f"{sample['metric']['__name__']}: no {sorted(missing)}")
            break

    targets, variables = _dashboard_queries()
    assert len(targets) >= 40
    for where, expr in targets:
        check(where, expr)
    for where, selector, label in variables:
        series = check(where, selector)
        if series and not all(label in sample["metric"] for sample in series):
            failures.append(f"{where}: series without the `{label}` label: {selector}")

    rules = prometheus.rules()
    assert {rule["type"] for rule in rules} == {"recording", "alerting"}
    for rule in rules:
        where = f"rule {rule['name']}"
        if rule["health"] != "ok":
            failures.append(f"{where}: health {rule['health']}: {rule.get('lastError')}")
        if rule["type"] == "recording":
            check(where, rule["query"])
            check(f"{where} (recorded series)", rule["name"])
        else:
            check(where, rule["query"], need_data=False)
            for i, part in enumerate(signals(rule["query"])):
                check(f"{where} signal {i}", part)
    assert not failures, f"{len(failures)} queries failed:\n" + "\n".join(failures)

    # and the alerts saw what happened: streams cut by the drains, limits fallen back from Redis. An alert
    # may have been pending and gone again before this line, so ask whether it ever was (rule evaluation
    # runs on its own clock: poll it, the deadline is only a guard).
    expected = {"StreamingDrainCutStreams", "StreamingRedisFallback"}
    deadline = time.monotonic() + 20
    while True:
        seen = {sample["metric"]["alertname"] for sample in prometheus.query("count_over_time(ALERTS[10m])")}
        if expected <= seen or time.monotonic() > deadline:
            break
        time.sleep(0.5)  # polling interval, not an assertion
    assert expected <= seen, seen

    # and the fleet's series saw the death: its streams continued, its failures counted, its circuit open, so
    # that pod finds 2 of its 3 endpoints healthy (no alert: not below half). Polled as above.
    fleet_pod = f'pod="{FLEET_POD}"'
    by_state = "namespace_job_pod_state:streaming_upstream_endpoints:max"
    healthy_share = "namespace_job_pod:streaming_upstream_endpoints_healthy:ratio"
    facts = {
        "continued": f'sum(streaming_upstream_continuations_total{{{fleet_pod}, result="continued"}}) > 0',
        "failures": f'sum(streaming_upstream_endpoint_failures_total{{{fleet_pod}, reason=~"reset|connect"}}) > 0',
        "one circuit open": f"count(streaming_upstream_endpoint_circuit_state{{{fleet_pod}}} == 1) == 1",
        "one unhealthy": f'{by_state}{{{fleet_pod}, state="unhealthy"}} == 1',
        "2/3 healthy": f"abs({healthy_share}{{{fleet_pod}}} - 2 / 3) < 0.001",
    }
    deadline = time.monotonic() + 20
    while True:
        missed = [fact for fact, expr in facts.items() if not prometheus.query(expr)]
        if not missed or time.monotonic() > deadline:
            break
        time.sleep(0.5)  # polling interval, not an assertion
    assert not missed, f"the fleet's series do not show: {missed}"
