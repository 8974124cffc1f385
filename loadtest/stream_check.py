"""How a load-test client judges one stream, and the run's tally: pure Python, no Locust, no gevent.

`locustfile.py` feeds what it reads into these checkers and records their verdicts; tests import this
module directly (importing Locust would monkey-patch the test process). It must stay importable both as
`loadtest.stream_check` (tests) and as top-level `stream_check` (Locust puts the locustfile's directory
on sys.path; the in-cluster Job ships the loadtest files side by side).

A stream ends in exactly one of five kinds (the summary keys, `errors` for `error`):

    completed   `done` with as many token events as `done.tokens` (+ close 1000 on /ws); `[DONE]` after a
                finish_reason, with at least usage.completion_tokens content chunks when usage is sent
    graceful    ended by the drain: `server_shutdown` event, OpenAI error chunk with code server_shutdown,
                WS close 1012 (or an HTTP 503 whose code is server_shutdown); the client reconnects
    truncated   anything else that stops early: no terminal event, connection lost, fewer tokens than
                the server said it sent, `done` on /ws without the normal close
    refused     HTTP 429/503 before the stream (or on /ws an error + close 1013/1012 before `status`),
                named by reason: `refused:429:rate_limited`, `refused:1012:draining`
    error       the server reported a failure (`error:timeout`, `error:http_502:upstream_error`, ...)
                or the client could not talk to it (`error:connect`, `error:client_timeout`)
"""

from __future__ import annotations

import json
import os
import struct
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

COMPLETED, GRACEFUL, TRUNCATED, REFUSED, ERROR = "completed", "graceful", "truncated", "refused", "error"
KINDS = (COMPLETED, GRACEFUL, TRUNCATED, REFUSED, ERROR)
SUMMARY_KEYS = ("started", "completed", "graceful", "truncated", "refused", "errors", "aborted")
_KIND_KEY = {COMPLETED: "completed", GRACEFUL: "graceful", TRUNCATED: "truncated", REFUSED: "refused", ERROR: "errors"}

SHUTDOWN_CODE = "server_shutdown"
REFUSAL_STATUSES = frozenset({429, 503})
# /ws has no status line: these codes before the `status` event are the HTTP 429/503 refusals.
WS_REFUSAL_CODES = frozenset({
    "rate_limited", "upstream_rate_limited", "connection_limit", "client_connection_limit", "circuit_open",
    "unavailable", "draining",
})
WS_NORMAL, WS_SERVICE_RESTART, WS_TRY_AGAIN_LATER = 1000, 1012, 1013
WS_NO_STATUS, WS_ABNORMAL = 1005, 1006  # RFC 6455 §7.1.5: empty close frame / no close frame at all


@dataclass(frozen=True)
class Verdict:
    kind: str  # one of KINDS
    name: str  # the Locust entry name: "completed", "graceful:server_shutdown", "refused:429:rate_limited", ...
    detail: str = ""  # categorical reason (Locust groups failures by it, so no counts or ids in here)

    @property
    def failed(self) -> bool:
        return self.kind in (TRUNCATED, ERROR)


def completed() -> Verdict:
    return Verdict(COMPLETED, COMPLETED)


def graceful(detail: str = "server_shutdown") -> Verdict:
    return Verdict(GRACEFUL, f"graceful:{SHUTDOWN_CODE}", detail)


def truncated(detail: str) -> Verdict:
    return Verdict(TRUNCATED, TRUNCATED, detail)


def error(code: str, detail: str = "") -> Verdict:
    return Verdict(ERROR, f"error:{code}", detail or code)


def refused(status: int, code: str) -> Verdict:
    return Verdict(REFUSED, f"refused:{status}:{code}", f"refused with {status} {code}")


# --- before the stream: HTTP status / WebSocket handshake ----------------------------------------------

def error_code(body: bytes | str | None) -> str:
    """The `code` of an error body in either shape (`{"detail", "code"}` or OpenAI's `{"error": {...}}`)."""
    try:
        obj = json.loads(body or b"")
    except (ValueError, UnicodeDecodeError):
        return "unknown"
    if isinstance(obj, dict):
        inner = obj.get("error")
        code = inner.get("code") if isinstance(inner, dict) else obj.get("code")
        if isinstance(code, str) and code:
            return code
    return "unknown"


def classify_status(status: int, body: bytes | str | None) -> Verdict:
    """A non-200 answer to a stream request: refused (429/503), graceful (code server_shutdown), or an error."""
    code = error_code(body)
    if code == SHUTDOWN_CODE:
        return graceful(f"http {status} server_shutdown")
    if status in REFUSAL_STATUSES:
        return refused(status, code)
    return error(f"http_{status}:{code}", f"http {status} {code}")


