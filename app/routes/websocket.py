"""`WebSocket /ws`: send the `/stream` request JSON, receive the same events as text frames.

Refusals and errors are an `error` event followed by a close with the mapped code; a finished
stream is `done` followed by a normal close (1000); a stream ended by the drain gets
`server_shutdown` and close 1012 (service restart), so the client reconnects elsewhere.

Before the upgrade: a browser Origin not in ALLOWED_ORIGINS gets 403, and with API_KEYS set the key
is checked (401/403 as plain HTTP, so a page cannot open a socket it may not use). A browser that sends the
key as a subprotocol offers `["gateway.v1", "bearer.<key>"]` and the server chooses `gateway.v1` (a browser
fails a handshake that offered protocols and got none back); the key is never echoed. After it, the
first message must arrive within REQUEST_READ_TIMEOUT_SECONDS (else `request_timeout`, close 1008);
a frame larger than MAX_BODY_BYTES is refused by the server from its header (close 1009).

Resuming: with resumption on, the status event carries `"stream_id"`. A client that lost its
connection opens a new one and sends `{"resume": "<stream id>", "received": <events it got>}`
(or `"last_event_id": "<stream id>-<seq>"`); it gets every later event, then the live tail.

Stopping: a connection whose first message is `{"stop": "<stream id>"}` stops that stream's
generation (its owner only), gets `{"type": "stopped", "stream_id", "final"}` and close 1000. The
connection that runs a stream may also send that message for its own stream at any time.
A stream of someone else, or an unknown one, answers as a resume of it would: `not_resumable`, 1008.
"""

from __future__ import annotations

import asyncio
import json

from fastapi import WebSocket
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from starlette.types import Message

from app.admission import Ticket
from app.errors import (
    WS_NORMAL,
    WS_POLICY_VIOLATION,
    GatewayError,
    InvalidRequestError,
    NotResumableError,
    OriginForbiddenError,
    PayloadTooLargeError,
    RequestTimeoutError,
)
from app.resume.store import EventLog
from app.routes.bodies import StreamRequest
from app.routes.deps import (
    admit,
    affinity_key,
    checked_stream_id,
    new_session,
    open_stream,
    parse_json_model,
    validate_model,
)
from app.routes.refusal import count_refusal, refusal
from app.routes.stream import not_resumable, resume_position, seed_chat_request, stop_generation
from app.state import GatewayState
from app.streaming.encoders import SeedEncoder, WebSocketEncoder
from app.streaming.run import StreamLog
from app.streaming.session import StreamSession
from app.streaming.transports import WebSocketTransport, close_with_error
from app.upstream.base import ChatRequest

ENDPOINT = "/ws"
# The subprotocol the server chooses when offered: browsers fail a handshake that offered protocols (`bearer.<key>`)
# and got none back, and the key itself is never echoed.
SUBPROTOCOL = "gateway.v1"


class ResumeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    resume: StrictStr = Field(description="The stream id from the status event.")
    last_event_id: StrictStr | None = None
    received: StrictInt | None = Field(None, ge=0, description="How many events of the stream the client has.")

    def after_seq(self) -> int:
        if self.received is not None:
            return self.received - 1
        return resume_position(self.resume, self.last_event_id)


class StopRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stop: StrictStr = Field(description="The id of a stream of this client, whose generation is to stop.")


Request = StreamRequest | ResumeRequest | StopRequest


def _load(raw: str | bytes | None, max_bytes: int) -> object:
    """The first message's JSON value, parsed once; None for anything `_parse` refuses before validation."""
    if raw is None or len(raw) > max_bytes:
        return None
    try:
        return json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    except ValueError:  # not UTF-8, not JSON
        return None


def _kind(fields: object) -> type[Request]:
    """Which request a first message is, by its keys (not by its text: `{"prompt": "stop"}` is a stream)."""
    if isinstance(fields, dict):
        if "resume" in fields:
            return ResumeRequest
        if "stop" in fields:
            return StopRequest
    return StreamRequest


def _parse(raw: str | bytes | None, fields: object, kind: type[Request], max_bytes: int) -> Request:
    if isinstance(fields, dict):
        return validate_model(fields, kind)
    if raw is None:
        raise InvalidRequestError("expected one text message with the /stream request JSON")
    if len(raw) > max_bytes:
        raise PayloadTooLargeError(f"request message is larger than {max_bytes} bytes")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode()
        except UnicodeDecodeError:
            raise InvalidRequestError("request message is not valid UTF-8") from None
    return parse_json_model(raw, kind)  # not JSON, or not an object: refused with the reason


