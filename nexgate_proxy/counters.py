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
(``CountersUnavailable``) until a background probe sees Redis answer again.
The caller decides whether that means "limit in-process" or "refuse".
The Redis backend speaks RESP itself over one pipelined connection per
process (redis-py's per-call overhead was larger than the rest of a request).

Redis time (``TIME``) is the clock of the Redis backend, so instances with
skewed clocks still agree on windows. Keys are ``<prefix>:<kind>:<subject>``
and expire on their own when idle. (All keys of one call must live on one
node: Redis Cluster is not supported.)
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import hiredis

from .background import stop_tasks

log = logging.getLogger("nexgate.counters")

REQUESTS = "r"
"""A sliding-window count of requests; ``amount`` is 1."""
TOKENS = "t"
"""A sliding-window sum of tokens; ``amount`` is the reservation, corrected in ``settle``."""
CONCURRENCY = "c"
"""Leases of requests in flight; ``window_ms`` is the lease."""

DEFAULT_PREFIX = "nexgate:rl"
LEASE_SPAN_MS = 2000
"""How long a window lease serves requests; its entries are timestamped at its end (see window_leases).

Two seconds, so that the next lease, asked for half a span ahead, arrives in time even when Redis
answers late: on the benchmark machine replies took up to 0.6 s at times (Redis descheduled on a
shared core), and every request of an instance whose lease ran out then waited for Redis."""


class CountersUnavailable(Exception):
    """The backend did not answer in time, or its circuit breaker is open."""

    def __init__(self, reason: str, *, sent: bool = True) -> None:
        super().__init__(reason)
        self.sent = sent
        """False only when the call surely never reached Redis (so it surely did nothing there)."""


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
    """Failed authentications from one IP within ``window_ms`` that ban it."""
    max_key_failures: int = 0
    """Failures against one public key id within the window after which every IP failing on it is banned (0: off)."""
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

        Every later call on this backend sees it done. Raises ``CountersUnavailable`` only when it is
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


def _retrieve(future: asyncio.Future) -> None:
    # Nobody waits for it: read the outcome so that asyncio does not log it as never retrieved.
    if not future.cancelled():
        future.exception()


def _tokens_wait(tlog: _TokenLog | None, need: int, window_ms: int, now: int) -> int:
    freed = 0
    if tlog is not None:
        for ts, tokens, _ in tlog.entries:
            freed += tokens
            if freed >= need:
                return ts + window_ms - now
    return window_ms


# ------------------------------------------------------------------- redis

_LUA_COMMON = """
local SPAN = """ + str(LEASE_SPAN_MS) + """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function resum(log, sum, window)
  local all = redis.call('ZRANGE', log, 0, -1)
  local s = 0
  for _, m in ipairs(all) do s = s + (tonumber(string.match(m, ':(%d+)$')) or 0) end
  if #all == 0 then redis.call('DEL', sum) else redis.call('SET', sum, s, 'PX', window + SPAN) end
  return s
end
-- A requests lease's entries base:x .. base:y, added at one score (or removed) a thousand per call:
-- one call per entry made a lease of 4096 cost Redis ~30 ms, with every other call waiting behind it.
local function lease_entries(cmd, log, score, base, x, y)
  local args = {}
  for s = x, y do
    if score then args[#args + 1] = score end
    args[#args + 1] = base .. ':' .. s
    if #args >= 2000 then
      redis.call(cmd, log, unpack(args))
      args = {}
    end
  end
  if #args > 0 then redis.call(cmd, log, unpack(args)) end
end
-- Tokens in a window: what left it is dropped from the log and the running sum first.
local function tokens_used(log, sum, window, now)
  local cutoff = now - window
  local old = redis.call('ZRANGEBYSCORE', log, '-inf', cutoff)
  if #old > 0 then
    local freed = 0
    for _, m in ipairs(old) do freed = freed + (tonumber(string.match(m, ':(%d+)$')) or 0) end
    redis.call('ZREMRANGEBYSCORE', log, '-inf', cutoff)
    if redis.call('EXISTS', sum) == 1 then
      local u = redis.call('DECRBY', sum, freed)
      if u < 0 then u = resum(log, sum, window) end
      return u
    end
    return resum(log, sum, window)
  end
  local s = redis.call('GET', sum)
  if s then return tonumber(s) end
  return resum(log, sum, window)
end
"""

ACQUIRE_LUA = _LUA_COMMON + """
-- KEYS: [ban], then per check: r -> log | t -> log, sum | c -> leases
-- ARGV: member, has_ban, n, lease prefix, then kind, limit, amount, window_ms, lease per check
-- A lease (window_leases) is granted only while the window stays at most half used; log keys
-- live one span longer than the window, for the leased entries timestamped a span ahead.
local now = now_ms()
local member = ARGV[1]
local k = 1
if ARGV[2] == '1' then
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then return {-2, ttl} end
  k = 2
end
local n = tonumber(ARGV[3])
local kinds, limits, amounts, windows, logs, sums, used, leases = {}, {}, {}, {}, {}, {}, {}, {}
local a = 5
for i = 1, n do
  local kind = ARGV[a]
  local limit = tonumber(ARGV[a + 1])
  local amount = tonumber(ARGV[a + 2])
  local window = tonumber(ARGV[a + 3])
  leases[i] = tonumber(ARGV[a + 4])
  a = a + 5
  local log = KEYS[k]
  k = k + 1
  local u
  if kind == 't' then
    local sum = KEYS[k]
    k = k + 1
    sums[i] = sum
    u = tokens_used(log, sum, window, now)
    if u + amount > limit then
      local need = u + amount - limit
      local freed = 0
      local entries = redis.call('ZRANGE', log, 0, -1, 'WITHSCORES')
      for j = 1, #entries, 2 do
        freed = freed + (tonumber(string.match(entries[j], ':(%d+)$')) or 0)
        if freed >= need then return {i - 1, tonumber(entries[j + 1]) + window - now} end
      end
      return {i - 1, window}
    end
  elseif kind == 'c' then
    redis.call('ZREMRANGEBYSCORE', log, '-inf', now)
    u = redis.call('ZCARD', log)
    if u + 1 > limit then return {i - 1, 1000} end
  else
    redis.call('ZREMRANGEBYSCORE', log, '-inf', now - window)
    u = redis.call('ZCARD', log)
    if u + 1 > limit then
      local e = redis.call('ZRANGE', log, u - limit, u - limit, 'WITHSCORES')
      return {i - 1, tonumber(e[2]) + window - now}
    end
  end
  kinds[i], limits[i], amounts[i], windows[i], logs[i], used[i] = kind, limit, amount, window, log, u
end
local out = {-1, 0}
local prefix = ARGV[4]
for i = 1, n do
  local kind, log, window = kinds[i], logs[i], windows[i]
  if kind == 'c' then
    redis.call('ZADD', log, now + window, member)
    redis.call('PEXPIRE', log, window)
    out[#out + 1] = limits[i] - used[i] - 1
    out[#out + 1] = 0
    out[#out + 1] = 0
  else
    local lease = leases[i]
    if lease > 0 and (used[i] + amounts[i] + lease) * 2 > limits[i] then lease = 0 end
    local base = prefix .. ':' .. (i - 1)
    if kind == 't' then
      redis.call('ZADD', log, now, member .. ':' .. amounts[i])
      redis.call('INCRBY', sums[i], amounts[i] + lease)
      if lease > 0 then redis.call('ZADD', log, now + SPAN, base .. ':' .. lease) end
      redis.call('PEXPIRE', sums[i], window + SPAN)
    else
      redis.call('ZADD', log, now, member)
      lease_entries('ZADD', log, now + SPAN, base, 1, lease)
    end
    redis.call('PEXPIRE', log, window + SPAN)
    local e = redis.call('ZRANGE', log, 0, 0, 'WITHSCORES')
    out[#out + 1] = limits[i] - used[i] - amounts[i]
    out[#out + 1] = tonumber(e[2]) + window - now
    out[#out + 1] = lease
  end
end
return out
"""

SETTLE_LUA = _LUA_COMMON + """
-- Many requests' releases in one call (those that arrive within one loop iteration travel together).
-- KEYS per release: t -> log, sum | c -> leases
-- ARGV: m, then per request: member, n, then kind, reserved, actual, window_ms per release
local m = tonumber(ARGV[1])
local k, a = 1, 2
for _ = 1, m do
  local member = ARGV[a]
  local n = tonumber(ARGV[a + 1])
  a = a + 2
  for i = 1, n do
    local kind = ARGV[a]
    local reserved = tonumber(ARGV[a + 1])
    local actual = tonumber(ARGV[a + 2])
    local window = tonumber(ARGV[a + 3])
    a = a + 4
    if kind == 't' then
      local log, sum = KEYS[k], KEYS[k + 1]
      k = k + 2
      if reserved ~= actual then
        local old = member .. ':' .. reserved
        local score = redis.call('ZSCORE', log, old)
        if score then
          redis.call('ZREM', log, old)
          if actual > 0 then redis.call('ZADD', log, score, member .. ':' .. actual) end
          if redis.call('EXISTS', sum) == 1 then
            local s = redis.call('INCRBY', sum, actual - reserved)
            if s < 0 then resum(log, sum, window) end
          else
            resum(log, sum, window)
          end
        end
      end
    else
      redis.call('ZREM', KEYS[k], member)
      k = k + 1
    end
  end
end
return m
"""

NOTE_LUA = _LUA_COMMON + """
-- KEYS: ip log, ip failures, key failures, ban
-- ARGV: member, ip_limit, ip_window, failed, max_failures, max_key_failures, failure_window, ban_ms, has_key
local now = now_ms()
local block = 0
local limit = tonumber(ARGV[2])
if limit > 0 then
  local log, window = KEYS[1], tonumber(ARGV[3])
  redis.call('ZREMRANGEBYSCORE', log, '-inf', now - window)
  local u = redis.call('ZCARD', log)
  if u < limit then
    redis.call('ZADD', log, now, ARGV[1])
    redis.call('PEXPIRE', log, window + SPAN)
    u = u + 1
  end
  if u >= limit then
    local e = redis.call('ZRANGE', log, u - limit, u - limit, 'WITHSCORES')
    block = tonumber(e[2]) + window - now
  end
end
local created = 0
if ARGV[4] == '1' then
  local max_failures, max_key_failures = tonumber(ARGV[5]), tonumber(ARGV[6])
  local fwindow = tonumber(ARGV[7])
  local f = redis.call('INCR', KEYS[2])
  if f == 1 then redis.call('PEXPIRE', KEYS[2], fwindow) end
  local kf = 0
  if ARGV[9] == '1' then
    kf = redis.call('INCR', KEYS[3])
    if kf == 1 then redis.call('PEXPIRE', KEYS[3], fwindow) end
  end
  if (max_failures > 0 and f >= max_failures) or (max_key_failures > 0 and kf >= max_key_failures) then
    if redis.call('SET', KEYS[4], '1', 'PX', tonumber(ARGV[8]), 'NX') then created = 1 end
    redis.call('DEL', KEYS[2])
  end
end
local ban = 0
if KEYS[4] ~= '' then
  local ttl = redis.call('PTTL', KEYS[4])
  if ttl > 0 then ban = ttl end
end
return {ban, block, created}
"""

RENEW_LUA = """
-- KEYS: lease sets; ARGV: lease_ms, then one member per key
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', now + lease, ARGV[i + 1])
  redis.call('PEXPIRE', key, lease)
end
return #KEYS
"""


LEASE_AHEAD_LUA = _LUA_COMMON + """
-- Window leases asked ahead of need (see window_leases), with no request entry of their own.
-- KEYS per check: r -> log | t -> log, sum. ARGV: prefix, then kind, limit, window_ms, lease per check.
-- Returns per check: granted, left in the window before the lease, reset.
local now = now_ms()
local out = {}
local k, i = 1, 0
for a = 2, #ARGV, 4 do
  local kind, limit, window, lease = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local base = ARGV[1] .. ':' .. i
  i = i + 1
  local log = KEYS[k]
  local u
  if kind == 't' then
    local sum = KEYS[k + 1]
    k = k + 2
    u = tokens_used(log, sum, window, now)
    if (u + lease) * 2 > limit then lease = 0 end
    if lease > 0 then
      redis.call('ZADD', log, now + SPAN, base .. ':' .. lease)
      redis.call('INCRBY', sum, lease)
      redis.call('PEXPIRE', sum, window + SPAN)
    end
  else
    k = k + 1
    redis.call('ZREMRANGEBYSCORE', log, '-inf', now - window)
    u = redis.call('ZCARD', log)
    if (u + lease) * 2 > limit then lease = 0 end
    lease_entries('ZADD', log, now + SPAN, base, 1, lease)
  end
  local reset = window
  if lease > 0 then
    redis.call('PEXPIRE', log, window + SPAN)
    local e = redis.call('ZRANGE', log, 0, 0, 'WITHSCORES')
    reset = tonumber(e[2]) + window - now
  end
  out[#out + 1] = lease
  out[#out + 1] = limit - u
  out[#out + 1] = reset
end
return out
"""


WINDOW_LEASES_LUA = _LUA_COMMON + """
-- Ended window leases (see window_leases): unused request entries go, token entries are rewritten.
-- Per lease, ARGV kind, base, a, b, window_ms; KEYS r -> log | t -> log, sum.
-- r: remove base:a .. base:b. t: the entry base:a becomes base:b (removed when b is 0).
local k = 1
for a = 1, #ARGV, 5 do
  local base, x, y, window = ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  if ARGV[a] == 'r' then
    lease_entries('ZREM', KEYS[k], nil, base, x, y)
    k = k + 1
  else
    local log, sum = KEYS[k], KEYS[k + 1]
    k = k + 2
    local score = redis.call('ZSCORE', log, base .. ':' .. x)
    if score then
      redis.call('ZREM', log, base .. ':' .. x)
      if y > 0 then redis.call('ZADD', log, score, base .. ':' .. y) end
      if redis.call('EXISTS', sum) == 1 then
        if redis.call('INCRBY', sum, y - x) < 0 then resum(log, sum, window) end
      else
        resum(log, sum, window)
      end
    end
  end
end
return k - 1
"""


class CircuitBreaker:
    """Opens after ``threshold`` consecutive failures; closed again by a successful probe."""

    def __init__(self, threshold: int = 3) -> None:
        self.threshold = threshold
        self.consecutive = 0
        self.open = False
        self.opened = 0
        """How many times it opened (for metrics)."""

    def success(self) -> None:
        self.consecutive = 0

    def failure(self) -> bool:
        """Record a failure; True if this one opened the breaker."""
        self.consecutive += 1
        if not self.open and self.consecutive >= self.threshold:
            self.open = True
            self.opened += 1
            return True
        return False

    def close(self) -> None:
        self.open = False
        self.consecutive = 0


# ------------------------------------------------------- a lean RESP client

# redis-py costs ~150 us of CPU per call (pool, command machinery, parsing): more than the rest of a
# proxied request. The limits need four commands (EVALSHA, SCRIPT LOAD, PING and the handshake), so they
# speak RESP themselves over ONE pipelined connection per process: calls made in the same loop
# iteration go out in one write, replies are matched to callers in order, and a caller that timed out
# leaves its reply to be skipped, so the connection stays usable.


class RespError(Exception):
    """An error reply from Redis (``-ERR ...``, ``-NOSCRIPT ...``)."""


def encode_command(*args: object) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        else:
            data = str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _time_out(reply: asyncio.Future) -> None:
    if not reply.done():
        reply.set_exception(TimeoutError())  # its reply, when it comes, is skipped


class _RespProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.waiters: deque[asyncio.Future] = deque()
        # hiredis (redis-py's C reply parser): a reply costs a fraction of a microsecond to read.
        self.reader = hiredis.Reader(replyError=RespError)
        self.closed = False
        self._out: list[bytes | Callable[[], bytes]] = []
        self._flush_scheduled = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def call(self, payload: bytes | Callable[[], bytes]) -> asyncio.Future:
        """Queue one command; its reply resolves the future. Calls of one loop iteration share a write.

        ``payload`` may be a function that builds the command when the write goes out: the command
        keeps its place in the pipeline, and whatever is added to it until then still travels in it.
        """
        if self.closed:
            raise ConnectionError("connection closed")
        future = self.loop.create_future()
        self.waiters.append(future)
        self._out.append(payload)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self.transport is not None and not self.closed:
            out, self._out = self._out, []
            parts = [part if part.__class__ is bytes else part() for part in out]  # type: ignore[operator]
            self.transport.write(parts[0] if len(parts) == 1 else b"".join(parts))

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        waiters = self.waiters
        try:
            while (value := reader.gets()) is not False:  # False: the next reply is not complete yet
                if not waiters:
                    raise ConnectionError("reply without a request")
                future = waiters.popleft()
                if not future.done():  # a caller that timed out is skipped, in order
                    if isinstance(value, RespError):
                        future.set_exception(value)
                    else:
                        future.set_result(value)
        except (ConnectionError, hiredis.ProtocolError) as exc:
            self.abort(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionError("connection closed by Redis"))

    def _fail(self, exc: BaseException) -> None:
        self.closed = True
        self._out.clear()
        while self.waiters:
            future = self.waiters.popleft()
            if not future.done():
                future.set_exception(ConnectionError(f"Redis connection lost ({type(exc).__name__})"))
                future.exception()  # retrieved: its caller may be gone

    def abort(self, exc: BaseException | None = None) -> None:
        self._fail(exc or ConnectionError("connection aborted"))
        if self.transport is not None:
            self.transport.abort()


@dataclass(frozen=True, slots=True)
class RedisAddress:
    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None
    """A unix socket (``unix://``) instead of host and port."""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    verify_tls: bool = True


def parse_redis_url(url: str) -> RedisAddress:
    """``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS), ``unix:///path[?db=N]``."""
    from urllib.parse import parse_qs, unquote, urlsplit

    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    query = parse_qs(parts.query)
    db_text = (query.get("db") or [""])[0]
    if not db_text and scheme != "unix":
        db_text = parts.path.lstrip("/")
    try:
        db = int(db_text or 0)
    except ValueError:
        raise ValueError(f"the Redis database in the URL must be a number, got {db_text!r}") from None
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    if scheme == "unix":
        return RedisAddress(path=unquote(parts.path), db=db, username=username, password=password)
    if scheme not in ("redis", "rediss"):
        raise ValueError(f"not a Redis URL: {scheme!r}")
    verify = (query.get("ssl_cert_reqs") or ["required"])[0].lower() not in ("none", "optional")
    return RedisAddress(host=parts.hostname or "127.0.0.1", port=parts.port or 6379, db=db, username=username,
                        password=password, tls=scheme == "rediss", verify_tls=verify)


async def open_resp(address: RedisAddress, client_name: str | None = None) -> _RespProtocol:
    """Connect and authenticate; the caller bounds the time."""
    loop = asyncio.get_running_loop()
    ssl_context = None
    if address.tls:
        import ssl

        ssl_context = ssl.create_default_context()
        if not address.verify_tls:
            ssl_context.check_hostname = False
            ssl_context.verify_mode = ssl.CERT_NONE
    if address.path is not None:
        _, protocol = await loop.create_unix_connection(_RespProtocol, address.path)
    else:
        _, protocol = await loop.create_connection(_RespProtocol, address.host, address.port, ssl=ssl_context)
    try:
        handshake = []
        if address.password is not None:
            auth = ("AUTH", address.username, address.password) if address.username else ("AUTH", address.password)
            handshake.append(protocol.call(encode_command(*auth)))
        if address.db:
            handshake.append(protocol.call(encode_command("SELECT", address.db)))
        if client_name:
            handshake.append(protocol.call(encode_command("CLIENT", "SETNAME", client_name)))
        for reply in handshake:
            await reply
    except BaseException:
        protocol.abort()
        raise
    return protocol


# ------------------------------------------------------------------- redis


class RedisScripts:
    """Lua scripts run on one pipelined RESP connection per process.

    One EVALSHA per call, bounded by a tight timeout; a script Redis forgot (restart) is loaded
    again once. After ``breaker_threshold`` consecutive failures a circuit breaker answers at once
    with ``CountersUnavailable`` until a background probe sees Redis again, so a dead Redis costs
    nothing per request. Used by the rate limits and by the credit holds.
    """

    def __init__(self, url: str, scripts: Mapping[str, str], *, label: str, timeout: float = 0.1,
                 breaker_threshold: int = 3, probe_interval: float = 0.5, max_probe_interval: float = 5.0,
                 client_name: str = "nexgate") -> None:
        import hashlib

        self.url = url
        self.address = parse_redis_url(url)
        self.label = label
        self.timeout = timeout
        self.connect_timeout = max(timeout, 1.0)
        self.probe_interval = probe_interval
        self.max_probe_interval = max_probe_interval
        self.client_name = client_name
        self.breaker = CircuitBreaker(breaker_threshold)
        self.failures = 0
        """Calls that failed (timeout, connection, server error)."""
        self.round_trips = 0
        """EVALSHA calls sent: one request and one reply each (several may share one TCP write)."""
        self._scripts = {name: (lua.encode(), hashlib.sha1(lua.encode()).hexdigest())
                         for name, lua in scripts.items()}
        self._conn: _RespProtocol | None = None
        self._connecting: asyncio.Future[_RespProtocol] | None = None
        self._prober: asyncio.Task[None] | None = None
        self._last_warning = 0.0

    async def start(self) -> None:
        # Connect and load the scripts now, so no request pays for it; an absent Redis is not fatal here.
        try:
            async with asyncio.timeout(self.connect_timeout):
                self._conn = await self._open()
        except Exception as exc:
            self._fail(exc)

    async def close(self) -> None:
        await stop_tasks(self._prober, self._connecting)
        self._prober = self._connecting = None
        if self._conn is not None:
            self._conn.abort()
            self._conn = None

    # -- the connection

    async def _open(self) -> _RespProtocol:
        conn = await open_resp(self.address, self.client_name)
        try:
            loads = [conn.call(encode_command("SCRIPT", "LOAD", lua)) for lua, _ in self._scripts.values()]
            for reply in loads:
                await reply
        except BaseException:
            conn.abort()
            raise
        return conn

    async def _connection(self) -> _RespProtocol:
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._connect_once())
            # Waiters may all time out; the outcome is still retrieved.
            self._connecting.add_done_callback(lambda f: f.cancelled() or f.exception())
        return await asyncio.shield(self._connecting)

    async def _connect_once(self) -> _RespProtocol:
        async with asyncio.timeout(self.connect_timeout):
            conn = await self._open()
        self._conn = conn
        return conn

    async def call(self, script: str, keys: Sequence[str], args: Sequence[object],
                   timeout: float | None = None) -> object:
        """EVALSHA one of the scripts: one round trip, bounded by the timeout; CountersUnavailable on failure."""
        if self.breaker.open:
            raise CountersUnavailable("circuit open", sent=False)
        conn = self._conn
        if conn is None or conn.closed:
            return await self._call_connecting(script, keys, args, timeout)
        self.round_trips += 1
        reply = conn.call(encode_command("EVALSHA", self._scripts[script][1], len(keys), *keys, *args))
        # A timer on the reply bounds it as asyncio.timeout() would, for a fraction of the CPU per call.
        timer = conn.loop.call_later(timeout or self.timeout, _time_out, reply)
        try:
            result = await reply
        except asyncio.CancelledError:
            raise
        except RespError as exc:
            if str(exc).startswith("NOSCRIPT"):
                return await self._call_connecting(script, keys, args, timeout)  # loads it again
            self._fail(exc)
            raise CountersUnavailable(type(exc).__name__) from None
        except Exception as exc:  # timeouts, connection errors: all mean "no answer"
            self._fail(exc)
            raise CountersUnavailable(type(exc).__name__) from None
        finally:
            timer.cancel()
        self.breaker.success()
        return result

    async def _call_connecting(self, script: str, keys: Sequence[str], args: Sequence[object],
                               timeout: float | None) -> object:
        """``call`` when there is no connection yet, or Redis forgot the script."""
        lua, sha = self._scripts[script]
        sent = False
        try:
            async with asyncio.timeout(timeout or self.timeout):
                conn = await self._connection()
                sent = True
                self.round_trips += 1
                payload = encode_command("EVALSHA", sha, len(keys), *keys, *args)
                try:
                    result = await conn.call(payload)
                except RespError as exc:
                    if not str(exc).startswith("NOSCRIPT"):
                        raise
                    # Redis restarted and lost its script cache: load and run again, once.
                    loaded = await conn.call(encode_command("SCRIPT", "LOAD", lua))
                    sha = loaded.decode() if isinstance(loaded, bytes) else sha
                    self._scripts[script] = (lua, sha)
                    self.round_trips += 1
                    result = await conn.call(encode_command("EVALSHA", sha, len(keys), *keys, *args))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # timeouts, connection errors, error replies: all mean "no answer"
            self._fail(exc)
            raise CountersUnavailable(type(exc).__name__, sent=sent) from None
        self.breaker.success()
        return result

    def _fail(self, exc: BaseException) -> None:
        self.failures += 1
        if self.breaker.failure():
            log.warning("%s (Redis) failed %d times in a row (%s); circuit open, probing in the background",
                        self.label, self.breaker.threshold, type(exc).__name__)
            if self._conn is not None:
                self._conn.abort()  # a wedged connection is not reused; the probe opens a fresh one
                self._conn = None
            if self._prober is None or self._prober.done():
                self._prober = asyncio.create_task(self._probe_until_up(), name=f"{self.client_name}-probe")
        else:
            now = time.monotonic()
            if now - self._last_warning > 10.0:
                self._last_warning = now
                log.warning("%s (Redis) call failed: %s", self.label, type(exc).__name__)

    async def _probe_until_up(self) -> None:
        interval = self.probe_interval
        while self.breaker.open:
            await asyncio.sleep(interval)
            try:
                async with asyncio.timeout(self.connect_timeout):
                    conn = await self._open()
                    await conn.call(encode_command("PING"))
            except asyncio.CancelledError:
                raise
            except Exception:
                interval = min(interval * 2, self.max_probe_interval)
                continue
            self._conn = conn
            self.breaker.close()
            log.warning("%s (Redis) answers again; circuit closed", self.label)