def ws_close_code(payload: bytes) -> int:
    """The status code in a close frame's payload (1005 if it carries none)."""
    return int(struct.unpack("!H", payload[:2])[0]) if len(payload) >= 2 else WS_NO_STATUS


# --- SSE -----------------------------------------------------------------------------------------------

class SSEDecoder:
    """Line-fed SSE decoder: returns an event's data when the blank line that ends it arrives.

    Lines are what `readline(b"\\n")` returns (CRLF endings are stripped too). Comments (`: ping`) and
    fields other than `data` are ignored; an event the stream never finished with a blank line is
    never returned (the SSE spec discards it), so a cut in the middle of a `done` is still a truncation.
    """

    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed_line(self, raw: bytes | str) -> str | None:
        line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        if line.endswith("\n"):
            line = line[:-1]
        if line.endswith("\r"):
            line = line[:-1]
        if not line:
            if not self._data:
                return None
            data, self._data = "\n".join(self._data), []
            return data
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        if field == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None


# --- in the stream: /stream and /ws events ------------------------------------------------------------

class SeedCheck:
    """The `/stream` event sequence (SSE data or /ws text frames): status, token..., done | error | server_shutdown."""

    __slots__ = ("tokens", "status", "terminal", "malformed")

    def __init__(self) -> None:
        self.tokens = 0
        self.status = False
        self.terminal: dict[str, Any] | None = None
        self.malformed = False

    def feed(self, data: str) -> bool:
        """One event; True when it is a token (the caller timestamps it)."""
        if self.terminal is not None:
            return False
        try:
            event = json.loads(data)
        except ValueError:
            self.malformed = True
            return False
        kind = event.get("type") if isinstance(event, dict) else None
        if kind == "token":
            self.tokens += 1
            return True
        if kind == "status":
            self.status = True
        elif kind in ("done", "error", "server_shutdown"):
            self.terminal = event
        else:
            self.malformed = True
        return False

    def _terminal_verdict(self) -> Verdict | None:
        """The verdict the terminal event alone decides, or None for `done` (the caller checks the end)."""
        event = self.terminal
        if event is None:
            return None
        if event["type"] == "server_shutdown":
            return graceful()
        if event["type"] == "error":
            code = str(event.get("code") or "unknown")
            return graceful() if code == SHUTDOWN_CODE else error(code, f"error event {code}")
        return None

    def _done_verdict(self) -> Verdict:
        assert self.terminal is not None
        claimed = self.terminal.get("tokens")
        if not isinstance(claimed, int) or isinstance(claimed, bool):
            return error("malformed_done", "done without an integer tokens field")
        if self.tokens < claimed:
            return truncated("fewer token events than done.tokens")
        if self.tokens > claimed:
            return error("token_count", "more token events than done.tokens")
        if self.malformed:
            return error("malformed_event", "an event that is not /stream JSON")
        return completed()

    def sse_verdict(self, *, connection_lost: bool = False) -> Verdict:
        """`POST /stream` after its body ended (`connection_lost`: a reset or an incomplete chunked body)."""
        verdict = self._terminal_verdict()
        if verdict is not None:
            return verdict
        if self.terminal is None:
            return truncated("connection lost before done" if connection_lost else "ended without done")
        return self._done_verdict()

    def ws_verdict(self, close_code: int | None) -> Verdict:
        """`/ws` after its close frame (`close_code`) or after the connection dropped without one (None)."""
        code = WS_ABNORMAL if close_code is None else close_code
        event = self.terminal
        if not self.status and self.tokens == 0:
            reason = str(event.get("code") or "unknown") if event is not None and event["type"] == "error" else None
            if reason in WS_REFUSAL_CODES or (reason is None and code == WS_TRY_AGAIN_LATER):
                return refused(code, reason or "unknown")
        verdict = self._terminal_verdict()
        if verdict is not None:
            return verdict
        if code == WS_SERVICE_RESTART:
            return graceful("close 1012")
        if event is None:
            if close_code is None:
                return truncated("connection lost before done")
            return truncated(f"close {code} without done")
        if code != WS_NORMAL:
            return truncated(f"close {code} after done, not 1000")
        return self._done_verdict()


# --- in the stream: /v1/chat/completions chunks -------------------------------------------------------

