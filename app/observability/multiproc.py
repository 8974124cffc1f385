"""Compaction of dead workers' prometheus-client multiprocess files.

Each worker writes its values to `<kind>_<pid>.db` files in PROMETHEUS_MULTIPROC_DIR, and every scrape
reads every file. `mark_process_dead` removes only a dead worker's live gauges, so each restarted worker
(gunicorn max_requests, a crash, a drain) leaves its counters, histograms and non-live gauges behind and
every scrape gets slower. The gunicorn master calls `compact_dead_worker(pid)` from `child_exit`: the dead
worker's values are merged into one `<kind>_archive.db` per kind, the way prometheus-client's own merge
combines them (sums for counters and histograms, max/min/most recent for gauges), and its files are removed.

Only the master writes archives (gunicorn runs `child_exit` in the master, one at a time), and a dead
worker writes nothing any more. The new archive is written under a name scrapes ignore (`*.db` is what
they read) and renamed into place before the worker's files go, so a scrape sees each value at least once;
one that lists the directory between the two steps counts the dead worker twice for that one scrape.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from prometheus_client.mmap_dict import MmapedDict

ARCHIVE = "archive"  # in place of a pid: `counter_archive.db`, `gauge_max_archive.db`, ...

Value = tuple[float, float]  # (value, timestamp)


def _add(old: Value, new: Value) -> Value:
    return old[0] + new[0], max(old[1], new[1])


def _max(old: Value, new: Value) -> Value:
    return new if new[0] > old[0] else old


def _min(old: Value, new: Value) -> Value:
    return new if new[0] < old[0] else old


def _latest(old: Value, new: Value) -> Value:
    return new if new[1] > old[1] else old


# File prefix -> how two processes' values of one series combine. Live gauges are not here: a dead
# worker's live values must vanish (mark_process_dead deletes them); `all` gauges keep a pid label.
COMBINE: dict[str, Callable[[Value, Value], Value]] = {
    "counter": _add,
    "histogram": _add,  # buckets are stored per bucket (not cumulative), so they add up too
    "summary": _add,
    "gauge_sum": _add,
    "gauge_max": _max,
    "gauge_min": _min,
    "gauge_mostrecent": _latest,
}


def _read(path: Path) -> dict[str, Value]:
    values = MmapedDict.read_all_values_from_file(str(path))  # type: ignore[no-untyped-call]  # untyped library
    return {key: (value, timestamp) for key, value, timestamp, _ in values}


def compact_dead_worker(directory: str | os.PathLike[str], pid: int) -> int:
    """Merge a dead worker's files into the archives and remove them; returns how many files went."""
    root = Path(directory)
    removed = 0
    for prefix, combine in COMBINE.items():
        dead = root / f"{prefix}_{pid}.db"
        if not dead.exists():
            continue
        archive = root / f"{prefix}_{ARCHIVE}.db"
        merged = _read(archive) if archive.exists() else {}
        for key, value in _read(dead).items():
            merged[key] = combine(merged[key], value) if key in merged else value
        staging = root / f"{prefix}_{ARCHIVE}.db.new"  # not `*.db`: scrapes never read a half-written archive
        staging.unlink(missing_ok=True)
        out = MmapedDict(str(staging))  # type: ignore[no-untyped-call]  # untyped library
        try:
            for key, (number, timestamp) in merged.items():
                out.write_value(key, number, timestamp)  # type: ignore[no-untyped-call]
        finally:
            out.close()  # type: ignore[no-untyped-call]
        os.replace(staging, archive)
        dead.unlink()
        removed += 1
    return removed
