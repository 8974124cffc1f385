"""`POST /v1/chat/completions` and `GET /v1/models`: the OpenAI-compatible surface."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse

from app.errors import GatewayError, error_response
from app.routes.bodies import ChatCompletionRequest
from app.routes.deps import (
    ASGIResponse,
    StateDep,
    admit,
    affinity_key,
    check_max_tokens,
    check_model,
    check_prompt_size,
    open_stream,
    read_json,
    stream_headers,
)
from app.streaming.encoders import ChatChunkEncoder
from app.streaming.responses import CompletionResponse, SSEStreamResponse
from app.upstream.base import ChatRequest, Usage

router = APIRouter(prefix="/v1")
ENDPOINT = "/v1/chat/completions"


def _openai_error(error: GatewayError) -> JSONResponse:
    return error_response(error, openai_shape=True)


async def chat_completions(request: Request, state: StateDep) -> ASGIResponse:
    ticket = await admit(request, state)
    body = await read_json(request, ChatCompletionRequest)
    settings = state.settings
    limit: int | None
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        field, limit = "max_completion_tokens", min(body.max_tokens, body.max_completion_tokens)
    elif body.max_completion_tokens is not None:
        field, limit = "max_completion_tokens", body.max_completion_tokens
    else:
        field, limit = "max_tokens", body.max_tokens
    check_model(body.model, settings, status=404)
    screened = body.screen(extra_fields=settings.upstream_extra_field_names, images=settings.image_input_enabled)
    chat = ChatRequest(
        model=body.model,
        messages=screened.messages,
        max_tokens=check_max_tokens(limit, settings, field=field),
        options=screened.options,
        full_deltas=True,  # tool calls and refusals reach OpenAI clients whole
        client=ticket.identity,
        affinity=affinity_key(request, settings, (body.model_extra or {}).get("user")),
    )
    check_prompt_size(screened.prompt_chars, settings)
    session, _ = await open_stream(request, state, ticket, chat, endpoint=ENDPOINT, resumable=False)
    completion_id = f"chatcmpl-{session.id}"
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        encoder = ChatChunkEncoder(
            completion_id=completion_id, model=chat.model, created=created, include_usage=include_usage
        )
        return ASGIResponse(
            SSEStreamResponse(
                relay=state.relay,
                session=session,
                request=chat,
                encoder=encoder,
                release=ticket.release,
                error_response=_openai_error,
                extra_headers=stream_headers(session, ticket),
            )
        )

    def render(
        message: dict[str, Any], finish_reason: str | None, usage: Usage | None, tokens: int
    ) -> dict[str, object]:
        usage = usage or Usage(len(chat.prompt_text.split()), tokens)
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": chat.model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": finish_reason or "stop",
                }
            ],
            "usage": usage.as_dict(),
        }

    return ASGIResponse(
        CompletionResponse(
            relay=state.relay,
            session=session,
            request=chat,
            release=ticket.release,
            error_response=_openai_error,
            render=render,
            extra_headers=stream_headers(session, ticket),
        )
    )


OWNED_BY = "streaming-gateway"  # never the upstream's host: clients need not know where models run


@router.get("/models", summary="Models this gateway serves")
async def list_models(request: Request, state: StateDep) -> dict[str, object]:
    state.admission.authenticate(request)  # with API_KEYS set, listing models needs a key as streaming does
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": OWNED_BY} for name in state.settings.model_names
        ],
    }
