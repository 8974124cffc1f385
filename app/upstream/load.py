"""Endpoint load as the model servers report it (UPSTREAM_LOAD_METRICS=vllm): what the fleet's pick prefers.

vLLM's `GET /metrics` (Prometheus text) reports each server's queue and KV cache. `parse_vllm` reads the gauges
the Inference Extension's endpoint picker reads: `vllm:num_requests_running`, `vllm:num_requests_waiting` (each
summed over label sets: a server may report per model) and the KV-cache usage, a fraction of 1, under its old name
`vllm:gpu_cache_usage_perc` or its current one `vllm:kv_cache_usage_perc` (the highest of what is reported: one
cache, however it is labelled).

The score of an endpoint, in running streams (lower is better):

    score = running + WAITING_WEIGHT * waiting + KV_WEIGHT * kv_cache_usage + started

- a waiting request weighs most (WAITING_WEIGHT = 4): the server is saturated, a new stream would queue too;
- a full KV cache (KV_WEIGHT = 8) counts like eight more running streams: new sequences will be preempted;
- `started`: the streams this worker started on the endpoint since its last scrape, so a burst between two
  scrapes does not all land on the endpoint that looked idle.

An endpoint whose last scrape failed, or is older than STALE_INTERVALS scrape intervals, is scored by its
streams in flight instance-wide instead (policies/inflight.py: what the fleet balances on without metrics,
in the same unit). The pick takes the lowest score; the endpoints tied on it go to the least-in-flight pick.

The board is per worker (each worker scrapes, scrape.py), a plain dict a pick reads: nothing per token.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from app.policies.clock import MONOTONIC, Clock

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_CACHE_USAGE = ("vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc")
WAITING_WEIGHT = 4.0
KV_WEIGHT = 8.0
STALE_INTERVALS = 3


@dataclass(frozen=True, slots=True)
class Load:
    running: float
    waiting: float
    kv_cache_usage: float

    def score(self) -> float:
        return self.running + WAITING_WEIGHT * self.waiting + KV_WEIGHT * self.kv_cache_usage


def parse_vllm(text: str) -> Load | None:
    """The load in a vLLM metrics page; None if it reports neither queue gauge (not a vLLM server) or is not
    Prometheus text."""
    running = waiting = kv_cache_usage = 0.0
    seen = False
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == RUNNING:
                    running += sample.value
                    seen = True
                elif sample.name == WAITING:
                    waiting += sample.value
                    seen = True
                elif sample.name in KV_CACHE_USAGE:
                    kv_cache_usage = max(kv_cache_usage, sample.value)
    except ValueError:  # the parser's verdict on a page that is not Prometheus text
        return None
    return Load(running, waiting, kv_cache_usage) if seen else None


class LoadBoard:
    """The last load each endpoint reported to this worker, and the streams started on it since."""

    def __init__(self, interval_s: float, *, clock: Clock = MONOTONIC) -> None:
        self._max_age_s = STALE_INTERVALS * interval_s
        self._clock = clock
        self._loads: dict[str, tuple[Load, float]] = {}  # url: (load, when scraped)
        self._started: Counter[str] = Counter()

    def report(self, url: str, load: Load | None) -> None:
        """A scrape's result (None: it failed, so the endpoint falls back to its in-flight count)."""
        if load is None:
            self._loads.pop(url, None)
        else:
            self._loads[url] = (load, self._clock())
        self._started.pop(url, None)  # counted by the server from now on (or by the in-flight table)

    def keep(self, urls: Sequence[str]) -> None:
        """Forget endpoints that left."""
        known = set(urls)
        for url in [url for url in self._loads if url not in known]:
            del self._loads[url]
        for url in [url for url in self._started if url not in known]:
            del self._started[url]

    def started(self, url: str) -> None:
        self._started[url] += 1

    def scores(self, urls: Sequence[str], in_flight: Sequence[int]) -> list[float]:
        """Each endpoint's score (see the module docstring); `in_flight`: their streams in flight instance-wide."""
        now = self._clock()
        scores = []
        for url, count in zip(urls, in_flight, strict=True):
            entry = self._loads.get(url)
            if entry is None or now - entry[1] > self._max_age_s:
                scores.append(float(count))
            else:
                scores.append(entry[0].score() + self._started[url])
        return scores
