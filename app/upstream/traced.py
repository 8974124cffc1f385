"""Wraps any upstream in one client span per generation, and propagates the trace to the upstream.

Iteration goes straight to the wrapped stream (`__aiter__` returns it), so tracing adds nothing per
token; the span ends when the relay closes the stream.
"""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from app.errors import GatewayError
from app.upstream.base import ChatRequest, Upstream, UpstreamStream, UpstreamStreamWrapper


class TracedStream(UpstreamStreamWrapper):
    __slots__ = ("_span",)

    def __init__(self, inner: UpstreamStream, span: Span) -> None:
        super().__init__(inner)
        self._span = span

    def mark_failed(self) -> None:
        self._span.set_status(Status(StatusCode.ERROR, "upstream deadline"))
        self._inner.mark_failed()

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            inner, span = self._inner, self._span
            if inner.finish_reason:
                span.set_attribute("gen_ai.response.finish_reasons", [inner.finish_reason])
            if inner.usage is not None:
                span.set_attribute("gen_ai.usage.input_tokens", inner.usage.prompt_tokens)
                span.set_attribute("gen_ai.usage.output_tokens", inner.usage.completion_tokens)
            span.end()


class TracedUpstream:
    def __init__(self, inner: Upstream, tracer: trace.Tracer, *, provider_name: str) -> None:
        self._inner = inner
        self._tracer = tracer
        self._provider_name = provider_name
        self.name = inner.name

    async def open(
        self, request: ChatRequest, *, max_batch: int, headers: Mapping[str, str] | None = None
    ) -> UpstreamStream:
        span = self._tracer.start_span(
            f"chat {request.model}",
            kind=SpanKind.CLIENT,
            attributes={
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": self._provider_name,
                "gen_ai.request.model": request.model,
                "gen_ai.request.max_tokens": request.max_tokens,
                "server.address": self.name,
            },
        )
        carrier: dict[str, str] = dict(headers or {})
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        try:
            stream = await self._inner.open(request, max_batch=max_batch, headers=carrier)
        except GatewayError as exc:
            span.set_status(Status(StatusCode.ERROR, exc.code))
            span.set_attribute("error.type", exc.code)
            span.end()
            raise
        except BaseException:
            span.end()
            raise
        return TracedStream(stream, span)

    async def aclose(self) -> None:
        await self._inner.aclose()