class ChatCheck:
    """`chat.completion.chunk` data lines, then `[DONE]`; an `{"error": ...}` line ends a failed stream."""

    __slots__ = ("content_chunks", "finish_reason", "usage", "error", "done", "malformed")

    def __init__(self) -> None:
        self.content_chunks = 0
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.done = False
        self.malformed = False

    def feed(self, data: str) -> bool:
        """One data payload; True when it carries content (the caller timestamps it)."""
        if self.done:
            return False
        if data == "[DONE]":
            self.done = True
            return False
        try:
            obj = json.loads(data)
        except ValueError:
            self.malformed = True
            return False
        if not isinstance(obj, dict):
            self.malformed = True
            return False
        if "error" in obj:
            err = obj["error"]
            self.error = err if isinstance(err, dict) else {"message": str(err)}
            return False
        if isinstance(obj.get("usage"), dict):
            self.usage = obj["usage"]
        is_content = False
        for choice in obj.get("choices") or ():
            delta = choice.get("delta") or {}
            content = delta.get("content")
            # the opening chunk (role, content "") is not a token; every other content chunk is one
            if isinstance(content, str) and (content or "role" not in delta):
                is_content = True
            if choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])
        if is_content:
            self.content_chunks += 1
        return is_content

    def verdict(self, *, connection_lost: bool = False, check_usage: bool = True) -> Verdict:
        if self.error is not None:
            code = str(self.error.get("code") or "unknown")
            return graceful() if code == SHUTDOWN_CODE else error(code, f"error chunk {code}")
        if not self.done:
            return truncated("connection lost before [DONE]" if connection_lost else "ended without [DONE]")
        if self.finish_reason is None:
            return truncated("[DONE] without a finish_reason")
        if check_usage and self.usage is not None:
            claimed = self.usage.get("completion_tokens")
            if isinstance(claimed, int) and self.content_chunks < claimed:
                return truncated("fewer content chunks than usage.completion_tokens")
        if self.malformed:
            return error("malformed_chunk", "a data line that is not a chunk object")
        return completed()


# --- the run's tally -----------------------------------------------------------------------------------

class Tally:
    """Counts of every stream's outcome, overall, per endpoint and per reason; mergeable across workers."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.counts: Counter[str] = Counter()
        self.by_reason: Counter[str] = Counter()
        self.by_endpoint: dict[str, Counter[str]] = {}

    def _add(self, endpoint: str, key: str, n: int = 1) -> None:
        self.counts[key] += n
        self.by_endpoint.setdefault(endpoint, Counter())[key] += n

    def started(self, endpoint: str) -> None:
        self._add(endpoint, "started")

    def reconnect(self, endpoint: str) -> None:
        self._add(endpoint, "reconnects")

    def retried(self, endpoint: str) -> None:
        """A request the server never answered (its keep-alive connection was closed under it), sent again."""
        self._add(endpoint, "retried")

    def aborted(self, endpoint: str) -> None:
        """The load test itself stopped the stream (run time over, user stopped): not the server's doing."""
        self._add(endpoint, "aborted")

    def record(self, endpoint: str, verdict: Verdict) -> None:
        self._add(endpoint, _KIND_KEY[verdict.kind])
        if verdict.kind != COMPLETED:
            self.by_reason[verdict.name] += 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "counts": dict(self.counts),
            "by_reason": dict(self.by_reason),
            "by_endpoint": {endpoint: dict(counts) for endpoint, counts in self.by_endpoint.items()},
        }

    def take(self) -> dict[str, Any]:
        """Snapshot and reset (a worker sends what it counted since its last report)."""
        snap = self.snapshot()
        self.reset()
        return snap

    def merge(self, snap: Mapping[str, Any]) -> None:
        self.counts.update(snap.get("counts") or {})
        self.by_reason.update(snap.get("by_reason") or {})
        for endpoint, counts in (snap.get("by_endpoint") or {}).items():
            self.by_endpoint.setdefault(endpoint, Counter()).update(counts)

    def summary(self) -> dict[str, Any]:
        """The run's one-line summary; `ok` is what a pass/fail gate wants (see SUMMARY_KEYS)."""
        out: dict[str, Any] = {key: int(self.counts.get(key, 0)) for key in SUMMARY_KEYS}
        out["reconnects"] = int(self.counts.get("reconnects", 0))
        out["retried"] = int(self.counts.get("retried", 0))
        out["in_flight"] = out["started"] - sum(out[key] for key in SUMMARY_KEYS[1:])  # 0 once the run is over
        out["ok"] = out["truncated"] == 0 and out["errors"] == 0 and out["completed"] > 0
        out["by_reason"] = dict(sorted(self.by_reason.items()))
        out["by_endpoint"] = {
            endpoint: {key: int(counts.get(key, 0)) for key in (*SUMMARY_KEYS, "reconnects", "retried")}
            for endpoint, counts in sorted(self.by_endpoint.items())
        }
        return out


def write_summary(path: str, summary: Mapping[str, Any]) -> None:
    """Write the summary as one JSON line, atomically (a reader never sees half a file)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(json.dumps(summary, sort_keys=True) + "\n")
    os.replace(tmp, path)
