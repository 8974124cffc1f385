"""The memory budget's instance table and its choice of the buffers to cut (app/policies/buffers.py)."""

from __future__ import annotations

import os

from app.policies.buffers import FULL_PER_WORKER, MemoryBufferTable, SharedBufferTable, WorkerBuffers, cutoff


def test_within_budget_nothing_is_cut() -> None:
    assert cutoff([WorkerBuffers(1, 100, ((1.0, 100),))], 100) is None
    assert cutoff([WorkerBuffers(1, 500, ())], 100) is None  # over, but nothing full: admission alone refuses


def test_the_oldest_full_buffers_across_workers_cover_the_excess() -> None:
    workers = [
        WorkerBuffers(1, 300, ((2.0, 100), (5.0, 100), (6.0, 100))),
        WorkerBuffers(2, 200, ((1.0, 100), (4.0, 100))),
    ]
    assert cutoff(workers, 450) == 1.0  # 50 over: the oldest buffer (worker 2's) is enough
    assert cutoff(workers, 350) == 2.0  # 150 over: the two oldest, one per worker
    assert cutoff(workers, 0) == 6.0  # everything


def test_shared_table_sums_every_worker_and_forgets_dead_ones() -> None:
    table = SharedBufferTable()
    try:
        child = os.fork()
        if child == 0:  # a second worker reports, then exits
            attached = SharedBufferTable.attach(table.fd)
            attached.publish(700, [(3.0, 700)], refusing=True)
            os._exit(0)
        os.waitpid(child, 0)
        full = [(float(i), 10) for i in range(FULL_PER_WORKER + 5)]
        reports = {r.pid: r for r in table.publish(400, full)}
        assert reports[child] == WorkerBuffers(child, 700, ((3.0, 700),), refusing=True)
        assert reports[os.getpid()].buffered == 400
        assert not reports[os.getpid()].refusing
        assert len(reports[os.getpid()].full) == FULL_PER_WORKER  # the oldest only
        assert table.reclaim(child)
        assert not table.reclaim(child)
        assert [r.pid for r in table.publish(0, [])] == [os.getpid()]
    finally:
        table.close()


def test_one_process_table_is_its_own_instance() -> None:
    assert MemoryBufferTable().publish(5, [(1.0, 5)]) == [WorkerBuffers(os.getpid(), 5, ((1.0, 5),))]
