"""Window leases: room in a shared sliding window that one instance uses without asking Redis.

An admit that goes to Redis may also ask, per requests or tokens limit, for a lease: ``size``
more entries added to the shared log *now*, timestamped at the end of the lease's span (Redis
time + ``LEASE_SPAN_MS``). Until that end the instance admits requests against the lease in
process. When a lease is a quarter used, the next one is asked for in the background (a script that
takes no request entry), so a busy limit's requests do not wait for Redis at all.

Why this stays exact: an entry counts until one window after its timestamp, and a leased entry's
timestamp is never earlier than the request that uses it (it is used before the span ends). So
every request is counted at least as long as if it had been logged when it came, in the log
every instance checks: "at most ``limit`` in any window" holds across instances. What a lease
costs is caution: an unused entry counts until it is given back (right after the span; a dead
instance's, for one window), and a used one up to one span longer than needed. Redis grants a
lease only while the window is at most half used, so near a limit every request is decided by
Redis, one by one, and no room is left stranded on another instance.

Token leases hold ``size`` tokens in one entry; requests served from it take their estimate and
settle to their real usage in process. When the span ends, the entry is rewritten to what the
requests served from it used (open ones at their estimate, corrected again when they settle).
"""

from __future__ import annotations

import secrets
from typing import Callable, Sequence

from .base import LEASE_SPAN_MS, REQUESTS, TOKENS, Check, Decision

LEASE_SHARE = 32
"""A lease takes at most 1/LEASE_SHARE of a limit..."""
MAX_LEASE_REQUESTS = 4096
"""...and room for at most this many requests..."""
MIN_LEASE_REQUESTS = 4
"""...and at least this many, else none is taken (small limits are decided by Redis each time)."""
FIRST_LEASE_REQUESTS = 16
"""A limit's first lease has room for this many requests. A lease a quarter used before its end
doubles the next one, one ending more than half unused halves it: leases follow the request rate,
so a quiet limit leases (and gives back) little, and a busy one rarely asks."""
ASK_AHEAD_AT = 4
"""The next lease is asked for when the one in use is 1/ASK_AHEAD_AT used: under load an awaited
round trip takes a few event-loop turns (tens of ms at 32 connections), time for ~100 requests."""
ASK_BEFORE_END = LEASE_SPAN_MS / 2000
"""...or when it ends within this many seconds: half a span, what a late Redis answer may take."""
CLOCK_MARGIN = 0.05
"""Seconds a lease stops early, for clock rate differences between this host and Redis."""


_LEASED = (REQUESTS, TOKENS)


