"""Protection policies: rate limit, connection slots, circuit breaker, retry.

Pure Python, no web framework: each policy is a small class with injected time, so it runs on a
fake clock in tests and can keep its state in memory (one process) or in shared memory (all
gunicorn workers of one instance).
"""
