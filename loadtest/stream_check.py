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
                or the client could not talk to it (`error:connect`, `error:client_timeout`); two of them
                have their own names and summary counts:
                  resume_mismatch  the stream as assembled (over one connection or several) is not the
                                   uninterrupted stream: an event seq missing, repeated or out of order,
                                   more/fewer tokens than `done.tokens` after a resume, or (built-in
                                   mock) a text other than the mock's answer
                  not_resumable    a resume the gateway refused (404 not_resumable, or an `error` event
                                   with code not_resumable)

Resuming (a stream spans connections): `SeedCheck` keeps one stream's state across them. `SSEDecoder`
reports each event's `id:` (`<stream id>-<seq>`), `SeedCheck.should_resume` says whether a connection's
end is one to resume from, `new_connection` starts the next one, and at `done` the seqs are checked
(`seq_problem`: every seq from 0 to done's exactly once, in order) and the text compared with the one
`expected_text` names: `mock_text`, a copy of the built-in mock's word function (this module must not import
the app), or `fake_text`, the answer of the fake model server (loadtest/fake_openai.py) behind a gateway.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import struct
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

COMPLETED, GRACEFUL, TRUNCATED, REFUSED, ERROR = "completed", "graceful", "truncated", "refused", "error"
KINDS = (COMPLETED, GRACEFUL, TRUNCATED, REFUSED, ERROR)
SUMMARY_KEYS = ("started", "completed", "graceful", "truncated", "refused", "errors", "aborted")
_KIND_KEY = {COMPLETED: "completed", GRACEFUL: "graceful", TRUNCATED: "truncated", REFUSED: "refused", ERROR: "errors"}

SHUTDOWN_CODE = "server_shutdown"
RESUME_MISMATCH, NOT_RESUMABLE = "resume_mismatch", "not_resumable"
RESUME_KEYS = ("resumed", RESUME_MISMATCH, NOT_RESUMABLE)  # summary counts of the resuming users
EVENT_ID = re.compile(r"^([0-9a-z]{1,64})-(\d{1,9})$")  # `id: <stream id>-<seq>`, as the gateway sends it
REFUSAL_STATUSES = frozenset({429, 503})
# /ws has no status line: these codes before the `status` event are the HTTP 429/503 refusals.
WS_REFUSAL_CODES = frozenset(
    {
        "rate_limited",
        "upstream_rate_limited",
        "connection_limit",
        "client_connection_limit",
        "circuit_open",
        "unavailable",
        "draining",
    }
)
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


def resume_mismatch(detail: str) -> Verdict:
    return Verdict(ERROR, RESUME_MISMATCH, detail)


def not_resumable(detail: str) -> Verdict:
    return Verdict(ERROR, NOT_RESUMABLE, detail)


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
    if code == NOT_RESUMABLE:
        return not_resumable(f"http {status} not_resumable")
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
    fields other than `data` and `id` are ignored; an event the stream never finished with a blank line is
    never returned (the SSE spec discards it), so a cut in the middle of a `done` is still a truncation.
    After an event is returned, `event_id` is the `id:` it carried itself (None without one: the gateway's
    `server_shutdown`) and `last_event_id` what EventSource would send as `Last-Event-ID` (the last id seen).
    """

    __slots__ = ("_data", "_id", "event_id", "last_event_id")

    def __init__(self) -> None:
        self._data: list[str] = []
        self._id: str | None = None
        self.event_id: str | None = None
        self.last_event_id: str | None = None

    def feed_line(self, raw: bytes | str) -> str | None:
        line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        if line.endswith("\n"):
            line = line[:-1]
        if line.endswith("\r"):
            line = line[:-1]
        if not line:
            event_id, self._id = self._id, None
            if not self._data:
                return None
            data, self._data = "\n".join(self._data), []
            self.event_id = event_id
            return data
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
        elif field == "id" and "\0" not in value:
            self._id = self.last_event_id = value
        return None


# --- the uninterrupted text and the seqs of a resumed stream ------------------------------------------

# A copy of app/upstream/mock.py's word function (tests/loadtest keeps the two equal): the in-cluster Job
# ships the loadtest files alone, so this module cannot import the app.
MOCK_VOCABULARY = (
    "the",
    "stream",
    "of",
    "tokens",
    "flows",
    "through",
    "a",
    "gateway",
    "that",
    "never",
    "drops",
    "one",
    "while",
    "clients",
    "read",
    "at",
    "their",
    "own",
    "pace",
    "and",
    "servers",
    "roll",
    "over",
    "café",
    "naïve",
    "über",
    "日本語",
    "模型",
    "🚀",
    "données",
    "réseau",
    "latency",
    "budget",
    "is",
    "kept",
    "in",
    "check",
)


def mock_words(prompt: str, start: int, stop: int) -> list[str]:
    """Tokens `start..stop-1` of the built-in mock's answer to `prompt` (each a word plus a space)."""
    intro = f"This is a streaming response for: {prompt[:40]}".split()
    seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big")
    n_vocab = len(MOCK_VOCABULARY)
    return [
        (intro[i] if i < len(intro) else MOCK_VOCABULARY[(seed + i * 7) % n_vocab]) + " " for i in range(start, stop)
    ]


