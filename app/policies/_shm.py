"""Shared memory for policies that must agree across the gunicorn workers of one instance.

A `SharedRegion` is a fixed-size anonymous `MAP_SHARED` mapping plus a cross-process lock. Create
it in the gunicorn master *before* the workers fork: children inherit both the pages and the lock
descriptor, so every worker reads and writes the same bytes. It cannot be pickled, so it does not
work with the `spawn` start method, only with `fork` (which is what gunicorn does).

Why an fcntl (POSIX record) lock rather than `multiprocessing.Lock`: gunicorn SIGKILLs a worker
that misses its heartbeat. A semaphore held by a killed process stays held forever and wedges
every other worker; the kernel drops a record lock when its owner dies. Record locks belong to a
process, not to a descriptor, so an inherited descriptor still gives each worker its own lock
(which is also why `flock`, tied to the shared open file description, would not exclude
anything here). Threads of one process share the record lock, so a thread lock is taken first.

The lock is a blocking syscall held for a few struct reads and writes (microseconds): callers
keep the critical section tiny and never await inside it.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import secrets
import tempfile
import threading
from types import TracebackType
from typing import NoReturn

# Slots are grouped in windows of this many for open addressing: a key lives somewhere in the
# window that starts at its hash, so a lookup is one struct read of the whole window.
DEFAULT_PROBE = 8


def _lock_descriptor() -> int:
    # memfd needs no writable filesystem (the chart runs with a read-only root filesystem).
    if hasattr(os, "memfd_create"):
        return os.memfd_create("gateway-policy-lock", os.MFD_CLOEXEC)
    fd, path = tempfile.mkstemp(prefix="gateway-policy-lock-")  # pragma: no cover - non-Linux fallback
    os.unlink(path)  # pragma: no cover - non-Linux fallback
    return fd  # pragma: no cover - non-Linux fallback


class SharedRegion:
    """`size` zeroed bytes shared with every process forked after construction, and their lock."""

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError("size must be positive")
        self.size = size
        self.buf = mmap.mmap(-1, size)  # anonymous + MAP_SHARED (the default flags on Unix)
        self._fd = _lock_descriptor()
        self._thread_lock = threading.Lock()
        # Keyed hashing: stable across the forked workers (they inherit the key), but clients
        # cannot choose keys that collide into one probe window and evict each other.
        self._hash_key = secrets.token_bytes(16)
        self.closed = False

    def __enter__(self) -> mmap.mmap:
        self._thread_lock.acquire()
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise
        return self.buf

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()

    def key_hash(self, key: str) -> int:
        """A non-zero 64-bit hash of `key`, identical in every process that shares this region."""
        digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8, key=self._hash_key).digest()
        return int.from_bytes(digest, "little") or 1  # 0 marks an empty slot

    def close(self) -> None:
        """Unmap and drop the lock descriptor in this process (other processes keep theirs)."""
        if not self.closed:
            self.closed = True
            self.buf.close()
            os.close(self._fd)

    def __reduce__(self) -> NoReturn:
        raise TypeError("a SharedRegion is inherited through fork(); it cannot be pickled or spawned")


def window_start(key_hash: int, slots: int) -> int:
    """First slot of the key's probe window; tables keep `probe - 1` spare slots so windows never wrap."""
    return key_hash % slots
