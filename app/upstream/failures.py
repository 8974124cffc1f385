"""How an upstream failure is judged, for the guard's retries and the breakers (one upstream's, or a fleet's
per-endpoint ones): what kind of failure it is, whom a content-caused one is charged to, and which failures are no
verdict on the upstream at all.
"""

from __future__ import annotations

from app.errors import GatewayError, StreamTimeoutError, UpstreamError
from app.policies.retry import ErrorKind, error_kind_for_status
from app.upstream.base import ChatRequest

CONNECT_DEADLINE = "upstream connect"  # the deadline of connecting to the model server (its fault when it passes)
# The deadline a stream's open ran out on while it waited for a free pooled connection (UPSTREAM_MAX_CONNECTIONS
# in use by this worker's streams): the gateway's load, not the model server's health.
POOL_WAIT = "upstream pool"


def waited_for_pool(error: GatewayError) -> bool:
    """The open ran out of time waiting for this worker's own pool: no verdict on the model server."""
    return isinstance(error, StreamTimeoutError) and error.deadline == POOL_WAIT


def error_kind(error: GatewayError) -> ErrorKind:
    """How the retry policy sees an upstream failure."""
    if isinstance(error, StreamTimeoutError):
        return ErrorKind.CONNECT if error.deadline == CONNECT_DEADLINE else ErrorKind.TIMEOUT
    if not isinstance(error, UpstreamError):
        return ErrorKind.OTHER
    if error.kind in ("connect", "broken"):  # a reset before any token is as good as never connected
        return ErrorKind.CONNECT
    if error.kind == "status" and error.upstream_status is not None:
        return error_kind_for_status(error.upstream_status)
    return ErrorKind.OTHER


def charged_client(error: GatewayError, request: ChatRequest) -> str | None:
    """The client a failure is charged to when the request's content can cause it: an HTTP 5xx from a
    model server that did answer, an error event, garbled data. None: no content causes it (refused,
    reset, no answer in time), and it counts in full (policies/breaker.py, "Fairness")."""
    if not request.client or not isinstance(error, UpstreamError):
        return None
    if error.kind in ("malformed", "error_event") or (error.kind == "status" and (error.upstream_status or 0) >= 500):
        return request.client
    return None
