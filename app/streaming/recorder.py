"""Turns a finished `StreamSession` into metrics and one log line. Called twice per stream, never per token."""

from __future__ import annotations

import asyncio
import logging

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from app.errors import GatewayError, UpstreamError
from app.observability import metrics as m
from app.streaming.session import Outcome, StreamSession

logger = logging.getLogger("app.access")
# ended as its client wanted: finished, left, or stopped by its owner (none of them an error of the gateway)
SUCCESSFUL = (Outcome.DONE, Outcome.CLIENT_GONE, Outcome.CANCELLED)


class _Bound:
    """The labelled children one (endpoint, model) pair uses, looked up once per worker, not per stream."""

    __slots__ = ("active", "duration", "ttft", "generation", "tokens", "tokens_per_second", "inter_token")

    def __init__(self, endpoint: str, model: str) -> None:
        self.active = m.ACTIVE_CONNECTIONS.labels(endpoint)
        self.duration = m.REQUEST_DURATION_SECONDS.labels(endpoint)
        self.ttft = m.TTFT_SECONDS.labels(endpoint, model)
        self.generation = m.GENERATION_DURATION_SECONDS.labels(endpoint, model)
        self.tokens = m.TOKENS_TOTAL.labels(endpoint, model)
        self.tokens_per_second = m.TOKENS_PER_SECOND.labels(model)
        self.inter_token = m.INTER_TOKEN_SECONDS.labels(endpoint, model)


class StreamRecorder:
    """The `StreamObserver` every relay reports to."""

    def __init__(self, *, model_names: tuple[str, ...]) -> None:
        self._models = frozenset(model_names)
        self._bound: dict[tuple[str, str], _Bound] = {}  # bounded: endpoints x (MODELS + "other")

    def model_label(self, model: str) -> str:
        return model if model in self._models else m.OTHER_MODEL

    def _children(self, session: StreamSession) -> _Bound:
        key = (session.endpoint, self.model_label(session.model))
        bound = self._bound.get(key)
        if bound is None:
            bound = self._bound[key] = _Bound(*key)
        return bound

    def started(self, session: StreamSession) -> None:
        self._children(session).active.inc()

    def finished(self, session: StreamSession, error: GatewayError | None) -> None:
        endpoint, bound = session.endpoint, self._children(session)
        bound.active.dec()
        end = asyncio.get_running_loop().time()
        status = "success" if session.outcome in SUCCESSFUL else "error"
        m.CONNECTIONS_TOTAL.labels(endpoint, status).inc()
        bound.duration.observe(end - session.started_at)
        m.STREAM_OUTCOMES_TOTAL.labels(endpoint, str(session.outcome)).inc()
        if session.first_token_at:
            bound.ttft.observe(session.first_token_at - session.started_at)
            generation = session.last_token_at - session.first_token_at
            bound.generation.observe(generation)
            bound.tokens.inc(session.tokens)
            if generation > 0 and session.tokens > 1:
                bound.tokens_per_second.observe((session.tokens - 1) / generation)
                bound.inter_token.observe(generation / (session.tokens - 1))
        if error is not None and session.outcome is not Outcome.CANCELLED:
            m.ERRORS_TOTAL.labels(endpoint, error.code).inc()
        span = trace.get_current_span()  # the request's server span when tracing is on, else a no-op
        trace_id = None
        if span.is_recording():
            _annotate_server_span(span, session, error)
            trace_id = format(span.get_span_context().trace_id, "032x")
        extra: dict[str, object] = {
            "stream_id": session.id,
            "request_id": session.request_id,
            "endpoint": endpoint,
            "model": session.model,
            "client": session.client,
            "outcome": str(session.outcome),
            "tokens": session.tokens,
            "ttft_s": round(session.first_token_at - session.started_at, 4) if session.first_token_at else None,
            "duration_s": round(end - session.started_at, 4),
            "error_code": error.code if error else None,
            "trace_id": trace_id,
            # the upstream's own words about its failure: for the operator, never sent to the client
            "upstream_detail": error.detail if isinstance(error, UpstreamError) else None,
        }
        if session.replays:  # a resumed read: which stream it read (its own id is fresh)
            extra["replays"] = session.replays
        # an upstream failure is the operator's business: its line stays visible at LOG_LEVEL=warning
        logger.log(
            logging.WARNING if isinstance(error, UpstreamError) else logging.INFO, "stream finished", extra=extra
        )


def _annotate_server_span(span: trace.Span, session: StreamSession, error: GatewayError | None) -> None:
    span.set_attribute("gen_ai.operation.name", "chat")
    span.set_attribute("gen_ai.request.model", session.model)
    span.set_attribute("gen_ai.usage.output_tokens", session.tokens)
    span.set_attribute("gateway.stream.id", session.id)
    span.set_attribute("gateway.stream.outcome", str(session.outcome))
    if session.first_token_at:
        span.set_attribute("gen_ai.response.time_to_first_chunk", session.first_token_at - session.started_at)
    if error is not None:
        span.set_attribute("error.type", error.code)
        span.set_status(Status(StatusCode.ERROR, error.message))
