"""Credit holds in this process: a dict per account (``memory://``)."""

from __future__ import annotations

import asyncio
import time

from .base import BalanceLoader, Booker, Credited, CreditState, Reservation, nano_floor


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
        self._credits_ended: dict[str, int] = {}
        """Per account, how many credits ended: a load that overlapped one may miss it, and loads again."""
        self._open: dict[str, int] = {}
        """Per account, how many credits are being booked: no load of theirs is taken meanwhile, since
        it may or may not hold what is being booked..."""
        self._crediting: dict[str, asyncio.Event] = {}
        """...and loads wait for this, set when the last of them ends."""
        self._stale: set[str] = set()
        """Accounts whose cached balance may or may not hold a credit (its booking failed midway)."""

    async def reserve(self, account_id: str, request_id: str, amount_nano: int, overdraft_nano: int,
                      hold_seconds: float, load_balance: BalanceLoader) -> Reservation:
        account = self._accounts.get(account_id)
        if account is None or account_id in self._stale:
            account = await self._load(account_id, load_balance)
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

    async def _load(self, account_id: str, load_balance: BalanceLoader) -> _Account:
        while True:
            crediting = self._crediting.get(account_id)
            if crediting is not None:
                await crediting.wait()
                continue
            version = self._credits_ended.get(account_id, 0)
            loaded = nano_floor(await load_balance())
            if account_id not in self._open and self._credits_ended.get(account_id, 0) == version:
                break
        account = self._accounts.get(account_id)
        if account is None:
            account = self._accounts[account_id] = _Account(loaded)
        elif account_id in self._stale:  # reloaded: the holds stay
            account.balance = loaded
        self._stale.discard(account_id)  # else another load took it while this one read
        return account

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

    async def credit(self, account_id: str, amount_nano: int, book: Booker) -> Credited:
        self._open[account_id] = self._open.get(account_id, 0) + 1
        self._crediting.setdefault(account_id, asyncio.Event())
        booked: bool | None = None
        try:
            booked = await book()
        finally:
            self._credits_ended[account_id] = self._credits_ended.get(account_id, 0) + 1
            account = self._accounts.get(account_id)
            if account is not None and booked is None:
                self._stale.add(account_id)  # whether the ledger took it is unknown: load it again
            elif account is not None and booked:
                account.balance += amount_nano
            self._open[account_id] -= 1
            if not self._open[account_id]:
                del self._open[account_id]
                self._crediting.pop(account_id).set()
        return Credited(booked, reached_state=True)

    async def available(self, account_id: str) -> int | None:
        account = self._accounts.get(account_id)
        if account is None or account_id in self._stale:
            return None
        return account.balance - account.held
