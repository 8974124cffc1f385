"""One exception hierarchy and the one mapping from it to HTTP, SSE and WebSocket.

Routes and the relay raise `GatewayError` subclasses; nothing else builds error responses.
Before the response starts, the error becomes a plain HTTP answer (`/v1/*` in OpenAI's error
shape, the rest as `{"detail", "code"}`). After it started, the relay writes the same facts as a
final event, and WebSockets close with `ws_close_code`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

from starlette.responses import JSONResponse

# WebSocket close codes (RFC 6455 §7.4.1 and the IANA registry).
WS_NORMAL = 1000
WS_INVALID_PAYLOAD = 1007
WS_POLICY_VIOLATION = 1008
WS_MESSAGE_TOO_BIG = 1009
WS_INTERNAL_ERROR = 1011
WS_SERVICE_RESTART = 1012
WS_TRY_AGAIN_LATER = 1013

MAX_DETAIL_CHARS = 500  # of an upstream's own error text, kept for the log line


class GatewayError(Exception):
    """Base of every error the gateway reports to a client."""

    status: int = 500
    code: str = "internal_error"
    openai_type: str = "server_error"
    ws_close_code: int = WS_INTERNAL_ERROR
    retryable: bool = False  # may the request be retried upstream (only before the first token)

    def __init__(self, message: str, *, headers: Mapping[str, str] | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers: dict[str, str] = dict(headers or {})
        self.param = param

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, code={self.code!r}, message={self.message!r})"

    # --- encoders: the three wire shapes ---------------------------------------------------------
    def openai_body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.openai_type, "param": self.param, "code": self.code}}

    def detail_body(self) -> dict[str, object]:
        return {"detail": self.message, "code": self.code}

    def sse_event(self) -> dict[str, object]:
        return {"type": "error", "code": self.code, "message": self.message}

    def event_bytes(self) -> bytes:
        """The seed protocol's final `error` event, framed for SSE."""
        return b"data: " + json.dumps(self.sse_event()).encode() + b"\n\n"

    def openai_chunk_bytes(self) -> bytes:
        """A mid-stream OpenAI error (what OpenAI itself sends), followed by the stream terminator."""
        return b"data: " + json.dumps(self.openai_body()).encode() + b"\n\ndata: [DONE]\n\n"

    @property
    def ws_reason(self) -> str:
        # RFC 6455 caps the close reason at 123 bytes of UTF-8.
        return self.message.encode()[:123].decode(errors="ignore")


class InvalidRequestError(GatewayError):
    """The request body is malformed or fails validation."""

    status, code, openai_type, ws_close_code = 422, "invalid_request", "invalid_request_error", WS_INVALID_PAYLOAD


class UnknownParameterError(GatewayError):
    """A request field the gateway does not forward (not OpenAI's, not in UPSTREAM_EXTRA_FIELDS)."""

    status, code, openai_type, ws_close_code = 400, "unknown_parameter", "invalid_request_error", WS_INVALID_PAYLOAD

    def __init__(self, param: str, message: str | None = None) -> None:
        super().__init__(
            message
            or f"Unknown parameter: {param!r}. This gateway forwards only OpenAI chat completion "
            "parameters; its operator can allow others with UPSTREAM_EXTRA_FIELDS.",
            param=param,
        )
        if message is not None:
            self.message = f"{message} ({param})"


class ContentNotAllowedError(GatewayError):
    """A content part this gateway does not accept (images when off, audio, files, unsafe image URLs)."""

    status, code, openai_type, ws_close_code = 400, "content_not_allowed", "invalid_request_error", WS_INVALID_PAYLOAD

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{message} ({param})", param=param)


class ModelNotFoundError(GatewayError):
    """A model outside MODELS: 404 on /v1 (OpenAI's `model_not_found`), 422 on /stream and /ws."""

    code, openai_type, ws_close_code = "model_not_found", "invalid_request_error", WS_INVALID_PAYLOAD

    def __init__(self, model: str, *, status: int) -> None:
        super().__init__(f"The model {model[:80]!r} does not exist on this gateway; see GET /v1/models", param="model")
        self.status = status


class PayloadTooLargeError(GatewayError):
    """The request body exceeds MAX_BODY_BYTES."""

    status, code, openai_type, ws_close_code = 413, "payload_too_large", "invalid_request_error", WS_MESSAGE_TOO_BIG


class UnsupportedMediaTypeError(GatewayError):
    """The request body is not JSON."""

    status, code, openai_type = 415, "unsupported_media_type", "invalid_request_error"
    ws_close_code = WS_INVALID_PAYLOAD


class NotFoundError(GatewayError):
    """No such route or model."""

    status, code, openai_type, ws_close_code = 404, "not_found", "invalid_request_error", WS_POLICY_VIOLATION


