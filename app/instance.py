"""State shared by every worker of one instance: rate-limit buckets, connection slots, the breaker, the
buffered bytes the memory budget counts, and a fleet's streams in flight and circuit breaker per upstream endpoint.

Limits mean what they say only if all workers count against one table (per-process state would
multiply every limit by the worker count). The gunicorn master creates the tables in
shared memory before it forks (`create_shared`, from the `on_starting` hook) and publishes their
descriptors in GATEWAY_SHARED_STATE; each worker attaches to them (`instance_state`). Outside
gunicorn (one process) the same interfaces are served from process memory.

Why shared memory and not Redis for this: it is per instance, costs ~15 µs per check, needs no
service, and a killed worker's slots are reclaimed by the master (`child_exit`). Redis is the
optional layer on top for limits that must hold across replicas.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from app.policies.breaker import BreakerCell, BreakerConfig, MemoryBreakerCell, SharedBreakerCell, charged_capacity
from app.policies.breakers import BreakerTable, MemoryBreakerTable, SharedBreakerTable
from app.policies.buffers import BufferTable, MemoryBufferTable, SharedBufferTable
from app.policies.concurrency import ConnectionLimiter, MemoryConnectionLimiter, SharedConnectionLimiter
from app.policies.inflight import InFlightTable, MemoryInFlightTable, SharedInFlightTable
from app.policies.ratelimit import MemoryStorage, SharedMemoryStorage, Storage
from app.settings import Settings

# "ratelimit=FD,slots=FD,breaker=FD,buffers=FD,inflight=FD,breakers=FD", by the master
ENV_VAR = "GATEWAY_SHARED_STATE"


@dataclass
class InstanceState:
    rate_storage: Storage
    slots: ConnectionLimiter
    breaker_cell: BreakerCell
    buffers: BufferTable  # buffered stream data per worker: the memory budget
    inflight: InFlightTable  # streams in flight per upstream endpoint: what a fleet balances on
    breakers: BreakerTable  # a fleet's circuit breaker per upstream endpoint


@dataclass
class SharedTables:
    """The master's handles (it reclaims slots of dead workers through `slots`)."""

    rate_storage: SharedMemoryStorage
    slots: SharedConnectionLimiter
    breaker_cell: SharedBreakerCell
    buffers: SharedBufferTable
    inflight: SharedInFlightTable
    breakers: SharedBreakerTable

    def publish(self) -> None:
        for table in (self.rate_storage, self.slots, self.breaker_cell, self.buffers, self.inflight, self.breakers):
            os.set_inheritable(table.fd, True)
        os.environ[ENV_VAR] = (
            f"ratelimit={self.rate_storage.fd},slots={self.slots.fd},breaker={self.breaker_cell.fd},"
            f"buffers={self.buffers.fd},inflight={self.inflight.fd},breakers={self.breakers.fd}"
        )


def breaker_config(settings: Settings) -> BreakerConfig:
    return BreakerConfig(
        failure_threshold=settings.circuit_failure_threshold,
        window_seconds=settings.circuit_window_seconds,
        open_seconds=settings.circuit_open_seconds,
        success_threshold=settings.circuit_success_threshold,
        max_failures_per_client=settings.circuit_max_failures_per_client,
    )


def create_shared(settings: Settings) -> SharedTables:
    capacities = (settings.circuit_failure_threshold, charged_capacity(breaker_config(settings)))
    tables = SharedTables(
        rate_storage=SharedMemoryStorage(),
        slots=SharedConnectionLimiter(settings.max_connections, settings.max_connections_per_client),
        breaker_cell=SharedBreakerCell(*capacities),
        buffers=SharedBufferTable(),
        inflight=SharedInFlightTable(),
        breakers=SharedBreakerTable(*capacities),
    )
    tables.publish()
    return tables


def instance_state(settings: Settings) -> InstanceState:
    published = os.environ.get(ENV_VAR)
    if not published:
        return InstanceState(
            rate_storage=MemoryStorage(),
            slots=MemoryConnectionLimiter(settings.max_connections, settings.max_connections_per_client),
            breaker_cell=MemoryBreakerCell(),
            buffers=MemoryBufferTable(),
            inflight=MemoryInFlightTable(),
            breakers=MemoryBreakerTable(),
        )
    fds = {name: int(fd) for name, fd in (part.split("=") for part in published.split(","))}
    return InstanceState(
        rate_storage=SharedMemoryStorage.attach(fds["ratelimit"]),
        slots=SharedConnectionLimiter.attach(fds["slots"]),
        breaker_cell=SharedBreakerCell.attach(fds["breaker"]),
        buffers=SharedBufferTable.attach(fds["buffers"]),
        inflight=SharedInFlightTable.attach(fds["inflight"]),
        breakers=SharedBreakerTable.attach(fds["breakers"]),
    )
