"""schemathesis against the real gateway (gunicorn, 2 workers, loopback): no 5xx, no uncaught exception.

The schema comes from the app object (`create_app(settings).openapi()`), so it is the one the gateway
serves whether or not `/openapi.json` is exposed; the stream routes are in it with the request bodies
their handlers validate (app/routes/openapi.py). Valid and invalid requests are generated (positive and
negative modes), a bounded, derandomised number per operation, so every run sends the same requests.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.errors import InvalidSchema
from schemathesis.core.result import Ok, Result
from schemathesis.generation import GenerationMode
from schemathesis.schemas import APIOperation

from app.main import create_app
from app.settings import Settings
from tests.conftest import Gateway, launch_gateway

MAX_EXAMPLES = 60  # per operation (valid and invalid): about 30 s here, a minute on a loaded machine
STATEFUL_EXAMPLES = 25  # sequences of up to 4 calls
REQUEST_TIMEOUT_S = 30.0  # guard only
FUZZ_ENV = {
    # Streams end at once: any generated max_tokens above the limit is a 422, below it a short stream.
    "MOCK_TOKENS_PER_SECOND": 0,
    "MOCK_FIRST_TOKEN_MS": 0,
    "MAX_TOKENS_LIMIT": 64,
    "DEFAULT_MAX_TOKENS": 16,
    # An unknown stream id is looked up a few times, a flush interval apart, before its 404.
    "RESUME_FLUSH_INTERVAL_SECONDS": 0.01,
}
STREAM_OPERATIONS = {("POST", "/stream"), ("POST", "/v1/chat/completions"), ("GET", "/stream/{stream_id}")}

Operation = APIOperation[Any, Any, Any, Any]
schema = schemathesis.openapi.from_dict(create_app(Settings(resume_enabled=False)).openapi())
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
    max_examples=MAX_EXAMPLES,
    deterministic=True,
    database="none",
)


@pytest.fixture(scope="module")
def fuzzed_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = launch_gateway(FUZZ_ENV, tmp_path_factory.mktemp("gateway") / "gateway.log")
    yield gateway
    gateway.stop()


def _operation(result: Result[Operation, InvalidSchema]) -> Operation:
    assert isinstance(result, Ok), result.err()
    return result.ok()


def test_stream_routes_are_in_the_schema_with_their_bodies() -> None:
    operations = {(op.method.upper(), op.path): op for op in map(_operation, schema.get_all_operations())}
    assert STREAM_OPERATIONS <= set(operations)
    for method, path in STREAM_OPERATIONS - {("GET", "/stream/{stream_id}")}:
        body = operations[method, path].definition.raw["requestBody"]["content"]["application/json"]["schema"]
        assert "prompt" in body["properties"] or "messages" in body["properties"]
    link = operations["POST", "/stream"].definition.raw["responses"]["200"]["links"]["Resume"]
    assert operations["GET", "/stream/{stream_id}"].definition.raw["operationId"] == link["operationId"]


def _no_server_error(operation: Operation) -> object:
    """A test of one operation: no 5xx and no traceback in the gateway's log for any generated request."""

    @schema.include(method=operation.method.upper(), path=operation.path).parametrize()
    def test(case: schemathesis.Case[Operation], fuzzed_gateway: Gateway) -> None:
        case.call_and_validate(base_url=fuzzed_gateway.url, checks=[not_a_server_error], timeout=REQUEST_TIMEOUT_S)
        log = fuzzed_gateway.log()
        assert "Traceback" not in log, log[-4000:]

    return test


# One test function per operation, each with a node id of its own: schemathesis names every operation's test
# after the one function, and pytest-xdist (.ci/test) runs one test per node id, so the others would not run.
for _op in map(_operation, schema.get_all_operations()):
    _name = "test_no_server_error_" + re.sub(r"\W+", "_", f"{_op.method} {_op.path}").strip("_").lower()
    globals()[_name] = _no_server_error(_op)


def test_no_server_error_resuming_streams_it_opened(fuzzed_gateway: Gateway) -> None:
    """Stateful: the `Resume` link feeds a real `X-Stream-ID` from POST /stream to GET /stream/{stream_id}, so
    Last-Event-ID and ?after= are fuzzed against streams that exist."""

    class Workflow(schema.as_state_machine()):  # type: ignore[misc]  # a base class made at run time
        def get_call_kwargs(self, case: schemathesis.Case[Operation]) -> dict[str, object]:
            return {"base_url": fuzzed_gateway.url, "timeout": REQUEST_TIMEOUT_S}

        def validate_response(
            self,
            response: schemathesis.Response,
            case: schemathesis.Case[Operation],
            additional_checks: object = None,
            **kwargs: object,
        ) -> None:
            case.validate_response(response, checks=[not_a_server_error])

    Workflow.run(
        settings=settings(
            max_examples=STATEFUL_EXAMPLES, deadline=None, derandomize=True, database=None, stateful_step_count=4
        )
    )
    metrics = httpx.get(fuzzed_gateway.metrics_url + "/metrics", timeout=10).text
    resumed = re.findall(r'^streaming_resumptions_total\{route="/stream/\{stream_id\}"\} (\S+)$', metrics, re.M)
    assert float(resumed[0]) > 0  # the link was followed: streams that exist were resumed
    log = fuzzed_gateway.log()
    assert "Traceback" not in log, log[-4000:]
