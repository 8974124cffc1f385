"""A lean SSE load generator: raw asyncio protocols on uvloop, one loopback source address per client.

Run: `python -m loadtest.loadgen --port 8000 --users 450 --rate 200 --max-tokens 200 --hold-seconds 10`.
Prints JSON lines on stdout: `{"event": "all_open", ...}` once every user has a stream delivering
tokens, then `{"event": "result", ...}` with TTFT percentiles, token counts and errors.

Why not httpx or Locust: on the 2 cores the server shares with us, they spend more CPU per event
than the server does, so they measure themselves. Here each read costs one de-chunking pass and a
few `bytes.count` calls for fixed markers; no event is JSON-decoded.

Model: `--users` virtual users start at `--rate` per second; each runs streams back to back until
`--hold-seconds` after the last user started, then in-flight streams run to completion. A stream's
TTFT runs from opening its connection (the request goes out on connect) to its first token event.
Tokens count as delivered in time when they arrive within max_tokens / tokens-per-second + slack.
It prints `{"event": "ramp_end"}` once every user has started; from then on, each SIGUSR1 prints
`{"event": "mark", "tokens": ..., "errors": ..., "cpu_s": ..., "steady": ...}`: the tokens received, errors and
its own CPU so far, and whether every user was still cycling (after the ramp, before the hold ended). Two marks
bracket a window another process times (the benchmark's side-by-side rounds read server CPU over it).

Replay mode (`--replay N`, the gateway's resume path): N streams of max_tokens tokens run concurrently to
their end (each from its own address; the stream id comes from the `x-stream-id` header), then, after
`--replay-settle` seconds, each is fetched once more, one after another, with `GET /stream/{id}` and
`Last-Event-ID: <id>-<--replay-after>`: the time from opening that connection to its `done` event is the
replay time (`replay_ms`), and replayed events (tokens + done) per replay time give `events_per_s`.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import resource
import signal
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from typing import Any, cast

import uvloop

# Byte markers per protocol: tokens, tokens with empty text (subtracted), the end event, an error event.
# Both the gateway's compact JSON and json.dumps' default spacing (fake_openai) are matched.
SEED_MARKERS = ((b'"type": "token"',), (), (b'"type": "done"',), (b'"type": "error"',))
OPENAI_MARKERS = (
    (b'"delta":{"content":"', b'"delta": {"content": "'),
    (b'"delta":{"content":""', b'"delta": {"content": ""'),
    (b"data: [DONE]",),
    (b'data: {"error"',),
)
HARD_TIMEOUT_FACTOR = 2.0  # a stream still open after 2x its expected duration + 10 s is an error
ERROR_BACKOFF_S = 0.1  # keeps a user from hot-looping on refused connections
LAG_PROBE_S = 0.01


@dataclass(slots=True)
class Config:
    host: str
    port: int
    path: str
    users: int
    rate: float
    max_tokens: int
    tokens_per_second: float
    hold_seconds: float
    slack_seconds: float
    first_ip: str
    streams_per_client: int
    hold_open: float | None
    ttft_csv: str | None
    replay: int = 0
    replay_after: int = 0
    replay_settle: float = 0.5

    @property
    def openai(self) -> bool:
        return self.path != "/stream"

    @property
    def expected_s(self) -> float:
        return self.max_tokens / self.tokens_per_second if self.tokens_per_second > 0 else 0.0


@dataclass(slots=True)
class Totals:
    """Everything the protocols report into; plain attributes so the per-read path stays cheap."""

    tokens: int = 0
    active: int = 0
    peak_active: int = 0
    streams: int = 0
    ok: int = 0
    tokens_demanded: int = 0
    tokens_in_time: int = 0
    ttft: list[float] = field(default_factory=list)
    ttft_at: list[float] = field(default_factory=list)  # request start, seconds since the run began
    errors: Counter[str] = field(default_factory=Counter)


def build_request(cfg: Config) -> bytes:
    if cfg.openai:
        payload: dict[str, Any] = {
            "model": "gpt-4o-mini",
            "stream": True,
            "max_tokens": cfg.max_tokens,
            "messages": [{"role": "user", "content": "Tell me about streaming gateways."}],
        }
    else:
        payload = {"prompt": "Tell me about streaming gateways.", "max_tokens": cfg.max_tokens}
    body = json.dumps(payload).encode()
    head = (
        f"POST {cfg.path} HTTP/1.1\r\nHost: {cfg.host}:{cfg.port}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class StreamProtocol(asyncio.Protocol):
    """One request, one chunked SSE response; counts marker occurrences across read boundaries."""

    def __init__(self, cfg: Config, totals: Totals, request: bytes, t0: float, done: asyncio.Future[None]) -> None:
        self.totals, self.request, self.t0, self.done = totals, request, t0, done
        self.loop = asyncio.get_running_loop()
        tokens, empty, end, error = OPENAI_MARKERS if cfg.openai else SEED_MARKERS
        self.token_markers, self.empty_markers, self.end_markers, self.error_markers = tokens, empty, end, error
        self.tail_len = max(len(m) for m in (*tokens, *empty, *end, *error)) - 1
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.response_head = b""  # status line and headers, kept for the replay mode's x-stream-id
        self.in_body = False
        self.pending = b""  # an incomplete chunk-size line
        self.chunk_left = 0
        self.crlf_left = 0
        self.tail = b""  # last bytes of payload, so markers split across reads are still found
        self.tokens = 0
        self.in_time: int | None = None
        self.saw_end = False
        self.saw_error = False
        self.outcome: str | None = None
        self.ttft: float | None = None
        self.t_end: float | None = None  # when the end marker (done / [DONE]) arrived

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's TCPTransport does not subclass it
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.done.done():  # e.g. the CRLF after the last chunk, or bytes after a failed status
            return
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.head[:end], self.head[end + 4 :]
            self.head, self.response_head = b"", head
            self.in_body = True
            status = head[9:12]
            if status != b"200":
                self.finish(f"status {status.decode(errors='replace')}")
                return
            if b"chunked" not in head.lower():
                self.finish("not chunked")
                return
        self.feed_chunked(data)

    def feed_chunked(self, data: bytes) -> None:
        if self.pending:
            data, self.pending = self.pending + data, b""
        pos, n = 0, len(data)
        while pos < n:
            if self.chunk_left:
                take = min(self.chunk_left, n - pos)
                self.payload(data[pos : pos + take])
                pos += take
                self.chunk_left -= take
                if not self.chunk_left:
                    self.crlf_left = 2
            elif self.crlf_left:
                skip = min(self.crlf_left, n - pos)
                pos += skip
                self.crlf_left -= skip
            else:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    self.pending = data[pos:]
                    return
                try:
                    size = int(data[pos:eol].split(b";", 1)[0], 16)
                except ValueError:
                    self.finish("bad chunked framing")
                    return
                pos = eol + 2
                if size == 0:  # last chunk; trailers (none here) would follow
                    self.finish(
                        None
                        if self.saw_end and not self.saw_error
                        else ("error event" if self.saw_error else "no done event")
                    )
                    return
                self.chunk_left = size

    def payload(self, segment: bytes) -> None:
        old = len(self.tail)
        buf = self.tail + segment
        self.tail = buf[-self.tail_len :]
        # An occurrence starting before old - len(marker) + 1 lies wholly in the old tail: already counted.
        new = 0
        for m in self.token_markers:
            new += buf.count(m, max(0, old - len(m) + 1))
        for m in self.empty_markers:
            new -= buf.count(m, max(0, old - len(m) + 1))
        if new:
            if not self.tokens:
                self.ttft = perf_counter() - self.t0
            self.tokens += new
            self.totals.tokens += new
        if not self.saw_end:
            self.saw_end = any(buf.find(m, max(0, old - len(m) + 1)) >= 0 for m in self.end_markers)
            if self.saw_end:
                self.t_end = perf_counter()
        if not self.saw_error:
            self.saw_error = any(buf.find(m, max(0, old - len(m) + 1)) >= 0 for m in self.error_markers)

    def connection_lost(self, exc: Exception | None) -> None:
        self.finish("reset" if self.in_body or self.head else "closed before response")

    def mark_in_time(self) -> None:
        if self.in_time is None:
            self.in_time = self.tokens

    def finish(self, outcome: str | None) -> None:
        if self.done.done():
            return
        self.outcome = outcome
        self.mark_in_time()
        if self.transport is not None:
            self.transport.close()
        self.done.set_result(None)


class LoadGen:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.totals = Totals()
        self.request = build_request(cfg)
        self.loop = asyncio.get_running_loop()
        base = int(ipaddress.IPv4Address(cfg.first_ip))
        self.addresses = [
            str(ipaddress.IPv4Address(base + i // cfg.streams_per_client)) for i in range(max(cfg.users, cfg.replay))
        ]
        self.ramp_s = cfg.users / cfg.rate
        self.open_streams: set[StreamProtocol] = set()
        self.t_begin = perf_counter()

    async def one_stream(
        self, address: str, *, deadline_s: float | None, hard_s: float | None, request: bytes | None = None
    ) -> StreamProtocol:
        cfg, totals, loop = self.cfg, self.totals, self.loop
        done: asyncio.Future[None] = loop.create_future()
        t0 = loop.time()
        # uvloop's loop.time() is libuv's cached millisecond clock: too coarse for TTFT.
        proto = StreamProtocol(cfg, totals, request or self.request, perf_counter(), done)
        totals.streams += 1
        totals.active += 1
        totals.peak_active = max(totals.peak_active, totals.active)
        timers = []
        if deadline_s is not None:
            timers.append(loop.call_at(t0 + deadline_s, proto.mark_in_time))
        if hard_s is not None:
            timers.append(loop.call_at(t0 + hard_s, proto.finish, "timeout"))
        self.open_streams.add(proto)
        try:
            await loop.create_connection(lambda: proto, cfg.host, cfg.port, local_addr=(address, 0))
            await done
        except OSError as exc:
            proto.finish(f"connect {type(exc).__name__}")
        finally:
            for timer in timers:
                timer.cancel()
            self.open_streams.discard(proto)
            totals.active -= 1
        totals.tokens_demanded += cfg.max_tokens
        totals.tokens_in_time += proto.in_time or 0
        if proto.ttft is not None:
            totals.ttft.append(proto.ttft)
            totals.ttft_at.append(proto.t0 - self.t_begin)
        if proto.outcome is None:
            totals.ok += 1
        else:
            totals.errors[proto.outcome] += 1
        return proto

    async def cycling_user(self, index: int, start_at: float, stop_at: float) -> None:
        await asyncio.sleep(max(0.0, start_at - self.loop.time()))
        deadline = self.cfg.expected_s + self.cfg.slack_seconds
        hard = HARD_TIMEOUT_FACTOR * self.cfg.expected_s + 10.0
        while self.loop.time() < stop_at:
            proto = await self.one_stream(self.addresses[index], deadline_s=deadline, hard_s=hard)
            if proto.outcome is not None and proto.outcome.startswith(("connect", "closed")):
                await asyncio.sleep(ERROR_BACKOFF_S)

    async def watch_lag(self, lags: list[float]) -> None:
        """Our own loop's lateness: if we stall, every TTFT in flight grows and the server gets the blame."""
        while True:
            t = perf_counter()
            await asyncio.sleep(LAG_PROBE_S)
            lags.append(perf_counter() - t - LAG_PROBE_S)

    async def run(self) -> dict[str, Any]:
        cfg, loop = self.cfg, self.loop
        lags: list[float] = []
        watcher = loop.create_task(self.watch_lag(lags))
        t_start = loop.time() + 0.05
        self.t_begin = perf_counter() + 0.05
        ramp_end = t_start + self.ramp_s
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        if cfg.replay:
            result = await self.run_replay()
        elif cfg.hold_open is not None:
            result = await self.run_hold_open(t_start)
        else:
            stop_at = ramp_end + cfg.hold_seconds
            marks: dict[str, int] = {}

            def at_ramp_end() -> None:
                marks["ramp_end"] = self.totals.tokens
                emit({"event": "ramp_end"})

            def on_mark() -> None:  # SIGUSR1: the counts now, for a window timed by whoever sends them
                emit({"event": "mark", **self.counts(), "steady": ramp_end <= loop.time() < stop_at})

            loop.call_at(ramp_end, at_ramp_end)
            loop.call_at(stop_at, lambda: marks.__setitem__("stop", self.totals.tokens))
            loop.add_signal_handler(signal.SIGUSR1, on_mark)
            await asyncio.gather(*(self.cycling_user(i, t_start + i / cfg.rate, stop_at) for i in range(cfg.users)))
            loop.remove_signal_handler(signal.SIGUSR1)
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # a late mark must not kill us (the default action)
            steady = None  # tokens/s over the hold window, when every user is active
            if cfg.hold_seconds > 0:
                steady = (marks.get("stop", self.totals.tokens) - marks.get("ramp_end", 0)) / cfg.hold_seconds
            result = {"steady_tokens_per_s": steady, "hold_seconds": cfg.hold_seconds}
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        watcher.cancel()
        t = self.totals
        result.update(
            users=cfg.users,
            rate=cfg.rate,
            max_tokens=cfg.max_tokens,
            path=cfg.path,
            streams=t.streams,
            ok=t.ok,
            errors=dict(t.errors),
            error_count=sum(t.errors.values()),
            ttft_ms=percentiles(t.ttft),
            tokens_total=t.tokens,
            tokens_demanded=t.tokens_demanded,
            tokens_in_time=t.tokens_in_time,
            peak_active=t.peak_active,
            duration_s=loop.time() - t_start,
            loadgen_cpu_s=(cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
            loadgen_lag_ms=percentiles(lags),
        )
        if cfg.ttft_csv:
            rows = "".join(f"{at:.4f},{v * 1000:.2f}\n" for at, v in zip(t.ttft_at, t.ttft, strict=True))
            await asyncio.to_thread(Path(cfg.ttft_csv).write_text, "start_s,ttft_ms\n" + rows)  # off the loop
        return result

    def counts(self) -> dict[str, Any]:
        """Tokens received, errors and our own CPU so far: two marks' difference is what a window saw."""
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "tokens": self.totals.tokens,
            "errors": sum(self.totals.errors.values()),
            "cpu_s": usage.ru_utime + usage.ru_stime,
        }

    async def run_hold_open(self, t_start: float) -> dict[str, Any]:
        """Open one long stream per user, report once all deliver tokens, hold, then close them all."""
        cfg, loop = self.cfg, self.loop
        assert cfg.hold_open is not None
        tasks = [loop.create_task(self._delayed_stream(i, t_start + i / cfg.rate)) for i in range(cfg.users)]
        give_up = loop.time() + self.ramp_s + 30.0
        while loop.time() < give_up:
            opened = sum(1 for p in self.open_streams if p.tokens)
            failed = sum(self.totals.errors.values())
            if opened + failed >= cfg.users:
                break
            await asyncio.sleep(0.05)
        opened = sum(1 for p in self.open_streams if p.tokens)
        emit({"event": "all_open", "open": opened, "errors": sum(self.totals.errors.values())})
        await asyncio.sleep(cfg.hold_open)
        open_at_end = sum(1 for p in self.open_streams if p.tokens)
        for proto in list(self.open_streams):
            proto.finish("closed by loadgen")
        await asyncio.gather(*tasks)
        self.totals.errors.pop("closed by loadgen", None)
        return {"open_at_all_open": opened, "open_at_end": open_at_end}

    async def run_replay(self) -> dict[str, Any]:
        """Produce `replay` streams concurrently, let them end, then replay each once, sequentially."""
        cfg = self.cfg
        hard = HARD_TIMEOUT_FACTOR * cfg.expected_s + 10.0
        produced = await asyncio.gather(
            *(self.one_stream(self.addresses[i], deadline_s=None, hard_s=hard) for i in range(cfg.replay))
        )
        ids = [stream_id_of(p.response_head) for p in produced if p.outcome is None]
        await asyncio.sleep(cfg.replay_settle)
        times: list[float] = []
        events: list[int] = []
        replay_errors: Counter[str] = Counter()
        for stream_id in ids:
            if stream_id is None:
                replay_errors["no x-stream-id header"] += 1
                continue
            request = build_replay_request(cfg, stream_id)
            proto = await self.one_stream(self.addresses[0], deadline_s=None, hard_s=hard, request=request)
            if proto.outcome is not None or proto.t_end is None:
                replay_errors[f"replay {proto.outcome or 'no done event'}"] += 1
                continue
            times.append(proto.t_end - proto.t0)
            events.append(proto.tokens + 1)  # the tokens, then done
        self.totals.errors.update(replay_errors)
        median_events = sorted(events)[len(events) // 2] if events else 0
        replay_ms = percentiles(times)
        p50 = replay_ms["p50"]
        return {
            "produced": len(ids),
            "replays": len(times),
            "replay_ms": replay_ms,
            "events_per_replay": median_events,
            "replay_after": cfg.replay_after,
            "events_per_s": median_events / (p50 / 1000) if p50 else None,
        }

    async def _delayed_stream(self, index: int, start_at: float) -> None:
        await asyncio.sleep(max(0.0, start_at - self.loop.time()))
        await self.one_stream(self.addresses[index], deadline_s=None, hard_s=None)


def build_replay_request(cfg: Config, stream_id: str) -> bytes:
    return (
        f"GET /stream/{stream_id} HTTP/1.1\r\nHost: {cfg.host}:{cfg.port}\r\nAccept: text/event-stream\r\n"
        f"Last-Event-ID: {stream_id}-{cfg.replay_after}\r\nConnection: close\r\n\r\n"
    ).encode()


def stream_id_of(head: bytes) -> str | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"x-stream-id":
            return value.strip().decode()
    return None


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    ordered = sorted(values)

    def rank(q: float) -> float:  # nearest-rank percentile, in milliseconds
        return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.999999) - 1))] * 1000

    return {"p50": rank(0.50), "p90": rank(0.90), "p99": rank(0.99), "max": ordered[-1] * 1000}


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def raise_nofile_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/stream", help="/stream (seed SSE) or /v1/chat/completions (OpenAI)")
    p.add_argument("--users", type=int, required=True, help="concurrent virtual users (streams in flight)")
    p.add_argument("--rate", type=float, default=200.0, help="users started per second during the ramp")
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--tokens-per-second", type=float, default=20.0, help="server pace, for in-time accounting")
    p.add_argument("--hold-seconds", type=float, default=10.0, help="keep cycling this long after the ramp")
    p.add_argument("--slack-seconds", type=float, default=1.0, help="in-time allowance beyond the expected duration")
    p.add_argument("--first-ip", default="127.0.1.1", help="source address of the first client (loopback /8)")
    p.add_argument("--streams-per-client", type=int, default=1, help="users sharing one source address")
    p.add_argument("--ttft-csv", default=None, help="write start_s,ttft_ms per stream here (to see stalls in time)")
    p.add_argument(
        "--hold-open",
        type=float,
        default=None,
        help="open one stream per user, report all_open, keep them open this long, then close",
    )
    p.add_argument(
        "--replay",
        type=int,
        default=0,
        help="replay mode: produce this many streams, then time GET /stream/{id} for each",
    )
    p.add_argument("--replay-after", type=int, default=0, help="replay mode: the seq sent as Last-Event-ID")
    p.add_argument(
        "--replay-settle",
        type=float,
        default=0.5,
        help="replay mode: wait this long after the streams ended (the store flushes periodically)",
    )
    a = p.parse_args(argv)
    return Config(
        host=a.host,
        port=a.port,
        path=a.path,
        users=a.users,
        rate=a.rate,
        max_tokens=a.max_tokens,
        tokens_per_second=a.tokens_per_second,
        hold_seconds=a.hold_seconds,
        slack_seconds=a.slack_seconds,
        first_ip=a.first_ip,
        streams_per_client=a.streams_per_client,
        hold_open=a.hold_open,
        ttft_csv=a.ttft_csv,
        replay=a.replay,
        replay_after=a.replay_after,
        replay_settle=a.replay_settle,
    )


async def _main(cfg: Config) -> None:
    emit({"event": "result", **await LoadGen(cfg).run()})


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    raise_nofile_limit()
    uvloop.run(_main(cfg))


if __name__ == "__main__":
    main()
