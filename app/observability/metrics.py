"""Every Prometheus metric, defined once (names, types, labels and buckets from the seed).

Under gunicorn the entrypoint sets PROMETHEUS_MULTIPROC_DIR before prometheus_client is imported,
so values live in per-process mmap files and `/metrics` aggregates them on each scrape. Gauges
therefore declare how workers combine (`livesum`: only live workers count).
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from app.observability.multiproc import compact_dead_worker

OTHER_MODEL = "other"  # label value for any model not in the MODELS allow-list
# The only endpoint label values: route templates, never raw paths with ids in them.
STREAM_ENDPOINTS = frozenset({"/stream", "/stream/{stream_id}", "/v1/chat/completions", "/ws"})


KNOWN_STATUSES = ("success", "rejected", "error")
KNOWN_REJECTIONS = (
    "draining",
    "rate_limited",
    "connection_limit",
    "client_connection_limit",
    "circuit_open",
    "invalid_request",
    "payload_too_large",
    "unsupported_media_type",
    "missing_api_key",
    "invalid_api_key",
    "not_resumable",
    "invalid_stream_id",
    "api_key_in_url",
    "origin_not_allowed",
    "request_timeout",
    "unknown_parameter",
    "content_not_allowed",
    "model_not_found",
    "memory_pressure",
)
KNOWN_ERRORS = (
    "timeout",
    "backpressure",
    "upstream_error",
    "upstream_rejected",
    "upstream_rate_limited",
    "server_shutdown",
    "orphan_timeout",
    "circuit_open",
    "internal_error",
    "memory_pressure",
)
KNOWN_OUTCOMES = ("done", "error", "timeout", "backpressure", "client_gone", "shutdown", "cancelled")
KNOWN_HANDOVER_RESULTS = ("published", "claimed", "completed", "failed")


def precreate_series(max_connections: int) -> None:
    """Create every bounded label combination at 0, so rate() sees a series' first increment."""
    MAX_CONNECTIONS.set(max_connections)
    CONNECTION_SLOTS_IN_USE.set(0)
    DRAINING.set(0)
    for endpoint in STREAM_ENDPOINTS:
        ACTIVE_CONNECTIONS.labels(endpoint)
        for status in KNOWN_STATUSES:
            CONNECTIONS_TOTAL.labels(endpoint, status)
        for reason in KNOWN_REJECTIONS:
            REJECTIONS_TOTAL.labels(endpoint, reason)
        for code in KNOWN_ERRORS:
            ERRORS_TOTAL.labels(endpoint, code)
        for outcome in KNOWN_OUTCOMES:
            STREAM_OUTCOMES_TOTAL.labels(endpoint, outcome)
    for endpoint in ("/stream/{stream_id}", "/ws"):
        RESUMPTIONS_TOTAL.labels(endpoint)
    for result in KNOWN_HANDOVER_RESULTS:
        HANDOVERS_TOTAL.labels(result)


def count_client_gone(endpoint: str) -> None:
    """A client that left before its request was whole (mid-body): its fault, not the gateway's."""
    if endpoint in STREAM_ENDPOINTS:
        CONNECTIONS_TOTAL.labels(endpoint, "success").inc()  # as for a stream whose client left
        STREAM_OUTCOMES_TOTAL.labels(endpoint, "client_gone").inc()


def count_rejection(endpoint: str, reason: str) -> None:
    """A request refused before its stream started (bad input, draining, limits)."""
    if endpoint in STREAM_ENDPOINTS:
        CONNECTIONS_TOTAL.labels(endpoint, "rejected").inc()
        REJECTIONS_TOTAL.labels(endpoint, reason).inc()