class RedisCounters(RedisScripts, Counters):
    """The limits in Redis: one EVALSHA per call, a tight timeout, a circuit breaker."""

    def __init__(self, url: str, *, prefix: str = DEFAULT_PREFIX, timeout: float = 0.1,
                 breaker_threshold: int = 3, probe_interval: float = 0.5, max_probe_interval: float = 5.0,
                 lease_renew_interval: float | None = None, client_name: str = "nexgate-ratelimit") -> None:
        super().__init__(url, {"acquire": ACQUIRE_LUA, "settle": SETTLE_LUA, "note": NOTE_LUA, "renew": RENEW_LUA,
                               "lease_ahead": LEASE_AHEAD_LUA, "leases": WINDOW_LEASES_LUA},
                         label="rate limit state", timeout=timeout, breaker_threshold=breaker_threshold,
                         probe_interval=probe_interval, max_probe_interval=max_probe_interval,
                         client_name=client_name)
        self.prefix = prefix
        self.lease_renew_interval = lease_renew_interval
        self._leases: dict[str, tuple[tuple[str, int], ...]] = {}
        """member -> (lease key, lease_ms) of its concurrency slots, renewed while in flight."""
        self._renewer: asyncio.Task[None] | None = None
        self._batch: _SettleBatch | None = None
        """The settle call still open for more requests' releases (until its write goes out)."""
        self._unanswered: set[_SettleBatch] = set()
        """Settle calls sent or about to be, not yet answered: close() waits for them."""
        from .window_leases import WindowLeases

        self.window_leases = WindowLeases()
        self._window_keeper: asyncio.Task[None] | None = None
        self._asking_ahead: set[asyncio.Future[None]] = set()
        self.local_admits = 0
        """Requests admitted from window leases, without a round trip (for metrics)."""

    def key(self, kind: str, subject: str) -> str:
        return f"{self.prefix}:{kind}:{subject}"

    async def start(self) -> None:
        await super().start()
        self._renewer = asyncio.create_task(self._renew_forever(), name="nexgate-ratelimit-leases")
        self._window_keeper = asyncio.create_task(self._end_window_leases_forever(),
                                                  name="nexgate-ratelimit-window-leases")

    async def close(self) -> None:
        await stop_tasks(self._renewer, self._window_keeper)
        self._renewer = self._window_keeper = None
        with contextlib.suppress(CountersUnavailable):  # what is not given back counts one window more
            await self.end_window_leases(closing=True)
        # Releases still on their way go out first: each is bounded by the call timeout.
        waiting = [batch.finished for batch in self._unanswered]
        if waiting:
            await asyncio.wait(waiting, timeout=self.connect_timeout)
        await super().close()

    # -- the operations

    async def acquire(self, member: str, checks: Sequence[Check], ban_subject: str | None = None) -> Decision:
        window_leases = self.window_leases
        sent = time.monotonic()
        sizes = window_leases.wanted(checks, sent)
        prefix = window_leases.prefix() if any(sizes) else ""
        keys: list[str] = []
        args: list[object] = [member, 0, len(checks), prefix]
        if ban_subject is not None:
            keys.append(self.key("ban", ban_subject))
            args[1] = 1
        leases: list[tuple[str, int]] = []
        for check, size in zip(checks, sizes):
            key = self.key(check.kind, check.subject)
            keys.append(key)
            if check.kind == TOKENS:
                keys.append(self.key("ts", check.subject))
            elif check.kind == CONCURRENCY:
                leases.append((key, check.window_ms))
            args += (check.kind, check.limit, check.amount, check.window_ms, size)
        try:
            result = await self.call("acquire", keys, args)
        finally:
            if prefix:
                window_leases.answered(checks, sizes)
        assert isinstance(result, list)
        status = result[0]
        if status != -1:
            return Decision(False, status, result[1])
        if leases:
            self._leases[member] = tuple(leases)
        decision = Decision(True, -1, 0, result[2::3], result[3::3])
        if prefix:
            window_leases.granted(prefix, checks, result[4::3], decision, sent)
        return decision

    def admit_locally(self, member: str, checks: Sequence[Check]) -> tuple[list[int], list[int]] | None:
        window_leases = self.window_leases
        if not window_leases.active and not window_leases.queued:
            return None
        left = window_leases.admit(member, checks, time.monotonic())
        if left is not None:
            self.local_admits += 1
        if window_leases.running_low:
            self._lease_ahead(window_leases.take_running_low())
        return left

    def settle_locally(self, member: str, reserved: int, actual: int) -> None:
        self.window_leases.settle(member, reserved, actual)

    def _lease_ahead(self, checks: list[Check]) -> None:
        """Ask in the background for the next leases of these limits, so no request waits for them."""
        if self.breaker.open:
            return
        window_leases = self.window_leases
        sizes = window_leases.wanted(checks, time.monotonic(), ahead=True)
        if not any(sizes):
            return
        asked = [(check, size) for check, size in zip(checks, sizes) if size]
        prefix = window_leases.prefix()
        keys: list[str] = []
        args: list[object] = [prefix]
        for check, size in asked:
            keys.append(self.key(check.kind, check.subject))
            if check.kind == TOKENS:
                keys.append(self.key("ts", check.subject))
            args += (check.kind, check.limit, check.window_ms, size)
        task = asyncio.ensure_future(self._ask_ahead(prefix, asked, keys, args, time.monotonic()))
        self._asking_ahead.add(task)
        task.add_done_callback(self._asking_ahead.discard)
        task.add_done_callback(_retrieve)

    async def _ask_ahead(self, prefix: str, asked: list[tuple[Check, int]], keys: list[str], args: list[object],
                         sent: float) -> None:
        checks = [check for check, _ in asked]
        try:
            # Nobody waits for it: a loaded loop's turns must not make it a failure (and open the circuit).
            result = await self.call("lease_ahead", keys, args, timeout=max(self.timeout, 1.0))
        except CountersUnavailable:
            return
        finally:
            self.window_leases.answered(checks, [size for _, size in asked])
        assert isinstance(result, list)
        self.window_leases.granted_ahead(prefix, checks, result, sent)

    async def settle(self, member: str, releases: Sequence[Release]) -> None:
        batch = self._settle_into_batch(member, releases)
        if batch is not None:
            await asyncio.shield(batch.finished)  # raises CountersUnavailable as any call would

    def settle_soon(self, member: str, releases: Sequence[Release]) -> None:
        self._settle_into_batch(member, releases)

    # -- window leases (see window_leases)

    async def end_window_leases(self, closing: bool = False) -> int:
        """Give back what ended leases did not use, and correct token leases to their usage."""
        if closing and self._asking_ahead:  # a lease granted after this would stay taken for a window
            await asyncio.wait(set(self._asking_ahead), timeout=max(self.timeout, 1.0))
        keys, args = self.window_leases.due(time.monotonic(), self.key, closing)
        if not args:
            return 0
        return await self.call("leases", keys, args, timeout=max(self.timeout, 1.0))  # type: ignore[return-value]

    async def _end_window_leases_forever(self) -> None:
        while True:
            await asyncio.sleep(LEASE_SPAN_MS / 4000)
            with contextlib.suppress(CountersUnavailable):
                await self.end_window_leases()

    # -- settles travel in batches

    def _settle_into_batch(self, member: str, releases: Sequence[Release]) -> _SettleBatch | None:
        self._leases.pop(member, None)
        if not releases:
            return None
        if member in self.window_leases.served:  # admitted locally: its token releases share one correction
            tokens = next((r for r in releases if r.kind == TOKENS), None)
            self.window_leases.settle(member, tokens.reserved if tokens else 0, tokens.actual if tokens else 0)
            return None
        batch = self._batch
        if batch is None or batch.sealed or batch.requests >= MAX_SETTLES_PER_CALL:
            batch = self._open_batch()
        batch.add(member, releases, self.key)
        return batch

    def _open_batch(self) -> _SettleBatch:
        if self.breaker.open:
            raise CountersUnavailable("circuit open")
        conn = self._conn
        if conn is None or conn.closed:
            # No connection at hand: a task waits for one, as call() would, and sends the batch then.
            batch = self._batch = _SettleBatch(asyncio.get_running_loop())
            self._unanswered.add(batch)
            asyncio.ensure_future(self._send_when_connected(batch)).add_done_callback(_retrieve)
            return batch
        batch = self._batch = _SettleBatch(conn.loop)
        self._unanswered.add(batch)
        self.round_trips += 1
        # The call takes its place in the pipeline now (later calls queue behind it, so they see these
        # releases done) and is encoded when the write goes out, carrying every release added until then.
        reply = conn.call(lambda: self._seal(batch))
        timer = conn.loop.call_later(self.timeout, _time_out, reply)
        reply.add_done_callback(lambda done: self._answered(batch, done, timer))
        return batch

    def _seal(self, batch: _SettleBatch) -> bytes:
        batch.sealed = True
        if self._batch is batch:
            self._batch = None
        return encode_command("EVALSHA", self._scripts["settle"][1], len(batch.keys), *batch.keys,
                              batch.requests, *batch.args)

    def _answered(self, batch: _SettleBatch, reply: asyncio.Future, timer: asyncio.TimerHandle) -> None:
        timer.cancel()
        # Also when it failed before its write went out (connection lost, timed out): no more joins it.
        batch.sealed = True
        if self._batch is batch:
            self._batch = None
        exc = reply.exception() if not reply.cancelled() else asyncio.CancelledError()
        if exc is None:
            self.breaker.success()
            batch.finish(None)
        elif isinstance(exc, RespError) and str(exc).startswith("NOSCRIPT"):
            # Redis restarted and lost its scripts: call() loads them and sends the batch again.
            asyncio.ensure_future(self._send_when_connected(batch)).add_done_callback(_retrieve)
        else:
            self._fail(exc)
            batch.finish(CountersUnavailable(type(exc).__name__))
        if batch.finished.done():
            self._unanswered.discard(batch)

    async def _send_when_connected(self, batch: _SettleBatch) -> None:
        batch.sealed = True
        if self._batch is batch:
            self._batch = None
        outcome: BaseException | None = CountersUnavailable("not sent")
        try:
            await self.call("settle", batch.keys, [batch.requests, *batch.args])
            outcome = None
        except CountersUnavailable as exc:
            outcome = exc
        finally:  # also when cancelled: whoever waits for the batch is answered
            batch.finish(outcome)
            self._unanswered.discard(batch)

    async def note(self, member: str, ip: Check | None, ip_subject: str | None,
                   failure: BruteForce | None = None, key_subject: str | None = None) -> Noted:
        keys = [
            self.key(REQUESTS, ip.subject) if ip is not None else "",
            self.key("f", ip_subject) if ip_subject else "",
            self.key("f", key_subject) if key_subject else "",
            self.key("ban", ip_subject) if ip_subject else "",
        ]
        f = failure if failure is not None and ip_subject else None
        args = [member, ip.limit if ip is not None else 0, ip.window_ms if ip is not None else 0,
                1 if f else 0, f.max_failures if f else 0, f.max_key_failures if f else 0,
                f.window_ms if f else 0, f.ban_ms if f else 0, 1 if key_subject else 0]
        result = await self.call("note", keys, args)
        assert isinstance(result, list)
        return Noted(result[0], result[1], bool(result[2]))

    # -- concurrency leases of requests still in flight

    async def renew_leases(self) -> int:
        """Extend every lease this instance holds; returns how many were renewed."""
        if not self._leases or self.breaker.open:
            return 0
        by_lease: dict[int, list[tuple[str, str]]] = {}
        for member, leases in list(self._leases.items()):
            for key, lease_ms in leases:
                by_lease.setdefault(lease_ms, []).append((key, member))
        renewed = 0
        for lease_ms, pairs in by_lease.items():
            for start in range(0, len(pairs), 500):
                chunk = pairs[start:start + 500]
                try:
                    await self.call("renew", [k for k, _ in chunk], [lease_ms, *[m for _, m in chunk]],
                                    timeout=max(self.timeout, 1.0))
                except CountersUnavailable:
                    return renewed
                renewed += len(chunk)
        return renewed

    async def _renew_forever(self) -> None:
        while True:
            shortest = min((lease for leases in self._leases.values() for _, lease in leases), default=60_000)
            interval = self.lease_renew_interval or max(0.05, shortest / 3000)
            await asyncio.sleep(interval)
            await self.renew_leases()


