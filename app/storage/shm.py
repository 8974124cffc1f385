"""Shared memory for tables that must agree across the gunicorn workers of one instance.

A `SharedRegion` is a fixed-size `MAP_SHARED` mapping of a nameless memory file (`memfd`: no path,
no writable filesystem needed, gone when the last process closes it) plus a cross-process lock on
that same descriptor. Two ways to reach it from the workers:

- inheritance: create it in the gunicorn master before the workers fork; each worker inherits the
  mapping and the descriptor (the policy objects then simply work in the children);
- by descriptor: a process that received the descriptor (fork, or exec with an inheritable fd)
  calls `SharedRegion.attach(fd, kind)`, which maps the same pages. This lets an app factory that
  runs in the worker find the master's tables from an environment variable.

The region starts with a 64-byte header: a magic, the policy kind, the key-hashing secret and up
to four layout parameters, so `attach` can rebuild the layout and refuse a descriptor of another
kind. The policy's own data starts at `DATA_OFFSET`.

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
import struct
import tempfile
import threading
from types import TracebackType
from typing import ClassVar, NoReturn, Self

# Slots are grouped in windows of this many for open addressing: a key lives somewhere in the
# window that starts at its hash, so a lookup is one struct read of the whole window.
DEFAULT_PROBE = 8
_MAGIC = b"GWPOLv1\0"
_HEADER = struct.Struct("<8s8s16s4Q")  # magic, kind, hash key, layout parameters
DATA_OFFSET = 64


def _memory_file(size: int) -> int:
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("gateway-policy", os.MFD_CLOEXEC)
    else:  # pragma: no cover - non-Linux fallback: an unlinked temporary file
        fd, path = tempfile.mkstemp(prefix="gateway-policy-")
        os.unlink(path)
    os.ftruncate(fd, size)  # zero-filled
    return fd


class SharedRegion:
    """Shared bytes of one policy kind, and their cross-process lock. Build with `create` or `attach`."""

    def __init__(self, fd: int, *, _token: object = None) -> None:
        if _token is not _PRIVATE:
            raise TypeError("use SharedRegion.create() or SharedRegion.attach()")
        self.fd = fd
        self.size = os.fstat(fd).st_size
        self.buf = mmap.mmap(fd, self.size)  # MAP_SHARED, read-write
        self._thread_lock = threading.Lock()
        self.closed = False
        magic, kind, hash_key, *params = _HEADER.unpack_from(self.buf, 0)
        self.kind: bytes = kind
        self.params: tuple[int, ...] = tuple(params)
        self._hash_key: bytes = hash_key
        self._magic_ok = magic == _MAGIC

    @classmethod
    def create(cls, kind: bytes, params: tuple[int, ...], data_size: int) -> SharedRegion:
        """A new zeroed region of `data_size` bytes after the header."""
        if data_size <= 0 or len(params) > 4 or len(kind) > 8:
            raise ValueError("bad region shape")
        fd = _memory_file(DATA_OFFSET + data_size)
        with mmap.mmap(fd, DATA_OFFSET) as head:
            # Keyed hashing: stable in every process that maps the region, but clients cannot
            # choose keys that collide into one probe window and evict each other.
            _HEADER.pack_into(head, 0, _MAGIC, kind, secrets.token_bytes(16), *params, *([0] * (4 - len(params))))
        return cls(fd, _token=_PRIVATE)

    @classmethod
    def attach(cls, fd: int, kind: bytes) -> SharedRegion:
        """Map the region behind descriptor `fd` (inherited from the process that created it).

        The descriptor is duplicated, so closing the region leaves `fd` itself open.
        """
        region = cls(os.dup(fd), _token=_PRIVATE)
        if not region._magic_ok or region.kind != kind.ljust(8, b"\0"):
            region.close()
            raise ValueError(f"descriptor {fd} is not a shared {kind.decode()} region")
        return region

    def __enter__(self) -> mmap.mmap:
        if self.closed:
            raise ValueError("shared region closed")
        self._thread_lock.acquire()
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise
        return self.buf

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()

    def key_hash(self, key: str) -> int:
        """A non-zero 64-bit hash of `key`, identical in every process that maps this region."""
        digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8, key=self._hash_key).digest()
        return int.from_bytes(digest, "little") or 1  # 0 marks an empty slot

    def close(self) -> None:
        """Unmap and close the descriptor in this process (other processes keep theirs)."""
        if not self.closed:
            self.closed = True
            self.buf.close()
            os.close(self.fd)

    def __reduce__(self) -> NoReturn:
        raise TypeError("a SharedRegion reaches other processes through fork or its descriptor, not pickling")


_PRIVATE = object()


class SharedTable:
    """Base of a table in a `SharedRegion`: how it is re-opened by descriptor, and closed.

    A subclass names its region `KIND`, builds a region in `__init__` and hands it to `_bind`, which
    reads the layout back from the region's parameters (extend it), so `attach` needs nothing else.
    """

    KIND: ClassVar[bytes]
    _region: SharedRegion

    @classmethod
    def attach(cls, fd: int) -> Self:
        """The table whose region is behind descriptor `fd` (its `fd` in the creating process)."""
        table = cls.__new__(cls)
        table._bind(SharedRegion.attach(fd, cls.KIND))
        return table

    def _bind(self, region: SharedRegion) -> None:
        self._region = region

    @property
    def fd(self) -> int:
        """The region's descriptor, for `attach` in a process that inherits it."""
        return self._region.fd

    def close(self) -> None:
        """Unmap in this process (other processes keep theirs)."""
        self._region.close()


def window_start(key_hash: int, slots: int) -> int:
    """First slot of the key's probe window; tables keep `probe - 1` spare slots so windows never wrap."""
    return key_hash % slots
