"""Streaming endpoints skip the framework's routing: per message, the relay calls uvicorn's `send`.

FastAPI's per-request machinery (routing, dependency resolution, exception middleware that wraps
`send` for every message) cost most of a short stream's CPU when profiled. This middleware sends the
stream routes (routes/table.py, the same declarations FastAPI registers and documents) straight to their
handlers, with the same refusals (routes/refusal.py) and request ids; everything else goes on to
FastAPI. When tracing is on it is not installed, so the OpenTelemetry instrumentation sees every request.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from app.middleware.body_limit import BodyLimitMiddleware
from app.middleware.request_id import assign_request_id
from app.routes.refusal import refusal
from app.routes.table import WEBSOCKET, StreamRoute
from app.state import GatewayState


def _split(template: str) -> tuple[str, str | None]:
    """`/stream/{stream_id}` -> ("/stream/", "stream_id"): a template is exact, or one trailing parameter."""
    prefix, brace, rest = template.partition("{")
    if not brace:
        return template, None
    if not rest.endswith("}") or "/" in rest:
        raise ValueError(f"the stream router matches one trailing path parameter, not {template!r}")
    return prefix, rest[:-1]


class StreamRouterMiddleware:
    def __init__(self, app: ASGIApp, *, routes: Iterable[StreamRoute], max_body_bytes: int) -> None:
        self.app = app
        self._exact: dict[tuple[str, str], StreamRoute] = {}
        self._trailing: list[tuple[str, str, str, StreamRoute]] = []  # method, prefix, parameter, route
        for route in routes:
            prefix, parameter = _split(route.path)
            if parameter is None:
                self._exact[route.method, route.path] = route
            else:
                self._trailing.append((route.method, prefix, parameter, route))
        self._limited = BodyLimitMiddleware(self._dispatch, max_body_bytes=max_body_bytes)

    def _match(self, method: str, path: str) -> tuple[StreamRoute, dict[str, str]] | None:
        route = self._exact.get((method, path))
        if route is not None:
            return route, {}
        for route_method, prefix, parameter, route in self._trailing:
            if method == route_method and path.startswith(prefix) and "/" not in path[len(prefix) :]:
                return route, {parameter: path[len(prefix) :]}
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http" or kind == "websocket":
            match = self._match(scope["method"] if kind == "http" else WEBSOCKET, scope["path"])
            if match is not None:
                scope["route"], scope["path_params"] = match
                assign_request_id(scope)
                if kind == "websocket":
                    await scope["route"].endpoint(WebSocket(scope, receive, send))
                else:
                    await self._limited(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        route: StreamRoute = scope["route"]
        assert route.call is not None
        state: GatewayState = scope["app"].state.gateway
        try:
            response = await route.call(Request(scope, receive), state, scope["path_params"])
        except Exception as exc:
            response = refusal(exc, scope)
        await response(scope, receive, send)
