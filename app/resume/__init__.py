"""Resumable streams: a stream's events go to a store that any connection can replay and tail."""
