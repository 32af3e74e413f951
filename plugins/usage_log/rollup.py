"""The usage roll-up job (``usage.rollup_after_days``, 0 = off, the default).

Request rows whose UTC day is older than N days are deleted once their day is in the
daily totals record_usage keeps in the same transaction (usage_daily, per account, day,
model, key, status and organization; debits in request_debits_daily). Usage totals,
statements and the dashboard overview read those totals, so their figures do not change;
only the request-level rows of those days are gone (the data export gives their daily
totals instead). The ledger is never touched. Runs at start and hourly, in batches;
several instances need no leader (a row is deleted once, PostgreSQL's SKIP LOCKED lets
them share the work).

A deleted row's request id is no longer known to the store, and the store books one debit per
batch, so a replayed outbox row of a rolled-up day would be charged again. ``refuse_late_rows``
keeps such rows out of the store: rows of days the job may already have rolled up (or will within
``ROLLUP_RACE_MARGIN``, for a flush that straddles midnight) are dropped and counted, never charged twice.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Awaitable, Callable, Sequence

from nexgate_proxy.store import Store, StoreError, UsageRecord

Sink = Callable[[Sequence[UsageRecord]], Awaitable[int]]

log = logging.getLogger("nexgate.usage")

ROLLUP_INTERVAL = 3600.0
"""Seconds between two runs."""
ROLLUP_RETRY = 300.0
"""Seconds before retrying a run that failed (the store was unreachable)."""
ROLLUP_BATCH = 5000
"""Rows deleted per transaction: short write locks, whatever the backlog."""
ROLLUP_PAUSE = 0.05
"""Seconds between two batches, so a large first run leaves the store to the traffic."""
MAX_ROLLUP_DAYS = 36_500
ROLLUP_RACE_MARGIN = timedelta(minutes=5)
"""How far ahead refuse_late_rows looks: a flush that started before midnight may still be writing
when a run after it rolls up one more day (a flush takes seconds)."""


def rollup_before(days: int, now: datetime | None = None) -> date:
    """The first UTC day kept as rows: rows of days before it are rolled up."""
    return (now or datetime.now(timezone.utc)).astimezone(timezone.utc).date() - timedelta(days=days)


async def run_rollup(store: Store, days: int, now: datetime | None = None, batch: int = ROLLUP_BATCH) -> int:
    """Delete the rows of days older than ``days`` (whole UTC days); return how many. Idempotent."""
    if type(days) is not int or not 1 <= days <= MAX_ROLLUP_DAYS:
        raise ValueError(f"rollup_after_days must be an integer between 1 and {MAX_ROLLUP_DAYS}")
    before = rollup_before(days, now)
    total = 0
    while True:
        deleted = await store.delete_rolled_up_usage(before, batch)
        total += deleted
        if deleted < batch:
            return total
        await asyncio.sleep(ROLLUP_PAUSE)


@dataclass
class RollupState:
    days: int
    runs: int = 0
    failures: int = 0
    rows_deleted: int = 0
    rows_refused: int = 0
    """Outbox rows too old to be told apart from rolled-up ones: dropped, never charged twice."""


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def refuse_late_rows(sink: Sink, state: RollupState, now: Callable[[], datetime] = _utcnow) -> Sink:
    """``sink`` (the store's record_usage) without the rows of days the roll-up may have removed.

    Their request ids may be gone from the store, so it cannot tell a replay from a first write:
    charging them could charge twice; dropping them charges at most once (a spool that waited
    N days was most likely written already). A row passes if its day is still kept as rows
    ``ROLLUP_RACE_MARGIN`` from now: the job cannot reach it while this flush writes.
    """

    async def record(rows: Sequence[UsageRecord]) -> int:
        first_safe = rollup_before(state.days, now() + ROLLUP_RACE_MARGIN)
        kept = [r for r in rows if r.ts.astimezone(timezone.utc).date() >= first_safe]
        if len(kept) < len(rows):
            refused = len(rows) - len(kept)
            state.rows_refused += refused
            log.warning("usage: %d outbox rows are older than the roll-up window (%d days): not stored or "
                        "charged, since their day may already be rolled up", refused, state.days)
        return await sink(kept) if kept else 0

    return record


async def rollup_loop(store: Store, state: RollupState) -> None:
    while True:
        delay = ROLLUP_INTERVAL
        try:
            deleted = await run_rollup(store, state.days)
        except asyncio.CancelledError:
            raise
        except StoreError as exc:
            state.failures += 1
            delay = ROLLUP_RETRY
            log.warning("usage roll-up failed (%s); retrying in %d s", type(exc).__name__, delay)
        except Exception:
            state.failures += 1
            delay = ROLLUP_RETRY
            log.exception("usage roll-up failed; retrying in %d s", delay)
        else:
            state.runs += 1
            state.rows_deleted += deleted
            if deleted:
                log.info("usage roll-up: deleted %d request rows older than %d days (their daily totals stay)",
                         deleted, state.days)
        await asyncio.sleep(delay)
