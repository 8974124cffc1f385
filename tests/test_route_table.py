"""The stream routes are declared once (app/routes/table.py): FastAPI registers exactly them, and the stream
router dispatches exactly them, with their path parameters, and passes everything else on."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.routing import APIRoute, APIWebSocketRoute
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.middleware.stream_router import StreamRouterMiddleware
from app.routes.table import STREAM_ROUTES, WEBSOCKET, StreamRoute, stream_routes_router
from app.state import GatewayState


def test_fastapi_registers_every_stream_route() -> None:
    registered = set()
    for route in stream_routes_router().routes:
        if isinstance(route, APIWebSocketRoute):
            registered.add((WEBSOCKET, route.path))
        else:
            assert isinstance(route, APIRoute) and route.methods is not None
            registered.update((method, route.path) for method in route.methods)
    assert registered == {(route.method, route.path) for route in STREAM_ROUTES}


def _recording_route(method: str, path: str, calls: list[tuple[str, Mapping[str, str]]]) -> StreamRoute:
    async def call(request: Request, state: GatewayState, params: Mapping[str, str]) -> ASGIApp:
        calls.append((path, dict(params)))
        return PlainTextResponse("routed")

    async def endpoint() -> None:
        raise AssertionError("the stream router calls `call`, not the endpoint, for HTTP")

    return StreamRoute(method, path, endpoint, call=call)


async def _request(app: ASGIApp, method: str, path: str) -> tuple[int, dict[bytes, bytes]]:
    scope: Scope = {
        "type": "http",
        "method": method,
        "path": path,
        "headers": [],
        "query_string": b"",
        "app": SimpleNamespace(state=SimpleNamespace(gateway=None)),
    }
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"], dict(sent[0]["headers"])


@pytest.mark.parametrize(
    ("method", "path", "routed"),
    [
        ("POST", "/stream", ("/stream", {})),
        ("GET", "/stream/abc", ("/stream/{stream_id}", {"stream_id": "abc"})),
        ("DELETE", "/stream/abc", ("/stream/{stream_id}", {"stream_id": "abc"})),
        ("GET", "/stream/a/b", None),  # one path segment only, as FastAPI's `{stream_id}`
        ("GET", "/stream", None),  # the method is part of the route: FastAPI answers 405
        ("PUT", "/stream/abc", None),
        ("GET", "/health", None),
    ],
)
def test_stream_router_dispatches_declared_routes_only(
    method: str, path: str, routed: tuple[str, dict[str, str]] | None
) -> None:
    calls: list[tuple[str, Mapping[str, str]]] = []
    passed_on: list[str] = []

    async def framework(scope: Scope, receive: Receive, send: Send) -> None:
        passed_on.append(scope["path"])
        await PlainTextResponse("framework", status_code=404)(scope, receive, send)

    routes = [
        _recording_route("POST", "/stream", calls),
        _recording_route("GET", "/stream/{stream_id}", calls),
        _recording_route("DELETE", "/stream/{stream_id}", calls),
    ]
    router = StreamRouterMiddleware(framework, routes=routes, max_body_bytes=1000)
    status, _ = asyncio.run(_request(router, method, path))
    if routed is None:
        assert (status, calls, passed_on) == (404, [], [path])
    else:
        assert (status, calls, passed_on) == (200, [routed], [])


def test_stream_router_refuses_templates_it_cannot_match() -> None:
    async def framework(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError

    calls: list[Any] = []
    with pytest.raises(ValueError, match="one trailing path parameter"):
        StreamRouterMiddleware(framework, routes=[_recording_route("GET", "/a/{b}/c", calls)], max_body_bytes=1)
