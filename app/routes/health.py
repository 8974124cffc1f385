"""Liveness and readiness: cheap, never blocked by stream load."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.policies.breaker import BreakerState
from app.routes.deps import StateDep

router = APIRouter()


@router.get("/health", summary="Liveness: the worker's event loop answers")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", summary="Readiness: this instance takes new streams")
async def ready(state: StateDep) -> JSONResponse:
    streams = len(state.registry.streams)
    if state.drain.draining:
        return JSONResponse({"status": "draining", "active_streams": streams}, status_code=503)
    if state.settings.ready_requires_closed_circuit and state.breaker.state is BreakerState.OPEN:
        return JSONResponse({"status": "circuit_open", "active_streams": streams}, status_code=503)
    return JSONResponse({"status": "ready", "active_streams": streams})
