"""The stream routes, declared once.

Each declaration serves both ways a stream request can take: FastAPI registers it (the OpenAPI document,
and the instrumented stack when tracing is on), and the stream router (middleware/stream_router.py)
dispatches it straight to the same handler when tracing is off. `call` is how that router invokes the
handler: the path parameters, headers and query parameters FastAPI would have read from its signature.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.types import ASGIApp

from app.routes import chat_completions, stream, websocket
from app.routes.bodies import ChatCompletionRequest, StreamRequest
from app.routes.openapi import EVENT_STREAM, answers, json_body, resume_link
from app.state import GatewayState

WEBSOCKET = "WEBSOCKET"  # the `method` of a WebSocket route (its scope has none)
RESUME_OPERATION = "resume_stream"

HttpCall = Callable[[Request, GatewayState, Mapping[str, str]], Awaitable[ASGIApp]]


@dataclass(frozen=True)
class StreamRoute:
    method: str  # an HTTP method, or WEBSOCKET
    path: str  # the template; also the `route` label of its metrics and logs
    endpoint: Callable[..., Awaitable[Any]]  # the handler, as FastAPI calls and documents it
    call: HttpCall | None = None  # the stream router's call of an HTTP handler; a WebSocket's gets the socket
    summary: str | None = None
    operation_id: str | None = None
    openapi_extra: dict[str, Any] = field(default_factory=dict)


STREAM_ROUTES: tuple[StreamRoute, ...] = (
    StreamRoute(
        "POST",
        stream.ENDPOINT,
        stream.stream,
        call=lambda request, state, _: stream.stream(request, state),
        summary="Stream a completion as seed SSE events (status, token..., done)",
        openapi_extra=json_body(StreamRequest, EVENT_STREAM, links=resume_link(RESUME_OPERATION)),
    ),
    StreamRoute(
        "GET",
        stream.RESUME_ENDPOINT,
        stream.resume_stream,
        call=lambda request, state, params: stream.resume_stream(
            params["stream_id"],
            request,
            state,
            request.headers.get("last-event-id"),
            request.query_params.get("after"),
        ),
        summary="Resume a /stream: every event after Last-Event-ID, then the live tail",
        operation_id=RESUME_OPERATION,
        openapi_extra=answers(EVENT_STREAM),
    ),
    StreamRoute(
        "DELETE",
        stream.RESUME_ENDPOINT,
        stream.stop_stream,
        call=lambda request, state, params: stream.stop_stream(params["stream_id"], request, state),
        summary="Stop a stream's generation (its owner only); answers with its final event",
    ),
    StreamRoute(
        "POST",
        chat_completions.ENDPOINT,
        chat_completions.chat_completions,
        call=lambda request, state, _: chat_completions.chat_completions(request, state),
        summary="OpenAI-compatible chat completion (stream or not)",
        openapi_extra=json_body(ChatCompletionRequest, "application/json", EVENT_STREAM),
    ),
    StreamRoute(WEBSOCKET, websocket.ENDPOINT, websocket.ws_stream),
)


def stream_routes_router() -> APIRouter:
    """The stream routes as FastAPI routes."""
    router = APIRouter()
    for route in STREAM_ROUTES:
        if route.method == WEBSOCKET:
            router.add_api_websocket_route(route.path, route.endpoint)
        else:
            router.add_api_route(
                route.path,
                route.endpoint,
                methods=[route.method],
                summary=route.summary,
                operation_id=route.operation_id,
                openapi_extra=route.openapi_extra or None,
            )
    return router