def check_origin(websocket: WebSocket, allowed: tuple[str, ...]) -> None:
    """Browsers send Origin on every WebSocket; other clients usually send none, and are not affected."""
    origin = websocket.headers.get("origin")
    if origin is None or "*" in allowed or origin.rstrip("/").lower() in allowed:
        return
    raise OriginForbiddenError(origin)


async def _refuse_handshake(websocket: WebSocket, error: GatewayError) -> None:
    response = refusal(error, websocket.scope)
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(response)
    else:  # pragma: no cover - uvicorn offers the denial extension; without it the server answers 403
        await websocket.close(code=WS_POLICY_VIOLATION)


async def _refuse_stream(websocket: WebSocket, error: GatewayError) -> None:
    """A refusal after the handshake: counted as every refusal is, answered as the socket answers any error."""
    count_refusal(websocket.scope, error)
    await close_with_error(websocket, error)


async def ws_stream(websocket: WebSocket) -> None:
    state: GatewayState = websocket.app.state.gateway
    try:
        check_origin(websocket, state.settings.origin_list)
        state.admission.authenticate(websocket)
    except GatewayError as exc:
        await _refuse_handshake(websocket, exc)
        return
    await websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in websocket.scope.get("subprotocols", ()) else None)
    read_timeout = state.settings.request_read_timeout_seconds
    try:
        async with asyncio.timeout(read_timeout):
            message = await websocket.receive()
    except TimeoutError:
        await _refuse_stream(websocket, RequestTimeoutError(read_timeout, "the first message"))
        return
    if message["type"] == "websocket.disconnect":
        return
    raw = message.get("text") if message.get("text") is not None else message.get("bytes")
    fields = _load(raw, state.settings.max_body_bytes)
    kind = _kind(fields)
    try:
        if kind is StopRequest:
            ticket = await state.admission.admit_stop(websocket)
        else:
            ticket = await admit(websocket, state, resume=kind is ResumeRequest)
        request = _parse(raw, fields, kind, state.settings.max_body_bytes)
        if isinstance(request, StopRequest):
            final = await stop_generation(state, checked_stream_id(request.stop), ticket.owner)
        elif isinstance(request, ResumeRequest):
            checked_stream_id(request.resume)
            if state.resume is None:
                raise NotResumableError("stream resumption is disabled on this gateway (RESUME_ENABLED=false)")
            after = request.after_seq()
        else:
            chat = seed_chat_request(request, state, ticket.identity, affinity_key(websocket, state.settings))
            session, log = await open_stream(websocket, state, ticket, chat, endpoint=ENDPOINT, resumable=True)
    except GatewayError as exc:
        await _refuse_stream(websocket, exc)
        return
    if isinstance(request, StopRequest):
        await websocket.send_text(json.dumps({"type": "stopped", "stream_id": request.stop, "final": final}))
        await websocket.close(code=WS_NORMAL)
    elif isinstance(request, ResumeRequest):
        await _replay(websocket, state, request.resume, after, ticket.owner)
    else:
        await _generate(websocket, state, chat, ticket, session, log)


async def _generate(
    websocket: WebSocket,
    state: GatewayState,
    chat: ChatRequest,
    ticket: Ticket,
    session: StreamSession,
    log: EventLog | None,
) -> None:

    async def receive() -> Message:  # the listener's: a stop of this very stream may arrive mid-stream
        message = await websocket.receive()
        if message["type"] == "websocket.receive" and _stops(message.get("text"), session.id):
            session.stop()
        return message

    transport = WebSocketTransport(websocket, session=session, registry=state.registry)
    async with state.relay.run(
        session, receive=receive, disconnect_type="websocket.disconnect", release=ticket.release
    ) as run:
        await run.stream(
            transport,
            WebSocketEncoder(session.id if log is not None else None),
            chat,
            None if log is None else StreamLog(log, SeedEncoder(session.id)),
        )


def _stops(text: str | None, stream_id: str) -> bool:
    if not text or '"stop"' not in text:
        return False
    try:
        return StopRequest.model_validate_json(text).stop == stream_id
    except ValidationError:
        return False


async def _replay(websocket: WebSocket, state: GatewayState, stream_id: str, after_seq: int, owner: str) -> None:
    assert state.resume is not None
    session = new_session(websocket, state, endpoint=ENDPOINT, model="resume")
    session.replays = stream_id
    frames = state.resume.replay(
        stream_id, after_seq, owner=owner, poll_s=state.settings.resume_flush_interval_seconds, endpoint=ENDPOINT
    )
    transport = WebSocketTransport(websocket, session=session, registry=state.registry)
    async with state.relay.run(session, receive=websocket.receive, disconnect_type="websocket.disconnect") as run:
        await run.replay(transport, WebSocketEncoder(), frames, lambda: not_resumable(stream_id))
