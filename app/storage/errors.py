"""The one error type storages raise, and the one place backend exceptions are translated into it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class StorageError(Exception):
    """A storage backend (shared memory, Redis) failed; the caller applies its fail-open or fail-closed choice."""


@contextmanager
def wrap_errors(what: str, errors: tuple[type[BaseException], ...]) -> Iterator[None]:
    """Re-raise `errors` as `StorageError("<what> failed: ...")`: callers handle one type (limits `_wrap_errors`)."""
    try:
        yield
    except errors as exc:
        raise StorageError(f"{what} failed: {exc!r}") from exc
