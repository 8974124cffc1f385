"""Locust users for the streaming gateway: `/stream` (SSE), `/v1/chat/completions` (stream) and `/ws`.

    locust -f loadtest/locustfile.py --headless -u 50 -r 10 -t 5m --host http://gateway --csv results/run

The in-cluster Locust Job runs this same file; ship `stream_check.py` and `shapes.py` beside it (they are
imported as top-level modules from the locustfile's directory, which Locust puts on sys.path).

Settings (environment variables, defaults in brackets):

    LOCUST_WEIGHT_SSE, LOCUST_WEIGHT_CHAT, LOCUST_WEIGHT_WS   user class weights [1, 1, 1]; 0 leaves one out
    LOCUST_MAX_TOKENS          max_tokens of every request [128]
    LOCUST_PROMPT              prompt text ["Explain how a streaming gateway relays tokens."]
    LOCUST_MODEL               model name [gpt-4o-mini]
    LOCUST_INCLUDE_USAGE       /v1: ask for the usage chunk and check content chunks against it [1]
    LOCUST_API_KEYS            comma-separated client keys, user n sends key n mod count (Bearer) [none]
    LOCUST_WAIT_MIN, LOCUST_WAIT_MAX   seconds a user waits between streams [0.5, 2]
    LOCUST_MAX_RECONNECTS      reconnects after graceful ends (server_shutdown) within one task [3]
    LOCUST_RECONNECT_DELAY     reconnect backoff base, full jitter: uniform(0, base * 2^attempt) s [0.2]
    LOCUST_MAX_RETRY_AFTER     longest Retry-After honoured after a refusal, seconds [5]
    LOCUST_NETWORK_TIMEOUT     longest silence on a connection, seconds (keep it above the gateway's
                               SSE_PING_INTERVAL_SECONDS and stream deadlines) [60]
    LOCUST_CONNECT_TIMEOUT     TCP connect timeout, seconds [10]
    LOCUST_SUMMARY_PATH        write the summary JSON here too (atomically) [unset]
    LOCUST_SHAPE               ramp | spike | soak, parameters in shapes.py; unset: -u/-r/-t [unset]
    LOCUST_RESUME              /stream and /ws users resume a broken stream instead of giving it up [1]
    LOCUST_RESUME_ATTEMPTS     resume attempts in a row that got no new event before a stream is given
                               up (truncated); backoff with full jitter as LOCUST_RECONNECT_DELAY, at most 5 s [5]
    LOCUST_VERIFY_TEXT         what a finished /stream or /ws text must equal: `mock` (the built-in mock's
                               uninterrupted answer), `fake` (loadtest/fake_openai.py's, `tok0 tok1 ...`, behind
                               the gateway), `off` (a real upstream) [mock]
    LOCUST_DROP_AFTER_TOKENS   /stream and /ws users close their connection after this many tokens, once per
                               stream, and resume it (exercises resumption without a drain); 0: never [0]

Resuming (LOCUST_RESUME=1): a /stream or /ws user remembers the last event of its stream (SSE `id:` lines;
on /ws the events counted and the status's `stream_id`). When the connection ends without the stream's final
event (reset, EOF, /ws close without `done`) or with `server_shutdown` carrying a `resume` id (the stream was
handed to the fleet), it reconnects and continues: `GET /stream/{id}` with `Last-Event-ID` (SSE) or the
`{"resume": id, "received": n}` message (/ws). A plain `server_shutdown` on the first connection means the
stream was not handed over: a graceful end and a new request, as without resumption. Refusals (429/503,
/ws 1013/1012 before any event), connection errors and 502/504 on a resume attempt are retried. At `done`
the stream as assembled over its connections is checked: every seq from 0 to done's exactly once and in
order (SSE), as many tokens as `done.tokens`, and the text LOCUST_VERIFY_TEXT names.

Locust entries; the custom ones have the protocol as their type: SSE (/stream), CHAT (/v1/chat/completions),
WS (/ws):

    POST /stream, POST /v1/chat/completions, WS /ws   time to the response headers / the WS handshake
    <type> TTFT                        request start → first token (every stream that got one)
    <type> inter-token gap             per stream, (last token - first token) / (tokens - 1)
    <type> stream duration             request start → done, completed streams only
    <type> graceful:server_shutdown    success: the drain ended the stream; the user reconnects
    <type> refused:<status>:<code>     success: a 429/503 refusal (on /ws the close code: 1013, 1012)
    <type> truncated                   failure: the stream stopped early (stream_check.py says how)
    <type> error:<code>                failure: the gateway reported an error, or the client could not
                                       reach it (error:connect) or heard nothing (error:client_timeout)
    <type> retried:<exception>         success: a request (or WS handshake) the server closed its
                                       connection on without a byte of answer, sent once more; also a
                                       resume attempt that could not connect (retried:connect, retried:http_502:*)
    GET /stream/{id}                   a resume request (SSE): time to the response headers
    <type> resumed                     success: a stream continued on a new connection; time from the break
                                       to the resumed connection's answer
    <type> resume_mismatch             failure: the assembled stream is not the uninterrupted one (seq gap or
                                       duplicate, token count, text)
    <type> not_resumable               failure: the gateway could not resume the stream (404 or error event)

At test stop one JSON line is printed (and written to LOCUST_SUMMARY_PATH): `started, completed, graceful,
truncated, refused, errors, aborted` (aborted: cut by the load test's own stop), `in_flight` (started minus
the six ends: 0 once the run is over), `reconnects` (after graceful ends), `retried` (unanswered requests
resent), `resumed` (reconnections that continued a stream), `resume_mismatch` and `not_resumable` (errors
too, counted again by name), `ok` (truncated == errors == 0 and completed > 0), `by_reason`, `by_endpoint`,
`type` ("stream_summary") and `locust` (its version). The file also has `final`,
true once Locust quits (on a master after the workers' last counts arrived, bounded by 10 s): read it then.
The exit code is 1 when truncated or errors > 0.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import time
from collections.abc import Callable
from http.client import HTTPException
from typing import TYPE_CHECKING, Any, NamedTuple

import locust
import websocket

if TYPE_CHECKING:  # the type checker sees the package; Locust runs this file with its directory on sys.path
    from loadtest import shapes
    from loadtest import stream_check as sc
else:
    import shapes
    import stream_check as sc
from gevent import GreenletExit
from geventhttpclient.response import HTTPConnectionClosed
from locust import FastHttpUser, LoadTestShape, between, events, task
from locust.env import Environment
from locust.runners import STATE_RUNNING, STATE_SPAWNING, MasterRunner, WorkerRunner

logger = logging.getLogger("locustfile")


def _env_float(name: str, default: float, minimum: float = 0.0) -> float:
    raw = os.environ.get(name, "").strip()
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if value < minimum:
        raise ValueError(f"{name}={value:g} must be at least {minimum:g}")
    return value


def _env_int(name: str, default: int, minimum: int = 0) -> int:
    return int(_env_float(name, default, minimum))


WEIGHT_SSE = _env_int("LOCUST_WEIGHT_SSE", 1)
WEIGHT_CHAT = _env_int("LOCUST_WEIGHT_CHAT", 1)
WEIGHT_WS = _env_int("LOCUST_WEIGHT_WS", 1)
if WEIGHT_SSE + WEIGHT_CHAT + WEIGHT_WS == 0:
    raise ValueError("LOCUST_WEIGHT_SSE, LOCUST_WEIGHT_CHAT and LOCUST_WEIGHT_WS are all 0: nothing to run")
MAX_TOKENS = _env_int("LOCUST_MAX_TOKENS", 128, minimum=1)
PROMPT = os.environ.get("LOCUST_PROMPT") or "Explain how a streaming gateway relays tokens."
MODEL = os.environ.get("LOCUST_MODEL") or "gpt-4o-mini"


def _env_flag(name: str, default: bool) -> bool:
    return os.environ.get(name, "1" if default else "0").strip().lower() not in ("0", "false", "no", "")


INCLUDE_USAGE = _env_flag("LOCUST_INCLUDE_USAGE", True)
API_KEYS = [key.strip() for key in os.environ.get("LOCUST_API_KEYS", "").split(",") if key.strip()]
WAIT_MIN = _env_float("LOCUST_WAIT_MIN", 0.5)
WAIT_MAX = max(WAIT_MIN, _env_float("LOCUST_WAIT_MAX", 2.0))
MAX_RECONNECTS = _env_int("LOCUST_MAX_RECONNECTS", 3)
RECONNECT_DELAY = _env_float("LOCUST_RECONNECT_DELAY", 0.2)
MAX_RETRY_AFTER = _env_float("LOCUST_MAX_RETRY_AFTER", 5.0)
NETWORK_TIMEOUT = _env_float("LOCUST_NETWORK_TIMEOUT", 60.0, minimum=0.1)
CONNECT_TIMEOUT = _env_float("LOCUST_CONNECT_TIMEOUT", 10.0, minimum=0.1)
SUMMARY_PATH = os.environ.get("LOCUST_SUMMARY_PATH", "").strip()
RESUME = _env_flag("LOCUST_RESUME", True)
RESUME_ATTEMPTS = _env_int("LOCUST_RESUME_ATTEMPTS", 5, minimum=1)
EXPECTED_TEXT = sc.expected_text(os.environ.get("LOCUST_VERIFY_TEXT", "").strip() or "mock", PROMPT)
DROP_AFTER_TOKENS = _env_int("LOCUST_DROP_AFTER_TOKENS", 0)
RESUME_BACKOFF_CAP = 5.0  # seconds: the longest jittered wait before a resume attempt

SSE_PATH, CHAT_PATH, WS_PATH = "/stream", "/v1/chat/completions", "/ws"
REQUEST_TYPES = {SSE_PATH: "SSE", CHAT_PATH: "CHAT", WS_PATH: "WS"}  # the type column of the custom entries
TTFT, GAP, DURATION, RESUMED = "TTFT", "inter-token gap", "stream duration", "resumed"
RESUME_NAME = "/stream/{id}"  # the Locust entry of the resume requests
WS_DATA_OPCODES = (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY, websocket.ABNF.OPCODE_CONT)
# a request that got not one byte back on a connection that was open: resent once (see one_stream)
UNANSWERED = (HTTPConnectionClosed, ConnectionResetError, BrokenPipeError)
WS_UNANSWERED = (websocket.WebSocketConnectionClosedException, ConnectionResetError, BrokenPipeError)
# no compression: a compressed body cannot be read line by line as it arrives
STREAM_HEADERS = {"Accept": "text/event-stream", "Accept-Encoding": "identity"}

SETTLE_TIMEOUT = 10.0  # how long a master waits at quit for workers' last counts
TALLY = sc.Tally()


class StreamFailure(Exception):
    """The failure Locust records for a truncated or failed stream (the message is the categorical reason)."""


class _Result(NamedTuple):
    verdict: sc.Verdict
    retry_after: float = 1.0  # seconds, honoured (capped) after a refusal
    nbytes: int = 0
    reported: bool = False  # the request's entry already carries the outcome (pre-stream refusal or error)


class _Read(NamedTuple):
    """How one connection of a stream ended (its events went into the stream's check)."""

    nbytes: int
    lost: bool = False  # reset, or an incomplete body (SSE)
    dropped: bool = False  # closed by this client (LOCUST_DROP_AFTER_TOKENS)
    failure: sc.Verdict | None = None  # the stream's verdict, whatever the check says (client timeout, bad UTF-8)
    close_code: int | None = None  # /ws: the server's close code, None if the connection dropped without one
    first_frame: float = 0.0  # /ws: when the first frame arrived (perf_counter), 0 if none did


class _Clock:
    """A stream's timestamps: request start, first and last token (over all its connections)."""

    __slots__ = ("start", "first", "last", "tokens", "resumes")

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first = 0.0
        self.last = 0.0
        self.tokens = 0
        self.resumes = 0

    def token(self) -> bool:
        """Timestamp one token; True for the first."""
        self.last = time.perf_counter()
        self.tokens += 1
        if self.tokens == 1:
            self.first = self.last
            return True
        return False

    def since_start_ms(self, t: float | None = None) -> float:
        return ((t if t is not None else time.perf_counter()) - self.start) * 1000


def new_seed_check() -> sc.SeedCheck:
    """The check of one /stream or /ws stream, comparing its text with the one LOCUST_VERIFY_TEXT names."""
    return sc.SeedCheck(expected=EXPECTED_TEXT)


def resume_retryable(verdict: sc.Verdict) -> bool:
    """A resume attempt's failure worth another attempt: refused, or no answer from an instance (yet)."""
    name = verdict.name
    return (
        verdict.kind in (sc.REFUSED, sc.GRACEFUL)
        or name == "error:connect"
        or name.startswith(("error:http_502:", "error:http_504:"))
    )


class _ResumeBudget:
    """Resume attempts left for a stream: LOCUST_RESUME_ATTEMPTS in a row without a new event, then it is given
    up. Waits before each attempt with full jitter (uniform(0, base * 2^n), at most RESUME_BACKOFF_CAP)."""

    __slots__ = ("failed", "position")

    def __init__(self) -> None:
        self.failed = 0  # attempts since the stream last made progress
        self.position = 0  # the stream's position when it last made progress

    def take(self, check: sc.SeedCheck, retry_after: float = 0.0) -> bool:
        """Wait for the next attempt; False when none is left."""
        if check.position > self.position:
            self.failed, self.position = 0, check.position
        if self.failed >= RESUME_ATTEMPTS:
            return False
        delay = random.uniform(0, min(RESUME_BACKOFF_CAP, RECONNECT_DELAY * 2**self.failed))
        self.failed += 1
        time.sleep(max(delay, min(retry_after, MAX_RETRY_AFTER)))  # gevent-patched
        return True


EXHAUSTED = "resume attempts exhausted"


class _StreamUser(FastHttpUser):
    """One protocol's client: open a stream, read it to its end, judge it, reconnect after a graceful end."""

    abstract = True
    endpoint = ""
    wait_time = between(WAIT_MIN, WAIT_MAX)
    network_timeout = NETWORK_TIMEOUT
    connection_timeout = CONNECT_TIMEOUT
    _serial = itertools.count()

    def on_start(self) -> None:
        n = next(_StreamUser._serial)
        self.auth = {"Authorization": f"Bearer {API_KEYS[n % len(API_KEYS)]}"} if API_KEYS else {}

    @task
    def stream(self) -> None:
        for attempt in range(MAX_RECONNECTS + 1):
            if attempt:
                TALLY.reconnect(self.endpoint)
                time.sleep(random.uniform(0, RECONNECT_DELAY * 2 ** (attempt - 1)))  # gevent-patched
            result = self._guarded()
            if result.verdict.kind != sc.GRACEFUL:
                break
        if result.verdict.kind == sc.REFUSED:
            time.sleep(min(result.retry_after, MAX_RETRY_AFTER))

    def _guarded(self) -> _Result:
        """One stream, counted exactly once: a verdict, or `aborted` when the load test itself kills it."""
        TALLY.started(self.endpoint)
        clock = _Clock()
        try:
            result = self.one_stream(clock)
        except (GreenletExit, KeyboardInterrupt):
            TALLY.aborted(self.endpoint)
            raise
        except Exception as exc:  # a bug here, not the server's doing: an error, with the traceback logged
            logger.exception("client failure on %s", self.endpoint)
            result = _Result(sc.error("client_exception", type(exc).__name__))
        self._finish(result, clock)
        return result

    def one_stream(self, clock: _Clock) -> _Result:
        raise NotImplementedError

    # --- reporting -----------------------------------------------------------------------------
    def _fire(self, name: str, ms: float, *, length: int = 0, exception: Exception | None = None) -> None:
        self.environment.events.request.fire(
            request_type=REQUEST_TYPES[self.endpoint],
            name=name,
            response_time=ms,
            response_length=length,
            exception=exception,
            context={},
        )

    def _first_token(self, clock: _Clock) -> None:
        self._fire(TTFT, clock.since_start_ms(clock.first))

    def _resumed(self, clock: _Clock, broke: float, answered: float) -> None:
        clock.resumes += 1
        TALLY.resumed(self.endpoint)
        self._fire(RESUMED, (answered - broke) * 1000)

    def _finish(self, result: _Result, clock: _Clock) -> None:
        verdict, nbytes = result.verdict, result.nbytes
        TALLY.record(self.endpoint, verdict)
        if result.reported:
            return
        if verdict.kind == sc.COMPLETED:
            self._fire(DURATION, clock.since_start_ms(), length=nbytes)
            if clock.tokens >= 2 and not clock.resumes:  # a resumed stream's gaps include the reconnect
                self._fire(GAP, (clock.last - clock.first) * 1000 / (clock.tokens - 1))
        elif verdict.kind in (sc.GRACEFUL, sc.REFUSED):
            self._fire(verdict.name, clock.since_start_ms(), length=nbytes)
        else:
            self._fire(verdict.name, clock.since_start_ms(), length=nbytes, exception=StreamFailure(verdict.detail))


class _HTTPStreamUser(_StreamUser):
    abstract = True

    def request_body(self) -> dict[str, Any]:
        raise NotImplementedError

    def new_check(self) -> tuple[Callable[[str], bool], Callable[[bool], sc.Verdict]]:
        """(feed one data payload → is it a token, verdict given whether the connection was lost)."""
        raise NotImplementedError

    def one_stream(self, clock: _Clock) -> _Result:
        opened = self._open("POST", self.endpoint, body=self.request_body())
        if isinstance(opened, _Result):
            return opened
        feed, verdict_of = self.new_check()
        read = self._read(opened, lambda data, _: feed(data), clock)
        if read.failure is not None:
            return _Result(read.failure, nbytes=read.nbytes)
        return _Result(verdict_of(read.lost), nbytes=read.nbytes)

    def _open(
        self,
        method: str,
        path: str,
        *,
        name: str | None = None,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        soft: Callable[[sc.Verdict], bool] | None = None,
    ) -> Any:
        """Send a stream request: its 200 response, or the `_Result` of a refusal or error (the request's entry
        renamed to it; a failure unless `soft` says it will be retried)."""
        for attempt in range(2):
            with self.client.request(
                method,
                path,
                name=name or path,
                json=body,
                stream=True,
                catch_response=True,
                headers={**STREAM_HEADERS, **self.auth, **(headers or {})},
            ) as response:
                status = response.status_code
                if status == 200:
                    response.success()  # reported as "<method> <name>": time to the response headers
                    return response
                if attempt == 0 and isinstance(getattr(response, "error", None), UNANSWERED):
                    # A pooled keep-alive connection the server closed (a draining instance closes its idle
                    # ones) fails before any response byte. geventhttpclient never resends a POST; the OpenAI
                    # SDK retries connection errors. This client resends once and counts it as `retried`.
                    TALLY.retried(self.endpoint)
                    self._rename(response, f"retried:{type(response.error).__name__}")
                    response.success()
                    continue
                return self._refusal_or_error(response, status, soft)
        raise AssertionError("unreachable: the second attempt always returns")

    def _read(self, response: Any, feed: Callable[[str, str | None], bool], clock: _Clock, drop_at: int = 0) -> _Read:
        """Read one connection's events into `feed(data, event id)`; with `drop_at`, close it after that many
        tokens of the stream."""
        decoder = sc.SSEDecoder()
        nbytes = 0
        # geventhttpclient's own response: its readline returns each line as soon as it is complete
        # (FastResponse.iter_content/read(n) wait for n bytes, which would delay every token)
        raw = response._response
        try:
            while line := raw.readline(b"\n"):
                nbytes += len(line)
                data = decoder.feed_line(line)
                if data is not None and feed(data, decoder.event_id):
                    if clock.token():
                        self._first_token(clock)
                    if drop_at and clock.tokens == drop_at:
                        return _Read(nbytes, dropped=True)
        except TimeoutError:
            return _Read(nbytes, failure=sc.error("client_timeout", f"no byte for {NETWORK_TIMEOUT:g}s"))
        except (OSError, HTTPException):  # reset, or the body ended before its chunked terminator
            return _Read(nbytes, lost=True)
        except UnicodeDecodeError:
            return _Read(nbytes, failure=sc.error("malformed_stream", "a line that is not UTF-8"))
        finally:
            response.release()  # a cut stream's connection is closed, a finished one goes back to the pool
        return _Read(nbytes)

    def _refusal_or_error(
        self, response: Any, status: int, soft: Callable[[sc.Verdict], bool] | None = None
    ) -> _Result:
        """A non-200 answer: the entry itself is renamed to the refusal (success) or error (failure)."""
        retry_after = 1.0
        if status == 0:
            error = getattr(response, "error", None)
            verdict = sc.error("connect", type(error).__name__ if error else "no response")
        else:
            try:
                body = response.content or b""
            except Exception:  # the body of an error answer is best effort
                body = b""
            verdict = sc.classify_status(status, body)
            try:
                retry_after = float(response.headers.get("retry-after") or 1)
            except (TypeError, ValueError):
                pass
        if verdict.failed and soft is not None and soft(verdict):  # retried: no failure of its own
            TALLY.retried(self.endpoint)
            self._rename(response, "retried:" + verdict.name.removeprefix("error:"))
            response.success()
        else:
            self._rename(response, verdict.name)
            if verdict.failed:
                response.failure(StreamFailure(verdict.detail))
            else:
                response.success()
        return _Result(verdict, retry_after, reported=True)

    def _rename(self, response: Any, name: str) -> None:
        """Report the entry as this outcome (type SSE/CHAT, name e.g. refused:429:rate_limited)."""
        response.request_meta["request_type"] = REQUEST_TYPES[self.endpoint]
        response.request_meta["name"] = name


class SSEUser(_HTTPStreamUser):
    """`POST /stream`: status, token..., done (`done.tokens` must equal the token events); resumed with
    `GET /stream/{id}` + `Last-Event-ID` when the connection breaks or the stream is handed over."""

    weight = WEIGHT_SSE or 1
    abstract = WEIGHT_SSE == 0
    endpoint = SSE_PATH

    def request_body(self) -> dict[str, Any]:
        return {"prompt": PROMPT, "model": MODEL, "max_tokens": MAX_TOKENS}

    def one_stream(self, clock: _Clock) -> _Result:
        response = self._open("POST", SSE_PATH, body=self.request_body())
        if isinstance(response, _Result):
            return response
        check = new_seed_check()
        budget = _ResumeBudget()
        nbytes = 0
        while True:
            read = self._read(response, check.feed, clock, drop_at=0 if check.resumes else DROP_AFTER_TOKENS)
            nbytes += read.nbytes
            if read.failure is not None:
                return _Result(read.failure, nbytes=nbytes)
            if not (RESUME and check.stream_id is not None and (read.dropped or check.should_resume())):
                return _Result(check.sse_verdict(connection_lost=read.lost), nbytes=nbytes)
            resumed = self._resume(check, budget, clock)
            if isinstance(resumed, _Result):
                return resumed._replace(nbytes=nbytes)
            response = resumed

    def _resume(self, check: sc.SeedCheck, budget: _ResumeBudget, clock: _Clock) -> Any:
        """`GET /stream/{id}` after the last event received, until answered: the response, or the stream's
        `_Result` (not resumable, an error, or no attempt left: truncated)."""
        broke, retry_after = time.perf_counter(), 0.0
        last = check.last_event_id
        while budget.take(check, retry_after):
            response = self._open(
                "GET",
                f"/stream/{check.stream_id}",
                name=RESUME_NAME,
                headers={"Last-Event-ID": last} if last else {},
                soft=resume_retryable,
            )
            if not isinstance(response, _Result):
                check.new_connection()
                self._resumed(clock, broke, time.perf_counter())
                return response
            if not resume_retryable(response.verdict):
                return response
            retry_after = response.retry_after if response.verdict.kind == sc.REFUSED else 0.0
        return _Result(sc.truncated(EXHAUSTED))


class ChatUser(_HTTPStreamUser):
    """`POST /v1/chat/completions` with `stream: true`: chunks, finish_reason, usage, `[DONE]`."""

    weight = WEIGHT_CHAT or 1
    abstract = WEIGHT_CHAT == 0
    endpoint = CHAT_PATH

    def request_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": MODEL,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": MAX_TOKENS,
            "stream": True,
        }
        if INCLUDE_USAGE:
            body["stream_options"] = {"include_usage": True}
        return body

    def new_check(self) -> tuple[Callable[[str], bool], Callable[[bool], sc.Verdict]]:
        check = sc.ChatCheck()
        return check.feed, lambda lost: check.verdict(connection_lost=lost, check_usage=INCLUDE_USAGE)


