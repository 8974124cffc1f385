"""A model server dies mid-stream (SIGKILL): with UPSTREAM_CONTINUATION=vllm its streams continue through another
one, and every client gets exactly the uninterrupted answer; without it they end with a clean error.

Real processes throughout: the gateway (gunicorn, 2 workers), `loadtest/fake_openai.py` model servers (each
answers `tok0 tok1 ...` and continues a partial answer exactly), and nginx in front of them as the Service a
single UPSTREAM_URL names: a new connection reaches a live pod. Every wait is on a condition; no timing.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from loadtest.fake_openai import default_tokens
from loadtest.harness.nginx import Nginx
from loadtest.harness.wait import wait_until
from tests.conftest import FakeUpstream, Gateway, GatewayFactory, gateway_running
from tests.fleet.fakes import fake_fleet, fake_server
from tests.slots import slots_in_use

TOKENS = 60  # per stream: 3 s at the fakes' pace, so the kill finds every stream mid-flight
PACE = 20  # tokens per second of each fake
STREAMS = 12  # concurrent streams (a few per fake)
STARTED = 3  # tokens every stream has received before the kill
GUARD_S = 60.0  # guard only: how long the streams may take to end
EXPECTED = "".join(default_tokens(TOKENS))
PROTOCOLS = ["/stream", "/v1", "/v1 non-streamed", "/ws"]
GATEWAY_ENV: dict[str, Any] = {
    "CIRCUIT_FAILURE_THRESHOLD": 1000,  # broken streams must not open the circuit for the others
    "UPSTREAM_RETRIES": 0,
}
CONTINUATIONS = "streaming_upstream_continuations_total"


@dataclass
class Reading:
    """What one client received, updated while it reads."""

    tokens: int = 0
    text: str = ""
    end: dict[str, Any] = field(default_factory=dict)  # done: {"tokens", "finish_reason", "usage"}; else {"error"}


def _take(reading: Reading, event: dict[str, Any]) -> None:
    """One seed-protocol event (the same on /stream and /ws) into what a client received."""
    if event["type"] == "token":
        reading.text += event["content"]
        reading.tokens += 1
    elif event["type"] == "done":
        reading.end = {"tokens": event["tokens"]}
    elif event["type"] == "error":
        reading.end = {"error": event["code"]}


def _read_stream(gateway: Gateway, reading: Reading) -> None:
    body = {"prompt": "hi", "max_tokens": TOKENS}
    with httpx.stream("POST", gateway.url + "/stream", json=body, timeout=GUARD_S) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            _take(reading, json.loads(line[6:]))


def _read_ws(gateway: Gateway, reading: Reading) -> None:
    with connect(gateway.url.replace("http://", "ws://") + "/ws") as ws:
        ws.send(json.dumps({"prompt": "hi", "max_tokens": TOKENS}))
        try:
            while True:
                _take(reading, json.loads(ws.recv(timeout=GUARD_S)))
        except ConnectionClosed:
            reading.end["close"] = ws.close_code


def _read_openai(gateway: Gateway, reading: Reading, *, stream: bool) -> None:
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0, timeout=GUARD_S) as client:
        messages: Any = [{"role": "user", "content": "hi"}]
        try:
            if not stream:
                answer = client.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=TOKENS)
                reading.text = answer.choices[0].message.content or ""
                usage = answer.usage.model_dump(include={"prompt_tokens", "completion_tokens"}) if answer.usage else {}
                reading.end = {"finish_reason": answer.choices[0].finish_reason, "usage": usage}
                return
            chunks = client.chat.completions.create(
                model="gpt-4o-mini",
                messages=messages,
                max_tokens=TOKENS,
                stream=True,
                stream_options={"include_usage": True},
            )
            for chunk in chunks:
                if chunk.usage is not None:
                    reading.end["usage"] = chunk.usage.model_dump(include={"prompt_tokens", "completion_tokens"})
                for choice in chunk.choices:
                    if choice.delta.content:
                        reading.text += choice.delta.content
                        reading.tokens += 1
                    if choice.finish_reason:
                        reading.end["finish_reason"] = choice.finish_reason
        except openai.APIError as error:  # the error chunk mid-stream, or the non-streamed answer's 502
            reading.end = {"error": error.code or getattr(error, "status_code", None)}


READERS: dict[str, Callable[[Gateway, Reading], None]] = {
    "/stream": _read_stream,
    "/ws": _read_ws,
    "/v1": lambda gateway, reading: _read_openai(gateway, reading, stream=True),
    "/v1 non-streamed": lambda gateway, reading: _read_openai(gateway, reading, stream=False),
}


@contextmanager
def service(fakes: list[FakeUpstream], prefix: Path) -> Iterator[str]:
    """nginx in front of the fakes, as a Service in front of model pods: one URL, a new connection reaches a
    live pod (nginx moves a request whose connection is refused to the next server)."""
    nginx = Nginx(prefix)
    nginx.start([fake.url.removeprefix("http://").removesuffix("/v1") for fake in fakes])
    try:
        yield nginx.url + "/v1"
    finally:
        assert nginx.child is not None
        nginx.child.stop()


def _continuations(gateway: Gateway) -> dict[str, float]:
    text = httpx.get(gateway.metrics_url + "/metrics", timeout=10).text
    counts = {"continued": 0.0, "failed": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name == CONTINUATIONS.removesuffix("_total"):
            for sample in family.samples:
                if sample.name == CONTINUATIONS:
                    counts[sample.labels["result"]] += sample.value
    return counts


def _kill_the_busiest(gateway: Gateway, fakes: list[FakeUpstream], protocol: str) -> tuple[list[Reading], int]:
    """STREAMS clients of `protocol`; once every one is mid-stream, SIGKILL the fake holding the most. Returns what
    each client received (all ended) and how many streams the killed fake held."""
    readings = [Reading() for _ in range(STREAMS)]
    threads = [threading.Thread(target=READERS[protocol], args=(gateway, r), daemon=True) for r in readings]
    for thread in threads:
        thread.start()

    def all_mid_stream() -> bool:
        stats = [fake.stats() for fake in fakes]
        if sum(s["active"] for s in stats) < STREAMS:
            return False
        if protocol == "/v1 non-streamed":  # nothing arrives before the end: count what the fakes sent
            return sum(int(s["tokens"]) for s in stats) >= STREAMS * STARTED
        return all(reading.tokens >= STARTED for reading in readings)

    wait_until(all_mid_stream, GUARD_S, "every stream mid-flight")
    held = [fake.stats()["active"] for fake in fakes]
    victim = fakes[held.index(max(held))]
    victim.proc.kill()
    victim.proc.wait()
    for thread in threads:
        thread.join(GUARD_S)
    assert not any(thread.is_alive() for thread in threads), "a stream did not end"
    return readings, max(held)


def _assert_whole(reading: Reading, protocol: str) -> None:
    assert reading.text == EXPECTED  # no gap, no duplicate
    if protocol in ("/stream", "/ws"):
        assert reading.end["tokens"] == TOKENS
        if protocol == "/ws":
            assert reading.end["close"] == 1000
    else:
        assert reading.end["finish_reason"] == "length"
        # the continuation's prompt held the text so far: usage still counts the whole answer as completion
        assert reading.end["usage"] == {"prompt_tokens": 7, "completion_tokens": TOKENS}


class ModelFleet:
    """Three fakes at PACE for the module, on ports that stay theirs: a fake a test killed is started again on
    its port, so the gateways' UPSTREAM_URL names the same three all along."""

    def __init__(self, stack: ExitStack) -> None:
        self._stack = stack
        self.fakes = [stack.enter_context(fake_server(tokens_per_second=PACE)) for _ in range(3)]
        self.url = ",".join(fake.url for fake in self.fakes)

    def revive(self) -> list[FakeUpstream]:
        """Every fake alive, idle (the last test's streams have left it) and with its stats cleared."""
        for index, fake in enumerate(self.fakes):
            if fake.proc.poll() is not None:
                port = int(fake.url.removesuffix("/v1").rsplit(":", 1)[1])
                self.fakes[index] = self._stack.enter_context(fake_server(port=port, tokens_per_second=PACE))
        wait_until(lambda: all(fake.stats()["active"] == 0 for fake in self.fakes), GUARD_S, "idle model servers")
        for fake in self.fakes:
            fake.reset()
        return list(self.fakes)


