"""Liveness and readiness: cheap, never blocked by stream load."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.routes.deps import StateDep

router = APIRouter()


@router.get("/health", summary="Liveness: the worker's event loop answers")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", summary="Readiness: this instance takes new streams")
async def ready(state: StateDep) -> JSONResponse:
    return JSONResponse({"status": "ready", "active_streams": len(state.registry.streams)})
