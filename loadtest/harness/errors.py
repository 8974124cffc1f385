"""The one error the harness raises."""

from __future__ import annotations


class HarnessError(RuntimeError):
    """A tool is missing, or a process would not start, answer or stop."""
