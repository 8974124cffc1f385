"""`GET /metrics` on METRICS_PORT: Prometheus exposition for the whole instance (app/middleware/metrics_port.py)."""

from __future__ import annotations

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.observability.metrics import CIRCUIT_BREAKER_STATE, CONNECTION_SLOTS_IN_USE, render_metrics
from app.state import GatewayState


async def metrics_app(scope: Scope, receive: Receive, send: Send) -> None:
    state: GatewayState = scope["app"].state.gateway
    # The breaker lives in shared memory; whichever worker answers reads its current state.
    CIRCUIT_BREAKER_STATE.labels(state.breaker.name).set(int(state.breaker.state))
    # So does the slot table: this is what admission counts, not what the streams' recorder counts.
    CONNECTION_SLOTS_IN_USE.set(state.admission.slots_in_use())
    # A fleet's per-endpoint series are read from the instance's tables by a collector, when rendered.
    body, content_type = render_metrics(*([state.endpoint_metrics] if state.endpoint_metrics is not None else []))
    await Response(body, media_type=content_type)(scope, receive, send)
