"""Shared route dependencies and request parsing (one place that turns bad input into a readable 4xx)."""

from __future__ import annotations

from typing import Annotated, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask
from starlette.requests import HTTPConnection
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from app.admission import Ticket
from app.errors import InvalidRequestError, InvalidStreamIdError, ModelNotFoundError, UnsupportedMediaTypeError
from app.resume.store import EventLog, StreamMeta
from app.settings import Settings
from app.state import GatewayState
from app.streaming.ids import is_stream_id, new_stream_id
from app.streaming.session import StreamSession
from app.upstream.base import ChatRequest

ModelT = TypeVar("ModelT", bound=BaseModel)


def checked_stream_id(value: str) -> str:
    """A stream id from a client, refused (400, WS 1008) unless it has the format ids are made in."""
    if not is_stream_id(value):
        raise InvalidStreamIdError()
    return value


# Dependencies are `async def` on purpose: FastAPI runs a sync dependency in its thread pool,
# which cost every request a thread hop and GIL hand-off (a third of a worker, profiled).
async def get_state(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state


StateDep = Annotated[GatewayState, Depends(get_state)]


async def admit(connection: HTTPConnection, state: GatewayState, *, resume: bool = False) -> Ticket:
    """Admission up to (not including) the connection slot; raises the refusal."""
    return await state.admission.admit(connection, resume=resume)


def stream_headers(session: StreamSession, ticket: Ticket) -> list[tuple[bytes, bytes]]:
    headers = [(b"x-stream-id", session.id.encode())]
    if session.request_id:
        headers.append((b"x-request-id", session.request_id.encode()))
    headers.extend((name.lower().encode(), value.encode()) for name, value in ticket.headers.items())
    return headers


def affinity_key(connection: HTTPConnection, settings: Settings, user: object = None) -> str:
    """The session a stream's endpoint affinity follows (a fleet): UPSTREAM_AFFINITY_HEADER's value, else on /v1
    OpenAI's `user` (with UPSTREAM_AFFINITY_USER). Empty: none."""
    if settings.upstream_affinity_header:
        value = connection.headers.get(settings.upstream_affinity_header)
        if value:
            return value
    if settings.upstream_affinity_user and isinstance(user, str):
        return user
    return ""


def new_session(connection: HTTPConnection, state: GatewayState, *, endpoint: str, model: str) -> StreamSession:
    """The session that will own this stream (ids, client, start time) - one place for all protocols."""
    return StreamSession(
        stream_id=new_stream_id(),
        request_id=connection.scope.get("state", {}).get("request_id", ""),
        endpoint=endpoint,
        model=model,
        client=connection.client.host if connection.client else "unknown",
        now=state.clock(),
    )


def open_log(state: GatewayState, session: StreamSession, chat: ChatRequest, owner: str) -> EventLog | None:
    """The stream's resume log (its events outlive the connection), if resumption is on."""
    if state.resume is None:
        return None
    session.resumable = True
    return state.resume.open(
        StreamMeta(
            stream_id=session.id,
            model=chat.model,
            messages=chat.messages,
            max_tokens=chat.max_tokens,
            owner=owner,
        )
    )


async def open_stream(
    connection: HTTPConnection,
    state: GatewayState,
    ticket: Ticket,
    chat: ChatRequest,
    *,
    endpoint: str,
    resumable: bool,
) -> tuple[StreamSession, EventLog | None]:
    """A route's last opening step, the same for every protocol: the stream's session, its connection slot and, on
    a resumable route, its resume log. From here the stream's run owns the slot; a failure before that gives it back."""
    session = new_session(connection, state, endpoint=endpoint, model=chat.model)
    await state.admission.take_slot(ticket)  # last admission step: nothing after it may refuse without releasing
    try:
        log = open_log(state, session, chat, ticket.owner) if resumable else None
    except BaseException:
        await ticket.release()
        raise
    return session, log


def describe_validation_error(exc: ValidationError) -> str:
    """`messages.0.role: Input should be 'system', 'user', ...; max_tokens: ...` - one readable line."""
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts[:10]) + ("; ..." if len(parts) > 10 else "")


def parse_json_model(raw: bytes | str, model: type[ModelT]) -> ModelT:
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        if first["type"] == "json_invalid":
            raise InvalidRequestError(f"request body is not valid JSON: {first['msg']}") from None
        if first["type"] == "model_type" and not first["loc"]:
            raise InvalidRequestError("request body must be a JSON object") from None
        raise _invalid(exc) from None


def validate_model(fields: dict[str, object], model: type[ModelT]) -> ModelT:
    """`parse_json_model` for a JSON object already parsed."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise _invalid(exc) from None


def _invalid(exc: ValidationError) -> InvalidRequestError:
    first = exc.errors(include_url=False)[0]
    param = str(first["loc"][0]) if first["loc"] else None
    return InvalidRequestError(describe_validation_error(exc), param=param)


async def read_json(request: Request, model: type[ModelT]) -> ModelT:
    """Read (size-capped by BodyLimitMiddleware) and validate a JSON body."""
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise UnsupportedMediaTypeError(f"Content-Type must be application/json, got {content_type or 'nothing'!r}")
    body = await request.body()
    if not body.strip():
        raise InvalidRequestError("request body is empty; expected a JSON object")
    return parse_json_model(body, model)


def check_max_tokens(value: int | None, settings: Settings, *, field: str = "max_tokens") -> int:
    if value is None:
        return settings.default_max_tokens
    if value > settings.max_tokens_limit:
        raise InvalidRequestError(
            f"{field} is {value}, above this gateway's limit of {settings.max_tokens_limit}", param=field
        )
    return value


def check_model(model: str, settings: Settings, *, status: int) -> None:
    """MODELS bounds what reaches the upstream (empty: any model)."""
    if settings.model_names and model not in settings.model_names:
        raise ModelNotFoundError(model, status=status)


def check_prompt_size(chars: int, settings: Settings) -> None:
    if chars > settings.max_prompt_chars:
        raise InvalidRequestError(
            f"prompt is {chars} characters, above this gateway's limit of {settings.max_prompt_chars}"
        )


class ASGIResponse(Response):
    """Lets a route hand FastAPI a pure-ASGI app as its response (FastAPI passes Responses through)."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app
        self.background: BackgroundTask | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)
