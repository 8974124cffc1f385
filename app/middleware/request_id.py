"""`X-Request-ID`: accepted from the client (bounded, sanitised) or generated, stored in the scope, echoed.

Logs of the request read it from `scope["state"]["request_id"]`; the response carries it back.
"""

from __future__ import annotations

import re
import secrets

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"
MAX_LENGTH = 128  # longer client ids are replaced, not truncated, so two clients never collide by truncation
_UNSAFE = re.compile(rb"[^A-Za-z0-9._:/+=@-]")  # no spaces, quotes or control characters reach logs


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name == HEADER:
            if 0 < len(value) <= MAX_LENGTH and not _UNSAFE.search(value):
                return value.decode()
            break
    return secrets.token_hex(8)


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope["headers"])
        scope.setdefault("state", {})["request_id"] = request_id
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
