"""The per-token path: framing, the upstream-to-client pump, and the per-worker stream registry."""
