"""Builds a worker's objects from settings: the upstream chain, the policies, the stores. Nothing else."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING

from opentelemetry.sdk.trace import TracerProvider

from app.admission import Admission, KeyRing, parse_networks
from app.drain import Drain
from app.instance import breaker_config, instance_state
from app.observability.metrics import ORPHANED_STREAMS, REDIS_FALLBACKS_TOTAL, REDIS_UP
from app.policies.breaker import Circuit, CircuitBreaker
from app.policies.breakers import BreakerTable, MemoryBreakerTable
from app.policies.concurrency import ClientSlots
from app.policies.concurrency_redis import RedisClientSlots
from app.policies.failover import ResilientClientSlots, ResilientStorage
from app.policies.inflight import InFlightTable, MemoryInFlightTable
from app.policies.ratelimit import RateLimit, RateLimiter, Storage
from app.policies.ratelimit_redis import RedisStorage
from app.policies.retry import RetryPolicy
from app.resume.claimer import Claimer
from app.resume.handover import HandoverPublisher
from app.resume.local import DirectoryBackend
from app.resume.redis_streams import RedisStreamsBackend
from app.resume.store import Backend, ResumeStore
from app.settings import Settings
from app.state import GatewayState
from app.storage.redis import LazyRedis
from app.streaming.continuation import HandoverContinuation
from app.streaming.memory import MemoryGuard
from app.streaming.recorder import StreamRecorder
from app.streaming.run import Relay
from app.streaming.session import StreamRegistry
from app.upstream.base import READ_AHEAD_BYTES, Upstream
from app.upstream.continuing import ContinuingUpstream
from app.upstream.discovery import Discovery, StaticDiscovery
from app.upstream.endpoint_metrics import EndpointMetrics
from app.upstream.guard import GuardedUpstream
from app.upstream.health import EndpointHealth, FleetCircuit
from app.upstream.load import LoadBoard
from app.upstream.mock import MockUpstream
from app.upstream.traced import TracedUpstream

if TYPE_CHECKING:
    from app.upstream.fleet import FleetUpstream

logger = logging.getLogger("app.lifecycle")  # the logger name operators filter Redis reachability lines by
CLAIM_BLOCK_SECONDS = 1.0  # the claimer's XREADGROUP BLOCK; its Redis client's timeout is this plus REDIS_TIMEOUT


def build_upstream(
    settings: Settings, inflight: InFlightTable | None = None, breakers: BreakerTable | None = None
) -> tuple[Upstream, FleetUpstream | None]:
    """The upstream, and the same object as a fleet when it is one (UPSTREAM_URL lists several, or discovers)."""
    if settings.upstream_url is None:
        mock = MockUpstream(
            tokens_per_second=settings.mock_tokens_per_second, first_token_ms=settings.mock_first_token_ms
        )
        return mock, None
    # imported here: the HTTP client stack (aiohttp) is a third of a worker's start, and the mock needs none of it
    from app.upstream.client import OpenAIUpstream
    from app.upstream.fleet import FleetUpstream

    api_key = settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else None
    client = OpenAIUpstream(
        settings.upstream_urls[0],
        api_key=api_key,
        model_override=settings.upstream_model,
        connect_timeout_s=settings.upstream_connect_timeout_seconds,
        pool_size=settings.upstream_pool_size,
        keepalive_s=settings.upstream_keepalive_seconds,
        continuation=settings.upstream_continuation,
    )
    if not settings.upstream_fleet:
        return client, None
    fleet = FleetUpstream(
        client,
        build_discovery(settings),
        inflight or MemoryInFlightTable(),
        EndpointHealth(breakers or MemoryBreakerTable(), breaker_config(settings)),
        affinity_load_factor=settings.upstream_affinity_load_factor,
        round_robin=settings.upstream_balance == "round_robin",
        load=LoadBoard(settings.upstream_load_metrics_interval_seconds)
        if settings.upstream_load_metrics == "vllm"
        else None,
    )
    return fleet, fleet


def build_discovery(settings: Settings) -> Discovery:
    if settings.upstream_discovery == "kubernetes":
        # imported here: the Kubernetes client is large, and only this mode needs it
        from app.upstream.k8s_discovery import KubernetesDiscovery

        assert settings.upstream_k8s_service is not None  # Settings refuses kubernetes discovery without it
        return KubernetesDiscovery(settings.upstream_urls[0], settings.upstream_k8s_service)
    if settings.upstream_discovery == "dns":
        from app.upstream.dns_discovery import DnsDiscovery  # dnspython: only this mode needs it

        return DnsDiscovery(
            settings.upstream_urls[0],
            refresh_s=settings.upstream_dns_refresh_seconds,
            nameserver=settings.upstream_dns_nameserver,
        )
    return StaticDiscovery(settings.upstream_urls)


def build_state(settings: Settings, *, tracer_provider: TracerProvider | None = None) -> GatewayState:
    shared = instance_state(settings)
    memory = MemoryGuard(
        budget_bytes=settings.memory_budget_bytes,
        table=shared.buffers,
        read_ahead_bytes=0 if settings.upstream_url is None else READ_AHEAD_BYTES,
    )
    registry = StreamRegistry(
        first_token_s=settings.first_token_timeout_seconds,
        inter_token_s=settings.inter_token_timeout_seconds,
        total_s=settings.total_timeout_seconds,
        slow_client_s=settings.slow_client_timeout_seconds,
        ping_interval_s=settings.sse_ping_interval_seconds,
        check_interval_s=settings.deadline_check_interval_seconds,
        orphan_timeout_s=settings.orphan_timeout_seconds if settings.resume_enabled else 0.0,
        max_orphans=settings.max_orphaned_streams,
        memory=memory.enforce,
    )
    upstream, fleet = build_upstream(settings, shared.inflight, shared.breakers)
    if tracer_provider is not None:  # a client span per attempt, inside the guard
        provider_name = "mock" if settings.upstream_url is None else "openai"
        upstream = TracedUpstream(upstream, tracer_provider.get_tracer("app.upstream"), provider_name=provider_name)
    if (
        settings.upstream_url is not None
        and settings.upstream_continuation != "none"
        and settings.upstream_continuation_max_attempts > 0
    ):
        # outside the span: each continuation is an upstream request of its own, with its own client span
        upstream = ContinuingUpstream(upstream, max_attempts=settings.upstream_continuation_max_attempts)
    retries = RetryPolicy(settings.upstream_retries, settings.retry_base_seconds, settings.retry_max_seconds)
    breaker: Circuit
    prober = endpoint_metrics = scraper = None
    if fleet is None:
        breaker = CircuitBreaker(upstream.name, breaker_config(settings), cell=shared.breaker_cell)
        upstream = GuardedUpstream(upstream, breaker, retries)
    else:  # a breaker per endpoint, in the fleet; the guard keeps the retries (and fails over)
        breaker = FleetCircuit(fleet.name, fleet.discovery, fleet.health)
        upstream = GuardedUpstream(upstream, None, retries, failover=fleet)
        endpoint_metrics = EndpointMetrics(
            fleet.discovery, fleet.health, shared.inflight, settings.upstream_endpoint_labels_max
        )
        from app.upstream.probe import Prober
        from app.upstream.scrape import LoadScraper

        if fleet.load is not None:
            scraper = LoadScraper(fleet, fleet.load, interval_s=settings.upstream_load_metrics_interval_seconds)
        if settings.upstream_probe_interval_seconds > 0:
            prober = Prober(
                fleet,
                interval_s=settings.upstream_probe_interval_seconds,
                path=settings.upstream_probe_path,
                timeout_s=settings.upstream_probe_timeout_seconds,
            )
    drain = Drain(
        registry,
        timeout_s=settings.drain_timeout_seconds,
        close_grace_s=settings.drain_close_grace_seconds,
        metrics_linger_s=settings.drain_metrics_linger_seconds,
    )
    rate_storage: Storage = shared.rate_storage
    remote_slots: ClientSlots | None = None
    redis = LazyRedis(settings.redis_url, socket_timeout=settings.redis_timeout_seconds) if settings.redis_url else None
    if redis is not None:
        rate_storage = ResilientStorage(
            RedisStorage(redis), shared.rate_storage, on_state_change=_redis_state_reporter("ratelimit")
        )
        remote_slots = ResilientClientSlots(RedisClientSlots(redis), on_state_change=_redis_state_reporter("slots"))
    rate_limiter = None
    if settings.rate_limit_per_minute > 0:
        rate_limiter = RateLimiter(
            rate_storage,
            RateLimit.per_minute(settings.rate_limit_per_minute, settings.rate_limit_burst),
            fail_open=True,
        )
    api_keys = settings.api_keys.get_secret_value().split(",") if settings.api_keys else []
    admission = Admission(
        draining=lambda: drain.draining,
        keys=KeyRing(key.strip() for key in api_keys),
        trusted_proxies=parse_networks(settings.trusted_proxies),
        forwarded_header=settings.forwarded_header,
        rate_limiter=rate_limiter,
        breaker=breaker,
        slots=shared.slots,
        remote_slots=remote_slots,
        lease_ttl_s=settings.max_stream_age_seconds,
        memory_pressure=lambda: memory.over,
    )
    recorder = StreamRecorder(model_names=settings.model_names)
    relay = Relay(upstream=upstream, registry=registry, observer=recorder, max_batch=settings.stream_buffer_size)
    resume = build_resume_store(settings, redis, registry) if settings.resume_enabled else None
    if resume is not None:
        memory.sources.append(lambda: resume.buffered_bytes)
    claimer = None
    if resume is not None and resume.handover is not None and settings.max_orphaned_streams > 0:
        assert settings.redis_url is not None
        claimer = Claimer(
            LazyRedis(settings.redis_url, socket_timeout=settings.redis_timeout_seconds + CLAIM_BLOCK_SECONDS),
            resume,
            HandoverContinuation(relay, resume),
            lease_s=settings.handover_lease_seconds,
            max_claims=settings.max_orphaned_streams,
            block_s=CLAIM_BLOCK_SECONDS,
        )
        drain.on_start.append(claimer.stop)  # a draining instance never claims
    return GatewayState(
        settings=settings,
        upstream=upstream,
        registry=registry,
        recorder=recorder,
        drain=drain,
        breaker=breaker,
        admission=admission,
        relay=relay,
        tracer_provider=tracer_provider,
        redis=redis,
        resume=resume,
        claimer=claimer,
        discovery=None if fleet is None else fleet.discovery,
        prober=prober,
        scraper=scraper,
        endpoint_metrics=endpoint_metrics,
    )


def can_continue(settings: Settings) -> bool:
    """Can another instance continue a generation (the mock always; OpenAI upstreams that opted in)?"""
    return settings.upstream_url is None or settings.upstream_continuation != "none"


def build_resume_store(
    settings: Settings, redis: LazyRedis | None = None, registry: StreamRegistry | None = None
) -> ResumeStore:
    backend: Backend
    handover = None
    if settings.resume_store == "redis":
        assert redis is not None  # Settings refuses RESUME_STORE=redis without REDIS_URL
        backend = RedisStreamsBackend(redis, ttl_s=settings.resume_ttl_seconds, max_entries=settings.resume_max_events)
        if can_continue(settings):
            handover = HandoverPublisher(redis, ttl_s=settings.resume_ttl_seconds)
    else:
        # under `python -m app` RESUME_DIR is always set; a lone process (tests) gets a fresh private one
        directory = settings.resume_dir or tempfile.mkdtemp(prefix="gateway-resume-")
        backend = DirectoryBackend(directory, ttl_s=settings.resume_ttl_seconds)
    return ResumeStore(
        backend,
        flush_interval_s=settings.resume_flush_interval_seconds,
        write_delay_s=settings.resume_write_delay_seconds,
        max_events=settings.resume_max_events,
        handover=handover,
        on_tick=_orphan_gauge(registry) if registry is not None else None,
        orphans=(lambda: [s for s in registry.streams if s.orphaned_at]) if registry is not None else None,
        producers=registry.producers if registry is not None else None,
        ttl_s=settings.resume_ttl_seconds,
    )


def _orphan_gauge(registry: StreamRegistry) -> Callable[[], None]:
    """Sampled once per flush interval: the registry counts orphans, the gauge follows (on change only)."""
    last = [-1]

    def sample() -> None:
        if registry.orphans != last[0]:
            last[0] = registry.orphans
            ORPHANED_STREAMS.set(registry.orphans)

    return sample


def _redis_state_reporter(store: str) -> Callable[[bool], None]:
    """Redis reachability changes: one log line and the metrics, per transition (not per request)."""

    def report(up: bool) -> None:
        REDIS_UP.labels(store).set(1 if up else 0)
        if up:
            logger.info("redis reachable again: limits shared across replicas", extra={"store": store})
        else:
            REDIS_FALLBACKS_TOTAL.labels(store).inc()
            logger.warning("redis unreachable: falling back to this instance's limits", extra={"store": store})

    return report
