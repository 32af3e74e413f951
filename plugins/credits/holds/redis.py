"""Credit holds shared by gateway instances through Redis, served from per-instance leases.

Each instance holds, per account, a *lease* in Redis: one hold like any request's, in the same
hash, counted in the same ``held`` total, expiring unless renewed. The instance serves its
requests' holds from the lease in process, and debits their costs in process; no request waits
for Redis while its lease has room. Only a request that does not fit calls Redis, and that call
grows the lease atomically against ``balance - held`` (and books what was settled since).

Why: a Redis call to hold and another to settle on every request cost more than the rest of the
credit path (benchmarks/README.md, "Credits and limits on Redis: leases"). The quota-slice design
of online charging systems (an OCS grants a gateway units ahead of use) avoids both, and keeps
the guarantees:

* Never more is held than ``balance + overdraft``: every lease grows atomically in Redis, and a
  request is only admitted against room its lease holds.
* While the account has plenty (what stays available after a grow covers ``PLENTY_SLICES``
  more slices), a grow takes a slice: room for ``SLICE_HOLDS`` more holds like the one asking.
  Below that, a grow takes exactly what the request needs and every flush gives the spare back,
  so a small balance is shared across instances hold by hold, as if there were no leases.
* A dead instance's lease expires ``LEASE_TTL`` after its last renewal. Costs settled in the
  last ``FLUSH_INTERVAL`` before a SIGKILL are missing from the *cached* balance only; the ledger
  has them (usage outbox), and the cache reloads from it.
* A lease this instance cannot be sure Redis still holds (not renewed for ``LEASE_TTL -
  LEASE_MARGIN``) is never used again; its holds run on as unbacked, a new lease replaces it.
* A credit reaches the cached balance exactly once (see ``base``): it is booked between two calls,
  one marking it open (``crediting``), one closing it, which adds it to a cached balance and bumps
  the account's credit version. A first load is only written while no credit is open and the
  version is the one read before the load; else it waits for the open ones and loads again. A close
  that finds its mark gone (expired, Redis lost it) or whose booking has an unknown outcome cannot
  place its credit: it drops the cached balance, and the next request loads it from the ledger.

Amounts are integer pico-USD, exact (see ``_LUA_EXACT``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time

from nexgate_proxy.background import stop_tasks
from nexgate_proxy.state.redis import RedisClient, RedisScripts, StateUnavailable

from .base import (
    KEY_TTL_SECONDS,
    BalanceLoader,
    Booker,
    Credited,
    CreditState,
    CreditStateUnavailable,
    Reservation,
)

log = logging.getLogger("nexgate.credits")

LEASE_TTL = 30.0
"""A lease not renewed for this long expires in Redis (a dead instance's share frees itself)."""
LEASE_MARGIN = 5.0
"""This instance stops using a lease this long before Redis could expire it."""
FLUSH_INTERVAL = 0.05
"""Settled costs reach the shared cached balance within this long (and spare goes back when low)."""
RENEW_INTERVAL = 5.0
IDLE_SECONDS = 10.0
"""A lease unused this long is given back whole."""
SLICE_HOLDS = 32
PLENTY_SLICES = 4
FLUSH_BATCH = 100
"""Accounts per flush call."""
CREDIT_OPEN_TTL = 10.0
"""A credit's open mark stops blocking loads this long after it was set (its booker died)."""
CREDIT_WAIT = 2.0
"""A first load waits this long at most for the account's open credits, then the request gets 503."""
CREDIT_POLL = 0.01
"""How often a waiting load looks again."""

# Amounts are pico-USD, beyond what a Lua number (a double, exact to 2**53: about 9,000 USD)
# holds: Redis's INCRBY/DECRBY/HINCRBY are exact on 64-bit integers, and the scripts compare and
# subtract in two base-10**9 limbs (`big`), so every amount is exact up to the ledger's bounds.
_LUA_EXACT = """
local B = 1000000000
local function big(s)
  s = tostring(s)
  local negative = string.sub(s, 1, 1) == '-'
  if negative then s = string.sub(s, 2) end
  local n = #s
  local hi, lo = 0, tonumber(s)
  if n > 9 then hi, lo = tonumber(string.sub(s, 1, n - 9)), tonumber(string.sub(s, n - 8)) end
  if negative then
    hi, lo = -hi, -lo
    if lo < 0 then lo, hi = lo + B, hi - 1 end
  end
  return {hi, lo}
end
local function add(a, b)
  local hi, lo = a[1] + b[1], a[2] + b[2]
  if lo >= B then lo, hi = lo - B, hi + 1 end
  return {hi, lo}
end
local function neg(a)
  if a[2] == 0 then return {-a[1], 0} end
  return {-a[1] - 1, B - a[2]}
end
local function sub(a, b) return add(a, neg(b)) end
local function lt(a, b) return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2]) end
local function str(a)
  if a[1] < 0 then return '-' .. str(neg(a)) end
  if a[1] == 0 then return string.format('%d', a[2]) end
  return string.format('%d%09d', a[1], a[2])
end
"""

# Every script: KEYS bal, held, holds, exp (+ credits, crediting for grow) of one account.
# The pending part of a flush: debit the cached balance, shrink the lease by `release`, renew it.
# Amounts arrive as decimal strings and go to Redis as strings: never through a double.
_LUA_FLUSH_ONE = _LUA_EXACT + """
local function flush_one(bal, held, holds, exp, lease, debit, release, expiry)
  if debit ~= '0' and redis.call('EXISTS', bal) == 1 then redis.call('DECRBY', bal, debit) end
  local old = redis.call('HGET', holds, lease)
  if not old then return 0 end
  if not lt(big(release), big(old)) then
    redis.call('HDEL', holds, lease)
    redis.call('ZREM', exp, lease)
    redis.call('DECRBY', held, old)
  else
    if release ~= '0' then
      redis.call('HINCRBY', holds, lease, '-' .. release)
      redis.call('DECRBY', held, release)
    end
    redis.call('ZADD', exp, expiry, lease)
  end
  return 1
end
local function available(bal, held)
  local b = redis.call('GET', bal)
  if not b then return nil end
  return sub(big(b), big(redis.call('GET', held) or '0'))
end
"""

_GROW = _LUA_FLUSH_ONE + """
-- ARGV: lease, need, extra, plenty, now, expiry, overdraft, loaded balance or '', version, key ttl, debit, release
flush_one(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[11], ARGV[12], ARGV[6])
if not redis.call('GET', KEYS[1]) then
  local version = redis.call('GET', KEYS[5]) or '0'
  redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', ARGV[5])
  local open = redis.call('ZCARD', KEYS[6])
  -- A credit being booked may or may not be in the load; one closed since the caller read the version
  -- may be missing from it: load again (once no credit is open).
  if ARGV[8] == '' or ARGV[9] ~= version or open > 0 then return {-1, version, open} end
  redis.call('SET', KEYS[1], ARGV[8], 'NX')
end
local expired = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', ARGV[5])
for _, id in ipairs(expired) do
  local amount = redis.call('HGET', KEYS[3], id)
  if amount then
    redis.call('DECRBY', KEYS[2], amount)
    redis.call('HDEL', KEYS[3], id)
  end
  redis.call('ZREM', KEYS[4], id)
end
local avail = available(KEYS[1], KEYS[2])
local need, extra = big(ARGV[2]), big(ARGV[3])
local left = sub(avail, need)
if lt(left, neg(big(ARGV[7]))) then return {0, str(avail)} end
local grown = ARGV[2]
if ARGV[3] ~= '0' and not lt(sub(left, extra), big(ARGV[4])) then grown = str(add(need, extra)) end
redis.call('HINCRBY', KEYS[3], ARGV[1], grown)
redis.call('ZADD', KEYS[4], ARGV[6], ARGV[1])
redis.call('INCRBY', KEYS[2], grown)
for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ARGV[10]) end
return {1, grown, str(sub(avail, big(grown)))}
"""

_FLUSH = _LUA_FLUSH_ONE + """
-- Many accounts: KEYS 4 per account; ARGV: key ttl, then lease, debit, release, expiry per account.
-- Returns per account: lease found (1/0), cached (1/0), balance - held.
local out = {}
local a = 2
for k = 1, #KEYS, 4 do
  local found = flush_one(KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], ARGV[a], ARGV[a + 1], ARGV[a + 2],
                         ARGV[a + 3])
  a = a + 4
  if found == 1 then
    for i = 0, 3 do redis.call('EXPIRE', KEYS[k + i], ARGV[1]) end
  end
  local avail = available(KEYS[k], KEYS[k + 1])
  out[#out + 1] = found
  out[#out + 1] = avail and 1 or 0
  out[#out + 1] = avail and str(avail) or '0'
end
return out
"""

# A credit's two calls. KEYS bal, credits (version), crediting (open marks: id -> expiry).
_CREDIT_OPEN = """
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('EXPIRE', KEYS[3], ARGV[3])
"""

_CREDIT_CLOSE = """
-- ARGV: mark id, amount, outcome ('1' booked, '0' not booked, '' unknown), key ttl
local ours = redis.call('ZREM', KEYS[3], ARGV[1]) == 1
redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[4])
if ARGV[3] == '0' then return 0 end
if ours and ARGV[3] == '1' then
  -- No load was written while the mark stood: a cached balance predates the booking.
  if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('INCRBY', KEYS[1], ARGV[2]) end
  return 1
end
redis.call('DEL', KEYS[1])  -- a load may have been written meanwhile, with or without it: reload
return 2
"""


class _Account:
    """This instance's share of one account: its lease and the holds served from it."""

    __slots__ = ("generation", "lease_id", "granted", "held", "holds", "spent", "unbacked", "renewed_at",
                 "last_used", "plentiful", "plenty")

    def __init__(self, instance: str) -> None:
        self.generation = 0
        self.lease_id = f"lease:{instance}:0"
        self.granted = 0
        """What the lease holds in Redis, as far as this instance knows (grows in flight not yet)."""
        self.held = 0
        """The open holds served from the lease (this generation's)."""
        self.holds: dict[str, tuple[int, float, int]] = {}
        """request id -> (amount, expiry, generation)."""
        self.spent = 0
        """Costs settled against the lease, not yet booked in Redis."""
        self.unbacked = 0
        """Costs settled of holds from a lease given up: booked in the balance, released from no lease."""
        self.renewed_at = float("-inf")
        """When Redis last confirmed the lease (monotonic); never, for none."""
        self.last_used = 0.0
        self.plentiful = False
        self.plenty = 0

    @property
    def free(self) -> int:
        return self.granted - self.held - self.spent

    def usable(self, now: float) -> bool:
        """Redis surely still holds the lease: confirmed less than LEASE_TTL - LEASE_MARGIN ago."""
        return now - self.renewed_at < LEASE_TTL - LEASE_MARGIN

    def give_up_lease(self, instance: str) -> None:
        """The lease may be gone in Redis: never use it again. What it still holds there expires."""
        self.generation += 1
        self.lease_id = f"lease:{instance}:{self.generation}"
        self.unbacked += self.spent
        self.spent = self.granted = self.held = 0
        self.renewed_at = float("-inf")
        self.plentiful = False

    def pending(self, give_back: bool) -> tuple[int, int, int]:
        """(spent, unbacked, release) a flush sends now, applied here at once: the settled costs it
        debits, and what it releases from the lease (the spent part, and the spare when giving back)."""
        release = self.spent
        if give_back:
            release += max(self.free, 0)
        release = min(release, self.granted)
        sent = (self.spent, self.unbacked, release)
        self.granted -= release
        self.spent = self.unbacked = 0
        return sent

    def unsend(self, generation: int, spent: int, unbacked: int, release: int) -> None:
        """A flush that surely never reached Redis: what it carried is pending again (its costs would
        otherwise be missing from the shared balance for as long as the account stays active)."""
        if generation == self.generation:
            self.spent += spent
            self.granted += release
            self.unbacked += unbacked
        else:  # the lease was given up meanwhile: the costs are still owed, from no lease
            self.unbacked += spent + unbacked


class RedisCreditState(CreditState):
    """Holds served from per-instance leases on the accounts' shared Redis state.

    Runs its scripts on the process's ``RedisClient`` (given a URL, on one of its own).
    """

    def __init__(self, redis: RedisClient | str, *, prefix: str = "nexgate:cr", timeout: float = 1.0) -> None:
        self._redis = RedisScripts(redis, {"grow": _GROW, "flush": _FLUSH, "credit_open": _CREDIT_OPEN,
                                           "credit_close": _CREDIT_CLOSE},
                                   label="credit state", timeout=timeout)
        self._prefix = prefix
        self._instance = secrets.token_hex(6)
        self._accounts: dict[str, _Account] = {}
        self._dirty: set[str] = set()
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False

    def _keys(self, account_id: str) -> list[str]:
        # One hash tag per account keeps its keys on one Redis Cluster slot.
        base = f"{self._prefix}:{{{account_id}}}"
        return [f"{base}:bal", f"{base}:held", f"{base}:holds", f"{base}:exp", f"{base}:credits", f"{base}:crediting"]

    async def _call(self, script: str, keys: list[str], args: list[object]) -> object:
        try:
            return await self._redis.call(script, keys, args)
        except StateUnavailable as exc:
            raise CreditStateUnavailable(str(exc), sent=exc.sent) from None

    def _account(self, account_id: str) -> _Account:
        account = self._accounts.get(account_id)
        if account is None:
            account = self._accounts[account_id] = _Account(self._instance)
        if self._flusher is None and not self._closed:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_forever(),
                                                                    name="nexgate-credits-flush")
        return account

    # -- the hot path: in process while the lease has room

    async def reserve(self, account_id: str, request_id: str, amount_pico: int, overdraft_pico: int,
                      hold_seconds: float, load_balance: BalanceLoader) -> Reservation:
        now = time.monotonic()
        account = self._account(account_id)
        account.last_used = now
        if request_id in account.holds:  # a request id holds once
            self._release_hold(account, account_id, request_id, 0)
        if account.usable(now):
            free = account.free
            if free >= amount_pico:
                account.holds[request_id] = (amount_pico, now + hold_seconds, account.generation)
                account.held += amount_pico
                return Reservation(True, free - amount_pico)
        elif account.granted:
            account.give_up_lease(self._instance)
        return await self._grow(account_id, account, request_id, amount_pico, overdraft_pico, now + hold_seconds,
                                load_balance)

    async def _grow(self, account_id: str, account: _Account, request_id: str, amount: int, overdraft: int,
                    expiry: float, load_balance: BalanceLoader) -> Reservation:
        # The request takes what room there is now and asks Redis for the rest, holding all of it at
        # once: requests served while the call is out see the room already taken.
        room = max(account.free, 0)
        need = max(amount - room, 0)
        generation = account.generation
        account.holds[request_id] = (amount, expiry, generation)
        account.held += amount
        extra = amount * SLICE_HOLDS
        account.plenty = extra * PLENTY_SLICES
        carried = account.pending(give_back=False)
        spent, unbacked, release = carried
        sent = time.monotonic()
        now = time.time()
        args: list[object] = [account.lease_id, need, extra, account.plenty, now, now + LEASE_TTL, overdraft, "", "",
                              KEY_TTL_SECONDS, spent + unbacked, release]
        keys = self._keys(account_id)
        try:
            try:
                status, *rest = await self._call("grow", keys, args)  # type: ignore[misc]
            except CreditStateUnavailable as exc:
                if not exc.sent:
                    account.unsend(generation, *carried)
                raise
            waited = 0.0
            while status == -1:  # not cached: load it, unless a credit races the load (then load again)
                version, crediting = rest
                args[10] = args[11] = 0  # booked by the first call
                if crediting:  # whether a load now would hold the credit being booked is unknowable
                    if waited >= CREDIT_WAIT:
                        raise CreditStateUnavailable(f"credits to {account_id} are being booked")
                    await asyncio.sleep(CREDIT_POLL)
                    waited += CREDIT_POLL
                    args[7] = ""
                else:
                    args[8] = version
                    args[7] = int(await load_balance())
                status, *rest = await self._call("grow", keys, args)  # type: ignore[misc]
        except BaseException:
            self._release_hold(account, account_id, request_id, 0)
            raise
        if status == 0:
            self._release_hold(account, account_id, request_id, 0)
            return Reservation(False, int(rest[0]) + room)
        grown, available = int(rest[0]), int(rest[1])
        if account.generation == generation:  # else the grant went to a lease given up: it expires there
            account.granted += grown
            account.renewed_at = sent
            account.plentiful = grown > need
        return Reservation(True, available + max(account.free, 0))

    def _release_hold(self, account: _Account, account_id: str, request_id: str, cost_pico: int) -> None:
        hold = account.holds.pop(request_id, None)
        if hold is not None and hold[2] == account.generation:
            account.held -= hold[0]
            account.spent += cost_pico
        else:
            account.unbacked += cost_pico
        if cost_pico or not account.plentiful:
            self._dirty.add(account_id)

    def settle(self, account_id: str, request_id: str, cost_pico: int) -> None:
        self._release_hold(self._account(account_id), account_id, request_id, cost_pico)

    # -- off the hot path

    async def credit(self, account_id: str, amount_pico: int, book: Booker) -> Credited:
        bal, _, _, _, version, crediting = self._keys(account_id)
        keys = [bal, version, crediting]
        mark = secrets.token_hex(8)
        with contextlib.suppress(CreditStateUnavailable):  # then the close finds no mark: it drops the cache
            await self._call("credit_open", keys, [mark, time.time() + CREDIT_OPEN_TTL, KEY_TTL_SECONDS])
        outcome = ""  # unknown, if the booking raises: the ledger may or may not have it
        try:
            booked = await book()
            outcome = "1" if booked else "0"
        finally:
            try:
                await self._call("credit_close", keys, [mark, amount_pico, outcome, KEY_TTL_SECONDS])
                reached = True
            except CreditStateUnavailable:
                reached = False
                log.warning("the credit state did not hear of a credit to %s: its cached balance may miss it "
                            "until it is loaded again", account_id)
        return Credited(booked, reached)

    async def available(self, account_id: str) -> int | None:
        """The cached balance minus every open hold, this instance's settled costs booked first."""
        account = self._account(account_id)
        (found, cached, available), = await self._flush([account_id])
        if not cached:
            return None
        return available + (max(account.free, 0) if found else 0)

    async def _flush(self, account_ids: list[str], closing: bool = False) -> list[tuple[int, int, int]]:
        """Book what the accounts settled, give spare back where due, renew their leases."""
        keys: list[str] = []
        args: list[object] = [KEY_TTL_SECONDS]
        sent = time.monotonic()
        expiry = time.time() + LEASE_TTL
        sent_for: list[tuple[_Account, int, tuple[int, int, int]]] = []
        for account_id in account_ids:
            account = self._account(account_id)
            idle = not account.holds and sent - account.last_used > IDLE_SECONDS
            carried = account.pending(give_back=closing or idle or not account.plentiful)
            spent, unbacked, release = carried
            keys += self._keys(account_id)[:4]
            args += [account.lease_id, spent + unbacked, release, expiry]
            sent_for.append((account, account.generation, carried))
        try:
            flat = await self._call("flush", keys, args)
        except CreditStateUnavailable as exc:
            if not exc.sent:  # e.g. the circuit is open: the next flush carries it all again
                for (account, generation, carried), account_id in zip(sent_for, account_ids):
                    account.unsend(generation, *carried)
                    self._dirty.add(account_id)
            raise
        answers = [(int(flat[i]), int(flat[i + 1]), int(flat[i + 2]))  # type: ignore[index]
                   for i in range(0, len(flat), 3)]  # type: ignore[arg-type]
        for (account, generation, _), (found, cached, available) in zip(sent_for, answers):
            if account.generation != generation:
                continue  # given up meanwhile
            if found:
                account.renewed_at = sent
                account.plentiful = account.plentiful and bool(cached) and available >= account.plenty
            elif account.granted:  # Redis no longer has it (expired, or Redis lost its data)
                account.give_up_lease(self._instance)
        return answers  # type: ignore[return-value]

    def _due(self, now: float) -> list[str]:
        """Accounts to flush now (settled costs, spare to give back, leases to renew); forgets idle ones."""
        due = self._dirty
        self._dirty = set()
        for account_id, account in list(self._accounts.items()):
            if account.holds and self._sweep(account, now):
                due.add(account_id)  # what the swept holds pinned goes back with this flush
            idle = not account.holds and now - account.last_used > IDLE_SECONDS
            if account_id in due:
                continue
            if account.granted and (idle or now - account.renewed_at >= RENEW_INTERVAL):
                due.add(account_id)
            elif idle and not (account.granted or account.spent or account.unbacked):
                del self._accounts[account_id]  # nothing leased, held or owed
        return list(due)

    @staticmethod
    def _sweep(account: _Account, now: float) -> bool:
        """Drop holds whose request never settled (a cancelled handler) once they expire; True if any."""
        expired = [rid for rid, (_, expiry, _) in account.holds.items() if expiry <= now]
        for request_id in expired:
            amount, _, generation = account.holds.pop(request_id)
            if generation == account.generation:
                account.held -= amount
        return bool(expired)

    async def _flush_forever(self) -> None:
        next_scan = 0.0
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            now = time.monotonic()
            if now >= next_scan:
                next_scan = now + 1.0
                due = self._due(now)
            else:
                due = [a for a in self._dirty if a in self._accounts]
                self._dirty = set()
            for start in range(0, len(due), FLUSH_BATCH):
                try:
                    await self._flush(due[start:start + FLUSH_BATCH])
                except CreditStateUnavailable:
                    pass  # counted and logged by the client; the leases stop being used unless renewed
                except Exception:
                    log.exception("credit flush failed")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await stop_tasks(self._flusher)
        self._flusher = None
        ids = list(self._accounts)
        for start in range(0, len(ids), FLUSH_BATCH):
            with contextlib.suppress(CreditStateUnavailable):
                await self._flush(ids[start:start + FLUSH_BATCH], closing=True)
        await self._redis.close()
