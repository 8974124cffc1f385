"""An OpenAI-compatible fake model server with fault injection, for tests and benchmarks.

Run: `python -m loadtest.fake_openai --port 9000 [--tokens-per-second 20 --first-token-ms 50]`.
It streams `/v1/chat/completions` like vLLM/OpenAI do and can be scripted to misbehave:

    POST /_script   {"faults": [{...}, ...]}   each later request takes the next fault (FIFO);
                                                 with the queue empty, requests behave normally
    GET  /_stats                                 requests, completed, disconnects, active (generations in
                                                 flight), tokens (content tokens sent), connections (distinct
                                                 client address:port of chat requests), bodies seen (the
                                                 first 50 request bodies, as received), hosts (their
                                                 Host headers)
    POST /_reset                                 clear script and stats (and make /health pass again, /metrics
                                                 report no load)
    GET  /health                                 vLLM's health route: 200 while healthy, else 503
    POST /_health   {"healthy": false}           what /health answers from now on (stats: health_checks
                                                 counts its calls)
    GET  /metrics                                vLLM's load gauges (Prometheus text; stats: metrics_scrapes
                                                 counts its calls, metrics_clients the distinct client
                                                 address:port that called it since the last /_load):
                                                 vllm:num_requests_running (the generations in flight),
                                                 vllm:num_requests_waiting and vllm:kv_cache_usage_perc (as
                                                 scripted, default 0)
    POST /_load     {"waiting": 8, "kv_cache": 0.9, "metrics_status": 503}
                                                 what /metrics reports from now on (any of the keys; a
                                                 metrics_status other than 200 answers that status instead)

Continuation (vLLM's `continue_final_message`): a request whose last message is an assistant message and
which sets `continue_final_message: true` continues that partial answer exactly. The default answer is
`tok0 tok1 ...`; a partial answer that is its first K tokens continues with `tok{K} `, `max_tokens` counts the
tokens still to produce, and usage's prompt_tokens counts the partial answer as prompt (7 + K), as vLLM's
does. A partial answer that is not a prefix of the default answer gets HTTP 400.

A prompt containing `[[fail:NNN]]` (in any message) gets HTTP status NNN whatever the script says,
with an error body that names a server path: a "poisoned" prompt, for breaker-fairness tests and
for checking that the upstream's error text never reaches a client.

A fault is a dict of any of: status (HTTP error with an OpenAI error body), retry_after,
location (with a 3xx status: where the redirect points),
tokens (exact token strings), split_bytes (write the response in pieces of this many bytes),
crlf, role_chunk, empty_deltas, usage, stall_after (stop sending after N tokens and hang),
reset_after (drop the connection after N tokens), die_after (after N deltas, tokens then tool-call pieces, the
process SIGKILLs itself: what a killed model pod looks like to its clients, every connection lost at once),
error_after (an error chunk after N tokens),
no_done (end without `[DONE]` or finish_reason), first_token_ms, tokens_per_second,
headers_delay_ms (hold the response headers back, like a server queueing the request),
tool_calls (a list of {"name", "arguments"}: after the tokens, stream these calls the way OpenAI does,
the arguments in 4-character pieces, and finish with "tool_calls"), raw (a list of payloads written
verbatim as `data:` lines after the tokens: strings as they are, anything else JSON-encoded; for
malformed upstream data).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import time
from collections import deque
from typing import Any

import uvicorn
from starlette.types import Receive, Scope, Send

FAIL_MARKER = re.compile(r"\[\[fail:(\d{3})\]\]")
POISONED_MESSAGE = "internal at /srv/model/shard-3/worker.py: poisoned prompt"


def marked_status(request: dict[str, Any]) -> int | None:
    """The status a `[[fail:NNN]]` marker in the request's messages asks for, if any."""
    match = FAIL_MARKER.search(json.dumps(request.get("messages"), ensure_ascii=False))
    return int(match[1]) if match else None


def default_tokens(n: int, start: int = 0) -> list[str]:
    return [f"tok{i} " for i in range(start, start + n)]


def continued_tokens(request: dict[str, Any]) -> int | None:
    """How many default tokens a continuation request's partial answer holds; None: not a continuation.
    Raises ValueError when the partial answer is not a prefix of the default answer."""
    messages = request.get("messages") or []
    if not request.get("continue_final_message") or not messages or messages[-1].get("role") != "assistant":
        return None
    partial = messages[-1].get("content") or ""
    k = len(partial.split())
    if partial != "".join(default_tokens(k)):
        raise ValueError("the partial answer is not a prefix of this server's answer")
    return k