def mock_text(prompt: str, tokens: int) -> str:
    """The built-in mock's uninterrupted answer of `tokens` tokens: what a resumed stream must add up to."""
    return "".join(mock_words(prompt, 0, tokens))


def fake_text(tokens: int) -> str:
    """The fake model server's uninterrupted answer (loadtest/fake_openai.py `default_tokens`, copied: the
    in-cluster Job ships this module alone): `tok0 tok1 ...`, whatever the prompt."""
    return "".join(f"tok{i} " for i in range(tokens))


TEXT_SOURCES = ("mock", "fake", "off")


def expected_text(source: str, prompt: str) -> Callable[[int], str] | None:
    """The uninterrupted text of `tokens` tokens a stream must add up to: the built-in mock's answer to `prompt`
    (`mock`), the fake model server's (`fake`), or None (`off`: a real model, whose text is not known)."""
    if source == "mock":
        return lambda tokens: mock_text(prompt, tokens)
    if source == "fake":
        return fake_text
    if source == "off":
        return None
    raise ValueError(f"unknown text source {source!r}: one of {', '.join(TEXT_SOURCES)}")


def parse_event_id(value: str) -> tuple[str, int] | None:
    """(stream id, seq) of an `id:` value, None if it is not one the gateway sends."""
    match = EVENT_ID.fullmatch(value)
    return (match.group(1), int(match.group(2))) if match else None


def seq_problem(seqs: Sequence[int], final_seq: int) -> str | None:
    """Why `seqs` (in arrival order) are not every seq from 0 to `final_seq` exactly once, in order; None if
    they are. Categorical (Locust groups failures by it): which kind of problem, not where."""
    seen: set[int] = set()
    for seq in seqs:
        if seq in seen:
            return "duplicate event seq"
        seen.add(seq)
    if any(seq > final_seq or seq < 0 for seq in seen):
        return "event seq past the final event"
    if any(a > b for a, b in itertools.pairwise(seqs)):
        return "event seqs out of order"
    if len(seen) != final_seq + 1:
        before_final = seen - {final_seq}
        if len(before_final) == max(before_final, default=-1) + 1:
            return "final event seq skips ahead"  # every event before it is there: the final one's id is off
        return "gap in event seqs"
    return None


# --- in the stream: /stream and /ws events ------------------------------------------------------------


