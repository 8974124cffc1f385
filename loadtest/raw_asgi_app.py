"""The benchmark ceiling: a bare ASGI callable that streams the gateway's `/stream` events, nothing else.

Run: `gunicorn loadtest.raw_asgi_app:app -k loadtest.raw_asgi_app.RawWorker -w 2 -b 127.0.0.1:8001`.
No framework, no validation, no metrics: whatever the gateway carries beyond this is its overhead.
Token `i` is due at `start + i / RAW_TOKENS_PER_SECOND` (default 20); tokens already due are sent in
one body message, the same catch-up the gateway's mock does, so an overloaded loop does not drift.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any, ClassVar

from starlette.types import Receive, Scope, Send
from uvicorn_worker import UvicornWorker

TOKENS_PER_SECOND = float(os.environ.get("RAW_TOKENS_PER_SECOND", "20"))
HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
STATUS = b'data: {"type": "status", "message": "Generating..."}\n\n'


class RawWorker(UvicornWorker):  # type: ignore[misc]  # uvicorn-worker ships no type information
    """Pin uvloop and httptools (the gateway's stack) instead of relying on "auto"."""

    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {"loop": "uvloop", "http": "httptools", "lifespan": "off"}


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] != "/stream":
        await send({"type": "http.response.start", "status": 200 if scope["path"] == "/health" else 404})
        await send({"type": "http.response.body", "body": b""})
        return
    total = int(json.loads(body).get("max_tokens", 16))
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": STATUS, "more_body": True})
    loop = asyncio.get_running_loop()
    start, gap = loop.time(), 1.0 / TOKENS_PER_SECOND
    sent = 0
    while sent < total:
        delay = start + sent * gap - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        due = min(total, max(sent + 1, int((loop.time() - start) / gap) + 1))
        chunk = b"".join(b'data: {"type": "token", "content": "tok%d "}\n\n' % i for i in range(sent, due))
        sent = due
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    done = b'data: {"type": "done", "tokens": %d}\n\n' % total
    await send({"type": "http.response.body", "body": done, "more_body": False})
