"""Redis backends against a real `redis-server` on a loopback port (the fixture fails, never skips,
when the binary is missing). Each test drives its own event loop with `asyncio.run` and closes
every client it opens; refill and retry timing is checked with written bucket states and a fake
clock, never with sleeps."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from redis.asyncio import Redis

from app.policies.concurrency import LOCAL_ONLY, ClientSlots
from app.policies.concurrency_redis import DEFAULT_SLOTS_PREFIX, RedisClientSlots
from app.policies.failover import ResilientClientSlots, ResilientStorage
from app.policies.ratelimit import Acquisition, MemoryStorage, RateLimit, RateLimiter, Storage
from app.policies.ratelimit_redis import DEFAULT_RATE_LIMIT_PREFIX, RedisStorage
from app.storage.errors import StorageError
from app.storage.redis import LazyRedis, redis_from_url
from loadtest.harness.ports import refused_port
from loadtest.harness.redis import START_TIMEOUT_S, RedisServer, started_redis
from tests.policies.policy_fakes import FakeClock

# Guard only, against a hang: a call that should fail at once (refused) or at its read timeout and does not
# fails the test with TimeoutError instead of hanging it. Generous: how fast is the benchmark's.
GUARD_S = 30.0
# The clients' read timeout. Generous too: a live server answering late on a loaded machine is not a failure
# (30 concurrent calls once took longer than 0.2 s); a stopped one refuses at once, a mute one has its own.
CLIENT_TIMEOUT_S = 5.0


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    yield from started_redis(tmp_path)


@asynccontextmanager
async def _client(url: str, socket_timeout: float = CLIENT_TIMEOUT_S) -> AsyncIterator[Redis]:
    client = redis_from_url(url, socket_timeout=socket_timeout)
    try:
        yield client
    finally:
        await client.aclose()


@asynccontextmanager
async def _refused_client() -> AsyncIterator[Redis]:
    """A client of a Redis address nothing listens on (and, held bound for the block, nothing else can take)."""
    with refused_port() as port:
        async with _client(f"redis://127.0.0.1:{port}/0") as client:
            yield client


async def _redis_now_us(client: Redis) -> int:
    seconds, micros = await client.time()
    return int(seconds) * 1_000_000 + int(micros)


async def _live_leases(client: Redis, name: str) -> int:
    """The client's unexpired leases, read from the store itself (expired ones may not be swept yet)."""
    now_ms = await _redis_now_us(client) // 1000
    return int(await client.zcount(DEFAULT_SLOTS_PREFIX + name, f"({now_ms}", "+inf"))


# --- RedisStorage ---------------------------------------------------------------------------------


def test_exact_burst_across_two_replicas(redis_server: RedisServer) -> None:
    async def scenario() -> list[bool]:
        async with _client(redis_server.url) as a, _client(redis_server.url) as b:
            replicas: list[Storage] = [RedisStorage(a), RedisStorage(b)]
            calls = [replicas[i % 2].acquire("client", 5, 0.001, 1, now=0.0) for i in range(40)]
            return [result.allowed for result in await asyncio.gather(*calls)]

    allowed = asyncio.run(scenario())
    assert allowed.count(True) == 5


def test_refused_retry_after_is_within_one_token_time(redis_server: RedisServer) -> None:
    async def scenario() -> tuple[Acquisition, Acquisition, Acquisition]:
        async with _client(redis_server.url) as client:
            storage = RedisStorage(client)
            first = await storage.acquire("k", 1, 2.0, 1, now=0.0)
            refused = await storage.acquire("k", 1, 2.0, 1, now=0.0)
            again = await storage.acquire("k", 1, 2.0, 1, now=0.0)
            return first, refused, again

    first, refused, again = asyncio.run(scenario())
    assert first == Acquisition(True, 0.0, 0.0)
    assert not refused.allowed and 0 < refused.retry_after_seconds <= 0.5
    assert 0 <= refused.remaining < 1
    # a refusal spent nothing: the next one waits less, never more
    assert not again.allowed and 0 < again.retry_after_seconds <= refused.retry_after_seconds


