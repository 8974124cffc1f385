"""Metrics, traces and logs: every stream reports the same facts to all three."""