@pytest.fixture(scope="module")
def model_fleet() -> Iterator[ModelFleet]:
    with ExitStack() as stack:
        yield ModelFleet(stack)


@pytest.fixture
def fakes(model_fleet: ModelFleet) -> list[FakeUpstream]:
    return model_fleet.revive()


def _fleet_gateway(model_fleet: ModelFleet, tmp_path_factory: pytest.TempPathFactory, **env: Any) -> Iterator[Gateway]:
    """A gateway on the module's fleet, shared by the kill tests. A killed endpoint is ejected when its first
    stream breaks and is back (half-open) a second later: by the next test, started again, it takes streams.
    A continuation never goes back to the endpoint it left while another is available (`tried_endpoints`)."""
    env = {"UPSTREAM_URL": model_fleet.url, "CIRCUIT_OPEN_SECONDS": 1, **GATEWAY_ENV, **env}
    with gateway_running(env, tmp_path_factory) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def continuing_gateway(model_fleet: ModelFleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    yield from _fleet_gateway(model_fleet, tmp_path_factory, UPSTREAM_CONTINUATION="vllm")


@pytest.fixture(scope="module")
def plain_gateway(model_fleet: ModelFleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    yield from _fleet_gateway(model_fleet, tmp_path_factory)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_streams_of_a_killed_model_server_continue_exactly(
    continuing_gateway: Gateway, fakes: list[FakeUpstream], protocol: str
) -> None:
    """A fleet (UPSTREAM_URL lists the three): the killed endpoint is ejected when its first stream breaks, so
    every continuation lands on a live one at its first attempt."""
    before = _continuations(continuing_gateway)
    readings, held = _kill_the_busiest(continuing_gateway, fakes, protocol)
    for reading in readings:
        _assert_whole(reading, protocol)
    assert held > 0
    after = _continuations(continuing_gateway)
    assert {result: after[result] - before[result] for result in after} == {"continued": held, "failed": 0}


def test_streams_behind_one_service_url_continue_exactly(start_gateway: GatewayFactory, tmp_path: Path) -> None:
    """One UPSTREAM_URL (nginx as the Service): the continuation's new connection reaches a live pod."""
    with fake_fleet(*[{"tokens_per_second": PACE}] * 3) as fakes, service(fakes, tmp_path) as url:
        gateway = start_gateway(UPSTREAM_URL=url, UPSTREAM_CONTINUATION="vllm", **GATEWAY_ENV)
        readings, held = _kill_the_busiest(gateway, fakes, "/stream")
        for reading in readings:
            _assert_whole(reading, "/stream")
        assert held > 0
        assert _continuations(gateway) == {"continued": held, "failed": 0}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_without_continuation_a_killed_model_server_ends_its_streams_with_an_error(
    plain_gateway: Gateway, fakes: list[FakeUpstream], protocol: str
) -> None:
    readings, held = _kill_the_busiest(plain_gateway, fakes, protocol)
    broken = [r for r in readings if "error" in r.end]
    assert len(broken) == held
    for reading in broken:
        assert EXPECTED.startswith(reading.text)  # what came before the break, in order
        assert reading.end["error"] in ("upstream_error", 502)
        if protocol == "/ws":
            assert reading.end["close"] == 1011  # the mapped close of an upstream error
    for reading in readings:
        if reading not in broken:
            _assert_whole(reading, protocol)
    wait_until(lambda: slots_in_use(plain_gateway) == 0, GUARD_S, "every slot released")
    assert _continuations(plain_gateway) == {"continued": 0, "failed": 0}


@pytest.mark.parametrize("protocol", ["/v1", "/stream"])
def test_a_stream_with_tool_calls_is_not_continued(
    start_gateway: GatewayFactory, tmp_path: Path, protocol: str
) -> None:
    """Two text tokens, then a tool call whose arguments stop halfway: the model server dies. A partial
    assistant message cannot carry a tool call, so the client gets the error, and no continuation is asked: on
    /v1, which relayed the call, and on /stream, which could only leave it out (text only)."""
    call = {
        "tokens": ["a ", "b "],
        "tool_calls": [{"name": "lookup", "arguments": '{"city": "Paris"}'}],
        "die_after": 4,
    }
    with fake_fleet({}, {}) as fakes, service(fakes, tmp_path) as url:
        for fake in fakes:
            fake.script(call)
        gateway = start_gateway(UPSTREAM_URL=url, UPSTREAM_CONTINUATION="vllm", **GATEWAY_ENV)
        body = {
            "model": "gpt-4o-mini",
            "stream": True,
            "max_tokens": TOKENS,
            "messages": [{"role": "user", "content": "hi"}],
        }
        if protocol == "/stream":
            reading = Reading()
            _read_stream(gateway, reading)
            assert (reading.text, reading.end) == ("a b ", {"error": "upstream_error"})
        else:
            with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body, timeout=GUARD_S) as response:
                events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
            deltas = [choice["delta"] for event in events for choice in event.get("choices", ())]
            assert "".join(d.get("content") or "" for d in deltas) == "a b "
            assert any(d.get("tool_calls") for d in deltas)
            assert events[-1]["error"]["code"] == "upstream_error"
        wait_until(lambda: any(fake.proc.poll() is not None for fake in fakes), GUARD_S, "the model server dead")
        alive = [fake for fake in fakes if fake.proc.poll() is None]
        assert len(alive) == 1
        assert alive[0].stats()["requests"] == 0  # no continuation was asked
        assert _continuations(gateway) == {"continued": 0, "failed": 0}


def test_the_attempt_cap_holds_when_every_model_server_dies(start_gateway: GatewayFactory) -> None:
    """Both model servers die three tokens into whatever they serve. The stream's first server dies; each
    continuation either finds the other (which dies three tokens later) or no server at all: two attempts, then
    the client gets an error, having received a prefix of the answer with no duplicate."""
    with fake_fleet({}, {}) as fakes:
        for fake in fakes:
            fake.script({"die_after": 3})
        gateway = start_gateway(
            UPSTREAM_URL=",".join(fake.url for fake in fakes), UPSTREAM_CONTINUATION="vllm", **GATEWAY_ENV
        )
        reading = Reading()
        _read_stream(gateway, reading)
        assert reading.end == {"error": "upstream_error"}
        assert reading.text in ("tok0 tok1 tok2 ", "tok0 tok1 tok2 tok3 tok4 tok5 ")
        assert sum(_continuations(gateway).values()) == 2  # the default UPSTREAM_CONTINUATION_MAX_ATTEMPTS
        wait_until(lambda: slots_in_use(gateway) == 0, GUARD_S, "the slot released")


def test_a_continuation_that_hangs_is_cut_by_the_inter_token_deadline(start_gateway: GatewayFactory) -> None:
    """The model server drops the connection after three tokens, and the continuation's request then gets no
    answer: the stream's inter-token deadline covers the continuation's open, the client gets `timeout`."""
    with fake_fleet({}) as (fake,):
        fake.script({"reset_after": 3}, {"headers_delay_ms": 600_000})
        gateway = start_gateway(
            UPSTREAM_URL=fake.url, UPSTREAM_CONTINUATION="vllm", INTER_TOKEN_TIMEOUT_SECONDS=1, **GATEWAY_ENV
        )
        reading = Reading()
        _read_stream(gateway, reading)
        assert reading.text == "tok0 tok1 tok2 "
        assert reading.end == {"error": "timeout"}
        assert _continuations(gateway) == {"continued": 0, "failed": 1}
        assert fake.stats()["requests"] == 2  # the continuation was asked
        wait_until(lambda: slots_in_use(gateway) == 0, GUARD_S, "the slot released")
