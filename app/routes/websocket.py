"""`WebSocket /ws`: send the `/stream` request JSON, receive the same events as text frames.

Refusals and errors are an `error` event followed by a close with the mapped code; a finished
stream is `done` followed by a normal close (1000).
"""

from __future__ import annotations

import json

from fastapi import APIRouter, WebSocket

from app.errors import WS_NORMAL, WS_SERVICE_RESTART, GatewayError, InvalidRequestError, PayloadTooLargeError
from app.routes.deps import new_stream_id, parse_json_model
from app.routes.stream import seed_chat_request
from app.streaming.relay import run_relay, watch_disconnect
from app.streaming.session import Outcome, StreamSession
from app.streaming.sse import escape
from app.upstream.schemas import StreamRequest

router = APIRouter()
ENDPOINT = "/ws"
STATUS_TEXT = json.dumps({"type": "status", "message": "Generating..."})
SHUTDOWN_TEXT = json.dumps({"type": "server_shutdown"})
TOKEN_HEAD = '{"type": "token", "content": '


async def _refuse(websocket: WebSocket, error: GatewayError) -> None:
    await websocket.send_text(json.dumps(error.sse_event()))
    await websocket.close(code=error.ws_close_code, reason=error.ws_reason)


@router.websocket("/ws")
async def ws_stream(websocket: WebSocket) -> None:
    state = websocket.app.state.gateway
    settings = state.settings
    await websocket.accept()
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        return
    raw = message.get("text") if message.get("text") is not None else message.get("bytes")
    try:
        if raw is None:
            raise InvalidRequestError("expected one text message with the /stream request JSON")
        if len(raw) > settings.max_body_bytes:
            raise PayloadTooLargeError(f"request message is larger than {settings.max_body_bytes} bytes")
        body = parse_json_model(raw, StreamRequest)
        chat = seed_chat_request(body, state)
    except GatewayError as exc:
        await _refuse(websocket, exc)
        return

    client = websocket.client.host if websocket.client else "unknown"
    session = StreamSession(stream_id=new_stream_id(), endpoint=ENDPOINT, model=chat.model, client=client,
                            now=state.clock())
    try:
        stream = await state.upstream.open(chat, max_batch=settings.stream_buffer_size)
    except GatewayError as exc:
        session.outcome = Outcome.ERROR
        state.recorder.finished(session, exc)
        await _refuse(websocket, exc)
        return

    send_text = websocket.send_text
    listener = watch_disconnect(websocket.receive, session, "websocket.disconnect")

    async def opening() -> None:
        await send_text(STATUS_TEXT)

    async def write(batch: list[str]) -> None:
        try:
            for text in batch:
                await send_text(f"{TOKEN_HEAD}{escape(text)}}}")
        except OSError:  # uvicorn's ClientDisconnected: the peer is gone before we heard its close
            session.client_gone = True
            raise

    try:
        outcome, error = await run_relay(
            session, stream, write, registry=state.registry, observer=state.recorder, opening=opening
        )
        if outcome is Outcome.CLIENT_GONE:
            return
        if outcome is Outcome.DONE:
            await send_text(json.dumps({"type": "done", "tokens": session.tokens}))
            await websocket.close(code=WS_NORMAL)
        elif outcome is Outcome.SHUTDOWN:
            await send_text(SHUTDOWN_TEXT)
            await websocket.close(code=WS_SERVICE_RESTART, reason="server restarting")
        elif error is not None:
            await _refuse(websocket, error)
    finally:
        listener.cancel()
        await stream.aclose()
