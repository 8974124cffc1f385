"""`GET /metrics`: Prometheus exposition for the whole instance."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import Response

from app.observability.metrics import render_metrics

router = APIRouter()


@router.get("/metrics", summary="Prometheus metrics (all workers)", include_in_schema=False)
async def metrics() -> Response:
    body, content_type = render_metrics()
    return Response(body, media_type=content_type)
