"""Rate limit counters in Redis: the same semantics as ``memory`` in Lua, one atomic call per check."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Callable, Sequence

from nexgate_proxy.background import stop_tasks
from nexgate_proxy.state.redis import RedisClient, RedisScripts, RespError, StateUnavailable, encode_command, time_out

from .base import (
    CONCURRENCY, DEFAULT_PREFIX, LEASE_SPAN_MS, REQUESTS, TOKENS, BruteForce, Check, Counters,
    Decision, Noted, Release, _retrieve,
)
from .leases import WindowLeases

log = logging.getLogger("nexgate.counters")

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
-- a call per entry keeps Redis busy for the whole lease, with every other call waiting behind it.
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
local kf = 0
if ARGV[4] == '1' then
  local max_failures, max_key_failures = tonumber(ARGV[5]), tonumber(ARGV[6])
  local fwindow = tonumber(ARGV[7])
  local f = redis.call('INCR', KEYS[2])
  if f == 1 then redis.call('PEXPIRE', KEYS[2], fwindow) end
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
return {ban, block, created, kf}
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


class RedisCounters(RedisScripts, Counters):
    """The limits in Redis: one EVALSHA per call, a tight timeout, a circuit breaker."""

    def __init__(self, redis: RedisClient | str, *, prefix: str = DEFAULT_PREFIX, timeout: float = 0.1,
                 lease_renew_interval: float | None = None) -> None:
        super().__init__(redis, {"acquire": ACQUIRE_LUA, "settle": SETTLE_LUA, "note": NOTE_LUA, "renew": RENEW_LUA,
                                 "lease_ahead": LEASE_AHEAD_LUA, "leases": WINDOW_LEASES_LUA},
                         label="rate limit state", timeout=timeout)
        self.prefix = prefix
        self.lease_renew_interval = lease_renew_interval
        self._leases: dict[str, tuple[tuple[str, int], ...]] = {}
        """member -> (lease key, lease_ms) of its concurrency slots, renewed while in flight."""
        self._renewer: asyncio.Task[None] | None = None
        self._batch: _SettleBatch | None = None
        """The settle call still open for more requests' releases (until its write goes out)."""
        self._unanswered: set[_SettleBatch] = set()
        """Settle calls sent or about to be, not yet answered: close() waits for them."""
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
        with contextlib.suppress(StateUnavailable):  # what is not given back counts one window more
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
        except StateUnavailable:
            return
        finally:
            self.window_leases.answered(checks, [size for _, size in asked])
        assert isinstance(result, list)
        self.window_leases.granted_ahead(prefix, checks, result, sent)

    async def settle(self, member: str, releases: Sequence[Release]) -> None:
        batch = self._settle_into_batch(member, releases)
        if batch is not None:
            await asyncio.shield(batch.finished)  # raises StateUnavailable as any call would

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
            with contextlib.suppress(StateUnavailable):
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
            raise StateUnavailable("circuit open")
        conn = self.redis._conn
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
        timer = conn.loop.call_later(self.timeout, time_out, reply)
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
            batch.finish(StateUnavailable(type(exc).__name__))
        if batch.finished.done():
            self._unanswered.discard(batch)

    async def _send_when_connected(self, batch: _SettleBatch) -> None:
        batch.sealed = True
        if self._batch is batch:
            self._batch = None
        outcome: BaseException | None = StateUnavailable("not sent")
        try:
            await self.call("settle", batch.keys, [batch.requests, *batch.args])
            outcome = None
        except StateUnavailable as exc:
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
        return Noted(result[0], result[1], bool(result[2]), result[3])

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
                except StateUnavailable:
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
        """Resolved when Redis answered; StateUnavailable when it did not."""

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
