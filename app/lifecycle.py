"""Per-worker state and its lifespan: the upstream client pool and the stream registry."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI

from app.observability.recorder import StreamRecorder
from app.settings import Settings
from app.streaming.session import StreamRegistry
from app.upstream.base import Upstream
from app.upstream.client import OpenAIUpstream
from app.upstream.mock import MockUpstream

logger = logging.getLogger("app.lifecycle")


@dataclass
class GatewayState:
    """Everything a worker shares between requests; held by `app.state.gateway`, never a global."""

    settings: Settings
    upstream: Upstream
    registry: StreamRegistry
    recorder: StreamRecorder

    @staticmethod
    def clock() -> float:
        """The event loop's monotonic clock: the one timebase of every stream timing."""
        return asyncio.get_running_loop().time()


def build_upstream(settings: Settings) -> Upstream:
    if settings.upstream_url is None:
        return MockUpstream(
            tokens_per_second=settings.mock_tokens_per_second, first_token_ms=settings.mock_first_token_ms
        )
    api_key = settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else None
    return OpenAIUpstream(
        settings.upstream_url,
        api_key=api_key,
        model_override=settings.upstream_model,
        connect_timeout_s=settings.upstream_connect_timeout_seconds,
        pool_size=settings.upstream_pool_size,
    )


def build_state(settings: Settings) -> GatewayState:
    return GatewayState(
        settings=settings,
        upstream=build_upstream(settings),
        registry=StreamRegistry(
            first_token_s=settings.first_token_timeout_seconds,
            inter_token_s=settings.inter_token_timeout_seconds,
            total_s=settings.total_timeout_seconds,
            slow_client_s=settings.slow_client_timeout_seconds,
            ping_interval_s=settings.sse_ping_interval_seconds,
            check_interval_s=settings.deadline_check_interval_seconds,
        ),
        recorder=StreamRecorder(model_names=settings.model_names),
    )


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: GatewayState = app.state.gateway
    state.registry.start()
    logger.info("worker ready", extra={"upstream": state.upstream.name})
    try:
        yield
    finally:
        await state.registry.stop()
        await state.upstream.aclose()