class WSUser(_StreamUser):
    """`WebSocket /ws`: the /stream request as one text message, the /stream events as frames, close 1000;
    resumed on a new connection with `{"resume": <stream id>, "received": <events>}`."""

    weight = WEIGHT_WS or 1
    abstract = WEIGHT_WS == 0
    endpoint = WS_PATH

    def one_stream(self, clock: _Clock) -> _Result:
        url = "ws" + str(self.host).removeprefix("http") + WS_PATH  # http→ws, https→wss
        ws = self._connect(url, clock)
        if isinstance(ws, _Result):
            return ws
        self.environment.events.request.fire(
            request_type="WS",
            name=WS_PATH,
            response_time=clock.since_start_ms(),
            response_length=0,
            exception=None,
            context={},
        )
        check = new_seed_check()
        budget = _ResumeBudget()
        message: dict[str, Any] = {"prompt": PROMPT, "model": MODEL, "max_tokens": MAX_TOKENS}
        nbytes, broke = 0, 0.0
        while True:
            read = self._read(ws, message, check, clock, drop_at=0 if check.resumes else DROP_AFTER_TOKENS)
            nbytes += read.nbytes
            if read.failure is not None:
                return _Result(read.failure, nbytes=nbytes)
            verdict = check.ws_verdict(read.close_code)
            if check.resumes and (check.conn_events or (check.terminal or {}).get("type") == "done"):
                self._resumed(clock, broke, read.first_frame)  # the gateway took the resume message
            retry = check.resumes > 0 and resume_retryable(verdict)  # the resume attempt itself was refused
            if not (
                RESUME
                and check.stream_id is not None
                and (read.dropped or retry or check.should_resume(ws_close=read.close_code))
            ):
                return _Result(verdict, nbytes=nbytes)
            if not check.resumes or check.conn_events:  # a connection that carried events broke: time from here
                broke = time.perf_counter()
            resumed = self._reconnect(url, check, budget, clock)
            if isinstance(resumed, _Result):
                return resumed._replace(nbytes=nbytes)
            ws = resumed
            check.new_connection()
            message = {"resume": check.stream_id, "received": check.position}

    def _reconnect(
        self, url: str, check: sc.SeedCheck, budget: _ResumeBudget, clock: _Clock
    ) -> websocket.WebSocket | _Result:
        """A new connection for a resume message, or the stream's `_Result` (no attempt left: truncated)."""
        retry_after = 0.0
        while budget.take(check, retry_after):
            ws = self._connect(url, clock)
            if not isinstance(ws, _Result):
                return ws
            if not resume_retryable(ws.verdict):
                return ws
            retry_after = ws.retry_after if ws.verdict.kind == sc.REFUSED else 0.0
        return _Result(sc.truncated(EXHAUSTED))

    def _connect(self, url: str, clock: _Clock) -> websocket.WebSocket | _Result:
        for attempt in range(2):
            try:
                return websocket.create_connection(  # no Origin: not a browser (ALLOWED_ORIGINS refuses others)
                    url,
                    timeout=NETWORK_TIMEOUT,
                    header=[f"{k}: {v}" for k, v in self.auth.items()],
                    suppress_origin=True,
                )
            except websocket.WebSocketBadStatusException as exc:  # refused before the upgrade
                retry_after = str((exc.resp_headers or {}).get("retry-after") or "1")
                return _Result(
                    sc.classify_status(exc.status_code, exc.resp_body),
                    float(retry_after) if retry_after.isdigit() else 1.0,
                )
            except WS_UNANSWERED as exc:
                if attempt:
                    return _Result(sc.error("connect", type(exc).__name__))
                # accepted, then closed unanswered (a server stopping closes the connections it has not
                # read yet): the handshake is a GET, so it is sent once more, as for the POSTs
                TALLY.retried(self.endpoint)
                self._fire(f"retried:{type(exc).__name__}", clock.since_start_ms())
            except (OSError, websocket.WebSocketException) as exc:
                return _Result(sc.error("connect", type(exc).__name__))
        raise AssertionError("unreachable: the second attempt always returns")

    def _read(
        self, ws: websocket.WebSocket, message: dict[str, Any], check: sc.SeedCheck, clock: _Clock, drop_at: int = 0
    ) -> _Read:
        """Send the request (or resume) message and read the connection's frames into `check` until it closes;
        with `drop_at`, close it after that many tokens of the stream."""
        nbytes, close_code, data, first_frame = 0, None, b"", 0.0
        try:
            ws.send(json.dumps(message))
            while True:
                # frames one by one: recv_data_frame answers a close itself, and when that answer fails
                # (the server already closed the TCP connection) the close code would be lost with it
                frame = ws.recv_frame()
                first_frame = first_frame or time.perf_counter()
                if frame.opcode == websocket.ABNF.OPCODE_CLOSE:
                    close_code = sc.ws_close_code(frame.data)
                    break
                if frame.opcode == websocket.ABNF.OPCODE_PING:
                    ws.pong(frame.data)
                elif frame.opcode in WS_DATA_OPCODES:
                    nbytes += len(frame.data)
                    data += frame.data
                    if frame.fin:
                        text, data = data.decode(), b""
                        if check.feed(text):
                            if clock.token():
                                self._first_token(clock)
                            if drop_at and clock.tokens == drop_at:  # closed below without a close
                                return _Read(nbytes, dropped=True, first_frame=first_frame)  # frame: a lost line
        except websocket.WebSocketTimeoutException:
            failure = sc.error("client_timeout", f"no frame for {NETWORK_TIMEOUT:g}s")
            return _Read(nbytes, failure=failure, first_frame=first_frame)
        except (OSError, websocket.WebSocketException):  # dropped without a close frame
            close_code = None
        except UnicodeDecodeError:
            return _Read(nbytes, failure=sc.error("malformed_stream", "a frame that is not UTF-8"))
        finally:
            self._close(ws, close_code)
        return _Read(nbytes, close_code=close_code, first_frame=first_frame)

    @staticmethod
    def _close(ws: websocket.WebSocket, close_code: int | None) -> None:
        if close_code is not None:
            try:  # echo the server's close, completing the handshake
                ws.send_close(close_code if close_code not in (sc.WS_NO_STATUS, sc.WS_ABNORMAL) else sc.WS_NORMAL)
            except (OSError, websocket.WebSocketException, ValueError):
                pass
        ws.shutdown()


