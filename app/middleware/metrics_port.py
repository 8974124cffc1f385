"""The metrics port serves `GET /metrics` and nothing else; the public port never serves it.

gunicorn listens on PORT and METRICS_PORT; each request's local port (`scope["server"]`) says which
one it came in on. The chart routes the ingress to PORT only, so /metrics stays inside the cluster.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import MethodNotAllowedError, NotFoundError, error_response

METRICS_PATH = "/metrics"


class MetricsPortMiddleware:
    def __init__(self, app: ASGIApp, *, metrics_app: ASGIApp, metrics_port: int) -> None:
        self.app = app
        self.metrics_app = metrics_app
        self.metrics_port = metrics_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        server = scope.get("server")
        on_metrics_port = server is not None and server[1] == self.metrics_port
        if scope["type"] == "http" and on_metrics_port and scope["path"] == METRICS_PATH:
            if scope["method"] in ("GET", "HEAD"):
                await self.metrics_app(scope, receive, send)
            else:
                await error_response(MethodNotAllowedError("only GET /metrics"), openai_shape=False)(
                    scope, receive, send
                )
            return
        if on_metrics_port or (scope["type"] == "http" and scope["path"] == METRICS_PATH):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            where = "this port serves only GET /metrics" if on_metrics_port else "/metrics is on the metrics port"
            await error_response(NotFoundError(where), openai_shape=False)(scope, receive, send)
            return
        await self.app(scope, receive, send)
