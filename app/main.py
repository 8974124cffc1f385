"""`create_app(settings)`: middleware, routers, error handlers, lifespan. Nothing else."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp

from app.errors import (
    GatewayError,
    InternalError,
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    error_response,
    is_openai_path,
)
from app.middleware.body_limit import BodyLimitMiddleware
from app.middleware.metrics_port import MetricsPortMiddleware
from app.middleware.request_id import RequestIdMiddleware
from app.middleware.stream_router import StreamRouterMiddleware
from app.observability.metrics import count_client_gone, count_rejection
from app.observability.tracing import setup_tracing
from app.protocol import refusal_code
from app.routes import chat_completions, health, stream, websocket
from app.routes.metrics import metrics_app
from app.settings import Settings
from app.state import lifespan
from app.wiring import build_state

logger = logging.getLogger("app")


def _respond(request: Request, error: GatewayError) -> JSONResponse:
    route = request.scope.get("route")
    count_rejection(getattr(route, "path", request.url.path), error.code)  # the route template, never raw ids
    return error_response(error, openai_shape=is_openai_path(request.url.path))


async def _on_gateway_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, GatewayError)
    return _respond(request, exc)


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return _respond(request, InvalidRequestError("; ".join(str(e.get("msg")) for e in exc.errors()) or "invalid"))


async def _on_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    error: GatewayError
    if exc.status_code == 404:
        error = NotFoundError(f"no route for {request.method} {request.url.path}")
    elif exc.status_code == 405:
        error = MethodNotAllowedError(f"{request.method} is not allowed on {request.url.path}")
    else:
        error = GatewayError(str(exc.detail))
        error.status = exc.status_code
    return _respond(request, error)


async def _on_client_gone(request: Request, exc: Exception) -> Response:
    route = getattr(request.scope.get("route"), "path", request.url.path)
    refusal = refusal_code(request.scope)
    if refusal is not None:  # the protocol already answered (e.g. 408 for a body that came too slowly)
        count_rejection(route, refusal)
    else:
        count_client_gone(route)
    return Response(status_code=499)  # never delivered: the client left mid-body (nginx's code for it)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error", extra={"path": request.url.path})
    return _respond(request, InternalError("the gateway failed to handle this request"))


class GatewayApp(FastAPI):
    """FastAPI with the stream router outside its whole middleware stack (see stream_router.py), and the
    metrics port outside everything (see metrics_port.py)."""

    stream_router_max_body_bytes: int | None = None  # set: streams bypass the framework
    metrics_port: int | None = None  # set with the stream router, which would otherwise answer streams on it

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        if self.stream_router_max_body_bytes is None:
            return stack
        stack = StreamRouterMiddleware(stack, max_body_bytes=self.stream_router_max_body_bytes)
        assert self.metrics_port is not None
        return MetricsPortMiddleware(stack, metrics_app=metrics_app, metrics_port=self.metrics_port)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = GatewayApp(
        title="Streaming Gateway",
        version="0.1.0",
        lifespan=lifespan,
        # the API description is for developers; in production it maps the surface for an attacker
        openapi_url="/openapi.json" if settings.docs_enabled else None,
        # FastAPI's own OpenTelemetry hooks re-check the OTel providers on every request; tracing is
        # configured explicitly in app/observability/tracing.py instead.
        telemetry={"tracing": False, "metrics": False, "logs": False},
        exception_handlers={
            GatewayError: _on_gateway_error,
            RequestValidationError: _on_validation_error,
            StarletteHTTPException: _on_http_exception,
            ClientDisconnect: _on_client_gone,
            Exception: _on_unexpected,
        },
    )
    tracer_provider = setup_tracing(app)
    app.state.gateway = build_state(settings, tracer_provider=tracer_provider)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(RequestIdMiddleware)  # outermost but for the metrics port: every answer carries the id
    if tracer_provider is None:  # with tracing on, streams go through the instrumented stack
        app.stream_router_max_body_bytes = settings.max_body_bytes
        app.metrics_port = settings.metrics_port
    else:  # outermost user middleware: the instrumentation expects ServerErrorMiddleware outside everything
        app.add_middleware(MetricsPortMiddleware, metrics_app=metrics_app, metrics_port=settings.metrics_port)
    for module in (stream, chat_completions, websocket, health):
        app.include_router(module.router)
    return app