class SeedCheck:
    """The `/stream` event sequence (SSE data or /ws text frames): status, token..., done | error | server_shutdown.

    One instance follows one stream across its connections: token texts and event seqs add up, and
    `new_connection` clears the previous connection's end. `expected(n)` (optional) is the uninterrupted text
    of an n-token answer, compared at `done`.
    """

    __slots__ = (
        "tokens",
        "status",
        "terminal",
        "malformed",
        "texts",
        "seqs",
        "stream_id",
        "id_problem",
        "final_seq",
        "position",
        "resumes",
        "conn_events",
        "expected",
    )

    def __init__(self, expected: Callable[[int], str] | None = None) -> None:
        self.tokens = 0
        self.status = False
        self.terminal: dict[str, Any] | None = None
        self.malformed = False
        self.texts: list[str] = []  # token contents, in arrival order, over all connections
        self.seqs: list[int] = []  # seqs of the events that carried an `id:` (SSE), in arrival order
        self.stream_id: str | None = None  # from the ids, the status event (/ws) or X-Stream-ID
        self.id_problem: str | None = None  # an id that is malformed or of another stream
        self.final_seq: int | None = None  # the terminal event's seq, if it had an id
        self.position = 0  # events of the stream received (status, tokens): /ws resumes with `received`
        self.resumes = 0  # connections after the first
        self.conn_events = 0  # events on the current connection
        self.expected = expected

    @property
    def text(self) -> str:
        return "".join(self.texts)

    @property
    def last_event_id(self) -> str | None:
        """What to resume after (SSE `Last-Event-ID`): the last seq received; None if there is none."""
        if self.stream_id is None or not self.seqs:
            return None
        return f"{self.stream_id}-{self.seqs[-1]}"

    def new_connection(self) -> None:
        """The stream goes on over a new connection (a resume): the last one's end is forgotten."""
        self.terminal = None
        self.resumes += 1
        self.conn_events = 0

    def _event_id(self, event_id: str) -> int | None:
        parsed = parse_event_id(event_id)
        if parsed is None:
            self.id_problem = self.id_problem or "malformed event id"
            return None
        stream_id, seq = parsed
        if self.stream_id is None:
            self.stream_id = stream_id
        elif stream_id != self.stream_id:
            self.id_problem = self.id_problem or "event id of another stream"
        self.seqs.append(seq)
        return seq

    def feed(self, data: str, event_id: str | None = None) -> bool:
        """One event (and its SSE `id:`, if any); True when it is a token (the caller timestamps it)."""
        if self.terminal is not None:
            return False
        try:
            event = json.loads(data)
        except ValueError:
            event = None
        kind = event.get("type") if isinstance(event, dict) else None
        seq = self._event_id(event_id) if event_id is not None else None
        if kind in ("done", "error", "server_shutdown"):
            assert isinstance(event, dict)
            self.terminal = event  # the end of this connection, not an event before it
            self.final_seq = seq
            return False
        self.conn_events += 1
        if kind == "token":
            self.tokens += 1
            self.position += 1
            self.texts.append(str(event.get("content", "")))
            return True
        if kind == "status":
            assert isinstance(event, dict)
            self.status = True
            self.position += 1
            if self.stream_id is None and isinstance(event.get("stream_id"), str):
                self.stream_id = event["stream_id"]
        else:
            self.malformed = True
        return False

    def should_resume(self, *, ws_close: int | None = None) -> bool:
        """Whether this connection's end is one to resume from rather than a verdict: the stream's id is known
        and the connection ended without the stream's final event (lost, ended early, /ws closed without
        `done`), or with `server_shutdown` carrying a `resume` id (handed to the fleet). A plain
        `server_shutdown` on the first connection means the stream was not handed over (the gateway's
        "send the request again"): that stays a graceful end. On a resumed connection it means the
        instance replaying it went away while the stream may live on elsewhere: resume again."""
        if self.stream_id is None:
            return False
        event = self.terminal
        if event is None:
            if ws_close == WS_SERVICE_RESTART:
                return self.resumes > 0
            return ws_close != WS_TRY_AGAIN_LATER
        shutdown = event["type"] == "server_shutdown" or (
            event["type"] == "error" and event.get("code") == SHUTDOWN_CODE
        )
        return shutdown and (bool(event.get("resume")) or self.resumes > 0)

    def _terminal_verdict(self) -> Verdict | None:
        """The verdict the terminal event alone decides, or None for `done` (the caller checks the end)."""
        event = self.terminal
        if event is None:
            return None
        if event["type"] == "server_shutdown":
            return graceful()
        if event["type"] == "error":
            code = str(event.get("code") or "unknown")
            if code == NOT_RESUMABLE:
                return not_resumable("error event not_resumable")
            return graceful() if code == SHUTDOWN_CODE else error(code, f"error event {code}")
        return None

    def _seq_verdict(self) -> Verdict | None:
        if self.id_problem is not None:
            return resume_mismatch(self.id_problem)
        if not self.seqs:
            return None  # the gateway sends no ids (resumption off): nothing to check
        if self.final_seq is None:
            return resume_mismatch("done without an event id")
        problem = seq_problem(self.seqs, self.final_seq)
        return resume_mismatch(problem) if problem else None

    def _done_verdict(self) -> Verdict:
        assert self.terminal is not None
        claimed = self.terminal.get("tokens")
        if not isinstance(claimed, int) or isinstance(claimed, bool):
            return error("malformed_done", "done without an integer tokens field")
        verdict = self._seq_verdict()
        if verdict is not None:
            return verdict
        if self.tokens < claimed:
            detail = "fewer token events than done.tokens"
            return resume_mismatch(detail) if self.resumes else truncated(detail)
        if self.tokens > claimed:
            detail = "more token events than done.tokens"
            return resume_mismatch(detail) if self.resumes else error("token_count", detail)
        if self.malformed:
            return error("malformed_event", "an event that is not /stream JSON")
        if self.expected is not None and self.text != self.expected(claimed):
            return resume_mismatch("text differs from the uninterrupted text")
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
        if self.conn_events == 0:  # nothing before the end on this connection: a refusal, if the code says so
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

    def resumed(self, endpoint: str) -> None:
        """A reconnection the gateway accepted and continued the stream on (after the last event received)."""
        self._add(endpoint, "resumed")

    def aborted(self, endpoint: str) -> None:
        """The load test itself stopped the stream (run time over, user stopped): not the server's doing."""
        self._add(endpoint, "aborted")

    def record(self, endpoint: str, verdict: Verdict) -> None:
        self._add(endpoint, _KIND_KEY[verdict.kind])
        if verdict.name in (RESUME_MISMATCH, NOT_RESUMABLE):  # errors, also counted by name
            self._add(endpoint, verdict.name)
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
        """The run's one-line summary; `ok` is what a pass/fail gate wants (see SUMMARY_KEYS). `resume_mismatch`
        and `not_resumable` are errors too (in `errors`, so `ok` is false), counted again by name."""
        out: dict[str, Any] = {key: int(self.counts.get(key, 0)) for key in SUMMARY_KEYS}
        out["reconnects"] = int(self.counts.get("reconnects", 0))
        out["retried"] = int(self.counts.get("retried", 0))
        for key in RESUME_KEYS:
            out[key] = int(self.counts.get(key, 0))
        out["in_flight"] = out["started"] - sum(out[key] for key in SUMMARY_KEYS[1:])  # 0 once the run is over
        out["ok"] = out["truncated"] == 0 and out["errors"] == 0 and out["completed"] > 0
        out["by_reason"] = dict(sorted(self.by_reason.items()))
        out["by_endpoint"] = {
            endpoint: {key: int(counts.get(key, 0)) for key in (*SUMMARY_KEYS, "reconnects", "retried", *RESUME_KEYS)}
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