# --- load shape -----------------------------------------------------------------------------------
_PLAN = shapes.plan_from_env(os.environ)
if _PLAN is not None:
    _SHAPE_NAME, _STAGES = _PLAN  # here, where the type checker knows _PLAN is not None

    class StreamLoadShape(LoadTestShape):
        """The stages LOCUST_SHAPE picked (shapes.py); -u/-r/-t are ignored while it runs."""

        shape_name, stages = _SHAPE_NAME, _STAGES

        def tick(self) -> tuple[int, float] | None:
            return shapes.tick(self.stages, self.get_run_time())


# --- run summary ----------------------------------------------------------------------------------
_printed: list[dict[str, Any]] = []


def _emit_summary(environment: Environment, *, final: bool) -> dict[str, Any]:
    """Print the summary line (at test stop; again at quit only if late worker reports changed it) and write
    the file (at quit with `final: true`: a master's test-stop numbers can still miss workers' last reports)."""
    summary = {"type": "stream_summary", "locust": locust.__version__, **TALLY.summary()}
    if _printed[-1:] != [summary]:
        print(json.dumps(summary, sort_keys=True), flush=True)
        _printed.append(summary)
    if SUMMARY_PATH:
        try:
            sc.write_summary(SUMMARY_PATH, {**summary, "final": final})
        except OSError:
            logger.exception("could not write LOCUST_SUMMARY_PATH=%s", SUMMARY_PATH)
            environment.process_exit_code = 2
    return summary


