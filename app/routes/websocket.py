"""`WebSocket /ws`: send the `/stream` request JSON, receive the same events as text frames.

Refusals and errors are an `error` event followed by a close with the mapped code; a finished
stream is `done` followed by a normal close (1000); a stream ended by the drain gets
`server_shutdown` and close 1012 (service restart), so the client reconnects elsewhere.
"""

from __future__ import annotations

import json

from fastapi import APIRouter, WebSocket

from app.errors import WS_NORMAL, GatewayError, InvalidRequestError, PayloadTooLargeError
from app.lifecycle import GatewayState
from app.observability.metrics import count_rejection
from app.routes.deps import admit, new_session, parse_json_model
from app.routes.stream import seed_chat_request
from app.streaming.relay import ClientGoneError
from app.streaming.session import Outcome
from app.streaming.sse import escape
from app.upstream.schemas import StreamRequest

router = APIRouter()
ENDPOINT = "/ws"
STATUS_TEXT = json.dumps({"type": "status", "message": "Generating..."})
SHUTDOWN_TEXT = json.dumps({"type": "server_shutdown"})
TOKEN_HEAD = '{"type": "token", "content": '


async def _end_with_error(websocket: WebSocket, error: GatewayError) -> None:
    text = SHUTDOWN_TEXT if error.code == "server_shutdown" else json.dumps(error.sse_event())
    await websocket.send_text(text)
    await websocket.close(code=error.ws_close_code, reason=error.ws_reason)


@router.websocket("/ws")
async def ws_stream(websocket: WebSocket) -> None:
    state: GatewayState = websocket.app.state.gateway
    settings = state.settings
    await websocket.accept()
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        return
    raw = message.get("text") if message.get("text") is not None else message.get("bytes")
    try:
        ticket = await admit(websocket, state)
        if raw is None:
            raise InvalidRequestError("expected one text message with the /stream request JSON")
        if len(raw) > settings.max_body_bytes:
            raise PayloadTooLargeError(f"request message is larger than {settings.max_body_bytes} bytes")
        chat = seed_chat_request(parse_json_model(raw, StreamRequest), state)
        await state.admission.take_slot(ticket)
    except GatewayError as exc:
        count_rejection(ENDPOINT, exc.code)
        await _end_with_error(websocket, exc)
        return

    session = new_session(websocket, state, endpoint=ENDPOINT, model=chat.model)
    send_text = websocket.send_text

    async def opening() -> None:
        await send_text(STATUS_TEXT)

    async def write(batch: list[str]) -> None:
        try:
            for text in batch:
                await send_text(f"{TOKEN_HEAD}{escape(text)}}}")
        except OSError:  # uvicorn's ClientDisconnected: the peer is gone before we heard its close
            session.client_gone = True
            raise

    async with state.relay.run(session, receive=websocket.receive, disconnect_type="websocket.disconnect",
                               release=ticket.release) as run:
        try:
            await run.open(chat)
        except ClientGoneError:
            return
        except GatewayError as exc:
            run.report(Outcome.ERROR, exc)
            await _end_with_error(websocket, exc)
            return
        outcome, error = await run.relay(write, opening)
        if outcome is Outcome.CLIENT_GONE:
            return
        if error is not None:
            await _end_with_error(websocket, error)
            return
        await send_text(json.dumps({"type": "done", "tokens": session.tokens}))
        await websocket.close(code=WS_NORMAL)
