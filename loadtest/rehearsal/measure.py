"""What the rehearsal measures: the gateways' and nginx's logs, the rehearsal's own resuming SSE clients,
Prometheus' series over the run and Locust's statistics."""

from __future__ import annotations

import contextlib
import csv
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from app.upstream.mock import mock_tokens
from loadtest.harness.prometheus import Prometheus

TTFT_P95 = "histogram_quantile(0.95, sum by (le) (rate(streaming_ttft_seconds_bucket[10s])))"
ACTIVE = "sum by (instance) (streaming_active_connections)"
UP = "up"


# --- gateway and nginx logs -----------------------------------------------------------------------------------


def drain_cuts(log_path: Path) -> int | None:
    """Streams the drain ended with server_shutdown, summed over the workers' "drain finished" log lines."""
    cuts = []
    for line in log_path.read_text(errors="replace").splitlines():
        if '"drain finished"' in line:
            with contextlib.suppress(ValueError):
                cuts.append(int(json.loads(line).get("cut", 0)))
    return sum(cuts) if cuts else None


def shutdown_ends(log_path: Path) -> Counter[str]:
    """Streams that ended with server_shutdown, by endpoint, from the `stream finished` log lines."""
    ends: Counter[str] = Counter()
    for line in log_path.read_text(errors="replace").splitlines():
        if '"stream finished"' in line and '"shutdown"' in line:
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if entry.get("outcome") == "shutdown":
                    ends[str(entry.get("endpoint"))] += 1
    return ends


def log_messages(paths: Sequence[Path], message: str) -> int:
    """How many JSON log lines of these files have this message (e.g. a claimer's handover pickups)."""
    needle = json.dumps(message)
    return sum(path.read_text(errors="replace").count(f'"message": {needle}') for path in paths if path.exists())


def nginx_access_stats(path: Path) -> dict[str, Any]:
    """From nginx's access log: requests by status, and the ones it sent to more than one instance (a 503 or
    connection error from the first, `proxy_next_upstream`), with what the earlier attempts answered."""
    statuses: Counter[str] = Counter()
    retried: Counter[str] = Counter()
    pattern = re.compile(r'"(?P<request>[^"]*)" (?P<status>\d{3}) .*upstream_status=(?P<upstream>.*?) rt=')
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            match = pattern.search(line)
            if match is None:
                continue
            statuses[match["status"]] += 1
            attempts = [a.strip() for a in re.split(r"[,:]", match["upstream"]) if a.strip()]
            if len(attempts) > 1:
                retried[" → ".join(attempts)] += 1
    return {
        "requests": sum(statuses.values()),
        "by_status": dict(sorted(statuses.items())),
        "retried_on_another_instance": sum(retried.values()),
        "retries": dict(retried),
    }


def continuations(metrics_urls: Sequence[str]) -> dict[str, int]:
    """Streams the gateways continued on another model server after theirs died mid-stream, by result
    (`continued`, `failed`): `streaming_upstream_continuations_total` summed over the instances' /metrics."""
    by_result: Counter[str] = Counter()
    pattern = re.compile(r'^streaming_upstream_continuations_total\{[^}]*result="([^"]+)"[^}]*\} (\S+)$', re.M)
    for url in metrics_urls:
        with contextlib.suppress(httpx.HTTPError):
            for result, value in pattern.findall(httpx.get(url + "/metrics", timeout=5.0).text):
                by_result[result] += int(float(value))
    return dict(by_result)


# --- resuming SSE clients (resume mode) ---------------------------------------------------------------------


@dataclass
class ResumeStats:
    streams: int = 0  # streams opened (each counted once, however many times it was resumed)
    completed: int = 0  # ended with done, every seq once, the whole text
    shutdowns: int = 0  # server_shutdown events seen
    shutdowns_with_resume: int = 0  # the generation was handed over (a cut replay connection carries no id)
    resumed: int = 0  # server_shutdowns after which GET /stream/{id} continued the stream (the rest checked at done)
    failures: Counter[str] = field(default_factory=Counter)  # by reason: not_resumable, gap, text_mismatch, ...
    refused: int = 0
    done_id_skips: int = 0  # completed streams whose `done` did not carry the next event id (n+1)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["failures"] = dict(self.failures)
        return out