def test_refill_math_on_a_bucket_written_in_the_past(redis_server: RedisServer) -> None:
    """A bucket emptied 15 s ago (by Redis TIME) at 0.1 token/s has 1.5 tokens: one hit passes with 0.5 left,
    the next is refused with 5 s to wait. Redis time passes between the calls (more on a busy machine): the
    expected values move by rate x elapsed, and the bounds below take the elapsed time as measured."""

    async def scenario() -> tuple[Acquisition, Acquisition, float]:
        async with _client(redis_server.url) as client:
            key = DEFAULT_RATE_LIMIT_PREFIX + "k"
            start = await _redis_now_us(client)
            await client.hset(key, mapping={"tokens": "0", "ts": str(start - 15_000_000)})
            storage = RedisStorage(client)
            allowed = await storage.acquire("k", 5, 0.1, 1, now=0.0)
            refused = await storage.acquire("k", 5, 0.1, 1, now=0.0)
            return allowed, refused, (await _redis_now_us(client) - start) / 1e6

    allowed, refused, elapsed = asyncio.run(scenario())
    assert elapsed < 5.0  # guard only: within 5 s the second hit finds less than one token
    assert allowed.allowed and 0.5 - 1e-6 <= allowed.remaining <= 0.5 + 0.1 * elapsed + 1e-6
    assert not refused.allowed and 5.0 - elapsed - 1e-6 <= refused.retry_after_seconds <= 5.0 + 1e-6


def test_a_bucket_stamped_in_the_future_mints_nothing(redis_server: RedisServer) -> None:
    """After a failover to a server whose clock is behind, the stored time is ahead of TIME: no
    tokens appear, and the wait includes the gap (as `ratelimit.take` does): 2 s of gap and 1 s for the token,
    less the Redis time that passed before the call."""

    async def scenario() -> tuple[Acquisition, float]:
        async with _client(redis_server.url) as client:
            key = DEFAULT_RATE_LIMIT_PREFIX + "k"
            start = await _redis_now_us(client)
            await client.hset(key, mapping={"tokens": "0", "ts": str(start + 2_000_000)})
            refused = await RedisStorage(client).acquire("k", 5, 1.0, 1, now=0.0)
            return refused, (await _redis_now_us(client) - start) / 1e6

    refused, elapsed = asyncio.run(scenario())
    assert elapsed < 2.0  # guard only: the stored time is still ahead when the call runs
    assert not refused.allowed and refused.remaining == 0
    assert 3.0 - elapsed - 1e-6 <= refused.retry_after_seconds <= 3.0 + 1e-6


def test_keys_expire_when_the_bucket_would_be_full(redis_server: RedisServer) -> None:
    async def scenario() -> tuple[int, int, bool]:
        async with _client(redis_server.url) as client:
            storage = RedisStorage(client, prefix="test:rl:")
            await storage.acquire("one", 5, 1.0, 1, now=0.0)  # 4 left: full again in 1 s
            for _ in range(5):
                await storage.acquire("all", 5, 1.0, 1, now=0.0)  # empty: full again in 5 s
            before = await client.hgetall("test:rl:all")
            assert not (await storage.acquire("all", 5, 1.0, 1, now=0.0)).allowed
            untouched = await client.hgetall("test:rl:all") == before
            return await client.pttl("test:rl:one"), await client.pttl("test:rl:all"), untouched

    one, everything, untouched = asyncio.run(scenario())
    assert 0 < one <= 1000
    assert 4000 < everything <= 5000  # window = capacity / rate
    assert untouched  # a refusal writes nothing


