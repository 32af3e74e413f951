"""Credit holds in this process: a dict per account (``memory://``)."""

from __future__ import annotations

import time

from .base import BalanceLoader, Booker, Credited, CreditState, Reservation, StoreBalance


class _Account:
    __slots__ = ("balance", "position", "stale", "held", "holds", "next_sweep")

    def __init__(self, balance: int, position: int) -> None:
        self.balance = balance
        self.position = position
        """The store feed position the balance includes: a credit change after it is not in it yet."""
        self.stale = False
        """The feed may have missed changes: read the balance again (the holds stay)."""
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

    async def reserve(self, account_id: str, request_id: str, amount_pico: int, overdraft_pico: int,
                      hold_seconds: float, load_balance: BalanceLoader) -> Reservation:
        account = self._accounts.get(account_id)
        while account is None or account.stale:
            version = self._credits_seen.get(account_id, 0)
            loaded = await load_balance()
            position = loaded.position if isinstance(loaded, StoreBalance) else 0
            account = self._accounts.get(account_id)  # another request may have read it meanwhile
            if self._credits_seen.get(account_id, 0) != version:
                # A credit arrived while we read: applied to no cached balance, and maybe not in
                # `loaded`. Read again, after it.
                continue
            if account is None:
                account = self._accounts[account_id] = _Account(int(loaded), position)
            elif account.stale:  # as after a restart: costs settled but not yet flushed are not in the read
                account.balance, account.position, account.stale = int(loaded), position, False
        now = time.monotonic()
        if now >= account.next_sweep:
            self._sweep(account, now)
        available = account.balance - account.held
        if available - amount_pico < -overdraft_pico and self._sweep(account, now):
            available = account.balance - account.held
        if available - amount_pico < -overdraft_pico:
            return Reservation(False, available)
        previous = account.holds.get(request_id)
        if previous is not None:
            account.held -= previous[0]
        account.holds[request_id] = (amount_pico, now + hold_seconds)
        account.held += amount_pico
        return Reservation(True, available - amount_pico)

    def _sweep(self, account: _Account, now: float) -> bool:
        """Drop expired holds; True when some were dropped."""
        account.next_sweep = now + self.SWEEP_INTERVAL
        expired = [rid for rid, (_, expiry) in account.holds.items() if expiry <= now]
        for rid in expired:
            account.held -= account.holds.pop(rid)[0]
        return bool(expired)

    def settle(self, account_id: str, request_id: str, cost_pico: int) -> None:
        account = self._accounts.get(account_id)
        if account is None:
            return
        hold = account.holds.pop(request_id, None)
        if hold is not None:
            account.held -= hold[0]
        account.balance -= cost_pico

    async def credit(self, account_id: str, amount_pico: int, book: Booker) -> Credited:
        # Moves nothing here: the store feed brings the booked entry to every process, this one
        # too, in order and once (credit_from_store), so no load can count it twice or miss it.
        return Credited(await book(), reached_state=True)

    def credit_from_store(self, account_id: str, amount_pico: int, position: int) -> None:
        self._credits_seen[account_id] = self._credits_seen.get(account_id, 0) + 1
        account = self._accounts.get(account_id)
        if account is not None and position > account.position:  # else the loaded balance has it
            account.balance += amount_pico
            account.position = position

    def reload_balances(self) -> None:
        for account in self._accounts.values():
            account.stale = True

    async def available(self, account_id: str) -> int | None:
        account = self._accounts.get(account_id)
        return None if account is None else account.balance - account.held
