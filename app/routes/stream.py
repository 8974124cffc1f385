"""`POST /stream`: the seed's SSE protocol; `GET /stream/{id}` resumes a stream, `DELETE` stops it.

Only a stream's owner reads or stops it (the API key's hash; without keys whoever holds the id).
Anyone else gets exactly the answer an unknown id gets.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Annotated

from fastapi import Header, Query, Request
from starlette.responses import JSONResponse

from app.errors import (
    GatewayError,
    InvalidRequestError,
    NotResumableError,
    ServiceUnavailableError,
    error_response,
)
from app.resume.store import is_final, parse_event_id
from app.routes.bodies import StreamRequest
from app.routes.deps import (
    ASGIResponse,
    StateDep,
    admit,
    affinity_key,
    check_max_tokens,
    check_model,
    check_prompt_size,
    checked_stream_id,
    new_session,
    open_stream,
    read_json,
    stream_headers,
)
from app.state import GatewayState
from app.streaming.encoders import SeedEncoder
from app.streaming.responses import ReplayResponse, SSEStreamResponse
from app.upstream.base import ChatRequest

logger = logging.getLogger("app.access")
ENDPOINT = "/stream"
RESUME_ENDPOINT = "/stream/{stream_id}"
STOP_CONFIRM_S = 5.0  # how long a stop waits for the stream's final event before answering 202


def seed_chat_request(body: StreamRequest, state: StateDep, client: str, affinity: str) -> ChatRequest:
    check_model(body.model, state.settings, status=422)
    check_prompt_size(len(body.prompt), state.settings)
    return ChatRequest(
        model=body.model,
        messages=[{"role": "user", "content": body.prompt}],
        max_tokens=check_max_tokens(body.max_tokens, state.settings),
        client=client,
        affinity=affinity,
    )


async def stream(request: Request, state: StateDep) -> ASGIResponse:
    ticket = await admit(request, state)
    chat = seed_chat_request(
        await read_json(request, StreamRequest), state, ticket.identity, affinity_key(request, state.settings)
    )
    session, log = await open_stream(request, state, ticket, chat, endpoint=ENDPOINT, resumable=True)
    return ASGIResponse(
        SSEStreamResponse(
            relay=state.relay,
            session=session,
            request=chat,
            encoder=SeedEncoder(session.id if log else None),
            release=ticket.release,
            error_response=_detail_error,
            extra_headers=stream_headers(session, ticket),
            log=log,
        )
    )


def _detail_error(error: GatewayError) -> JSONResponse:
    return error_response(error, openai_shape=False)


async def resume_stream(
    stream_id: str,
    request: Request,
    state: StateDep,
    last_event_id: Annotated[str | None, Header()] = None,
    after: Annotated[str | None, Query(description="Last-Event-ID, for clients that cannot set headers")] = None,
) -> ASGIResponse:
    ticket = await admit(request, state, resume=True)  # no slot: the generation holds one wherever it runs
    checked_stream_id(stream_id)
    if state.resume is None:
        raise NotResumableError("stream resumption is disabled on this gateway (RESUME_ENABLED=false)")
    after_seq = resume_position(stream_id, last_event_id or after)
    session = new_session(request, state, endpoint=RESUME_ENDPOINT, model="resume")
    session.replays = stream_id
    frames = state.resume.replay(
        stream_id, after_seq, owner=ticket.owner, poll_s=state.settings.resume_flush_interval_seconds
    )
    return ASGIResponse(
        ReplayResponse(
            relay=state.relay,
            session=session,
            frames=frames,
            encoder=SeedEncoder(),
            error_response=_detail_error,
            not_resumable=lambda: not_resumable(stream_id),
            extra_headers=[(b"x-stream-id", stream_id.encode())],
        )
    )


async def stop_stream(stream_id: str, request: Request, state: StateDep) -> JSONResponse:
    ticket = await state.admission.admit_stop(request)
    final = await stop_generation(state, checked_stream_id(stream_id), ticket.owner)
    return JSONResponse({"stream_id": stream_id, "final": final}, status_code=202 if final is None else 200)


async def stop_generation(state: GatewayState, stream_id: str, owner: str) -> dict[str, object] | None:
    """Stop `owner`'s stream wherever it runs; its final event, or None if that did not arrive in time.

    A stream that already ended is left as it is (its final event is returned). Someone else's
    stream, or an unknown one, raises the same NotResumableError a resume gets.
    """
    if state.resume is None:
        raise NotResumableError("stream resumption is disabled on this gateway (RESUME_ENABLED=false)")
    frames = state.resume.replay(
        stream_id, -1, owner=owner, poll_s=state.settings.resume_flush_interval_seconds, endpoint=None
    )
    last: bytes | None = None
    try:
        try:
            last = (await anext(frames))[-1]
        except LookupError:
            raise not_resumable(stream_id) from None
        if is_final(last):
            return _event(last)
        logger.info("stream stop requested", extra={"stream_id": stream_id})
        for session in state.registry.producers():  # here: at once; elsewhere: through the store
            if session.id == stream_id:
                session.stop()
        try:
            await state.resume.request_stop(stream_id)
        except LookupError:
            raise ServiceUnavailableError("the resume store is unavailable: the stop could not be delivered") from None
        try:
            async with asyncio.timeout(STOP_CONFIRM_S):
                async for batch in frames:
                    last = batch[-1]
        except (TimeoutError, LookupError):
            return None
        return _event(last) if is_final(last) else None
    finally:
        await frames.aclose()


def _event(frame: bytes) -> dict[str, object]:
    """The JSON object of a stored SSE frame (`id: ...` line, `data: {...}` line)."""
    event: dict[str, object] = json.loads(frame.split(b"data: ", 1)[1])
    return event


def not_resumable(stream_id: str) -> NotResumableError:
    return NotResumableError(f"stream {stream_id} cannot be resumed: unknown, expired, or past its replay window")


def resume_position(stream_id: str, last_event_id: str | None) -> int:
    """The seq after which to replay: -1 (everything) without a Last-Event-ID."""
    if not last_event_id:
        return -1
    parsed = parse_event_id(last_event_id)
    if parsed is None or parsed[0] != stream_id:
        raise InvalidRequestError(f"Last-Event-ID {last_event_id[:80]!r} is not an event id of stream {stream_id}")
    return parsed[1]