class ResumeClients:
    """`clients` threads, each streaming `/stream` through nginx until stopped, resuming after server_shutdown."""

    MAX_HOPS = 6

    def __init__(self, base_url: str, clients: int, max_tokens: int) -> None:
        self.base_url = base_url
        self.max_tokens = max_tokens
        self.stop = threading.Event()
        self.stats = ResumeStats()
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._run, args=(i,), name=f"resume-client-{i}", daemon=True)
            for i in range(clients)
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def finish(self, guard_s: float) -> None:
        """Stop opening streams; the ones open are read to their end (bounded by the guard)."""
        self.stop.set()
        deadline = time.monotonic() + guard_s
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _count(self, **deltas: int) -> None:
        with self.lock:
            for key, value in deltas.items():
                setattr(self.stats, key, getattr(self.stats, key) + value)

    def _fail(self, reason: str) -> None:
        with self.lock:
            self.stats.failures[reason] += 1

    def _run(self, index: int) -> None:
        n = 0
        with httpx.Client(timeout=httpx.Timeout(60.0, connect=5.0)) as client:
            while not self.stop.is_set():
                prompt = f"rehearsal resume client {index} stream {n}"
                n += 1
                try:
                    self._one(client, prompt)
                except httpx.HTTPError as exc:
                    self._fail(f"client:{type(exc).__name__}")
                    time.sleep(0.2)

    @staticmethod
    def _events(response: httpx.Response) -> Iterator[tuple[str | None, dict[str, Any]]]:
        event_id: str | None = None
        data: list[str] = []
        for line in response.iter_lines():
            if line.startswith("id:"):
                event_id = line[3:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip(" "))
            elif not line and data:
                yield event_id, json.loads("\n".join(data))
                event_id, data = None, []

    def _one(self, client: httpx.Client, prompt: str) -> None:
        body = {"prompt": prompt, "max_tokens": self.max_tokens}
        request: tuple[str, str, dict[str, Any]] = ("POST", "/stream", {"json": body})
        seqs: list[int] = []  # of status and token events (0, 1..n)
        text: list[str] = []
        final_seq: int | None = None
        last_id: str | None = None
        counted = False
        shutdowns = 0  # of this stream: each one resumed, once the stream reached done with the whole text
        for _hop in range(self.MAX_HOPS):
            method, path, kwargs = request
            with client.stream(method, self.base_url + path, **kwargs) as response:
                if response.status_code in (429, 503) and not counted:
                    response.read()
                    self._count(refused=1)
                    time.sleep(0.5)
                    return
                if response.status_code != 200:
                    response.read()
                    self._fail(f"http_{response.status_code}:{'resume' if counted else 'open'}")
                    return
                if not counted:
                    self._count(streams=1)
                    counted = True
                stream_id = response.headers.get("x-stream-id", "")
                terminal: dict[str, Any] | None = None
                for event_id, event in self._events(response):
                    last_id = event_id or last_id
                    seq = int(event_id.rsplit("-", 1)[1]) if event_id else None
                    if event.get("type") in ("done", "error", "server_shutdown"):
                        terminal, final_seq = event, seq
                        break
                    if seq is not None:
                        seqs.append(seq)
                    if event.get("type") == "token":
                        text.append(str(event.get("content", "")))
            if terminal is None:
                self._fail("ended_silently")
                return
            if terminal["type"] == "server_shutdown":
                self._count(shutdowns=1)
                shutdowns += 1
                resume_id = terminal.get("resume")
                if resume_id:
                    self._count(shutdowns_with_resume=1)
                elif method == "GET" and last_id:
                    # a resumed connection (a replay) cut by a drain: the generation runs on elsewhere, so the
                    # client resumes again from the last event it got, as EventSource would
                    resume_id = last_id
                else:
                    self._fail("server_shutdown_without_resume_id")
                    return
                request = ("GET", f"/stream/{stream_id}", {"headers": {"Last-Event-ID": str(resume_id)}})
                continue
            if terminal["type"] == "error":
                self._fail(f"error:{terminal.get('code')}")
                return
            break
        else:
            self._fail("too_many_hops")
            return
        if seqs != list(range(len(seqs))):
            self._fail("gap_or_duplicate")
        elif "".join(text) != "".join(mock_tokens(prompt, 0, self.max_tokens)):
            self._fail("text_mismatch")
        elif terminal.get("tokens") != self.max_tokens:
            self._fail("done_tokens")
        else:
            self._count(completed=1, resumed=shutdowns)
            if final_seq != len(seqs):  # `done` should be the next id (n+1); noted, not a resumption failure
                self._count(done_id_skips=1)


# --- Prometheus data --------------------------------------------------------------------------------------------


def query_series(prometheus: Prometheus, start: float, end: float) -> dict[str, Any]:
    """Range queries over the run (1 s steps): active connections per instance, TTFT p95."""

    def points(expr: str) -> list[dict[str, Any]]:
        data = prometheus.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step="1s")
        return [
            {"labels": item["metric"], "values": [[float(t), float(v)] for t, v in item["values"]]}
            for item in data["result"]
        ]

    return {
        "active_connections": points(ACTIVE),
        "ttft_p95": points(TTFT_P95),
        "up": points(UP),
        "queries": {"active_connections": ACTIVE, "ttft_p95": TTFT_P95, "up": UP},
    }


def locust_stats(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    keep = ("Type", "Name", "Request Count", "Failure Count", "Median Response Time", "95%", "99%", "Max Response Time")
    with path.open() as f:
        return [{k: row.get(k, "") for k in keep} for row in csv.DictReader(f)]
