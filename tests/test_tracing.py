"""Traces through a real OTLP/HTTP exporter into a receiver on loopback: spans per stream, never per token."""

from __future__ import annotations

from typing import Any

import httpx

from tests.conftest import FakeUpstream, GatewayFactory
from tests.otlp import OTLPReceiver


def test_one_server_and_one_upstream_span_per_stream(
    otlp: OTLPReceiver, start_gateway: GatewayFactory, fake_upstream: FakeUpstream
) -> None:
    gateway = start_gateway(
        UPSTREAM_URL=fake_upstream.url,
        OTEL_EXPORTER_OTLP_ENDPOINT=otlp.url,
        OTEL_BSP_SCHEDULE_DELAY=50,
        OTEL_SERVICE_NAME="gw-under-test",
        WEB_CONCURRENCY=1,
        LOG_LEVEL="info",
    )
    for tokens in (3, 150):  # the span count per stream does not depend on the token count
        r = httpx.post(gateway.url + "/stream", json={"prompt": "trace me", "max_tokens": tokens}, timeout=10)
        assert r.text.rstrip().endswith(f'"tokens": {tokens}}}')
    r = httpx.post(gateway.url + "/stream", json={"prompt": "trace me", "max_tokens": 25}, timeout=10)
    assert r.text.rstrip().endswith('"tokens": 25}')
    httpx.get(gateway.url + "/health", timeout=5)  # excluded from tracing
    traceparent = fake_upstream.stats()["bodies"][-1]["traceparent"]
    assert gateway.stop() == 0  # workers flush their span queues on the way out
    by_trace: dict[str, list[dict[str, Any]]] = {}
    for span in otlp.spans:
        by_trace.setdefault(span["trace_id"], []).append(span)
    assert sorted(len(spans) for spans in by_trace.values()) == [2, 2, 2]  # 3, 150 and 25 tokens alike
    spans = next(
        spans
        for spans in by_trace.values()
        if any(s["attributes"].get("gen_ai.usage.output_tokens") == 25 for s in spans)
    )
    server = next(s for s in spans if s["kind"] == 2)  # SPAN_KIND_SERVER
    client = next(s for s in spans if s["kind"] == 3)  # SPAN_KIND_CLIENT
    assert server["name"] == "POST /stream"
    assert server["service"] == "gw-under-test"
    assert server["attributes"]["gen_ai.usage.output_tokens"] == 25
    assert server["attributes"]["gen_ai.request.model"] == "gpt-4o-mini"
    assert server["attributes"]["gen_ai.response.time_to_first_chunk"] > 0
    assert client["name"] == "chat gpt-4o-mini"
    assert client["parent"] == server["span_id"]
    assert client["trace_id"] == server["trace_id"]
    assert client["attributes"]["gen_ai.usage.output_tokens"] == 25
    assert client["attributes"]["gen_ai.response.finish_reasons"] == ["length"]
    # the trace continues at the upstream: it received our client span as its parent (sampled flag set)
    version, trace_id, parent_id, flags = traceparent.split("-")
    assert (version, trace_id, parent_id) == ("00", client["trace_id"], client["span_id"])
    assert int(flags, 16) & 1
    # and the stream's log line names the trace
    assert f'"trace_id": "{server["trace_id"]}"' in gateway.log()


def test_tracing_is_off_without_an_exporter(start_gateway: GatewayFactory, fake_upstream: FakeUpstream) -> None:
    gateway = start_gateway(UPSTREAM_URL=fake_upstream.url, WEB_CONCURRENCY=1, LOG_LEVEL="info")
    httpx.post(gateway.url + "/stream", json={"prompt": "x", "max_tokens": 2}, timeout=10)
    assert fake_upstream.stats()["bodies"][-1]["traceparent"] is None
    assert '"trace_id": null' in gateway.log()