class MethodNotAllowedError(GatewayError):
    """The route exists, the method does not."""

    status, code, openai_type, ws_close_code = 405, "method_not_allowed", "invalid_request_error", WS_POLICY_VIOLATION


class ServiceUnavailableError(GatewayError):
    """The gateway cannot take this stream now (limits, draining); retry elsewhere or later."""

    status, code, openai_type, ws_close_code = 503, "unavailable", "server_error", WS_TRY_AGAIN_LATER
    retryable = True


def _retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


class UnauthorizedError(GatewayError):
    """No API key was presented, and this gateway requires one."""

    status, code, openai_type, ws_close_code = 401, "missing_api_key", "invalid_request_error", WS_POLICY_VIOLATION

    def __init__(self) -> None:
        super().__init__(
            "an API key is required: send 'Authorization: Bearer <key>' (or 'X-API-Key: <key>')",
            headers={"WWW-Authenticate": "Bearer"},
        )


class KeyInUrlError(UnauthorizedError):
    """An API key came in the URL, where proxies and browsers log it; it belongs in a header."""

    code = "api_key_in_url"

    def __init__(self, parameter: str) -> None:
        GatewayError.__init__(
            self,
            f"API keys are not accepted in the URL (query parameter {parameter!r}): send 'Authorization: Bearer "
            "<key>' or 'X-API-Key: <key>' (WebSocket: also subprotocol 'bearer.<key>' or '?api_key=')",
            headers={"WWW-Authenticate": "Bearer"},
        )


class OriginForbiddenError(GatewayError):
    """A browser page from an origin not in ALLOWED_ORIGINS tried to open a WebSocket."""

    status, code, openai_type, ws_close_code = 403, "origin_not_allowed", "invalid_request_error", WS_POLICY_VIOLATION

    def __init__(self, origin: str) -> None:
        super().__init__(f"origin {origin[:100]!r} is not allowed to open WebSockets on this gateway")


class RequestTimeoutError(GatewayError):
    """The request (head, body, or a WebSocket's first message) did not arrive within REQUEST_READ_TIMEOUT_SECONDS."""

    status, code, openai_type, ws_close_code = 408, "request_timeout", "invalid_request_error", WS_POLICY_VIOLATION

    def __init__(self, seconds: float, what: str = "the request") -> None:
        super().__init__(f"{what} did not arrive within {seconds:g}s", headers={"Connection": "close"})


class HeadersTooLargeError(GatewayError):
    """The request head is over MAX_REQUEST_HEAD_BYTES or has more than MAX_REQUEST_HEADERS fields."""

    status, code, openai_type = 431, "headers_too_large", "invalid_request_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Connection": "close"})


class ForbiddenError(GatewayError):
    """The API key presented is not one this gateway accepts."""

    status, code, openai_type, ws_close_code = 403, "invalid_api_key", "invalid_request_error", WS_POLICY_VIOLATION

    def __init__(self) -> None:
        super().__init__("the API key presented is not valid for this gateway")


class RateLimitedError(GatewayError):
    """The client spent its request budget (token bucket)."""

    status, code, openai_type, ws_close_code = 429, "rate_limited", "rate_limit_error", WS_TRY_AGAIN_LATER
    retryable = True

    def __init__(self, retry_after_seconds: float, headers: Mapping[str, str]) -> None:
        super().__init__(
            f"rate limit exceeded; retry after {_retry_after(retry_after_seconds)}s",
            headers={**headers, "Retry-After": _retry_after(retry_after_seconds)},
        )


class CircuitOpenError(GatewayError):
    """The upstream failed repeatedly; the breaker refuses calls until it has recovered."""

    status, code, openai_type, ws_close_code = 503, "circuit_open", "server_error", WS_TRY_AGAIN_LATER
    retryable = True

    def __init__(self, service: str, retry_after_seconds: float) -> None:
        super().__init__(
            f"upstream {service} is unavailable (circuit open); retry after {_retry_after(retry_after_seconds)}s",
            headers={"Retry-After": _retry_after(retry_after_seconds)},
        )


class ConnectionLimitError(ServiceUnavailableError):
    """No connection slot: the instance (code connection_limit) or this client (client_connection_limit) is full."""

    ws_close_code = WS_TRY_AGAIN_LATER

    def __init__(self, message: str, *, per_client: bool) -> None:
        super().__init__(message, headers={"Retry-After": "1"})
        self.code = "client_connection_limit" if per_client else "connection_limit"


class DrainingError(ServiceUnavailableError):
    """This instance is shutting down and takes no new streams; retry (another instance will answer)."""

    code, ws_close_code = "draining", WS_SERVICE_RESTART

    def __init__(self) -> None:
        super().__init__(
            "this instance is shutting down; retry the request",
            headers={"Retry-After": "1", "Connection": "close"},
        )


