"""`X-Request-ID`: accepted from the client (bounded, sanitised) or generated, stored in the scope, echoed.

Logs of the request read it from `scope["state"]["request_id"]`; the response carries it back. The stream
router (stream_router.py) assigns it with the same function for the routes it serves itself.
"""

from __future__ import annotations

import re
import secrets

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"
MAX_LENGTH = 128  # longer client ids are replaced, not truncated, so two clients never collide by truncation
_UNSAFE = re.compile(rb"[^A-Za-z0-9._:/+=@-]")  # no spaces, quotes or control characters reach logs


def assign_request_id(scope: Scope) -> str:
    """The one place a request's id is chosen and stored: the client's, if it is safe, else a new one."""
    request_id = ""
    for name, value in scope["headers"]:
        if name == HEADER:
            if 0 < len(value) <= MAX_LENGTH and not _UNSAFE.search(value):
                request_id = value.decode()
            break
    request_id = request_id or secrets.token_hex(8)
    scope.setdefault("state", {})["request_id"] = request_id
    return request_id


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = assign_request_id(scope)
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return
        header = (HEADER, request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                if not any(name.lower() == HEADER for name, _ in headers):  # streams set their own
                    headers.append(header)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_id)
