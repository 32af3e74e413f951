"""Rate limit counters in this process (``memory://``): dicts and deques."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Callable, Sequence

from nexgate_proxy.background import stop_tasks

from .base import (
    BANNED, REQUESTS, TOKENS, BruteForce, Check, Counters, Decision, Noted, Release,
)

# ------------------------------------------------------------------ memory


class _TokenLog:
    __slots__ = ("entries", "index", "total")

    def __init__(self) -> None:
        self.entries: deque[list] = deque()  # [timestamp_ms, tokens, member]
        self.index: dict[str, list] = {}
        self.total = 0

    def add(self, now: int, tokens: int, member: str) -> None:
        entry = [now, tokens, member]
        self.entries.append(entry)
        self.index[member] = entry
        self.total += tokens

    def prune(self, cutoff: int) -> None:
        entries = self.entries
        while entries and entries[0][0] <= cutoff:
            _, tokens, member = entries.popleft()
            self.total -= tokens
            self.index.pop(member, None)


class MemoryCounters(Counters):
    """Every limit in this process: exact for one instance, per instance for several."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, sweep_interval: float = 30.0) -> None:
        self._clock = clock
        self._sweep_interval = sweep_interval
        self._requests: dict[str, deque[int]] = {}
        self._tokens: dict[str, _TokenLog] = {}
        self._leases: dict[str, set[str]] = {}
        self._bans: dict[str, int] = {}
        self._failures: dict[str, list[int]] = {}  # subject -> [count, expires_at_ms]
        self._windows: dict[str, int] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def _now(self) -> int:
        return int(self._clock() * 1000)

    async def start(self) -> None:
        if self._sweeper is None and self._sweep_interval > 0:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="nexgate-counters-sweep")

    async def close(self) -> None:
        await stop_tasks(self._sweeper)
        self._sweeper = None

    async def acquire(self, member: str, checks: Sequence[Check], ban_subject: str | None = None) -> Decision:
        return self.acquire_now(member, checks, ban_subject)

    def acquire_now(self, member: str, checks: Sequence[Check], ban_subject: str | None = None) -> Decision:
        now = int(self._clock() * 1000)
        if ban_subject is not None and self._bans:
            until = self._bans.get(ban_subject)
            if until is not None:
                if until > now:
                    return Decision(False, BANNED, until - now)
                del self._bans[ban_subject]
        # First pass: check every limit, remembering each one's log so the second pass looks nothing up.
        found: list = []
        for i, check in enumerate(checks):
            kind = check.kind
            if kind == REQUESTS:
                rlog = self._requests.get(check.subject)
                u = 0
                if rlog is not None:
                    cutoff = now - check.window_ms
                    while rlog and rlog[0] <= cutoff:
                        rlog.popleft()
                    u = len(rlog)
                    if u >= check.limit:
                        return Decision(False, i, rlog[u - check.limit] + check.window_ms - now)
                elif check.limit < 1:
                    return Decision(False, i, check.window_ms)
                found.append((rlog, u))
            elif kind == TOKENS:
                tlog = self._tokens.get(check.subject)
                u = 0
                if tlog is not None:
                    entries = tlog.entries
                    if entries and entries[0][0] <= now - check.window_ms:
                        tlog.prune(now - check.window_ms)
                    u = tlog.total
                if u + check.amount > check.limit:
                    return Decision(False, i, _tokens_wait(tlog, u + check.amount - check.limit,
                                                           check.window_ms, now))
                found.append((tlog, u))
            else:
                leases = self._leases.get(check.subject)
                u = len(leases) if leases else 0
                if u + 1 > check.limit:
                    return Decision(False, i, 1000)
                found.append((leases, u))
        # Second pass: take them all.
        remaining: list[int] = []
        reset: list[int] = []
        windows = self._windows
        for check, (log, u) in zip(checks, found):
            kind = check.kind
            subject = check.subject
            if kind == REQUESTS:
                if log is None:  # setdefault: the same subject may appear twice
                    log = self._requests.setdefault(subject, deque())
                log.append(now)
                oldest = log[0]
            elif kind == TOKENS:
                if log is None:
                    log = self._tokens.setdefault(subject, _TokenLog())
                log.add(now, check.amount, member)
                oldest = log.entries[0][0]
            else:
                if log is None:
                    log = self._leases.setdefault(subject, set())
                log.add(member)
                remaining.append(check.limit - u - 1)
                reset.append(0)
                continue
            if windows.get(subject) != check.window_ms:
                windows[subject] = check.window_ms
            remaining.append(check.limit - u - check.amount)
            reset.append(oldest + check.window_ms - now)
        return Decision(True, -1, 0, remaining, reset)

    async def settle(self, member: str, releases: Sequence[Release]) -> None:
        self.settle_now(member, releases)

    def settle_soon(self, member: str, releases: Sequence[Release]) -> None:
        self.settle_now(member, releases)

    def settle_now(self, member: str, releases: Sequence[Release]) -> None:
        for release in releases:
            if release.kind == TOKENS:
                tlog = self._tokens.get(release.subject)
                entry = tlog.index.get(member) if tlog is not None else None
                if entry is not None and tlog is not None:
                    tlog.total += release.actual - entry[1]
                    entry[1] = release.actual
            else:
                leases = self._leases.get(release.subject)
                if leases is not None:
                    leases.discard(member)
                    if not leases:
                        del self._leases[release.subject]

    async def note(self, member: str, ip: Check | None, ip_subject: str | None,
                   failure: BruteForce | None = None, key_subject: str | None = None) -> Noted:
        now = self._now()
        noted = Noted()
        if ip is not None:
            rlog = self._requests.get(ip.subject)
            if rlog is None:
                rlog = self._requests[ip.subject] = deque()
            cutoff = now - ip.window_ms
            while rlog and rlog[0] <= cutoff:
                rlog.popleft()
            if len(rlog) < ip.limit:
                rlog.append(now)
                self._windows[ip.subject] = ip.window_ms
            if len(rlog) >= ip.limit:
                noted.block_ms = rlog[len(rlog) - ip.limit] + ip.window_ms - now
        if ip_subject is None:
            return noted
        if failure is not None:
            count = self._count_failure("f:" + ip_subject, failure.window_ms, now)
            key_count = self._count_failure("f:" + key_subject, failure.window_ms, now) if key_subject else 0
            if (failure.max_failures > 0 and count >= failure.max_failures) or (
                    failure.max_key_failures > 0 and key_count >= failure.max_key_failures):
                until = self._bans.get(ip_subject)
                if until is None or until <= now:
                    self._bans[ip_subject] = now + failure.ban_ms
                    noted.new_ban = True
                self._failures.pop("f:" + ip_subject, None)
            noted.key_failures = key_count
        until = self._bans.get(ip_subject)
        if until is not None and until > now:
            noted.ban_ms = until - now
        return noted

    def _count_failure(self, subject: str, window_ms: int, now: int) -> int:
        entry = self._failures.get(subject)
        if entry is None or entry[1] <= now:
            entry = self._failures[subject] = [0, now + window_ms]
        entry[0] += 1
        return entry[0]

    def sweep(self) -> None:
        """Drop whatever has fully expired (idle subjects), so memory follows the active set."""
        now = self._now()
        for subject, rlog in list(self._requests.items()):
            window = self._windows.get(subject, 60_000)
            if not rlog or rlog[-1] <= now - window:
                del self._requests[subject]
                self._windows.pop(subject, None)
        for subject, tlog in list(self._tokens.items()):
            tlog.prune(now - self._windows.get(subject, 60_000))
            if not tlog.entries:
                del self._tokens[subject]
        for subject, until in list(self._bans.items()):
            if until <= now:
                del self._bans[subject]
        for subject, (_, expires) in list(self._failures.items()):
            if expires <= now:
                del self._failures[subject]

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval)
            self.sweep()

    def __len__(self) -> int:
        return len(self._requests) + len(self._tokens) + len(self._leases) + len(self._bans) + len(self._failures)


def _tokens_wait(tlog: _TokenLog | None, need: int, window_ms: int, now: int) -> int:
    freed = 0
    if tlog is not None:
        for ts, tokens, _ in tlog.entries:
            freed += tokens
            if freed >= need:
                return ts + window_ms - now
    return window_ms