MAX_SETTLES_PER_CALL = 200
"""Requests whose releases share one settle call, at most (bounds the time the script runs)."""


class _SettleBatch:
    """The releases of several requests, sent as one EVALSHA of the settle script."""

    __slots__ = ("keys", "args", "requests", "sealed", "finished")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.keys: list[str] = []
        self.args: list[object] = []
        self.requests = 0
        self.sealed = False
        """Encoded (or handed to call()): later releases go into a new batch."""
        self.finished: asyncio.Future[None] = loop.create_future()
        """Resolved when Redis answered; CountersUnavailable when it did not."""

    def add(self, member: str, releases: Sequence[Release], key: Callable[[str, str], str]) -> None:
        args = self.args
        args += (member, len(releases))
        for release in releases:
            self.keys.append(key(release.kind, release.subject))
            if release.kind == TOKENS:
                self.keys.append(key("ts", release.subject))
            args += (release.kind, release.reserved, release.actual, release.window_ms)
        self.requests += 1

    def finish(self, exc: BaseException | None) -> None:
        if self.finished.done():
            return
        if exc is None:
            self.finished.set_result(None)
        else:
            self.finished.set_exception(exc)
            self.finished.exception()  # retrieved: usually nobody waits for a settle


def open_counters(url: str, *, prefix: str = DEFAULT_PREFIX, timeout: float = 0.1, **options: object) -> Counters:
    """``memory://`` for one process; ``redis://``, ``rediss://`` or ``unix://`` to share with other instances."""
    scheme = url.split(":", 1)[0].lower()
    if scheme == "memory":
        return MemoryCounters()
    if scheme in ("redis", "rediss", "unix"):
        return RedisCounters(url, prefix=prefix, timeout=timeout, **options)  # type: ignore[arg-type]
    raise ValueError(f"unsupported state URL scheme {scheme!r} (use memory://, redis://, rediss:// or unix://)")
