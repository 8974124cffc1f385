"""OpenTelemetry traces: off unless the standard OTEL_* variables configure an exporter.

Enabled when `OTEL_TRACES_EXPORTER` is `otlp` or `console`, or when an OTLP endpoint
(`OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set and the exporter is
not `none`. Everything else (service name, resource attributes, sampler, batch delays, OTLP
headers) is read by the SDK from its own OTEL_* variables. Set up in each worker (create_app
runs after gunicorn forks), so no exporter thread is shared across a fork.

Spans: one server span per request (FastAPI instrumentation, minus the per-message ASGI
send/receive spans, which would be one span per token) and one client span per upstream
generation, carrying GenAI semantic-convention attributes. Never a span per token.
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Span

from app.observability.redaction import redact_url_keys

EXCLUDED_URLS = "/health,/ready,/metrics"
DEFAULT_SERVICE_NAME = "streaming-gateway"
URL_ATTRIBUTES = ("http.url", "url.full", "http.target", "url.query")  # old and stable semantic conventions


def redact_span_url(span: Span, scope: dict[str, Any]) -> None:
    """server_request_hook: a /ws key in the query string (`?api_key=`) never reaches a span."""
    if not scope.get("query_string") or not span.is_recording():
        return
    attributes = getattr(span, "attributes", None) or {}
    for name in URL_ATTRIBUTES:
        value = attributes.get(name)
        if isinstance(value, str):
            redacted = redact_url_keys(value) if "?" in value else redact_url_keys("?" + value)[1:]
            if redacted != value:
                span.set_attribute(name, redacted)


def _exporter_from_env() -> SpanExporter | None:
    chosen = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if chosen == "console":
        return ConsoleSpanExporter()
    if chosen == "otlp" or (not chosen and endpoint):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    return None  # "none", unset, or an exporter this image does not ship


def setup_tracing(app: FastAPI) -> TracerProvider | None:
    """Instrument `app` and return the provider (to flush at shutdown), or None when tracing is off."""
    exporter = _exporter_from_env()
    if exporter is None:
        return None
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    attributes: dict[str, Any] = {}
    if "OTEL_SERVICE_NAME" not in os.environ:
        attributes["service.name"] = DEFAULT_SERVICE_NAME
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=provider,
        excluded_urls=EXCLUDED_URLS,
        exclude_spans=["send", "receive"],
        server_request_hook=redact_span_url,
    )
    return provider
