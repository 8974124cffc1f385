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

Locust entries; the custom ones have the protocol as their type: SSE (/stream), CHAT (/v1/chat/completions),
WS (/ws):

    POST /stream, POST /v1/chat/completions, WS /ws   time to the response headers / the WS handshake
    <type> TTFT                        request start → first token (every stream that got one)
    <type> inter-token gap             per stream, (last token − first token) / (tokens − 1)
    <type> stream duration             request start → done, completed streams only
    <type> graceful:server_shutdown    success: the drain ended the stream; the user reconnects
    <type> refused:<status>:<code>     success: a 429/503 refusal (on /ws the close code: 1013, 1012)
    <type> truncated                   failure: the stream stopped early (stream_check.py says how)
    <type> error:<code>                failure: the gateway reported an error, or the client could not
                                       reach it (error:connect) or heard nothing (error:client_timeout)
    <type> retried:<exception>         success: a request (or WS handshake) the server closed its
                                       connection on without a byte of answer, sent once more

At test stop one JSON line is printed (and written to LOCUST_SUMMARY_PATH): `started, completed, graceful,
truncated, refused, errors, aborted` (aborted: cut by the load test's own stop), `in_flight` (started minus
the six ends: 0 once the run is over), `reconnects` (after graceful ends), `retried` (unanswered requests
resent), `ok` (truncated == errors == 0 and completed > 0), `by_reason`, `by_endpoint`, `type`
("stream_summary") and `locust` (its version). The file also has `final`,
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
from typing import Any, NamedTuple

import locust
import shapes
import stream_check as sc
import websocket
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
INCLUDE_USAGE = os.environ.get("LOCUST_INCLUDE_USAGE", "1").strip().lower() not in ("0", "false", "no", "")
API_KEYS = [key.strip() for key in os.environ.get("LOCUST_API_KEYS", "").split(",") if key.strip()]
WAIT_MIN = _env_float("LOCUST_WAIT_MIN", 0.5)
WAIT_MAX = max(WAIT_MIN, _env_float("LOCUST_WAIT_MAX", 2.0))
MAX_RECONNECTS = _env_int("LOCUST_MAX_RECONNECTS", 3)
RECONNECT_DELAY = _env_float("LOCUST_RECONNECT_DELAY", 0.2)
MAX_RETRY_AFTER = _env_float("LOCUST_MAX_RETRY_AFTER", 5.0)
NETWORK_TIMEOUT = _env_float("LOCUST_NETWORK_TIMEOUT", 60.0, minimum=0.1)
CONNECT_TIMEOUT = _env_float("LOCUST_CONNECT_TIMEOUT", 10.0, minimum=0.1)
SUMMARY_PATH = os.environ.get("LOCUST_SUMMARY_PATH", "").strip()

SSE_PATH, CHAT_PATH, WS_PATH = "/stream", "/v1/chat/completions", "/ws"
REQUEST_TYPES = {SSE_PATH: "SSE", CHAT_PATH: "CHAT", WS_PATH: "WS"}  # the type column of the custom entries
TTFT, GAP, DURATION = "TTFT", "inter-token gap", "stream duration"
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
    reported: bool = False  # the POST entry already carries the outcome (pre-stream refusal or error)


class _Clock:
    """A stream's timestamps: request start, first and last token."""

    __slots__ = ("start", "first", "last", "tokens")

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first = 0.0
        self.last = 0.0
        self.tokens = 0

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
            request_type=REQUEST_TYPES[self.endpoint], name=name, response_time=ms, response_length=length,
            exception=exception, context={},
        )

    def _first_token(self, clock: _Clock) -> None:
        self._fire(TTFT, clock.since_start_ms(clock.first))

    def _finish(self, result: _Result, clock: _Clock) -> None:
        verdict, nbytes = result.verdict, result.nbytes
        TALLY.record(self.endpoint, verdict)
        if result.reported:
            return
        if verdict.kind == sc.COMPLETED:
            self._fire(DURATION, clock.since_start_ms(), length=nbytes)
            if clock.tokens >= 2:
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
        for attempt in range(2):
            with self.client.request(
                "POST", self.endpoint, name=self.endpoint, json=self.request_body(), stream=True,
                catch_response=True, headers={**STREAM_HEADERS, **self.auth},
            ) as response:
                status = response.status_code
                if status == 200:
                    response.success()  # reported as "POST <endpoint>": time to the response headers
                    break
                if attempt == 0 and isinstance(getattr(response, "error", None), UNANSWERED):
                    # A pooled keep-alive connection the server closed (a draining instance closes its idle
                    # ones) fails before any response byte. geventhttpclient never resends a POST; the OpenAI
                    # SDK retries connection errors. This client resends once and counts it as `retried`.
                    TALLY.retried(self.endpoint)
                    self._rename(response, f"retried:{type(response.error).__name__}")
                    response.success()
                    continue
                return self._refusal_or_error(response, status)
        feed, verdict_of = self.new_check()
        decoder = sc.SSEDecoder()
        nbytes, lost = 0, False
        # geventhttpclient's own response: its readline returns each line as soon as it is complete
        # (FastResponse.iter_content/read(n) wait for n bytes, which would delay every token)
        raw = response._response
        try:
            while line := raw.readline(b"\n"):
                nbytes += len(line)
                data = decoder.feed_line(line)
                if data is not None and feed(data) and clock.token():
                    self._first_token(clock)
        except TimeoutError:
            return _Result(sc.error("client_timeout", f"no byte for {NETWORK_TIMEOUT:g}s"), nbytes=nbytes)
        except (OSError, HTTPException):  # reset, or the body ended before its chunked terminator
            lost = True
        except UnicodeDecodeError:
            return _Result(sc.error("malformed_stream", "a line that is not UTF-8"), nbytes=nbytes)
        finally:
            response.release()  # a cut stream's connection is closed, a finished one goes back to the pool
        return _Result(verdict_of(lost), nbytes=nbytes)

    def _refusal_or_error(self, response: Any, status: int) -> _Result:
        """A non-200 answer: the POST entry itself is renamed to the refusal (success) or error (failure)."""
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
        self._rename(response, verdict.name)
        if verdict.failed:
            response.failure(StreamFailure(verdict.detail))
        else:
            response.success()
        return _Result(verdict, retry_after, reported=True)

    def _rename(self, response: Any, name: str) -> None:
        """Report the POST entry as this outcome (type SSE/CHAT, name e.g. refused:429:rate_limited)."""
        response.request_meta["request_type"] = REQUEST_TYPES[self.endpoint]
        response.request_meta["name"] = name


