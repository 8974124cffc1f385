"""`GET /metrics` on METRICS_PORT: Prometheus exposition for the whole instance (app/middleware/metrics_port.py)."""

from __future__ import annotations

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.lifecycle import GatewayState
from app.observability.metrics import CIRCUIT_BREAKER_STATE, render_metrics


async def metrics_app(scope: Scope, receive: Receive, send: Send) -> None:
    state: GatewayState = scope["app"].state.gateway
    # The breaker lives in shared memory; whichever worker answers reads its current state.
    CIRCUIT_BREAKER_STATE.labels(state.breaker.name).set(int(state.breaker.state))
    body, content_type = render_metrics()
    await Response(body, media_type=content_type)(scope, receive, send)
