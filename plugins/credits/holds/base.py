"""Hot credit state shared by gateway instances: cached balances and open holds.

The durable truth is the ledger in the store. Here, per account, live the
balance as last loaded (minus charges settled since) and the holds of requests
in flight; a reservation succeeds atomically only if ``balance - holds - amount``
stays above ``-overdraft``. Holds expire, so a dead instance's holds free
themselves. Without Redis, a dict does it (here); with Redis, per-instance leases
on the shared state do (``credit_redis``).

Amounts here are integer pico-USD, the ledger's own unit, exact: a hold is the
request's worst case to the pico-dollar and a charge its exact cost, so the
cached balance ends where the ledger does and a request is refused only when
the ledger does not cover it (on Redis, the scripts do exact 64-bit arithmetic:
see ``redis``).

A credit (payment, grant, refund) is booked in the ledger *through* the hot state
(``credit(account, amount, book)``): the state hears of it before the ledger commits
and again after. That is what lets a cached balance take every credit exactly once.
Announced only after the commit, a credit could not be placed: a first balance load
that read the ledger between the commit and the announcement already has it, one
that read before does not, and the announcement looks the same to the state either
way. So while a credit is being booked no load of its account is taken (the load
waits for it to end), and a load that overlapped a credit's end is read again.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass
from typing import Awaitable, Callable


log = logging.getLogger("nexgate.credits")

KEY_TTL_SECONDS = 24 * 3600


class CreditStateUnavailable(Exception):
    """The hot state (Redis) did not answer."""

    def __init__(self, reason: str = "", *, sent: bool = True) -> None:
        super().__init__(reason)
        self.sent = sent
        """False only when the call surely never reached Redis."""


@dataclass(frozen=True, slots=True)
class Reservation:
    ok: bool
    available_pico: int
    """Balance minus holds after this reservation (before it, when refused)."""


@dataclass(frozen=True, slots=True)
class Credited:
    booked: bool
    """The ledger took the entry (False: it had it already, nothing changed)."""
    reached_state: bool
    """The hot state heard of it. False when it did not answer: the ledger has the credit, a cached
    balance may miss it until it is loaded again."""


Booker = Callable[[], Awaitable[bool]]
"""Commits a ledger entry; True when it applied it, False when the ledger had it already."""


class StoreBalance(int):
    """A balance read from the store (pico-USD) and the store feed position that read includes.

    An int, so a state that needs no position uses it as the balance.
    """

    position: int

    def __new__(cls, pico: int, position: int) -> StoreBalance:
        balance = super().__new__(cls, pico)
        balance.position = position
        return balance


BalanceLoader = Callable[[], Awaitable[int]]
"""Returns the account's durable balance in pico-USD (a StoreBalance, from the store)."""


class CreditState(abc.ABC):
    @abc.abstractmethod
    async def reserve(self, account_id: str, request_id: str, amount_pico: int, overdraft_pico: int,
                      hold_seconds: float, load_balance: BalanceLoader) -> Reservation: ...

    @abc.abstractmethod
    def settle(self, account_id: str, request_id: str, cost_pico: int) -> None:
        """Release the request's hold and take its actual cost off the cached balance.

        In process, never waiting (the hot path); every later call on this instance sees it done.
        """

    @abc.abstractmethod
    async def credit(self, account_id: str, amount_pico: int, book: Booker) -> Credited:
        """Book a payment, grant or refund with ``book``, and see that cached balances get it once.

        Shared state (Redis): moves the shared cached balance (if one is cached) by exactly
        ``amount_pico``, once, whatever loads race it. A state in process moves nothing here: it
        learns of every credit, its own process's too, from the store feed (``credit_from_store``).
        ``book``'s errors propagate; the hot state's own trouble does not (``reached_state``): the
        ledger is the truth."""

    def credit_from_store(self, account_id: str, amount_pico: int, position: int) -> None:
        """The store feed's credit change at ``position`` (signed): raise the cached balance, exactly once.

        Nothing for shared state (Redis): the process that booked it raised it there (``credit``).
        """

    def reload_balances(self) -> None:
        """The store feed may have missed changes: cached balances are read from the store again.

        Nothing for shared state (Redis), which is told of credits by whoever booked them.
        """

    @abc.abstractmethod
    async def available(self, account_id: str) -> int | None:
        """Cached balance minus open holds, or None when nothing is cached."""

    async def close(self) -> None:
        return None