class SSEUser(_HTTPStreamUser):
    """`POST /stream`: status, token..., done (`done.tokens` must equal the token events)."""

    weight = WEIGHT_SSE or 1
    abstract = WEIGHT_SSE == 0
    endpoint = SSE_PATH

    def request_body(self) -> dict[str, Any]:
        return {"prompt": PROMPT, "model": MODEL, "max_tokens": MAX_TOKENS}

    def new_check(self) -> tuple[Callable[[str], bool], Callable[[bool], sc.Verdict]]:
        check = sc.SeedCheck()
        return check.feed, lambda lost: check.sse_verdict(connection_lost=lost)


class ChatUser(_HTTPStreamUser):
    """`POST /v1/chat/completions` with `stream: true`: chunks, finish_reason, usage, `[DONE]`."""

    weight = WEIGHT_CHAT or 1
    abstract = WEIGHT_CHAT == 0
    endpoint = CHAT_PATH

    def request_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS,
            "stream": True,
        }
        if INCLUDE_USAGE:
            body["stream_options"] = {"include_usage": True}
        return body

    def new_check(self) -> tuple[Callable[[str], bool], Callable[[bool], sc.Verdict]]:
        check = sc.ChatCheck()
        return check.feed, lambda lost: check.verdict(connection_lost=lost, check_usage=INCLUDE_USAGE)


class WSUser(_StreamUser):
    """`WebSocket /ws`: the /stream request as one text message, the /stream events as frames, close 1000."""

    weight = WEIGHT_WS or 1
    abstract = WEIGHT_WS == 0
    endpoint = WS_PATH

    def one_stream(self, clock: _Clock) -> _Result:
        url = "ws" + str(self.host).removeprefix("http") + WS_PATH  # http→ws, https→wss
        for attempt in range(2):
            try:
                ws = websocket.create_connection(
                    url, timeout=NETWORK_TIMEOUT, header=[f"{k}: {v}" for k, v in self.auth.items()],
                )
                break
            except websocket.WebSocketBadStatusException as exc:  # refused before the upgrade
                retry_after = str((exc.resp_headers or {}).get("retry-after") or "1")
                return _Result(sc.classify_status(exc.status_code, exc.resp_body),
                               float(retry_after) if retry_after.isdigit() else 1.0)
            except WS_UNANSWERED as exc:
                if attempt:
                    return _Result(sc.error("connect", type(exc).__name__))
                # accepted, then closed unanswered (a server stopping closes the connections it has not
                # read yet): the handshake is a GET, so it is sent once more, as for the POSTs
                TALLY.retried(self.endpoint)
                self._fire(f"retried:{type(exc).__name__}", clock.since_start_ms())
            except (OSError, websocket.WebSocketException) as exc:
                return _Result(sc.error("connect", type(exc).__name__))
        self.environment.events.request.fire(
            request_type="WS", name=WS_PATH, response_time=clock.since_start_ms(), response_length=0,
            exception=None, context={},
        )
        check = sc.SeedCheck()
        nbytes, close_code, message = 0, None, b""
        try:
            ws.send(json.dumps({"prompt": PROMPT, "model": MODEL, "max_tokens": MAX_TOKENS}))
            while True:
                # frames one by one: recv_data_frame answers a close itself, and when that answer fails
                # (the server already closed the TCP connection) the close code would be lost with it
                frame = ws.recv_frame()
                if frame.opcode == websocket.ABNF.OPCODE_CLOSE:
                    close_code = sc.ws_close_code(frame.data)
                    break
                if frame.opcode == websocket.ABNF.OPCODE_PING:
                    ws.pong(frame.data)
                elif frame.opcode in WS_DATA_OPCODES:
                    nbytes += len(frame.data)
                    message += frame.data
                    if frame.fin:
                        data, message = message.decode(), b""
                        if check.feed(data) and clock.token():
                            self._first_token(clock)
        except websocket.WebSocketTimeoutException:
            return _Result(sc.error("client_timeout", f"no frame for {NETWORK_TIMEOUT:g}s"), nbytes=nbytes)
        except (OSError, websocket.WebSocketException):  # dropped without a close frame
            close_code = None
        except UnicodeDecodeError:
            return _Result(sc.error("malformed_stream", "a frame that is not UTF-8"), nbytes=nbytes)
        finally:
            self._close(ws, close_code)
        return _Result(check.ws_verdict(close_code), nbytes=nbytes)

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

    class StreamLoadShape(LoadTestShape):
        """The stages LOCUST_SHAPE picked (shapes.py); -u/-r/-t are ignored while it runs."""

        shape_name, stages = _PLAN

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
