"""Hot credit state shared by gateway instances: cached balances and open holds.

The durable truth is the ledger in the store. Here, per account, live the
balance as last loaded (minus charges settled since) and the holds of requests
in flight; a reservation succeeds atomically only if ``balance - holds - amount``
stays above ``-overdraft``. Holds expire, so a dead instance's holds free
themselves. Redis does it in one Lua call; without Redis, a dict does it.

Amounts here are integer nano-USD, rounded up from the ledger's pico-USD: Lua
numbers are doubles, exact to 2**53, which in nano-USD is about 9 million USD
per account. Rounding up only ever makes the gateway more careful.
"""

from __future__ import annotations

import abc
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from .counters import CountersUnavailable, RedisScripts

log = logging.getLogger("nexgate.credits")

PICO_PER_NANO = 1000
KEY_TTL_SECONDS = 24 * 3600


def nano_ceil(pico: int) -> int:
    return -(-pico // PICO_PER_NANO)


def nano_floor(pico: int) -> int:
    return pico // PICO_PER_NANO


class CreditStateUnavailable(Exception):
    """The hot state (Redis) did not answer."""


@dataclass(frozen=True, slots=True)
class Reservation:
    ok: bool
    available_nano: int
    """Balance minus holds after this reservation (before it, when refused)."""


BalanceLoader = Callable[[], Awaitable[int]]
"""Returns the account's durable balance in pico-USD."""


class CreditState(abc.ABC):
    @abc.abstractmethod
    async def reserve(self, account_id: str, request_id: str, amount_nano: int, overdraft_nano: int,
                      hold_seconds: float, load_balance: BalanceLoader) -> Reservation: ...

    @abc.abstractmethod
    async def settle(self, account_id: str, request_id: str, cost_nano: int) -> None:
        """Release the request's hold and take its actual cost off the cached balance."""

    @abc.abstractmethod
    def settle_soon(self, account_id: str, request_id: str, cost_nano: int) -> None:
        """``settle`` without waiting for it (the hot path). Every later call sees it done; a lost one
        leaves a hold that expires. CreditStateUnavailable only when that is known at once."""

    @abc.abstractmethod
    async def credit(self, account_id: str, amount_nano: int) -> None:
        """A payment or grant arrived: raise the cached balance (if one is cached)."""

    @abc.abstractmethod
    async def available(self, account_id: str) -> int | None:
        """Cached balance minus open holds, or None when nothing is cached."""

    async def close(self) -> None:
        return None


class _Account:
    __slots__ = ("balance", "held", "holds", "next_sweep")

    def __init__(self, balance: int) -> None:
        self.balance = balance
        self.held = 0
        """The sum of ``holds``' amounts, kept as they change: no sum per request."""
        self.holds: dict[str, tuple[int, float]] = {}
        self.next_sweep = 0.0


class MemoryCreditState(CreditState):
    """One process: exact and lock-free (the event loop serialises every call).

    A hold here outlives its expiry only when its request never settled (a bug, or a
    handler cancelled at shutdown), so expired holds are swept now and then and before
    any refusal, not on every request.
    """

    SWEEP_INTERVAL = 5.0

    def __init__(self) -> None:
        self._accounts: dict[str, _Account] = {}
        self._credits_seen: dict[str, int] = {}
        """Per account, how many credits arrived: a load that saw a credit race by loads again."""

    async def reserve(self, account_id: str, request_id: str, amount_nano: int, overdraft_nano: int,
                      hold_seconds: float, load_balance: BalanceLoader) -> Reservation:
        account = self._accounts.get(account_id)
        while account is None:
            version = self._credits_seen.get(account_id, 0)
            loaded = nano_floor(await load_balance())
            # A credit booked while we read may or may not be in `loaded`: read again to be sure.
            if self._credits_seen.get(account_id, 0) == version:
                account = self._accounts.setdefault(account_id, _Account(loaded))  # another may have loaded it
            else:
                account = self._accounts.get(account_id)
        now = time.monotonic()
        if now >= account.next_sweep:
            self._sweep(account, now)
        available = account.balance - account.held
        if available - amount_nano < -overdraft_nano and self._sweep(account, now):
            available = account.balance - account.held
        if available - amount_nano < -overdraft_nano:
            return Reservation(False, available)
        previous = account.holds.get(request_id)
        if previous is not None:
            account.held -= previous[0]
        account.holds[request_id] = (amount_nano, now + hold_seconds)
        account.held += amount_nano
        return Reservation(True, available - amount_nano)

    def _sweep(self, account: _Account, now: float) -> bool:
        """Drop expired holds; True when some were dropped."""
        account.next_sweep = now + self.SWEEP_INTERVAL
        expired = [rid for rid, (_, expiry) in account.holds.items() if expiry <= now]
        for rid in expired:
            account.held -= account.holds.pop(rid)[0]
        return bool(expired)

    async def settle(self, account_id: str, request_id: str, cost_nano: int) -> None:
        self.settle_soon(account_id, request_id, cost_nano)

    def settle_soon(self, account_id: str, request_id: str, cost_nano: int) -> None:
        account = self._accounts.get(account_id)
        if account is None:
            return
        hold = account.holds.pop(request_id, None)
        if hold is not None:
            account.held -= hold[0]
        account.balance -= cost_nano

    async def credit(self, account_id: str, amount_nano: int) -> None:
        self._credits_seen[account_id] = self._credits_seen.get(account_id, 0) + 1
        account = self._accounts.get(account_id)
        if account is not None:
            account.balance += amount_nano

    async def available(self, account_id: str) -> int | None:
        account = self._accounts.get(account_id)
        return None if account is None else account.balance - account.held


_RESERVE = """
local bal = redis.call('GET', KEYS[1])
if not bal then
  local version = redis.call('GET', KEYS[5]) or '0'
  -- A credit booked since the caller read the version may be missing from its load: load again.
  if ARGV[6] == '' or ARGV[8] ~= version then return {-1, version} end
  redis.call('SET', KEYS[1], ARGV[6], 'NX')
  bal = redis.call('GET', KEYS[1])
end
local expired = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', ARGV[3])
for _, rid in ipairs(expired) do
  local amount = redis.call('HGET', KEYS[3], rid)
  if amount then
    redis.call('DECRBY', KEYS[2], amount)
    redis.call('HDEL', KEYS[3], rid)
  end
  redis.call('ZREM', KEYS[4], rid)
end
local available = tonumber(bal) - tonumber(redis.call('GET', KEYS[2]) or '0')
local amount = tonumber(ARGV[2])
if available - amount < -tonumber(ARGV[5]) then return {0, available} end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1])
redis.call('INCRBY', KEYS[2], ARGV[2])
for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ARGV[7]) end
return {1, available - amount}
"""

_SETTLE = """
local amount = redis.call('HGET', KEYS[3], ARGV[1])
if amount then
  redis.call('DECRBY', KEYS[2], amount)
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('ZREM', KEYS[4], ARGV[1])
end
if tonumber(ARGV[2]) > 0 and redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('DECRBY', KEYS[1], ARGV[2])
end
return 1
"""

_CREDIT = """
redis.call('INCR', KEYS[5])
redis.call('EXPIRE', KEYS[5], ARGV[2])
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('INCRBY', KEYS[1], ARGV[1]) end
return false
"""

_AVAILABLE = """
local bal = redis.call('GET', KEYS[1])
if not bal then return false end
return tonumber(bal) - tonumber(redis.call('GET', KEYS[2]) or '0')
"""


class RedisCreditState(CreditState):
    """Shared by every instance using the same Redis; one round trip per reserve and per settle
    (the hot path's settle is not waited for: it keeps its place in the pipeline).

    Speaks RESP through the rate limiter's lean client (``RedisScripts``): redis-py costs more CPU
    per call than the rest of a proxied request.
    """

    def __init__(self, url: str, *, prefix: str = "nexgate:cr", timeout: float = 1.0) -> None:
        self._redis = RedisScripts(url, {"reserve": _RESERVE, "settle": _SETTLE, "credit": _CREDIT,
                                         "available": _AVAILABLE},
                                   label="credit state", timeout=timeout, client_name="nexgate-credits")
        self._prefix = prefix

    def _keys(self, account_id: str) -> list[str]:
        # One hash tag per account keeps its keys on one Redis Cluster slot.
        base = f"{self._prefix}:{{{account_id}}}"
        return [f"{base}:bal", f"{base}:held", f"{base}:holds", f"{base}:exp", f"{base}:credits"]

    async def _call(self, script: str, account_id: str, args: list[object]) -> object:
        try:
            return await self._redis.call(script, self._keys(account_id), args)
        except CountersUnavailable as exc:
            raise CreditStateUnavailable(str(exc)) from None

    async def reserve(self, account_id: str, request_id: str, amount_nano: int, overdraft_nano: int,
                      hold_seconds: float, load_balance: BalanceLoader) -> Reservation:
        now = time.time()
        args: list[object] = [request_id, amount_nano, now, now + hold_seconds, overdraft_nano, "", KEY_TTL_SECONDS,
                              ""]
        status, value = await self._call("reserve", account_id, args)  # type: ignore[misc]
        while status == -1:  # not cached: load it, unless a credit races the load (then load again)
            args[7] = value
            args[5] = nano_floor(await load_balance())
            status, value = await self._call("reserve", account_id, args)  # type: ignore[misc]
        return Reservation(status == 1, int(value))

    async def settle(self, account_id: str, request_id: str, cost_nano: int) -> None:
        await self._call("settle", account_id, [request_id, cost_nano])

    def settle_soon(self, account_id: str, request_id: str, cost_nano: int) -> None:
        try:
            self._redis.call_soon("settle", self._keys(account_id), [request_id, cost_nano])
        except CountersUnavailable as exc:
            raise CreditStateUnavailable(str(exc)) from None

    async def credit(self, account_id: str, amount_nano: int) -> None:
        await self._call("credit", account_id, [amount_nano, KEY_TTL_SECONDS])

    async def available(self, account_id: str) -> int | None:
        value = await self._call("available", account_id, [])
        return None if value is None else int(value)  # type: ignore[call-overload]

    async def close(self) -> None:
        await self._redis.close()


def open_credit_state(url: str, **options: object) -> CreditState:
    if url.startswith("memory://"):
        return MemoryCreditState()
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisCreditState(url, **options)  # type: ignore[arg-type]
    raise ValueError(f"unsupported state URL scheme {url.split(':', 1)[0]!r}")
