"""Hot credit state shared by gateway instances: cached balances and open holds.

The durable truth is the ledger in the store. Here, per account, live the
balance as last loaded (minus charges settled since) and the holds of requests
in flight; a reservation succeeds atomically only if ``balance - holds - amount``
stays above ``-overdraft``. Holds expire, so a dead instance's holds free
themselves. Without Redis, a dict does it (here); with Redis, per-instance leases
on the shared state do (``credit_redis``).

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


log = logging.getLogger("nexgate.credits")

PICO_PER_NANO = 1000
KEY_TTL_SECONDS = 24 * 3600


def nano_ceil(pico: int) -> int:
    return -(-pico // PICO_PER_NANO)


def nano_floor(pico: int) -> int:
    return pico // PICO_PER_NANO


class CreditStateUnavailable(Exception):
    """The hot state (Redis) did not answer."""

    def __init__(self, reason: str = "", *, sent: bool = True) -> None:
        super().__init__(reason)
        self.sent = sent
        """False only when the call surely never reached Redis."""


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
    def settle(self, account_id: str, request_id: str, cost_nano: int) -> None:
        """Release the request's hold and take its actual cost off the cached balance.

        In process, never waiting (the hot path); every later call on this instance sees it done.
        """

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

    def settle(self, account_id: str, request_id: str, cost_nano: int) -> None:
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


def open_credit_state(url: str, **options: object) -> CreditState:
    if url.startswith("memory://"):
        return MemoryCreditState()
    if url.startswith(("redis://", "rediss://", "unix://")):
        from .credit_redis import RedisCreditState

        return RedisCreditState(url, **options)  # type: ignore[arg-type]
    raise ValueError(f"unsupported state URL scheme {url.split(':', 1)[0]!r}")
