"""The HTTP protocol the workers run: uvicorn's httptools protocol with every wait before the app bounded.

uvicorn bounds only the keep-alive wait after a response, and httptools has no limit on a request head.
This subclass adds, per connection:

- A socket that never sends a byte is closed after KEEPALIVE_SECONDS, like an idle keep-alive one
  (uvicorn arms that timer only once a first response is complete).
- A request's head and body must arrive within REQUEST_READ_TIMEOUT_SECONDS of its first byte: else 408
  and close. An app waiting for the rest of the body sees `http.disconnect`.
- The head is capped at MAX_REQUEST_HEAD_BYTES and MAX_REQUEST_HEADERS fields: 431 and close. The raw
  bytes of an unfinished head are counted too, since httptools buffers a header value until it ends.
  (gunicorn's `limit_request_line` / `limit_request_fields` apply to its own parser, never to a uvicorn
  worker.)
- A worker holds at most `max_sockets`. A new socket beyond that closes the longest-idle socket that has
  no request in flight (a silent one, a keep-alive one, or one still sending its head), as nginx reuses idle
  keep-alive connections when it runs out; when every socket carries a request, the new one gets 503.
  uvicorn's `limit_concurrency` is not used: it answers 503 to new requests while idle sockets stay open,
  so hostile idle sockets would lock out legitimate clients instead of being closed.

A request whose first bytes arrive while the previous response is still going out (pipelined) is under
the read deadline from the end of that response: only then does the connection wait on it, and it is not
idle, so keep-alive does not apply (the next byte would cancel it and leave nothing armed).

A refusal that cuts a body short (408) is marked in the request's `scope["state"]` (see `refusal_code`):
the app's `receive()` sees `http.disconnect`, but the request is counted as refused, not as a client that left.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from app.errors import GatewayError, HeadersTooLargeError, RequestTimeoutError, ServiceUnavailableError

SOCKET_HEADROOM = 100  # sockets per worker beyond MAX_CONNECTIONS: probes, scrapes, idle keep-alive, refusals
REFUSAL_STATE_KEY = "gateway.refusal"


def refusal_code(scope: MutableMapping[str, Any]) -> str | None:
    """The error code the protocol answered this request with while the app still read its body, if any."""
    code: str | None = scope.get("state", {}).get(REFUSAL_STATE_KEY)
    return code


@dataclass(frozen=True)
class ReadLimits:
    read_timeout_s: float
    max_head_bytes: int
    max_headers: int
    max_sockets: int


class _HeadTooLargeError(Exception):
    """Raised from a parser callback; httptools turns it into the HttpParserError uvicorn handles."""


class BoundedHttpProtocol(HttpToolsProtocol):
    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: ReadLimits,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits
        self._read_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0  # raw bytes received since the current head began
        self._head_size = 0  # request line and header fields, as parsed
        self._head_fields = 0
        self._in_message = False  # between the first byte of a request and its last
        self._head_done = False
        self._refusal: GatewayError | None = None
        self.idle_since: float | None = None  # set while no request is in flight: the socket may be evicted

    # --- connection --------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.idle_since = self.loop.time()
        if len(self.connections) > self.limits.max_sockets and not self._evict_idle():
            self._refuse(
                ServiceUnavailableError(
                    "this worker holds its maximum of sockets; retry",
                    headers={"Retry-After": "1", "Connection": "close"},
                )
            )
            return
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_read_timer()
        super().connection_lost(exc)

    def _evict_idle(self) -> bool:
        victim: BoundedHttpProtocol | None = None
        for connection in self.connections:
            if (
                isinstance(connection, BoundedHttpProtocol)
                and connection is not self
                and connection.idle_since is not None
                and not connection.transport.is_closing()
                and (victim is None or connection.idle_since < victim.idle_since)
            ):  # type: ignore[operator]
                victim = connection
        if victim is None:
            return False
        victim.transport.close()
        self.connections.discard(victim)  # now, not at its connection_lost: the next accept must not pick it again
        return True

    # --- reading ----------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if not self._in_message:
            if self._read_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._read_timer = self.loop.call_later(self.limits.read_timeout_s, self._read_timed_out)
            self._head_bytes += len(data)
        elif not self._head_done:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._head_bytes > self.limits.max_head_bytes and self._refusal is None and self.parser is not None:
            self._refuse(HeadersTooLargeError(f"request head is larger than {self.limits.max_head_bytes} bytes"))

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_message, self._head_done = True, False
        self._head_size = self._head_fields = 0

    def on_url(self, url: bytes) -> None:
        self._head_size += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_fields += 1
        self._head_size += len(name) + len(value) + 4
        if self._head_fields > self.limits.max_headers:
            self._refusal = HeadersTooLargeError(f"request has more than {self.limits.max_headers} header fields")
            raise _HeadTooLargeError()
        if self._head_size > self.limits.max_head_bytes:
            self._refusal = HeadersTooLargeError(f"request head is larger than {self.limits.max_head_bytes} bytes")
            raise _HeadTooLargeError()
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._head_done, self._head_bytes = True, 0
        self.idle_since = None
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_message = False
        self._stop_read_timer()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self._in_message:  # the next request began while this response went out: now it is waited on
            self._unset_keepalive_if_required()
            if self._read_timer is None:
                self._read_timer = self.loop.call_later(self.limits.read_timeout_s, self._read_timed_out)
            if not self._head_done:
                self.idle_since = self.loop.time()  # still sending its head, as evictable as a fresh one
        elif self.timeout_keep_alive_task is not None:  # armed: idle until the next request (none pipelined)
            self.idle_since = self.loop.time()

    def handle_websocket_upgrade(self) -> None:
        self._stop_read_timer()  # from here the app bounds the wait for the first message
        super().handle_websocket_upgrade()

    def send_400_response(self, msg: str) -> None:
        if self._refusal is not None:
            self._refuse(self._refusal)
        else:
            super().send_400_response(msg)

    # --- refusing -----------------------------------------------------------------------------------
    def _stop_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        self._read_timer = None
        cycle = self.cycle  # the late request's own once its head is parsed; before that, the previous one's
        if cycle is not None and cycle.response_started and (self._head_done or not cycle.response_complete):
            self.transport.close()  # it was answered without the rest (e.g. 413), or a response is mid-way
            return
        self._refuse(RequestTimeoutError(self.limits.read_timeout_s))

    def _refuse(self, error: GatewayError) -> None:
        """Answer `error` (the gateway's JSON shape) and close, whatever the app was waiting for."""
        self._stop_read_timer()
        self._unset_keepalive_if_required()
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if self._in_message and self._head_done:  # the refused request is this cycle's, body unread
                cycle.scope.setdefault("state", {})[REFUSAL_STATE_KEY] = error.code
            cycle.disconnected = True  # the app's receive() gets http.disconnect; its sends are dropped
            cycle.message_event.set()
        body = json.dumps(error.detail_body()).encode()
        head = [STATUS_LINE[error.status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        for header, text in error.headers.items():
            if header.lower() != "connection":
                head += [header.lower().encode(), b": ", text.encode(), b"\r\n"]
        head += [
            b"content-type: application/json\r\ncontent-length: ",
            str(len(body)).encode(),
            b"\r\nconnection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()