def lease_size(check: Check, requests: int = MAX_LEASE_REQUESTS) -> int:
    """The lease to ask for with this check, room for at most ``requests`` requests (0: none)."""
    if check.kind == REQUESTS:
        size = min(check.limit // LEASE_SHARE, requests)
        return size if size >= MIN_LEASE_REQUESTS else 0
    if check.kind == TOKENS and check.amount > 0:
        size = min(check.limit // LEASE_SHARE, check.amount * requests)
        return size if size >= check.amount * MIN_LEASE_REQUESTS else 0
    return 0


class WindowLease:
    __slots__ = ("kind", "subject", "base", "size", "used", "open", "recorded", "end", "remaining", "reset_at",
                 "window_ms")

    def __init__(self, kind: str, subject: str, base: str, size: int, end: float, remaining: int,
                 reset_at: float, window_ms: int) -> None:
        self.kind = kind
        self.subject = subject
        self.base = base
        """Its entries in Redis: ``base:1`` .. ``base:size`` (requests), ``base:<tokens>`` (tokens)."""
        self.size = size
        self.used = 0
        """Requests: entries used. Tokens: estimates of open requests plus the usage of settled ones."""
        self.open = 0
        """Tokens: requests served from it that have not settled."""
        self.recorded = size
        """Tokens: what its entry in Redis holds."""
        self.end = end
        self.remaining = remaining
        """What Redis reported left in the window when it granted the lease (the lease not counted)."""
        self.reset_at = reset_at
        self.window_ms = window_ms

    def has_room(self, amount: int) -> bool:
        """Room for one more request (``amount``: its tokens, for a token lease)."""
        return self.used + (1 if self.kind == REQUESTS else amount) <= self.size


class WindowLeases:
    """This instance's window leases, by limit; ended ones go back to Redis in batches.

    Per limit, the lease in use (``active``) and the next one (``queued``), asked for in the
    background when the one in use is a quarter used or near its end, so busy limits never wait.
    """

    def __init__(self) -> None:
        self.active: dict[tuple[str, str], WindowLease] = {}
        self.queued: dict[tuple[str, str], WindowLease] = {}
        self.ending: list[WindowLease] = []
        self.asking: set[tuple[str, str]] = set()
        """Limits a lease is being asked for: concurrent admits do not ask again."""
        self.running_low: list[Check] = []
        """Checks whose lease in use is a quarter used or near its end, with no next one: ask ahead."""
        self.served: dict[str, list[WindowLease]] = {}
        """member -> the token leases it was admitted from (its settle corrects them)."""
        self.scale: dict[tuple[str, str], int] = {}
        """Per limit, the requests' worth its next lease is asked for (see FIRST_LEASE_REQUESTS)."""
        self.seen: dict[tuple[str, str], float] = {}
        """Per limit, when a request last went to Redis for it: a lease is asked for only by the second
        within a span, so a quiet limit never leases (and gives back) room it does not use."""
        self._instance = secrets.token_hex(6)
        self._calls = 0

    def wanted(self, checks: Sequence[Check], now: float, ahead: bool = False) -> list[int]:
        """Per check, the lease to ask for: none where one is held with room, queued, or being asked for.

        The caller reports back with ``answered``.
        """
        sizes = []
        span = LEASE_SPAN_MS / 1000
        for check in checks:
            key = (check.kind, check.subject)
            size = lease_size(check, self.scale.get(key, FIRST_LEASE_REQUESTS))
            if size and not ahead:
                last = self.seen.get(key)
                self.seen[key] = now
                if last is None or now - last > span:
                    size = 0
            if size:
                lease = self.active.get(key)
                if key in self.asking or key in self.queued or (
                        not ahead and lease is not None and now < lease.end and lease.has_room(check.amount)):
                    size = 0
                else:
                    self.asking.add(key)
            sizes.append(size)
        return sizes

    def answered(self, checks: Sequence[Check], sizes: Sequence[int]) -> None:
        """The call that asked for ``sizes`` came back (granted or not, or failed)."""
        for check, size in zip(checks, sizes):
            if size:
                self.asking.discard((check.kind, check.subject))

    def prefix(self) -> str:
        self._calls += 1
        return f"L:{self._instance}:{self._calls}"

    def granted(self, prefix: str, checks: Sequence[Check], sizes: Sequence[int], decision: Decision,
                sent: float) -> None:
        """An admit sent at ``sent`` was granted leases of ``sizes`` (0: none)."""
        for i, (check, size) in enumerate(zip(checks, sizes)):
            if size:
                self._add(WindowLease(check.kind, check.subject, f"{prefix}:{i}", size, _end(sent),
                                      decision.remaining[i], sent + decision.reset_ms[i] / 1000, check.window_ms))

    def granted_ahead(self, prefix: str, checks: Sequence[Check], reply: Sequence[int], sent: float) -> None:
        """Leases asked ahead: per check, (granted, left before the lease, reset ms) in ``reply``."""
        for i, check in enumerate(checks):
            size, left, reset_ms = reply[3 * i:3 * i + 3]
            if size:
                self._add(WindowLease(check.kind, check.subject, f"{prefix}:{i}", size, _end(sent), left,
                                      sent + reset_ms / 1000, check.window_ms))

    def _add(self, lease: WindowLease) -> None:
        key = (lease.kind, lease.subject)
        if key in self.active:
            old = self.queued.pop(key, None)
            if old is not None:
                self._retire(old)
            self.queued[key] = lease
        else:
            self.active[key] = lease

    def _next(self, key: tuple[str, str], lease: WindowLease | None, amount: int, now: float) -> WindowLease | None:
        """The lease in use (``lease``) cannot serve: the next one takes its place, if it can."""
        queued = self.queued.get(key)
        if queued is None:
            return None
        if now >= queued.end:  # ended unused: it goes back, and the next admit asks for another
            del self.queued[key]
            self._retire(queued)
            return None
        if not queued.has_room(amount):
            return None
        del self.queued[key]
        if lease is not None:
            self._retire(lease)
        self.active[key] = queued
        return queued

    def _retire(self, lease: WindowLease) -> None:
        """No more admits from it: what it did not use goes back with the next ``due``."""
        self.ending.append(lease)
        if lease.used * 2 < lease.size:  # the rate fell: lease less
            key = (lease.kind, lease.subject)
            scale = self.scale.get(key, FIRST_LEASE_REQUESTS) // 2
            if scale > FIRST_LEASE_REQUESTS:
                self.scale[key] = scale
            else:
                self.scale.pop(key, None)

    def admit(self, member: str, checks: Sequence[Check], now: float) -> tuple[list[int], list[int]] | None:
        """Admit against leases held here: per check, what is left and the ms until it resets (as an allowed
        ``Decision`` has them); None when some check has no lease with room (ask Redis)."""
        leases = []
        active = self.active
        for check in checks:
            kind = check.kind
            if kind not in _LEASED:
                return None
            key = (kind, check.subject)
            lease = active.get(key)
            amount = 1 if kind == REQUESTS else check.amount
            if lease is None or now >= lease.end or lease.used + amount > lease.size:
                lease = self._next(key, lease, amount, now)
                if lease is None:
                    return None
            leases.append(lease)
        remaining = []
        reset = []
        served = None
        for check, lease in zip(checks, leases):
            if check.kind == REQUESTS:
                lease.used += 1
            else:
                lease.used += check.amount
                lease.open += 1
                if served is None:
                    served = self.served[member] = []
                served.append(lease)
            remaining.append(lease.remaining - lease.used)
            reset.append(max(int((lease.reset_at - now) * 1000), 0))
            busy = lease.used * ASK_AHEAD_AT >= lease.size
            if busy or now >= lease.end - ASK_BEFORE_END:
                key = (lease.kind, lease.subject)
                if key not in self.queued and key not in self.asking:
                    self.running_low.append(check)
                    if busy:
                        self.scale[key] = min(self.scale.get(key, FIRST_LEASE_REQUESTS) * 2, MAX_LEASE_REQUESTS)
        return remaining, reset

    def take_running_low(self) -> list[Check]:
        low, self.running_low = self.running_low, []
        return low

    def settle(self, member: str, reserved: int, actual: int) -> None:
        """A locally admitted request settled: the token leases it used count ``actual`` for its ``reserved``."""
        leases = self.served.pop(member, None)
        if leases is not None:
            for lease in leases:
                lease.used += actual - reserved
                lease.open -= 1

    def due(self, now: float, key: Callable[[str, str], str], closing: bool = False) -> tuple[list[str], list[object]]:
        """What ended leases give back or correct, as the leases script's keys and args."""
        span = LEASE_SPAN_MS / 1000
        for k, last in list(self.seen.items()):
            if now - last > span:
                del self.seen[k]
        for table in (self.active, self.queued):
            for k, lease in list(table.items()):
                if closing or now >= lease.end:
                    del table[k]
                    self._retire(lease)
        keys: list[str] = []
        args: list[object] = []
        still: list[WindowLease] = []
        for lease in self.ending:
            if lease.kind == REQUESTS:
                if lease.used < lease.size:
                    keys.append(key(REQUESTS, lease.subject))
                    args += (REQUESTS, lease.base, lease.used + 1, lease.size, lease.window_ms)
                continue
            target = max(lease.used, 0)
            if target != lease.recorded:
                keys += (key(TOKENS, lease.subject), key("ts", lease.subject))
                args += (TOKENS, lease.base, lease.recorded, target, lease.window_ms)
                lease.recorded = target
            if lease.open > 0 and not closing:
                still.append(lease)  # its open requests correct it again when they settle
        self.ending = still
        return keys, args


def _end(sent: float) -> float:
    """When a lease granted by a call sent at ``sent`` stops serving (its entries' timestamp, early)."""
    return sent + LEASE_SPAN_MS / 1000 - CLOCK_MARGIN
