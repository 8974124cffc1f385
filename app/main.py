"""`create_app(settings)`: middleware, routers, error handlers, lifespan. Nothing else."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp

from app.errors import GatewayError
from app.middleware.body_limit import BodyLimitMiddleware
from app.middleware.metrics_port import MetricsPortMiddleware
from app.middleware.request_id import RequestIdMiddleware
from app.middleware.stream_router import StreamRouterMiddleware
from app.observability.tracing import setup_tracing
from app.routes import chat_completions, health
from app.routes.metrics import metrics_app
from app.routes.refusal import refusal
from app.routes.table import STREAM_ROUTES, stream_routes_router
from app.settings import Settings
from app.state import lifespan
from app.wiring import build_state


async def _refuse(request: Request, exc: Exception) -> Response:
    return refusal(exc, request.scope)


class GatewayApp(FastAPI):
    """FastAPI with the stream router outside its whole middleware stack (see stream_router.py), and the
    metrics port outside everything (see metrics_port.py)."""

    stream_router_max_body_bytes: int | None = None  # set: streams bypass the framework
    metrics_port: int | None = None  # set with the stream router, which would otherwise answer streams on it

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        if self.stream_router_max_body_bytes is None:
            return stack
        stack = StreamRouterMiddleware(stack, routes=STREAM_ROUTES, max_body_bytes=self.stream_router_max_body_bytes)
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
            GatewayError: _refuse,
            RequestValidationError: _refuse,
            StarletteHTTPException: _refuse,
            ClientDisconnect: _refuse,
            Exception: _refuse,
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
    app.include_router(stream_routes_router())
    for module in (chat_completions, health):  # /v1/models, /health, /ready
        app.include_router(module.router)
    return app
