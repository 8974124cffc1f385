"""Test doubles for `app/policies`: a fake clock, a sleep recorder, a driver for non-suspending
coroutines, and a helper that runs a function in several forked processes at once."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
CHILD_TIMEOUT_S = 60.0  # guard only: a forked worker that hangs fails the test instead of the run


class FakeClock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        assert seconds >= 0, "a monotonic clock never goes back"
        self.now += seconds


class SleepRecorder:
    """An injected `sleep` that records the interval and returns at once (tenacity's
    `sleep=intervals.append`, made awaitable)."""

    def __init__(self) -> None:
        self.intervals: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.intervals.append(seconds)


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Drive a coroutine that must finish without ever suspending.

    The in-process and shared-memory storages decide without awaiting anything (no await inside
    a critical section); a suspension here is a bug, not something to wait for.
    """
    try:
        coro.send(None)
    except StopIteration as stop:
        value: T = stop.value
        return value
    coro.close()
    raise AssertionError("the coroutine suspended")


def run_forked(workers: int, target: Callable[[int], int]) -> list[int]:
    """Run `target(worker_index)` in `workers` forked processes that start together (barrier),
    like gunicorn workers forked from one master; returns each one's result, in order.

    Objects built before the call (shared-memory tables) are inherited, as they are by gunicorn
    workers.
    """
    ctx = multiprocessing.get_context("fork")
    results = ctx.Array("q", workers, lock=False)
    barrier = ctx.Barrier(workers)

    def child(index: int) -> None:
        barrier.wait(timeout=CHILD_TIMEOUT_S)
        results[index] = target(index)

    procs = [ctx.Process(target=child, args=(i,)) for i in range(workers)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(CHILD_TIMEOUT_S)
    codes = [proc.exitcode for proc in procs]
    assert codes == [0] * workers, f"worker exit codes {codes}"
    return list(results)