class FakeOpenAI:
    def __init__(self, *, tokens_per_second: float = 0.0, first_token_ms: float = 0.0) -> None:
        self.tokens_per_second = tokens_per_second
        self.first_token_ms = first_token_ms
        self.script: deque[dict[str, Any]] = deque()
        self.reset()

    def reset(self) -> None:
        self.script.clear()
        self.stats: dict[str, Any] = {
            "requests": 0,
            "completed": 0,
            "disconnects": 0,
            "active": 0,
            "tokens": 0,
            "connections": 0,
            "bodies": [],
            "hosts": [],
            "health_checks": 0,
            "metrics_scrapes": 0,
            "metrics_clients": 0,
        }
        self.healthy = True
        self.load: dict[str, float] = {"waiting": 0, "kv_cache": 0.0, "metrics_status": 200}
        self._peers: set[tuple[str, int]] = set()
        self._scrapers: set[tuple[str, int]] = set()  # since the last /_load: who has seen the current load

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path, method = scope["path"], scope["method"]
        if path == "/_script" and method == "POST":
            self.script.extend(json.loads(body)["faults"])
            return await _json(send, 200, {"queued": len(self.script)})
        if path == "/_stats":
            return await _json(send, 200, self.stats)
        if path == "/_reset":
            self.reset()
            return await _json(send, 200, {"ok": True})
        if path == "/_health" and method == "POST":
            self.healthy = bool(json.loads(body)["healthy"])
            return await _json(send, 200, {"healthy": self.healthy})
        if path == "/_load" and method == "POST":
            self.load.update(json.loads(body))
            self._scrapers.clear()
            self.stats["metrics_clients"] = 0
            return await _json(send, 200, self.load)
        if path == "/metrics":
            self.stats["metrics_scrapes"] += 1
            self._scrapers.add(tuple(scope.get("client") or ("", 0)))
            self.stats["metrics_clients"] = len(self._scrapers)
            return await self._metrics(send)
        if path == "/health":
            self.stats["health_checks"] += 1
            return await _json(send, 200 if self.healthy else 503, {})
        if path == "/v1/models":
            return await _json(send, 200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})
        if path != "/v1/chat/completions" or method != "POST":
            return await _json(send, 404, {"error": {"message": "not found", "type": "invalid_request_error"}})
        request = json.loads(body)
        self.stats["requests"] += 1
        client = scope.get("client")
        if client and tuple(client) not in self._peers:
            self._peers.add(tuple(client))
            self.stats["connections"] = len(self._peers)
        if len(self.stats["bodies"]) < 50:
            self.stats["bodies"].append(
                {
                    **request,
                    "authorization": _header(scope, b"authorization"),
                    "traceparent": _header(scope, b"traceparent"),
                }
            )
            self.stats["hosts"].append(_header(scope, b"host"))
        marked = marked_status(request)
        if marked is not None:
            return await _json(send, marked, {"error": {"message": POISONED_MESSAGE, "type": "fake"}})
        try:
            continued = continued_tokens(request)
        except ValueError as exc:
            return await _json(send, 400, {"error": {"message": str(exc), "type": "invalid_request_error"}})
        fault = self.script.popleft() if self.script else {}
        if "status" in fault:
            headers = {"retry-after": str(fault["retry_after"])} if "retry_after" in fault else {}
            if "location" in fault:  # a redirect (status 3xx) to this URL
                headers["location"] = fault["location"]
            message = fault.get("message", f"injected status {fault['status']}")
            return await _json(send, fault["status"], {"error": {"message": message, "type": "fake"}}, headers)
        self.stats["active"] += 1
        generation = asyncio.ensure_future(self._generate(request, fault, send, continued or 0))
        disconnect = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            done, _ = await asyncio.wait({generation, disconnect}, return_when=asyncio.FIRST_COMPLETED)
            if disconnect in done and not generation.done():
                self.stats["disconnects"] += 1
                generation.cancel()
            elif generation.done() and generation.result():
                self.stats["completed"] += 1
        finally:
            self.stats["active"] -= 1
            disconnect.cancel()
            await asyncio.gather(generation, disconnect, return_exceptions=True)

    async def _metrics(self, send: Send) -> None:
        status = int(self.load["metrics_status"])
        if status != 200:
            return await _json(send, status, {})
        labels = '{model_name="fake"}'
        body = (
            f"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{labels} {self.stats['active']}\n"
            f"# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{labels} {self.load['waiting']}\n"
            f"# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{labels} {self.load['kv_cache']}\n"
        ).encode()
        headers = [(b"content-type", b"text/plain; version=0.0.4"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _generate(self, request: dict[str, Any], fault: dict[str, Any], send: Send, continued: int) -> bool:
        n = int(request.get("max_tokens") or request.get("max_completion_tokens") or 16)
        tokens: list[str] = fault["tokens"] if "tokens" in fault else default_tokens(n, continued)
        tokens = tokens[:n]
        finish = "length" if len(tokens) >= n and "tokens" not in fault else "stop"
        tps = float(fault.get("tokens_per_second", self.tokens_per_second))
        first_ms = float(fault.get("first_token_ms", self.first_token_ms))
        eol = b"\r\n" if fault.get("crlf") else b"\n"
        split = int(fault.get("split_bytes", 0))
        base = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": request.get("model", "fake"),
        }

        async def emit(payload: bytes) -> None:
            data = b"data: " + payload + eol + eol
            if split:
                for i in range(0, len(data), split):
                    await send({"type": "http.response.body", "body": data[i : i + split], "more_body": True})
                    await asyncio.sleep(0)
            else:
                await send({"type": "http.response.body", "body": data, "more_body": True})

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            obj = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
            return json.dumps(obj, ensure_ascii=False).encode()

        def die_if(sent: int) -> None:
            if fault.get("die_after") == sent:
                os.kill(
                    os.getpid(), signal.SIGKILL
                )  # what the kernel does to a killed pod: no goodbye on any connection

        await asyncio.sleep(float(fault.get("headers_delay_ms", 0)) / 1000)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        if fault.get("role_chunk", True):
            await emit(chunk({"role": "assistant", "content": ""}))
        await asyncio.sleep(first_ms / 1000)
        start = time.monotonic()
        for i, token in enumerate(tokens):
            if fault.get("stall_after") == i:
                await asyncio.sleep(3600)
            die_if(i)
            if fault.get("reset_after") == i:
                raise ConnectionResetError("injected reset")  # uvicorn drops the connection
            if fault.get("error_after") == i:
                await emit(json.dumps({"error": {"message": "injected mid-stream error"}}).encode())
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return True
            if tps > 0:
                delay = start + i / tps - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            if fault.get("empty_deltas"):
                await emit(chunk({"content": ""}))
            await emit(chunk({"content": token}))
            self.stats["tokens"] += 1
        for raw in fault.get("raw") or ():
            await emit(raw.encode() if isinstance(raw, str) else json.dumps(raw).encode())
        sent = len(tokens)  # deltas sent: die_after counts the tool calls' on from the tokens
        for index, call in enumerate(fault.get("tool_calls") or ()):
            finish = "tool_calls"
            head = {
                "index": index,
                "id": f"call_{index}",
                "type": "function",
                "function": {"name": call["name"], "arguments": ""},
            }
            die_if(sent)
            await emit(chunk({"tool_calls": [head]}))
            sent += 1
            arguments = call["arguments"]
            for i in range(0, len(arguments), 4):
                die_if(sent)
                await emit(chunk({"tool_calls": [{"index": index, "function": {"arguments": arguments[i : i + 4]}}]}))
                sent += 1
        if not fault.get("no_done"):
            await emit(chunk({}, finish))
            if fault.get("usage", (request.get("stream_options") or {}).get("include_usage")):
                prompt = 7 + continued  # a continuation's partial answer is part of its prompt
                usage = {
                    "prompt_tokens": prompt,
                    "completion_tokens": len(tokens),
                    "total_tokens": prompt + len(tokens),
                }
                await emit(json.dumps({**base, "choices": [], "usage": usage}).encode())
            await emit(b"[DONE]")
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return True


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode())
    return None


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _json(send: Send, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
    raw = json.dumps(body).encode()
    extra = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send(
        {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json"), *extra]}
    )
    await send({"type": "http.response.body", "body": raw})


def command(fd: int, *, tokens_per_second: float, first_token_ms: float = 0.0) -> list[str]:
    """The command line that serves a fake on the inherited listening socket `fd` (tests, the rehearsal)."""
    return [
        sys.executable,
        "-m",
        "loadtest.fake_openai",
        "--fd",
        str(fd),
        "--tokens-per-second",
        f"{tokens_per_second:g}",
        "--first-token-ms",
        f"{first_token_ms:g}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--tokens-per-second", type=float, default=0.0)
    parser.add_argument("--first-token-ms", type=float, default=0.0)
    parser.add_argument("--fd", type=int, default=None, help="serve on this inherited listening socket")
    args = parser.parse_args()
    app = FakeOpenAI(tokens_per_second=args.tokens_per_second, first_token_ms=args.first_token_ms)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        fd=args.fd,
        log_level="warning",
        loop="uvloop",
        http="httptools",
        lifespan="on",
        backlog=4096,
    )


if __name__ == "__main__":
    main()
