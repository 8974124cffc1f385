"""Streaming gateway for LLM token streams."""