def test_buckets_live_under_the_prefix_and_a_missing_one_is_full(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        async with _client(redis_server.url) as client:
            storage = RedisStorage(client, prefix="t[1]*:")  # glob characters in the prefix are literal
            await client.set("t[1]*-outside", "stays")
            await client.set("t1x:other", "stays")
            assert (await storage.acquire("a", 1, 0.001, 1, now=0.0)).allowed
            assert not (await storage.acquire("a", 1, 0.001, 1, now=0.0)).allowed
            await client.unlink("t[1]*:a")  # a bucket that expired (full again) is gone: it starts full
            assert (await storage.acquire("a", 1, 0.001, 1, now=0.0)).allowed
            for key in ("b", "c"):
                assert (await storage.acquire(key, 1, 0.001, 1, now=0.0)).allowed
            assert set(await client.keys("*")) == {b"t[1]*:a", b"t[1]*:b", b"t[1]*:c", b"t[1]*-outside", b"t1x:other"}
            assert await client.get("t[1]*-outside") == b"stays"
            assert await client.get("t1x:other") == b"stays"

    asyncio.run(scenario())


def test_script_cache_loss_is_survived(redis_server: RedisServer) -> None:
    """After a restart or failover the server has no scripts: EVALSHA gets NOSCRIPT and the
    script is loaded again."""

    async def scenario() -> None:
        async with _client(redis_server.url) as client:
            storage, slots = RedisStorage(client), RedisClientSlots(client)
            assert (await storage.acquire("k", 5, 1.0, 1, now=0.0)).allowed
            assert await slots.try_acquire("c", 10) is not None
            await client.script_flush()
            assert (await storage.acquire("k", 5, 1.0, 1, now=0.0)).remaining == pytest.approx(3.0, abs=0.1)
            assert await slots.try_acquire("c", 10) is not None and await _live_leases(client, "c") == 2

    asyncio.run(scenario())


def test_with_the_rate_limiter(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        async with _client(redis_server.url) as client:
            limiter = RateLimiter(
                RedisStorage(client), RateLimit(capacity=2, refill_per_second=0.01), fail_open=False, clock=FakeClock()
            )
            assert [(await limiter.hit("c")).allowed for _ in range(3)] == [True, True, False]
            refused = await limiter.hit("c")
            assert not refused.degraded and 0 < refused.retry_after_seconds <= 100
            assert refused.headers()["Retry-After"] == "100"  # one token per 100 s, rounded up

    asyncio.run(scenario())


def test_unreachable_redis_fails_fast() -> None:
    async def scenario() -> None:
        async with _refused_client() as client:
            storage, slots = RedisStorage(client), RedisClientSlots(client)
            calls: list[Callable[[], Awaitable[object]]] = [
                lambda: storage.acquire("k", 5, 1.0, 1, now=0.0),
                lambda: slots.try_acquire("c", 10),
                lambda: slots.release("c", "x"),
            ]
            for call in calls:
                with pytest.raises(StorageError, match="redis"):
                    await asyncio.wait_for(call(), GUARD_S)

    asyncio.run(scenario())


def test_a_redis_that_never_answers_times_out_fast() -> None:
    """A listener that accepts but never replies (hung server, black hole behind a proxy): the
    read timeout ends the wait with a StorageError (without it, the guard's TimeoutError would)."""

    async def scenario(port: int) -> None:
        async with _client(f"redis://127.0.0.1:{port}/0", socket_timeout=0.1) as client:
            with pytest.raises(StorageError):
                await asyncio.wait_for(RedisStorage(client).acquire("k", 5, 1.0, 1, now=0.0), GUARD_S)

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)  # the kernel completes handshakes; nobody ever reads
        asyncio.run(scenario(mute.getsockname()[1]))


def test_lazy_redis_is_made_in_the_running_loop_and_closed(redis_server: RedisServer) -> None:
    lazy = LazyRedis(redis_server.url, socket_timeout=CLIENT_TIMEOUT_S)
    storage = RedisStorage(lazy)

    async def acquire() -> bool:
        return (await storage.acquire("k", 5, 0.001, 1, now=0.0)).allowed

    async def scenario() -> None:
        assert await acquire()
        assert lazy.client() is lazy.client()
        await lazy.aclose()

    asyncio.run(scenario())
    asyncio.run(scenario())  # closed, so the next loop gets a new client

    with asyncio.Runner() as first_loop:
        assert first_loop.run(acquire())
        with pytest.raises(RuntimeError, match="second event loop"):
            asyncio.run(acquire())
        first_loop.run(lazy.aclose())
    with pytest.raises(RuntimeError):
        redis_from_url(redis_server.url)  # no running loop
    with pytest.raises(ValueError):
        LazyRedis(redis_server.url, socket_timeout=0)


# --- RedisClientSlots -----------------------------------------------------------------------------


def test_exactly_ten_streams_per_client_across_two_replicas(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        async with _client(redis_server.url) as a, _client(redis_server.url) as b:
            replicas: list[ClientSlots] = [RedisClientSlots(a), RedisClientSlots(b)]
            leases = await asyncio.gather(*(replicas[i % 2].try_acquire("c", 10) for i in range(30)))
            held = [lease for lease in leases if lease is not None]
            assert len(held) == 10 and len(set(held)) == 10
            assert await _live_leases(a, "c") == 10 and await _live_leases(b, "c") == 10
            assert await replicas[1].try_acquire("someone-else", 10) is not None
            assert await _live_leases(a, "nobody") == 0

            assert await replicas[1].release("c", held[0]) is True  # released on the other replica
            assert await replicas[0].release("c", held[0]) is False  # idempotent
            assert await _live_leases(a, "c") == 9
            assert await replicas[0].try_acquire("c", 10) is not None
            assert await replicas[1].try_acquire("c", 10) is None

            for lease in held[1:]:
                await replicas[0].release("c", lease)
            assert await _live_leases(a, "c") == 1
            pttl = await a.pttl(DEFAULT_SLOTS_PREFIX + "c")
            assert 0 < pttl <= 300_000  # the key goes with its last lease

    asyncio.run(scenario())


def test_expired_leases_are_reclaimed(redis_server: RedisServer) -> None:
    """A replica that crashed never releases: its leases lapse after the lease TTL, and the key with them.

    Conditions only: how soon a 0.2 s lease lapses is Redis's clock against a loaded machine's, so the test
    waits for the lapse (guarded) instead of asserting what is left at some moment."""
    key = DEFAULT_SLOTS_PREFIX + "c"

    async def wait_until(condition: Callable[[], Awaitable[int]], what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while await condition():
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.02)  # poll interval, not an assertion

    async def scenario() -> None:
        async with _client(redis_server.url) as client:
            slots = RedisClientSlots(client)
            assert all([await slots.try_acquire("c", 3, lease_ttl_seconds=0.2) for _ in range(3)])
            assert await client.pttl(key) != -1  # the key expires (-2: already gone with its leases)
            await wait_until(lambda: _live_leases(client, "c"), "leases never expired")
            await wait_until(lambda: client.exists(key), "the key outlived its leases")
            assert all([await slots.try_acquire("c", 3) for _ in range(3)])  # no release, yet the cap is back
            assert await slots.try_acquire("c", 3) is None

    asyncio.run(scenario())


def test_slot_arguments_are_checked(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        async with _client(redis_server.url) as client:
            slots = RedisClientSlots(client)
            with pytest.raises(ValueError):
                await slots.try_acquire("c", 0)
            with pytest.raises(ValueError):
                await slots.try_acquire("c", 1, lease_ttl_seconds=0)

    asyncio.run(scenario())


# --- resilience -----------------------------------------------------------------------------------


class CountingStorage:
    """Counts the calls that reach the wrapped storage."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.calls = 0

    async def acquire(self, key: str, capacity: int, refill_per_second: float, cost: float, now: float) -> Acquisition:
        self.calls += 1
        return await self.inner.acquire(key, capacity, refill_per_second, cost, now)


def test_resilient_storage_fails_over_and_back(redis_server: RedisServer) -> None:
    clock = FakeClock()
    changes: list[bool] = []

    async def scenario() -> None:
        async with _client(redis_server.url) as client:
            primary = CountingStorage(RedisStorage(client))
            fallback = MemoryStorage()
            storage: Storage = ResilientStorage(
                primary, fallback, retry_after_seconds=1.0, clock=clock, on_state_change=changes.append
            )
            assert (await storage.acquire("k", 5, 0.001, 1, now=clock())).remaining == pytest.approx(4.0, abs=0.01)
            assert await client.exists(DEFAULT_RATE_LIMIT_PREFIX + "k") == 1 and len(fallback) == 0

            redis_server.stop()
            results = []
            for _ in range(20):
                result = await asyncio.wait_for(storage.acquire("k", 5, 0.001, 1, now=clock()), GUARD_S)
                results.append(result.allowed)
            assert results == [True] * 5 + [False] * 15  # the fallback's own bucket of 5
            assert changes == [False]
            assert primary.calls == 2  # the one that failed; no retries within the interval
            assert len(fallback) == 1  # the fallback answered them all, with its own bucket

            clock.advance(1.0)
            assert (await storage.acquire("k", 5, 0.001, 1, now=clock())).allowed is False  # probe fails
            assert primary.calls == 3 and changes == [False]
            await asyncio.gather(*(storage.acquire("k", 5, 0.001, 1, now=clock()) for _ in range(10)))
            assert primary.calls == 3  # one probe per interval, however many callers

            redis_server.start()
            clock.advance(0.5)
            await storage.acquire("k", 5, 0.001, 1, now=clock())
            assert primary.calls == 3 and changes == [False]  # interval not over yet
            clock.advance(0.5)
            recovered = await storage.acquire("k", 5, 0.001, 1, now=clock())
            assert recovered.allowed and recovered.remaining == pytest.approx(4.0, abs=0.01)  # fresh server
            assert changes == [False, True]
            assert (await storage.acquire("k", 5, 0.001, 1, now=clock())).allowed
            assert primary.calls == 5 and changes == [False, True]
            assert await client.exists(DEFAULT_RATE_LIMIT_PREFIX + "k") == 1  # shared again

    asyncio.run(scenario())


def test_resilient_storage_with_redis_never_up() -> None:
    clock = FakeClock()
    changes: list[bool] = []

    async def scenario() -> None:
        async with _refused_client() as client:
            storage = ResilientStorage(
                RedisStorage(client), MemoryStorage(), clock=clock, on_state_change=changes.append
            )
            limiter = RateLimiter(storage, RateLimit(capacity=1, refill_per_second=0.01), fail_open=False, clock=clock)
            first, second = await limiter.hit("c"), await limiter.hit("c")
            assert first.allowed and not first.degraded  # answered by the local limit, not by fail-open
            assert not second.allowed and not second.degraded
            assert not storage.using_primary
            third = await limiter.hit("c")  # primary skipped within the interval; no error
            assert not third.allowed and not third.degraded
            clock.advance(1.0)
            fourth = await limiter.hit("c")  # primary tried and failed; still no error
            assert not fourth.degraded
            assert changes == [False]

    asyncio.run(scenario())


def test_stale_outcomes_do_not_flap_the_state() -> None:
    """A call that started before a transition reports the past: it must not undo the transition."""
    clock = FakeClock()
    changes: list[bool] = []

    class Gated:
        """A primary whose calls wait for the test to fail or succeed them."""

        def __init__(self) -> None:
            self.pending: list[asyncio.Future[bool]] = []

        async def acquire(
            self, key: str, capacity: int, refill_per_second: float, cost: float, now: float
        ) -> Acquisition:
            future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            self.pending.append(future)
            if not await future:
                raise StorageError("down")
            return Acquisition(True, 99.0, 0.0)

    async def started(primary: Gated, count: int) -> list[asyncio.Future[bool]]:
        while len(primary.pending) < count:
            await asyncio.sleep(0)  # let the callers reach the primary
        return primary.pending

    async def scenario() -> None:
        primary = Gated()
        storage = ResilientStorage(primary, MemoryStorage(), clock=clock, on_state_change=changes.append)

        def hit() -> asyncio.Task[float]:
            async def call() -> float:
                return (await storage.acquire("k", 5, 0.001, 1, now=clock())).remaining

            return asyncio.ensure_future(call())

        # Up: two calls in flight. The later-finishing one succeeds after the other failed.
        first, slow = hit(), hit()
        pending = await started(primary, 2)
        pending[0].set_result(False)
        assert await first == 4.0 and changes == [False]  # answered by the fallback
        pending[1].set_result(True)
        assert await slow == 99.0 and changes == [False]  # a stale success does not recover it

        # Down: a slow probe, then (one interval later) a second probe that succeeds first.
        clock.advance(1.0)
        slow_probe = hit()
        await started(primary, 3)
        assert await hit() == pytest.approx(3.0, abs=0.01)  # within the interval of the pending probe: fallback
        clock.advance(1.0)
        probe = hit()
        pending = await started(primary, 4)
        pending[3].set_result(True)
        assert await probe == 99.0 and changes == [False, True]
        pending[2].set_result(False)
        assert await slow_probe == pytest.approx(2.0, abs=0.01)  # answered by the fallback
        assert changes == [False, True]  # a stale failure does not bring it down
        assert storage.using_primary

    asyncio.run(scenario())


def test_resilient_slots_go_local_only_and_back(redis_server: RedisServer) -> None:
    clock = FakeClock()
    changes: list[bool] = []

    async def scenario() -> None:
        async with _client(redis_server.url) as client:
            slots: ClientSlots = ResilientClientSlots(
                RedisClientSlots(client), clock=clock, on_state_change=changes.append
            )
            lease = await slots.try_acquire("c", 1)
            assert lease is not None and lease != LOCAL_ONLY
            assert await slots.try_acquire("c", 1) is None  # the shared cap still refuses
            assert await _live_leases(client, "c") == 1

            redis_server.stop()
            for _ in range(5):
                assert await asyncio.wait_for(slots.try_acquire("c", 1), GUARD_S) == LOCAL_ONLY
            assert await slots.release("c", LOCAL_ONLY) is False  # no-op
            assert await slots.release("c", lease) is False  # cannot reach Redis: lapses by TTL
            assert changes == [False]

            redis_server.start()
            assert await slots.try_acquire("c", 1) == LOCAL_ONLY  # within the retry interval
            clock.advance(1.0)
            fresh = await slots.try_acquire("c", 1)
            assert fresh is not None and fresh != LOCAL_ONLY
            assert changes == [False, True]
            assert await _live_leases(client, "c") == 1
            assert await slots.release("c", fresh) is True and await slots.release("c", fresh) is False

    asyncio.run(scenario())


def test_resilient_slots_failing_mid_call_then_recovering(redis_server: RedisServer) -> None:
    clock = FakeClock()
    changes: list[bool] = []

    async def scenario() -> None:
        async with _client(redis_server.url) as client:
            slots = ResilientClientSlots(RedisClientSlots(client), clock=clock, on_state_change=changes.append)
            lease = await slots.try_acquire("c", 2)
            assert lease is not None
            redis_server.stop()
            assert await slots.release("c", lease) is False  # the failing call itself marks it down
            assert changes == [False] and not slots.using_primary
            redis_server.start()
            clock.advance(1.0)
            probe = await slots.try_acquire("c", 2)  # the probe reaches the fresh server
            assert probe is not None and probe != LOCAL_ONLY and await _live_leases(client, "c") == 1
            assert changes == [False, True] and slots.using_primary
            redis_server.stop()
            assert await slots.try_acquire("c", 2) == LOCAL_ONLY
            assert changes == [False, True, False]

    asyncio.run(scenario())


def test_retry_interval_is_checked() -> None:
    with pytest.raises(ValueError):
        ResilientStorage(MemoryStorage(), MemoryStorage(), retry_after_seconds=0)
    with pytest.raises(ValueError):
        ResilientClientSlots(RedisClientSlots(LazyRedis("redis://127.0.0.1:1")), retry_after_seconds=float("inf"))
    with pytest.raises(ValueError):
        RedisStorage(LazyRedis("redis://127.0.0.1:1"), prefix="")  # bucket keys would mix with every other key
