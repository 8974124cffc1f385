"""Streaming endpoints skip the framework's routing: per message, the relay calls uvicorn's `send`.

FastAPI's per-request machinery (routing, dependency resolution, exception middleware that wraps
`send` for every message) cost most of a short stream's CPU when profiled. This middleware sends
POST /stream, POST /v1/chat/completions, GET and DELETE /stream/{stream_id} and WebSocket /ws straight to
the same handler functions FastAPI lists in its OpenAPI schema, with the same error mapping and
request ids; everything else goes on to FastAPI. When tracing is on it is not installed, so the
OpenTelemetry instrumentation sees every request.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from app.errors import GatewayError, InternalError, error_response, is_openai_path
from app.middleware.body_limit import BodyLimitMiddleware
from app.middleware.request_id import request_id_from
from app.observability.metrics import count_client_gone, count_rejection
from app.protocol import refusal_code
from app.routes import chat_completions, stream, websocket
from app.state import GatewayState

logger = logging.getLogger("app")

Handler = Callable[[Request, GatewayState], Awaitable[ASGIApp]]
RESUME_PREFIX = "/stream/"


async def _resume(request: Request, state: GatewayState) -> ASGIApp:
    stream_id = request.scope["path"][len(RESUME_PREFIX):]
    return await stream.resume_stream(
        stream_id, request, state, request.headers.get("last-event-id"), request.query_params.get("after")
    )


async def _stop(request: Request, state: GatewayState) -> ASGIApp:
    return await stream.stop_stream(request.scope["path"][len(RESUME_PREFIX):], request, state)


HTTP_ROUTES: dict[tuple[str, str], tuple[str, Handler]] = {
    ("POST", "/stream"): ("/stream", stream.stream),
    ("POST", "/v1/chat/completions"): ("/v1/chat/completions", chat_completions.chat_completions),
}


class StreamRouterMiddleware:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self._limited = BodyLimitMiddleware(self._dispatch, max_body_bytes=max_body_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            method, path = scope["method"], scope["path"]
            route = HTTP_ROUTES.get((method, path))
            if route is None and path.startswith(RESUME_PREFIX) and "/" not in path[8:]:
                if method == "GET":
                    route = (stream.RESUME_ENDPOINT, _resume)
                elif method == "DELETE":
                    route = (stream.RESUME_ENDPOINT, _stop)
            if route is not None:
                scope["gateway.route"] = route
                await self._limited(scope, receive, send)
                return
        elif scope["type"] == "websocket" and scope["path"] == "/ws":
            scope.setdefault("state", {})["request_id"] = request_id_from(scope["headers"])
            await websocket.ws_stream(WebSocket(scope, receive, send))
            return
        await self.app(scope, receive, send)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint, handler = scope["gateway.route"]
        request_id = request_id_from(scope["headers"])
        scope.setdefault("state", {})["request_id"] = request_id
        state: GatewayState = scope["app"].state.gateway
        try:
            response = await handler(Request(scope, receive), state)
        except ClientDisconnect:  # it left mid-body, or the protocol refused it (408): nobody to answer here
            refusal = refusal_code(scope)
            if refusal is not None:
                count_rejection(endpoint, refusal)
            else:
                count_client_gone(endpoint)
            return
        except Exception as exc:
            if isinstance(exc, GatewayError):
                error = exc
            else:
                logger.exception("unhandled error", extra={"path": endpoint, "request_id": request_id})
                error = InternalError("the gateway failed to handle this request")
            count_rejection(endpoint, error.code)
            reply = error_response(error, openai_shape=is_openai_path(endpoint))
            reply.headers["x-request-id"] = request_id
            response = reply
        await response(scope, receive, send)
