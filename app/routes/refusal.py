"""A request refused before its stream started: the one place that counts the refusal and builds its answer.

Both ways into a stream route end here: FastAPI's exception handlers (main.py) and the stream router's
direct dispatch (middleware/stream_router.py), and so do the body limit and a WebSocket's refusals.
The refusal is counted under the route template (`scope["route"]`, set once a route matched), never a
raw path with ids in it; before routing (the body limit) it is the raw path, which names a stream route
only for the ones without ids.
"""

from __future__ import annotations

import logging

from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import Scope

from app.errors import (
    GatewayError,
    InternalError,
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    error_response,
    is_openai_path,
)
from app.observability.metrics import count_client_gone, count_rejection
from app.protocol import refusal_code

logger = logging.getLogger("app")
CLIENT_GONE_STATUS = 499  # never delivered: the client left mid-body (nginx's code for it)


def route_label(scope: Scope) -> str:
    """The `route` label of a request: its route's template once routed, else its path."""
    path: str = getattr(scope.get("route"), "path", None) or scope["path"]
    return path


def count_refusal(scope: Scope, error: GatewayError, route: str | None = None) -> None:
    count_rejection(route or route_label(scope), error.code)


def refusal(exc: Exception, scope: Scope, *, route: str | None = None) -> Response:
    """The HTTP answer to `exc`, raised before the request's stream started, counted as a refusal.

    A client that left mid-body is counted as gone (or as the protocol's refusal, e.g. a 408 for a body
    that came too slowly, which the protocol already answered); nobody reads the answer then.
    """
    route = route or route_label(scope)
    if isinstance(exc, ClientDisconnect):
        code = refusal_code(scope)
        if code is not None:
            count_rejection(route, code)
        else:
            count_client_gone(route)
        return Response(status_code=CLIENT_GONE_STATUS)
    error = _as_gateway_error(exc, scope, route)
    count_refusal(scope, error, route)
    response = error_response(error, openai_shape=is_openai_path(scope["path"]))
    request_id = scope.get("state", {}).get("request_id")
    if request_id:
        response.headers["x-request-id"] = request_id
    return response


def _as_gateway_error(exc: Exception, scope: Scope, route: str) -> GatewayError:
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, RequestValidationError):
        return InvalidRequestError("; ".join(str(e.get("msg")) for e in exc.errors()) or "invalid")
    if isinstance(exc, HTTPException):
        if exc.status_code == 404:
            return NotFoundError(f"no route for {scope['method']} {scope['path']}")
        if exc.status_code == 405:
            return MethodNotAllowedError(f"{scope['method']} is not allowed on {scope['path']}")
        error = GatewayError(str(exc.detail))
        error.status = exc.status_code
        return error
    logger.exception("unhandled error", extra={"path": route, "request_id": scope.get("state", {}).get("request_id")})
    return InternalError("the gateway failed to handle this request")
