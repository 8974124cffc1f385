"""`GET /metrics`: Prometheus exposition for the whole instance."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import Response

from app.observability.metrics import CIRCUIT_BREAKER_STATE, CONNECTION_SLOTS_IN_USE, render_metrics
from app.routes.deps import StateDep

router = APIRouter()


@router.get("/metrics", summary="Prometheus metrics (all workers)", include_in_schema=False)
async def metrics(state: StateDep) -> Response:
    # The breaker lives in shared memory; whichever worker answers reads its current state.
    CIRCUIT_BREAKER_STATE.labels(state.breaker.name).set(int(state.breaker.state))
    # So does the slot table: this is what admission counts, not what the streams' recorder counts.
    CONNECTION_SLOTS_IN_USE.set(state.admission.slots_in_use())
    body, content_type = render_metrics()
    return Response(body, media_type=content_type)
