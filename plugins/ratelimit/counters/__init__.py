"""Hot counters for rate limits: sliding-window logs, token budgets, concurrency leases, bans.

One interface, two backends, chosen by ``state.url``:

* ``MemoryCounters`` (``memory://``): dicts and deques in this process.
* ``RedisCounters`` (``redis://``, ``rediss://``, ``unix://``): the same
  semantics in Lua, so every check of a request is one atomic round trip
  shared by every gateway instance.

The algorithm is a sliding-window log: a request (or a token reservation) is an
entry timestamped when it was taken and counted until exactly one window later.
Unlike fixed windows it allows no double burst at window edges, and unlike a
token bucket it never allows more than ``limit`` in any window, so "100 per
minute" means at most 100 in any 60 seconds. An entry costs a few dozen bytes
for the window's length; limits of a few thousand per minute are cheap.

``acquire`` is all-or-nothing: it checks every limit of a request and takes
all of them, or refuses without taking any. Concurrency slots are leases that
expire (``lease_ms``), renewed in the background while the request is in
flight, so a crashed instance frees its slots within one lease.

Busy limits are mostly admitted without a round trip: an admit that goes to Redis may also
lease room in the window, which this instance then uses in process (``window_leases``).

``settle_soon`` is the settle nobody waits for: in Redis, the releases of all
requests settled within one loop iteration travel in one EVALSHA, which takes
its place in the pipeline at the first of them, so every later call sees them
done. ``close`` sends what is still waiting.

Redis trouble never hangs a request: every call has a tight timeout, and after
a few consecutive failures a circuit breaker opens and calls fail at once
(``StateUnavailable``) until a background probe sees Redis answer again.
The caller decides whether that means "limit in-process" or "refuse".
The Redis backend runs its scripts on the process's one ``RedisClient`` (the core's,
app key ``REDIS``): lean RESP over one pipelined connection, with one circuit breaker
shared with every other user of it (redis-py's per-call overhead was larger than the
rest of a request).

Redis time (``TIME``) is the clock of the Redis backend, so instances with
skewed clocks still agree on windows. Keys are ``<prefix>:<kind>:<subject>``
and expire on their own when idle. (All keys of one call must live on one
node: Redis Cluster is not supported.)
"""

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