@events.init.add_listener
def _on_init(environment: Environment, **_: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):

        def report(client_id: str, data: dict[str, Any]) -> None:
            data["stream_tally"] = TALLY.take()

        environment.events.report_to_master.add_listener(report)
    elif isinstance(environment.runner, MasterRunner):

        def merge(client_id: str, data: dict[str, Any]) -> None:
            TALLY.merge(data.get("stream_tally") or {})

        environment.events.worker_report.add_listener(merge)


@events.test_start.add_listener
def _on_test_start(environment: Environment, **_: Any) -> None:
    TALLY.reset()
    _printed.clear()


@events.test_stop.add_listener
def _on_test_stop(environment: Environment, **_: Any) -> None:
    if not isinstance(environment.runner, WorkerRunner):
        _emit_summary(environment, final=False)


@events.quitting.add_listener
def _on_quitting(environment: Environment, **_: Any) -> None:
    runner = environment.runner
    if runner is None or isinstance(runner, WorkerRunner):
        return
    if runner.state in (STATE_SPAWNING, STATE_RUNNING):
        runner.stop()  # SIGTERM / Ctrl-C quit before the users stop: stop them now (aborted), then count
    if isinstance(runner, MasterRunner):  # the workers' last reports may still be on their way
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while TALLY.summary()["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.2)  # gevent-patched: the master keeps receiving reports meanwhile
    summary = _emit_summary(environment, final=True)
    if (summary["truncated"] or summary["errors"]) and not environment.process_exit_code:
        environment.process_exit_code = 1
