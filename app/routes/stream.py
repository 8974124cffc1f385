"""`POST /stream`: the seed's SSE protocol."""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.errors import error_response
from app.routes.deps import (
    ASGIResponse,
    StateDep,
    admit,
    check_max_tokens,
    check_prompt_size,
    new_session,
    read_json,
    stream_headers,
)
from app.streaming.relay import SSEStreamResponse
from app.streaming.sse import SeedEncoder
from app.upstream.base import ChatRequest
from app.upstream.schemas import StreamRequest

router = APIRouter()
ENDPOINT = "/stream"
_SEED_ENCODER = SeedEncoder()


def seed_chat_request(body: StreamRequest, state: StateDep) -> ChatRequest:
    check_prompt_size(len(body.prompt), state.settings)
    return ChatRequest(
        model=body.model,
        messages=[{"role": "user", "content": body.prompt}],
        max_tokens=check_max_tokens(body.max_tokens, state.settings),
    )


@router.post("/stream", summary="Stream a completion as seed SSE events (status, token..., done)")
async def stream(request: Request, state: StateDep) -> ASGIResponse:
    ticket = await admit(request, state)
    chat = seed_chat_request(await read_json(request, StreamRequest), state)
    session = new_session(request, state, endpoint=ENDPOINT, model=chat.model)
    await state.admission.take_slot(ticket)  # last: from here the response owns the slot
    return ASGIResponse(
        SSEStreamResponse(
            relay=state.relay, session=session, request=chat, encoder=_SEED_ENCODER, release=ticket.release,
            error_response=lambda exc: error_response(exc, openai_shape=False),
            extra_headers=stream_headers(session, ticket),
        )
    )
