"""The gateway's one settings class: every knob is a plain environment variable with a documented default."""

from __future__ import annotations

from typing import Literal, Self, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """All configuration, read from the environment (names are the field names, upper-cased)."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore", frozen=True)

    # --- server -----------------------------------------------------------------------------------
    host: str = Field("0.0.0.0", description="Address gunicorn binds to.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port gunicorn binds to.")
    web_concurrency: int = Field(2, ge=1, le=64, description="Number of gunicorn worker processes (uvicorn workers).")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    log_format: Literal["json", "text"] = Field("json", description="Log line format: one JSON object, or plain text.")
    keepalive_seconds: int = Field(
        75,
        gt=0,
        description="Idle HTTP keep-alive timeout, also for a new socket that sends nothing; keep it above the load "
        "balancer's idle timeout.",
    )
    metrics_port: int = Field(
        9464,
        ge=1,
        le=65535,
        description="TCP port that serves /metrics (and nothing else); the public PORT does not serve it.",
    )
    docs_enabled: bool = Field(False, description="Serve /docs, /redoc and /openapi.json (off: 404).")

    # --- upstream ---------------------------------------------------------------------------------
    upstream_url: str | None = Field(
        None,
        description="Base URL of an OpenAI-compatible server (e.g. http://127.0.0.1:9000/v1), or several, "
        "comma-separated (a fleet: each new stream goes to the one with the fewest streams in flight). With "
        "UPSTREAM_DISCOVERY=dns or kubernetes: one URL, whose scheme and path (and, for dns, host and port) every "
        "discovered endpoint shares. Unset: built-in mock.",
    )
    upstream_discovery: Literal["static", "dns", "kubernetes"] = Field(
        "static",
        description="How the model servers are found: `static` (UPSTREAM_URL's URLs), `dns` (every address of "
        "UPSTREAM_URL's host, e.g. a headless Service, re-resolved every UPSTREAM_DNS_REFRESH_SECONDS), "
        "`kubernetes` (a watch on the EndpointSlices of UPSTREAM_K8S_SERVICE).",
    )
    upstream_dns_refresh_seconds: float = Field(
        5.0, gt=0, description="UPSTREAM_DISCOVERY=dns: how often the host is resolved again."
    )
    upstream_dns_nameserver: str | None = Field(
        None,
        description="UPSTREAM_DISCOVERY=dns: the DNS server asked (`host` or `host:port`); unset: /etc/resolv.conf's.",
    )
    upstream_k8s_service: str | None = Field(
        None,
        description="UPSTREAM_DISCOVERY=kubernetes: the Service whose EndpointSlices are watched, `namespace/name`.",
    )
    upstream_api_key: SecretStr | None = Field(None, description="Bearer token sent to the upstream, if any.")
    upstream_balance: Literal["least_in_flight", "round_robin"] = Field(
        "least_in_flight",
        description="A fleet: how a new stream picks its endpoint. `least_in_flight`: the fewest streams in flight, "
        "counted for the whole instance. `round_robin`: each worker takes the endpoints in turn, whatever their "
        "load, as a naive router does: a baseline for the benchmark, not a recommendation.",
    )
    upstream_load_metrics: Literal["none", "vllm"] = Field(
        "none",
        description="A fleet: `vllm`: every worker scrapes each endpoint's `GET /metrics` (vLLM's queue and KV-cache "
        "gauges) every UPSTREAM_LOAD_METRICS_INTERVAL_SECONDS, and a new stream prefers the endpoint with the lowest "
        "reported load (least in flight breaks ties, and stands in for an endpoint whose scrape failed or is older "
        "than 3 intervals). `none`: least in flight only.",
    )
    upstream_load_metrics_interval_seconds: float = Field(
        2.0,
        gt=0,
        description="How often each worker scrapes each endpoint's load (UPSTREAM_LOAD_METRICS=vllm); also the "
        "scrape's budget.",
    )
    upstream_affinity_header: str | None = Field(
        None,
        description="A fleet: the request header whose value names a session (e.g. `x-session-id`). A session's "
        "streams prefer the endpoint they used before, so the model server's prefix cache keeps hitting, while that "
        "endpoint's load stays within UPSTREAM_AFFINITY_LOAD_FACTOR of the mean. Unset: no header.",
    )
    upstream_affinity_user: bool = Field(
        False,
        description="A fleet: on /v1, OpenAI's `user` field names the session when no header does (it is still "
        "not forwarded).",
    )
    upstream_affinity_load_factor: float = Field(
        1.25,
        ge=1.0,
        description="A fleet: a session keeps its endpoint while that endpoint's streams in flight, the new one "
        "counted, stay within this multiple of the mean (consistent hashing with bounded loads).",
    )
    upstream_model: str | None = Field(
        None, description="Model name sent upstream; unset: the client's model is passed through."
    )
    upstream_continuation: Literal["none", "vllm"] = Field(
        "none",
        description="Can the upstream continue a partial answer (vLLM's continue_final_message)? `vllm`: a handed-over"
        " stream, and a stream whose model server died mid-stream, continue through another model server.",
    )
    upstream_continuation_max_attempts: int = Field(
        2,
        ge=0,
        description="UPSTREAM_CONTINUATION=vllm: continuations a stream may try after its model server died"
        " mid-stream (each open counts, also one that finds no server); 0: such a stream ends with an error.",
    )
    upstream_connect_timeout_seconds: float = Field(10.0, gt=0, description="Upstream TCP/TLS connect timeout.")
    upstream_max_connections: int | None = Field(
        None,
        ge=1,
        description="Upstream connection pool size per worker; unset: sized for MAX_CONNECTIONS (not a library's "
        "default such as 100).",
    )
    upstream_keepalive_seconds: float = Field(
        4.0,
        gt=0,
        description="How long an idle upstream connection is kept for reuse; keep it below the upstream's own "
        "keep-alive timeout (uvicorn: 5 s), or a request can meet a connection the server is closing.",
    )
    mock_tokens_per_second: float = Field(
        50.0, ge=0, description="Built-in mock: token pace after the first token (0 = as fast as possible)."
    )
    mock_first_token_ms: float = Field(50.0, ge=0, description="Built-in mock: delay before the first token.")
    models: str = Field(
        "gpt-4o-mini,gpt-4o",
        description="Comma-separated model names clients may ask for (others: 404 `model_not_found` on /v1, 422 on "
        "/stream and /ws), listed by /v1/models, and the metric label values. Empty: any model, every one "
        "labelled `other`.",
    )
    upstream_extra_fields: str = Field(
        "",
        description="Comma-separated request fields beyond OpenAI's that /v1 passes to the upstream (e.g. vLLM's "
        "`top_k,min_p,repetition_penalty`); any other unknown field gets 400 `unknown_parameter`.",
    )
    image_input_enabled: bool = Field(
        False,
        description="Accept `image_url` content parts on /v1 (https: URLs to public hosts, or data:image/ URLs) and "
        "forward them; off: 400 `content_not_allowed`.",
    )

    # --- requests ---------------------------------------------------------------------------------
    max_body_bytes: int = Field(
        1_048_576,
        ge=1024,
        description="Largest accepted request body or WebSocket message; larger gets 413 (WebSocket: close 1009).",
    )
    request_read_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="The request head and body (WebSocket: the first message) must arrive within this, counted "
        "from the first byte (WebSocket: the upgrade); later gets 408 and close (WebSocket: close 1008).",
    )
    max_request_head_bytes: int = Field(
        65_536, ge=1024, description="Largest request head (request line and headers); larger gets 431 and close."
    )
    max_request_headers: int = Field(100, ge=8, description="Most header fields in a request; more gets 431.")
    max_prompt_chars: int = Field(
        200_000,
        ge=1,
        description=(
            "Longest accepted prompt (all messages, plus tool schemas and response formats as JSON), in characters."
        ),
    )
    max_tokens_limit: int = Field(32_768, ge=1, description="Largest max_tokens a client may ask for; larger gets 422.")
    default_max_tokens: int = Field(512, ge=1, description="max_tokens when the client sends none.")

    # --- admission --------------------------------------------------------------------------------
    api_keys: SecretStr | None = Field(
        None,
        description="Comma-separated client API keys; set: every stream and /v1/models needs one, in "
        "`Authorization: Bearer` or `X-API-Key` (/ws also: subprotocol `bearer.<key>` or `?api_key=`); 401 none "
        "or in the URL, 403 wrong.",
    )
    trusted_proxies: str = Field(
        "", description="Comma-separated CIDRs whose FORWARDED_HEADER is believed (empty: none)."
    )
    forwarded_header: Literal["x-forwarded-for", "forwarded"] = Field(
        "x-forwarded-for",
        description="The one header a trusted proxy sets with the client address (the other is ignored); a value "
        "that is not an IP address falls back to the peer.",
    )
    allowed_origins: str = Field(
        "",
        description="Comma-separated browser origins (`https://app.example.com`) allowed to open /ws, or `*`; "
        "a request with any other Origin gets 403. Empty: no browser origin (clients without Origin are unaffected).",
    )
    rate_limit_per_minute: float = Field(
        20.0, ge=0, description="Token-bucket refill per client, requests per minute (0 disables rate limiting)."
    )
    rate_limit_burst: int = Field(5, ge=1, description="Token-bucket capacity per client: requests in a burst.")
    max_connections: int = Field(500, ge=1, description="Concurrent streams the instance carries (all workers).")
    max_connections_per_client: int = Field(10, ge=1, description="Concurrent streams per client (all workers).")
    max_stream_age_seconds: float = Field(
        300.0,
        gt=0,
        description="With REDIS_URL: lifetime of a stream's per-client slot lease in Redis, so the slots of an "
        "instance that died are reclaimed after it (on one instance, a slot is freed by its stream's end or its "
        "worker's exit).",
    )
    redis_url: str | None = Field(
        None,
        description="redis:// URL: rate limits and per-client slots hold across replicas. Unreachable: local limits.",
    )
    redis_timeout_seconds: float = Field(0.25, gt=0, description="Redis connect/read timeout (admission waits this).")

    # --- upstream protection ----------------------------------------------------------------------
    circuit_failure_threshold: int = Field(5, ge=1, description="Upstream failures within the window that open it.")
    circuit_window_seconds: float = Field(60.0, gt=0, description="Sliding window for counting upstream failures.")
    circuit_open_seconds: float = Field(30.0, gt=0, description="How long the circuit stays open before one probe.")
    circuit_success_threshold: int = Field(2, ge=1, description="Probe successes in a row that close the circuit.")
    circuit_max_failures_per_client: int = Field(
        2,
        ge=1,
        description="Failures a request's content can cause (upstream 5xx, an error or garbage it sent) that count per "
        "client identity per window; refused connections, resets and first-token timeouts always count in full.",
    )
    ready_requires_closed_circuit: bool = Field(
        False,
        description="/ready fails while the circuit is open (take the pod out instead of answering 503s). A fleet's "
        "circuit is open when every endpoint that accepts new streams is.",
    )
    upstream_probe_interval_seconds: float = Field(
        0.0,
        ge=0,
        description="A fleet: every worker GETs each endpoint's UPSTREAM_PROBE_PATH this often; a failing probe "
        "ejects the endpoint (its circuit opens), a passing one lets an ejected endpoint back (half-open). 0: off "
        "(an ejected endpoint comes back through its circuit's half-open probe after CIRCUIT_OPEN_SECONDS).",
    )
    upstream_probe_path: str = Field(
        "/health",
        pattern=r"^/",
        description="The active probe's path, from the endpoint's root (vLLM serves `GET /health`); 2xx passes.",
    )
    upstream_probe_timeout_seconds: float = Field(
        2.0,
        gt=0,
        description="The active probe's budget (connect and answer; at most UPSTREAM_PROBE_INTERVAL_SECONDS); no "
        "answer in time fails it.",
    )
    upstream_endpoint_labels_max: int = Field(
        20,
        ge=1,
        description="A fleet: endpoints named in the per-endpoint metrics' `upstream_endpoint` label (the first by "
        "`host:port`); the others are summed as `other`.",
    )
    upstream_retries: int = Field(
        2, ge=0, description="Retries before the first token (connect errors, 429, 5xx only; never after a token)."
    )
    retry_base_seconds: float = Field(1.0, gt=0, description="Retry backoff base (full jitter: uniform(0, base*2^n)).")
    retry_max_seconds: float = Field(10.0, gt=0, description="Retry backoff cap (an upstream Retry-After is honoured).")

    # --- deadlines -----------------------------------------------------------------------------
    first_token_timeout_seconds: float = Field(30.0, gt=0, description="Deadline from request to the first token.")
    inter_token_timeout_seconds: float = Field(
        15.0, gt=0, description="Longest silence between two upstream tokens (a stalled upstream trips it)."
    )
    total_timeout_seconds: float = Field(120.0, gt=0, description="Deadline for a whole stream.")
    slow_client_timeout_seconds: float = Field(
        5.0, gt=0, description="A client that accepts no bytes for this long is cut (code backpressure)."
    )
    deadline_check_interval_seconds: float = Field(
        0.25, gt=0, le=5, description="How often each worker checks stream deadlines and pings (their resolution)."
    )

    # --- lifecycle -----------------------------------------------------------------------------
    drain_timeout_seconds: float = Field(
        30.0, ge=0, description="On SIGTERM, how long streams in flight may run on before they get server_shutdown."
    )
    drain_close_grace_seconds: float = Field(
        5.0, gt=0, description="After the drain deadline, how long cut streams get to write their final event."
    )
    drain_metrics_linger_seconds: float = Field(
        0.0,
        ge=0,
        description="After a drain that cut streams, keep serving /metrics this long before exiting, so a scrape "
        "sees streaming_drain_cut_streams_total (set it to the scrape interval; 0: exit at once).",
    )

    # --- resumable streams -----------------------------------------------------------------------
    resume_enabled: bool = Field(
        True, description="Keep /stream and /ws events so a client can resume with Last-Event-ID."
    )
    resume_store: Literal["local", "redis"] = Field(
        "local",
        description="Where events are kept: `local` (this instance's RESUME_DIR) or `redis` (any replica; REDIS_URL).",
    )
    resume_dir: str | None = Field(
        None,
        description="Directory for the local store, shared by the workers; it must be a directory (not a symlink) "
        "owned by the gateway's user, or start-up stops. Unset: `python -m app` makes a private one (mkdtemp).",
    )
    resume_ttl_seconds: float = Field(300.0, gt=0, description="How long a finished stream can still be replayed.")
    resume_max_events: int = Field(
        20_000, ge=1, description="Events kept per stream; a longer stream stops being resumable."
    )
    resume_flush_interval_seconds: float = Field(
        0.1,
        gt=0,
        description="How often the store is written: streams that are read, orphaned, new or finished, and every held "
        "stream once its RESUME_WRITE_DELAY_SECONDS is up (and how often resumed tails poll it).",
    )
    resume_write_delay_seconds: float = Field(
        1.0,
        ge=0,
        description="How long a stream whose client is connected may keep its events in memory before they are "
        "written to the resume store; streams that a resumed client reads, orphaned ones and finished ones are "
        "written on the next flush. Counted in flush intervals, rounded up: a delay of one flush interval or less "
        "writes every flush, like 0. A worker that crashes loses up to this much of a connected stream's events "
        "from its log. Less than half of RESUME_TTL_SECONDS.",
    )
    orphan_timeout_seconds: float = Field(
        30.0, ge=0, description="A generation whose client left runs on this long for it to return (0: stop at once)."
    )
    max_orphaned_streams: int = Field(
        100,
        ge=0,
        description="Orphaned generations per worker; beyond, a client leaving stops its generation. Also bounds "
        "the handed-over generations a worker claims at once.",
    )
    handover_lease_seconds: float = Field(
        10.0,
        gt=0,
        description="RESUME_STORE=redis: a claimed handed-over stream whose claimer stops renewing for this long "
        "(crash, SIGKILL) is claimed by another instance.",
    )

    # --- relay ------------------------------------------------------------------------------------
    stream_buffer_size: int = Field(
        100, ge=1, description="Per-stream buffer: most upstream events read ahead of the client (one write)."
    )
    memory_budget_bytes: int = Field(
        524_288_000,
        ge=65_536,
        description="Buffered stream data the instance may hold (all workers): bytes relayed streams hold that their "
        "clients have not taken (a write waiting on a client that does not read, the server's socket buffer "
        "behind it, upstream data read ahead for it, unsent non-streamed answers, resume events not yet stored). "
        "At the budget new streams get 503 memory_pressure and the buffers full the longest are cut.",
    )
    sse_ping_interval_seconds: float = Field(
        15.0, gt=0, description="Interval of `: ping` comments on idle SSE streams (keeps proxies from timing out)."
    )

    @model_validator(mode="after")
    def _check_consistency(self) -> Self:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError("DEFAULT_MAX_TOKENS must not exceed MAX_TOKENS_LIMIT")
        if self.total_timeout_seconds > self.max_stream_age_seconds:
            raise ValueError(
                "TOTAL_TIMEOUT_SECONDS must not exceed MAX_STREAM_AGE_SECONDS: a slot lease would expire under a "
                "stream that is still allowed to run"
            )
        if self.resume_enabled and self.resume_store == "redis" and not self.redis_url:
            raise ValueError("RESUME_STORE=redis needs REDIS_URL")
        if self.resume_enabled and self.resume_write_delay_seconds >= self.resume_ttl_seconds / 2:
            raise ValueError(
                "RESUME_WRITE_DELAY_SECONDS must be less than half of RESUME_TTL_SECONDS: a stream's log expires "
                "RESUME_TTL_SECONDS after its last write, and a connected stream's goes unwritten that long"
            )
        if self.metrics_port == self.port:
            raise ValueError("METRICS_PORT must differ from PORT: /metrics is never served on the public port")
        self._check_upstream()
        return self

    def _check_upstream(self) -> None:
        urls = self.upstream_urls
        if self.upstream_url is not None and not urls:
            raise ValueError("UPSTREAM_URL must be an http:// or https:// base URL, e.g. http://127.0.0.1:9000/v1")
        for url in urls:
            if not url.startswith(("http://", "https://")) or not urlsplit(url).hostname:
                raise ValueError("UPSTREAM_URL must be an http:// or https:// base URL, e.g. http://127.0.0.1:9000/v1")
        if len(set(urls)) != len(urls):
            raise ValueError("UPSTREAM_URL names a base URL twice")
        if self.upstream_discovery == "static":
            return
        if len(urls) != 1:
            raise ValueError(f"UPSTREAM_DISCOVERY={self.upstream_discovery} needs UPSTREAM_URL: exactly one base URL")
        if self.upstream_discovery == "kubernetes":
            namespace, _, name = (self.upstream_k8s_service or "").partition("/")
            if not namespace or not name or "/" in name:
                raise ValueError("UPSTREAM_DISCOVERY=kubernetes needs UPSTREAM_K8S_SERVICE as namespace/name")

    @property
    def graceful_timeout_seconds(self) -> int:
        """gunicorn's graceful_timeout: the drain, the metrics linger, the close grace and a margin, so no layer
        kills a stream the drain still waits for (nesting: drain < uvicorn shutdown < gunicorn graceful_timeout)."""
        return int(
            self.drain_timeout_seconds + self.drain_metrics_linger_seconds + 2 * self.drain_close_grace_seconds + 1
        )

    @property
    def model_names(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.models.split(",") if name.strip())

    @property
    def origin_list(self) -> tuple[str, ...]:
        return tuple(origin.strip().rstrip("/").lower() for origin in self.allowed_origins.split(",") if origin.strip())

    @property
    def upstream_extra_field_names(self) -> frozenset[str]:
        return frozenset(name.strip() for name in self.upstream_extra_fields.split(",") if name.strip())

    @property
    def upstream_urls(self) -> tuple[str, ...]:
        """UPSTREAM_URL's base URLs (empty: the built-in mock)."""
        return tuple(url.strip() for url in (self.upstream_url or "").split(",") if url.strip())

    @property
    def upstream_fleet(self) -> bool:
        """More than one model server, or a discovered set: streams are balanced (app/upstream/fleet.py)."""
        return len(self.upstream_urls) > 1 or self.upstream_discovery != "static"

    @property
    def upstream_pool_size(self) -> int:
        return self.upstream_max_connections or self.max_connections


README_MARKERS = ("<!-- settings-table:start -->\n", "<!-- settings-table:end -->")


def settings_table() -> str:
    """The README's configuration table, generated from the model (a test fails on drift)."""
    rows = ["| Variable | Default | Description |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = "unset" if default is None else f"`{default}`"
        description = field.description or ""
        if get_origin(field.annotation) is Literal:
            description += " One of: " + ", ".join(f"`{choice}`" for choice in get_args(field.annotation)) + "."
        rows.append(f"| `{name.upper()}` | {shown} | {description} |")
    return "\n".join(rows)


def update_readme(path: str) -> None:
    with open(path) as f:
        text = f.read()
    start, end = README_MARKERS
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w") as f:
        f.write(f"{head}{start}{settings_table()}\n{end}{tail}")


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--update-readme"]:
        update_readme(sys.argv[2] if len(sys.argv) > 2 else "README.md")
    else:
        print(settings_table())
