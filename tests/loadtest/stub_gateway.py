"""A stand-in for the gateway that breaks the streaming contract on purpose, for the Locust truncation test.

The real gateway never ends a stream silently, so Locust's truncation detection is exercised against
this ASGI app instead. Each endpoint cycles through scripted behaviours, one per request:

    /stream   complete · no done · fewer tokens than done.tokens · connection reset · server_shutdown · 429
    /v1/...   complete · no [DONE] · fewer chunks than usage · server_shutdown error chunk · 503 draining
    /ws       complete · close 1000 without done · server_shutdown + 1012 · rate_limited + 1013 before status

Run: `python tests/loadtest/stub_gateway.py --fd N` (a listening socket the test bound and passed down).
"""

from __future__ import annotations

import argparse
import itertools
import json
from typing import Any

import uvicorn
from starlette.types import Receive, Scope, Send

SSE = [(b"content-type", b"text/event-stream")]
STATUS = {"type": "status", "message": "Generating..."}


def _token(i: int) -> dict[str, Any]:
    return {"type": "token", "content": f"t{i} "}


def _sse(*events: dict[str, Any] | str) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, str) else json.dumps(e)).encode() + b"\n\n" for e in events)


def _chunk(content: str | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    delta = {} if content is None else {"content": content}
    return {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }


USAGE = {"object": "chat.completion.chunk", "choices": [], "usage": {"completion_tokens": 3}}
SEED_PLANS = [
    _sse(STATUS, _token(0), _token(1), _token(2), {"type": "done", "tokens": 3}),
    _sse(STATUS, _token(0), _token(1), _token(2)),
    _sse(STATUS, _token(0), _token(1), {"type": "done", "tokens": 3}),
    "reset",
    _sse(STATUS, _token(0), {"type": "server_shutdown"}),
    (429, {"detail": "rate limit exceeded", "code": "rate_limited"}),
]
CHAT_PLANS = [
    _sse(_chunk("a"), _chunk("b"), _chunk("c"), _chunk(finish="length"), USAGE, "[DONE]"),
    _sse(_chunk("a"), _chunk("b"), _chunk("c"), _chunk(finish="length"), USAGE),
    _sse(_chunk("a"), _chunk("b"), _chunk(finish="length"), USAGE, "[DONE]"),
    _sse(
        _chunk("a"),
        {"error": {"message": "shutting down", "type": "server_error", "code": "server_shutdown"}},
        "[DONE]",
    ),
    (503, {"error": {"message": "draining", "type": "server_error", "param": None, "code": "draining"}}),
]
WS_PLANS: list[tuple[list[dict[str, Any]], int]] = [
    ([STATUS, _token(0), _token(1), {"type": "done", "tokens": 2}], 1000),
    ([STATUS, _token(0), _token(1)], 1000),
    ([STATUS, _token(0), {"type": "server_shutdown"}], 1012),
    ([{"type": "error", "code": "rate_limited", "message": "rate limit exceeded"}], 1013),
]


class StubGateway:
    def __init__(self) -> None:
        self.counters = {path: itertools.count() for path in ("/stream", "/v1/chat/completions", "/ws")}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
        elif scope["type"] == "websocket":
            await self.websocket(receive, send)
        elif scope["path"] in ("/stream", "/v1/chat/completions"):
            plans = SEED_PLANS if scope["path"] == "/stream" else CHAT_PLANS
            await self.http(plans[next(self.counters[scope["path"]]) % len(plans)], receive, send)
        else:
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    async def http(self, plan: Any, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body"):
            pass
        if isinstance(plan, tuple):
            status, body = plan
            headers = [(b"content-type", b"application/json"), (b"retry-after", b"1")]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": json.dumps(body).encode()})
            return
        await send({"type": "http.response.start", "status": 200, "headers": SSE})
        if plan == "reset":
            await send({"type": "http.response.body", "body": _sse(STATUS, _token(0)), "more_body": True})
            raise ConnectionResetError("scripted reset")  # uvicorn drops the connection mid-body
        await send({"type": "http.response.body", "body": plan})

    async def websocket(self, receive: Receive, send: Send) -> None:
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        await receive()  # the request message
        events, code = WS_PLANS[next(self.counters["/ws"]) % len(WS_PLANS)]
        for event in events:
            await send({"type": "websocket.send", "text": json.dumps(event)})
        await send({"type": "websocket.close", "code": code})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fd", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(StubGateway(), fd=args.fd, log_level="critical", lifespan="on", ws="websockets")


if __name__ == "__main__":
    main()