class UpstreamError(GatewayError):
    """The upstream failed: connect error, 5xx, broken or malformed stream, an error it sent.

    The client is told the kind of failure and its request id, never the upstream's own words:
    those (an error body, a reason, an exception) can carry the model server's paths, hosts or
    another tenant's input, and go to the stream's log line only (`detail`).
    """

    status, code, openai_type, ws_close_code = 502, "upstream_error", "server_error", WS_INTERNAL_ERROR
    retryable = True

    def __init__(
        self,
        message: str,
        *,
        upstream_status: int | None = None,
        retry_after_seconds: float | None = None,
        headers: Mapping[str, str] | None = None,
        kind: str = "status",
        detail: str | None = None,
    ) -> None:
        super().__init__(message, headers=headers)
        self.upstream_status = upstream_status
        self.retry_after_seconds = retry_after_seconds
        # "connect" (never reached it), "broken" (connection lost or stream cut short), "status" (an
        # HTTP error status), "malformed" (not OpenAI's wire format), "error_event" (it sent an error)
        self.kind = kind
        self.detail = detail[:MAX_DETAIL_CHARS] if detail else None
        self._request_id: str | None = None

    def for_request(self, request_id: str) -> None:
        """Name the client's request in the message (once), so it can quote it to the operator."""
        if request_id and self._request_id is None:
            self._request_id = request_id
            self.message = f"{self.message} (request id {request_id})"


class UpstreamRateLimitedError(UpstreamError):
    """The upstream answered 429."""

    status, code = 429, "upstream_rate_limited"


class UpstreamRejectedError(UpstreamError):
    """The upstream refused the request with a 4xx other than 429: the client's fault, never retried."""

    code, openai_type, ws_close_code = "upstream_rejected", "invalid_request_error", WS_POLICY_VIOLATION
    retryable = False

    def __init__(self, message: str, *, upstream_status: int, detail: str | None = None) -> None:
        super().__init__(message, upstream_status=upstream_status, detail=detail)
        self.status = upstream_status if 400 <= upstream_status < 500 else 400


class StreamTimeoutError(GatewayError):
    """A stream deadline passed (connect, first token, inter-token, total)."""

    status, code, openai_type, ws_close_code = 504, "timeout", "server_error", WS_INTERNAL_ERROR

    def __init__(self, deadline: str, seconds: float) -> None:
        super().__init__(f"{deadline} deadline of {seconds:g}s exceeded")
        self.deadline = deadline


class BackpressureError(GatewayError):
    """The client stopped reading: its stream is cut so it cannot pin memory or an upstream slot."""

    status, code, openai_type, ws_close_code = 503, "backpressure", "server_error", WS_POLICY_VIOLATION


class MemoryPressureError(BackpressureError):
    """The instance holds MEMORY_BUDGET_BYTES of buffered stream data: new streams are refused (503), and the
    streams whose buffers have been full the longest are cut."""

    code, ws_close_code = "memory_pressure", WS_TRY_AGAIN_LATER
    retryable = True

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class ShutdownError(GatewayError):
    """The instance is draining and the stream outlived the drain timeout: reconnect elsewhere."""

    status, code, openai_type, ws_close_code = 503, "server_shutdown", "server_error", WS_SERVICE_RESTART
    retryable = True


class OrphanTimeoutError(GatewayError):
    """The client left and did not resume in time: the generation was stopped."""

    status, code, openai_type, ws_close_code = 504, "orphan_timeout", "server_error", WS_INTERNAL_ERROR

    def __init__(self, seconds: float) -> None:
        super().__init__(f"no client resumed this stream within {seconds:g}s; its generation was stopped")


class NotResumableError(GatewayError):
    """The stream asked for is unknown, expired, or no longer holds the events asked for."""

    status, code, openai_type, ws_close_code = 404, "not_resumable", "invalid_request_error", WS_POLICY_VIOLATION


class InvalidStreamIdError(GatewayError):
    """A stream id that is not in the gateway's format (checked before any store sees it; never echoed)."""

    status, code, openai_type, ws_close_code = 400, "invalid_stream_id", "invalid_request_error", WS_POLICY_VIOLATION

    def __init__(self) -> None:
        super().__init__("not a stream id: stream ids are 32 lowercase hex characters, as sent in x-stream-id")


class StreamCancelledError(GatewayError):
    """The stream's owner stopped its generation (DELETE /stream/{id} or a WebSocket stop message)."""

    status, code, openai_type, ws_close_code = 409, "cancelled", "invalid_request_error", WS_NORMAL

    def __init__(self) -> None:
        super().__init__("the stream's owner stopped this generation")


class InternalError(GatewayError):
    """An unexpected failure inside the gateway (logged with the request id)."""


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/") or path == "/v1"


def error_response(error: GatewayError, *, openai_shape: bool) -> JSONResponse:
    """The plain HTTP answer for an error raised before a stream started."""
    body = error.openai_body() if openai_shape else error.detail_body()
    return JSONResponse(body, status_code=error.status, headers=error.headers or None)
