"""Rate limit counters: one interface (``base``), in process (``memory``) or on Redis (``redis``, with
window leases in ``leases``), chosen by ``state.url``; ``base`` describes the algorithm."""

from __future__ import annotations

from nexgate_proxy.state.redis import RedisClient

from .base import (
    BANNED, CONCURRENCY, DEFAULT_PREFIX, LEASE_SPAN_MS, REQUESTS, TOKENS, BruteForce, Check, Counters,
    Decision, Noted, Release,
)
from .memory import MemoryCounters
from .redis import RedisCounters


def open_counters(url: str, *, redis: RedisClient | None = None, prefix: str = DEFAULT_PREFIX, timeout: float = 0.1,
                  **options: object) -> Counters:
    """``memory://`` for one process; ``redis://``, ``rediss://`` or ``unix://`` to share with other instances.

    ``redis``: the process's client for that URL (without it, the counters open one of their own).
    """
    scheme = url.split(":", 1)[0].lower()
    if scheme == "memory":
        return MemoryCounters()
    if scheme in ("redis", "rediss", "unix"):
        return RedisCounters(redis or url, prefix=prefix, timeout=timeout, **options)  # type: ignore[arg-type]
    raise ValueError(f"unsupported state URL scheme {scheme!r} (use memory://, redis://, rediss:// or unix://)")


__all__ = [
    "BANNED", "CONCURRENCY", "DEFAULT_PREFIX", "LEASE_SPAN_MS", "REQUESTS", "TOKENS", "BruteForce", "Check",
    "Counters", "Decision", "MemoryCounters", "Noted", "RedisCounters", "Release", "open_counters",
]