ACTIVE_CONNECTIONS = Gauge(
    "streaming_active_connections", "Streams being relayed right now.", ["route"], multiprocess_mode="livesum"
)
CONNECTIONS_TOTAL = Counter(
    "streaming_connections_total", "Streams by final status (success/rejected/error).", ["route", "status"]
)
TTFT_SECONDS = Histogram(
    "streaming_ttft_seconds",
    "Time from request to first token sent.",
    ["route", "model"],
    # The seed's buckets plus 0.075, 0.3 (the p50 SLO) and 0.75, so quantiles between them are not flat.
    buckets=(0.05, 0.075, 0.1, 0.25, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0),
)
GENERATION_DURATION_SECONDS = Histogram(
    "streaming_generation_duration_seconds",
    "Time from first to last token.",
    ["route", "model"],
    buckets=(1.0, 5.0, 10.0, 30.0, 60.0, 120.0),
)
REQUEST_DURATION_SECONDS = Histogram(
    "streaming_request_duration_seconds",
    "Whole stream duration.",
    ["route"],
    # The seed's buckets stopped at 60 s, below TOTAL_TIMEOUT_SECONDS (120 s): up to MAX_STREAM_AGE_SECONDS'
    # default (300 s), the longest a stream may hold its slot, so every stream lands in a finite bucket.
    buckets=(0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
)
TOKENS_TOTAL = Counter("streaming_tokens_total", "Tokens relayed to clients.", ["route", "model"])
TOKENS_PER_SECOND = Histogram(
    "streaming_tokens_per_second",
    "Per-stream generation speed.",
    ["model"],
    buckets=(5.0, 10.0, 20.0, 50.0, 100.0, 200.0),
)
ERRORS_TOTAL = Counter("streaming_errors_total", "Streams that ended in an error, by type.", ["route", "error_type"])
STREAM_OUTCOMES_TOTAL = Counter(
    "streaming_stream_outcomes_total",
    "Streams by how they ended: done, error, timeout, backpressure, client_gone, shutdown.",
    ["route", "outcome"],
)
REJECTIONS_TOTAL = Counter(
    "streaming_rejections_total",
    "Requests refused before a stream started, by reason (the error code).",
    ["route", "reason"],
)
INTER_TOKEN_SECONDS = Histogram(
    "streaming_inter_token_seconds",
    "Mean gap between tokens, one observation per stream.",
    ["route", "model"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
UPSTREAM_RETRIES_TOTAL = Counter(
    "streaming_upstream_retries_total", "Upstream attempts retried before the first token, by cause.", ["reason"]
)
UPSTREAM_CONTINUATIONS_TOTAL = Counter(
    "streaming_upstream_continuations_total",
    "Continuations after a model server died mid-stream: opened (continued), or failed or cut while opening (failed).",
    ["result"],
)
CIRCUIT_BREAKER_TRANSITIONS_TOTAL = Counter(
    "streaming_circuit_breaker_transitions_total", "Circuit breaker state changes.", ["upstream", "state"]
)
DRAIN_DURATION_SECONDS = Histogram(
    "streaming_drain_duration_seconds",
    "Time from SIGTERM to the worker's last stream ending.",
    buckets=(0.1, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0),
)
DRAIN_CUT_STREAMS_TOTAL = Counter(
    "streaming_drain_cut_streams_total", "Streams still running at the drain deadline, ended with server_shutdown."
)
REDIS_UP = Gauge(
    "streaming_redis_up",
    "1 while limits are shared through Redis, 0 while falling back to local limits.",
    ["store"],
    multiprocess_mode="mostrecent",
)
REDIS_FALLBACKS_TOTAL = Counter(
    "streaming_redis_fallbacks_total", "Times Redis became unreachable and limits fell back to local.", ["store"]
)
DRAINING = Gauge(
    "streaming_draining",
    "1 while the instance drains (set at SIGTERM, so the drain is visible before exit).",
    multiprocess_mode="livemax",
)
MAX_CONNECTIONS = Gauge(
    "streaming_max_connections",
    "MAX_CONNECTIONS: the streams one instance carries (for saturation ratios).",
    multiprocess_mode="max",
)
# Read from the instance's slot table (app/admission.py) by whichever worker answers the scrape, just before
# it renders: the table is shared, so the most recent reading is the instance's, and a dead worker's stale
# reading is always older than the scraping worker's.
CONNECTION_SLOTS_IN_USE = Gauge(
    "streaming_connection_slots_in_use",
    "Connection slots held in the instance's slot table (all workers), read at scrape time; 0 when idle.",
    multiprocess_mode="mostrecent",
)
CIRCUIT_BREAKER_STATE = Gauge(
    "streaming_circuit_breaker_state",
    "Upstream circuit: 0 closed, 1 open, 2 half-open.",
    ["upstream"],
    multiprocess_mode="mostrecent",
)

RESUMPTIONS_TOTAL = Counter(
    "streaming_resumptions_total", "Resumed streams whose replay started (the stream was found).", ["route"]
)
REPLAYED_EVENTS_TOTAL = Counter(
    "streaming_replayed_events_total", "Stored events sent to resuming clients before their live tail."
)
RESUME_STORE_ERRORS_TOTAL = Counter(
    "streaming_resume_store_errors_total", "Failed resume store calls (those streams lose resumption)."
)
# result: published (a draining instance offered a stream), claimed, completed (a claimer finished it), failed.
HANDOVERS_TOTAL = Counter(
    "streaming_handovers_total", "Generations handed over at the drain deadline, by step.", ["result"]
)
ORPHANED_STREAMS = Gauge(
    "streaming_orphaned_streams", "Generations running on after their client left.", multiprocess_mode="livesum"
)
CLAIMED_STREAMS = Gauge(
    "streaming_claimed_streams", "Handed-over generations this instance is finishing.", multiprocess_mode="livesum"
)
BUFFERED_BYTES = Gauge(
    "streaming_buffered_bytes",
    "Buffered stream data clients have not taken yet (what MEMORY_BUDGET_BYTES limits), sampled per watchdog pass.",
    multiprocess_mode="livesum",
)
MEMORY_BUDGET_BYTES = Gauge(
    "streaming_memory_budget_bytes",
    "MEMORY_BUDGET_BYTES: buffered stream data the instance may hold.",
    multiprocess_mode="max",
)


# A fleet's per-endpoint series: read from the instance's shared tables by a collector when scraped
# (app/upstream/endpoint_metrics.py), so each stream and failure counts once whatever the number of
# workers, and an endpoint that left has no series any more. Fresh families per scrape.
def endpoint_active_streams() -> GaugeMetricFamily:
    return GaugeMetricFamily(
        "streaming_upstream_endpoint_active_streams",
        "Streams in flight per upstream endpoint, all workers, read at scrape time.",
        labels=["upstream_endpoint"],
    )


def endpoint_circuit_state() -> GaugeMetricFamily:
    return GaugeMetricFamily(
        "streaming_upstream_endpoint_circuit_state",
        "Upstream endpoint circuit: 0 closed, 1 open, 2 half-open (`other`: open if one is, else half-open if one is).",
        labels=["upstream_endpoint"],
    )


def endpoint_failures() -> CounterMetricFamily:
    return CounterMetricFamily(
        "streaming_upstream_endpoint_failures",
        "Failures recorded against an upstream endpoint, by reason.",
        labels=["upstream_endpoint", "reason"],
    )


def upstream_endpoints() -> GaugeMetricFamily:
    return GaugeMetricFamily(
        "streaming_upstream_endpoints",
        "Upstream endpoints this instance knows, by state: healthy (accepts new streams, circuit not open), "
        "unhealthy (circuit open: ejected), not_ready (discovery: not ready or terminating).",
        labels=["state"],
    )


def render_metrics(*scraped: Collector) -> tuple[bytes, str]:
    """The exposition text for this instance: all workers when in multiprocess mode. `scraped`: collectors
    that read instance-wide state themselves when scraped (once, by whichever worker answers), so their series
    are neither summed across workers nor left behind by a worker or a label that is gone."""
    extra = CollectorRegistry()
    for collector in scraped:
        extra.register(collector)
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()  # fresh per scrape, as the multiprocess docs require
        _multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry) + generate_latest(extra), CONTENT_TYPE_LATEST
    return generate_latest() + generate_latest(extra), CONTENT_TYPE_LATEST


def mark_worker_dead(pid: int) -> None:
    """Gunicorn `child_exit`: drop a dead worker's live gauges so they stop counting, and fold its other
    files into the archives so restarts do not add files every scrape reads (app/observability/multiproc.py)."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        _multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
        compact_dead_worker(directory, pid)
