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
lease room in the window, which this instance then uses in process (``leases``).

``settle_soon`` is the settle nobody waits for: in Redis, the releases of all
requests settled within one loop iteration travel in one EVALSHA, which takes
its place in the pipeline at the first of them, so every later call sees them
done. ``close`` sends what is still waiting.

Redis trouble never hangs a request: every call has a tight timeout, and after
a few consecutive failures a circuit breaker opens and calls fail at once
(``StateUnavailable``) until a background probe sees Redis answer again.
The caller decides whether that means "limit in-process" or "refuse".
The Redis backend runs its scripts on the process's one Redis client
(``nexgate_proxy.state.redis``: one pipelined connection, one circuit breaker).

Redis time (``TIME``) is the clock of the Redis backend, so instances with
skewed clocks still agree on windows. Keys are ``<prefix>:<kind>:<subject>``
and expire on their own when idle. (All keys of one call must live on one
node: Redis Cluster is not supported.)
"""

from __future__ import annotations

import abc
import asyncio
from dataclasses import dataclass, field
from typing import Sequence

REQUESTS = "r"
"""A sliding-window count of requests; ``amount`` is 1."""
TOKENS = "t"
"""A sliding-window sum of tokens; ``amount`` is the reservation, corrected in ``settle``."""
CONCURRENCY = "c"
"""Leases of requests in flight; ``window_ms`` is the lease."""

DEFAULT_PREFIX = "nexgate:rl"
LEASE_SPAN_MS = 2000
"""How long a window lease serves requests; its entries are timestamped at its end (see window_leases).

Long enough that the next lease, asked for half a span ahead, arrives before this one ends even
when Redis answers late (seen: up to 0.6 s, benchmarks/README.md); a request is never counted for
less time than if it had been logged when it came, at most one span longer."""


@dataclass(slots=True)
class Check:
    """One limit to check and take for a request."""

    kind: str
    subject: str
    """Who the limit is for, e.g. ``key:<id>``, ``org:<id>``, ``ip:<address>``."""
    limit: int
    amount: int = 1
    window_ms: int = 60_000


@dataclass(slots=True)
class Decision:
    allowed: bool
    refused: int = -1
    """Index of the check that refused; -1 when allowed, ``BANNED`` when the ban subject is banned."""
    retry_ms: int = 0
    """On refusal: how long until the refused check could pass."""
    remaining: list[int] = field(default_factory=list)
    """When allowed, per check: what is left in the window after this request."""
    reset_ms: list[int] = field(default_factory=list)
    """When allowed, per check: until the oldest counted entry leaves the window (0 for concurrency)."""


BANNED = -2


@dataclass(slots=True)
class Release:
    """What ``settle`` undoes or corrects for a request that acquired."""

    kind: str
    """TOKENS (correct the reservation to ``actual``) or CONCURRENCY (free the slot)."""
    subject: str
    reserved: int = 0
    actual: int = 0
    window_ms: int = 60_000


@dataclass(frozen=True, slots=True)
class BruteForce:
    max_failures: int = 20
    """Failed authentications from one IP within ``window_ms`` that ban it (0: off)."""
    max_key_failures: int = 10
    """Failures against one public key id within the window after which every IP failing on it is banned,
    and unknown secrets for it are refused without a bcrypt (0: off)."""
    window_ms: int = 300_000
    ban_ms: int = 900_000


@dataclass(slots=True)
class Noted:
    ban_ms: int = 0
    """> 0: the IP is banned for this long."""
    block_ms: int = 0
    """> 0: the IP's request rate is used up for this long."""
    new_ban: bool = False
    """This call created the ban (announce it to other instances)."""
    key_failures: int = 0
    """Failures counted against ``key_subject`` in its current window (0 when none was given)."""


class Counters(abc.ABC):
    """The hot-state interface rate limiting codes against."""

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    @abc.abstractmethod
    async def acquire(self, member: str, checks: Sequence[Check], ban_subject: str | None = None) -> Decision:
        """Check every limit and take them all, or none. ``member`` is the request's unique id."""

    def admit_locally(self, member: str, checks: Sequence[Check]) -> tuple[list[int], list[int]] | None:
        """Admit without a round trip, against room this instance holds, or None (call ``acquire``).

        Admitted: per check, what is left and the milliseconds until it resets, as in an allowed
        ``Decision``. A request admitted here holds no concurrency slot; its settle is ``settle_locally``.
        """
        return None

    def settle_locally(self, member: str, reserved: int, actual: int) -> None:
        """Settle a request ``admit_locally`` admitted: its token reservation becomes ``actual``."""
        raise NotImplementedError("nothing is admitted locally here")

    @abc.abstractmethod
    async def settle(self, member: str, releases: Sequence[Release]) -> None:
        """Correct token reservations to actual usage and free concurrency slots."""

    def settle_soon(self, member: str, releases: Sequence[Release]) -> None:
        """``settle`` without waiting for it: for the hot path, where nobody waits for the outcome.

        Every later call on this backend sees it done. Raises ``StateUnavailable`` only when it is
        known at once that it cannot be done (the leases and reservations then expire on their own).
        """
        task = asyncio.ensure_future(self.settle(member, releases))
        task.add_done_callback(_retrieve)

    @abc.abstractmethod
    async def note(self, member: str, ip: Check | None, ip_subject: str | None,
                   failure: BruteForce | None = None, key_subject: str | None = None) -> Noted:
        """Count a request that never reached ``acquire`` against its IP, and a failed authentication.

        ``ip``, if given, is a REQUESTS check taken unconditionally (the request happened) but never past
        its limit; ``failure``, if given, counts one failure for ``ip_subject`` (and ``key_subject``) and
        bans the IP past the thresholds. The answer also reports an existing ban of ``ip_subject``.
        """


def _retrieve(future: asyncio.Future) -> None:
    # Nobody waits for it: read the outcome so that asyncio does not log it as never retrieved.
    if not future.cancelled():
        future.exception()
