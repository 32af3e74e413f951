"""The store's change feed: what other processes changed reaches every running gateway.

A gateway caches what it reads from the store (verified keys, an organization's limits,
balances). When any process (the CLI, another instance, a webhook) changes one of those, the
store writes a row to ``store_changes`` in the same transaction as the change: a revoked key, an
organization's new limits or membership, a ledger entry that is not a request's own debit. Ids
grow in commit order (SQLite serializes writers; PostgreSQL writers hold an advisory lock to
commit), so a feed that read up to id N has seen everything committed before N and nothing after.

Each running gateway's feed delivers every row after the last id it saw, in order, exactly once:

* SQLite: ``PRAGMA data_version`` on a connection of its own every ``poll_interval`` (200 ms):
  any commit by another connection changes it; then one query reads the new rows.
* PostgreSQL: ``LISTEN``; the writing transaction's ``NOTIFY`` arrives at its commit, then one
  query reads the new rows. After a lost connection the feed reconnects with backoff and reads
  what it missed from the table: nothing is lost or delivered twice.

Rows older than ``RETENTION`` are pruned (never the newest). A feed that could not read for half
of that may have missed pruned rows: it delivers ``EVICT_ALL`` first, and caches drop everything.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Callable

from ..background import stop_tasks
from ..state.bus import EVICT_ALL
from .base import StoreError

if TYPE_CHECKING:
    from .base import Store

log = logging.getLogger("nexgate.store.feed")

API_KEY_CHANGE = "api_key"
"""Subject: a key id. Revoked (or its row changed): drop its cached verification."""
ORG_CHANGE = "org"
"""Subject: an organization id. Its limits or members changed: drop its keys' cached identities."""
CREDIT_CHANGE = "credit"
"""Subject: an account id; with the signed amount and the ledger entry id. Not a request's own debit."""

RETENTION = timedelta(days=1)
PRUNE_INTERVAL = 3600.0
CATCH_UP_PAGE = 500


@dataclass(frozen=True, slots=True)
class StoreChange:
    id: int
    """The feed position: ids grow in commit order."""
    kind: str
    subject: str
    amount_pico: int | None = None
    ledger_id: int | None = None


MISSED = StoreChange(id=0, kind=EVICT_ALL, subject="")
"""Delivered when changes may have been missed: every cache drops what it holds."""

ChangeCallback = Callable[[StoreChange], None]


class ChangeFeed(abc.ABC):
    """Delivers the store's changes to subscribers, in order, exactly once each; backends say when to look."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._callbacks: list[ChangeCallback] = []
        self.position = 0
        """The id of the last change delivered."""
        self._task: asyncio.Task[None] | None = None
        self._last_read = 0.0
        self._next_prune = 0.0
        self._reading = asyncio.Lock()
        """One read at a time: two reads from the same position would deliver its rows twice."""

    def subscribe(self, callback: ChangeCallback) -> Callable[[], None]:
        """Call ``callback(change)`` for every change from now on. Returns an unsubscribe function."""
        self._callbacks.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._callbacks.remove(callback)

        return unsubscribe

    @property
    def connected(self) -> bool:
        return True

    async def start(self) -> None:
        """From the latest change on: the caches are empty, and what they read later includes the rest."""
        if self._task is not None:
            return
        self.position = await self._store.latest_change_id()
        self._last_read = time.monotonic()
        self._next_prune = self._last_read + 60.0  # not at once: several workers start together
        self._task = asyncio.create_task(self._watch(), name="nexgate-store-feed")

    async def close(self) -> None:
        task, self._task = self._task, None
        await stop_tasks(task)

    async def deliver_now(self) -> None:
        """This process just changed the store: its own caches hear of it at once, not at the next poll.

        A failure is logged and left to the watcher, which reads the same rows again.
        """
        try:
            await self.catch_up()
        except StoreError as exc:
            log.warning("could not read the store change feed now (%s); it is read again shortly", exc)

    async def catch_up(self) -> int:
        """Deliver every change committed after ``position``, in order; returns how many."""
        async with self._reading:
            return await self._read()

    async def _read(self) -> int:
        started = time.monotonic()
        if started - self._last_read > RETENTION.total_seconds() / 2:
            log.warning("the store change feed could not read for %.0f s: caches drop everything",
                        started - self._last_read)
            self._deliver(MISSED)
        delivered = 0
        while True:
            changes = await self._store.changes_since(self.position, CATCH_UP_PAGE)
            for change in changes:
                self.position = change.id
                self._deliver(change)
            delivered += len(changes)
            if len(changes) < CATCH_UP_PAGE:
                break
        self._last_read = started
        if started >= self._next_prune:
            self._next_prune = started + PRUNE_INTERVAL
            await self._store.prune_changes(RETENTION)
        return delivered

    def _deliver(self, change: StoreChange) -> None:
        for callback in list(self._callbacks):
            try:
                callback(change)
            except Exception:
                # One broken subscriber must not keep the others from hearing of it.
                log.exception("store change subscriber failed for kind %r", change.kind)

    @abc.abstractmethod
    async def _watch(self) -> None:
        """Run until cancelled: call ``catch_up`` whenever something may have been committed."""
