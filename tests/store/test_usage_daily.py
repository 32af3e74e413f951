"""The daily usage totals (usage_daily) record_usage keeps, the reads built on them, and the
status filter of list_usage: on SQLite and PostgreSQL alike.

The invariant: whatever batches arrive (replayed, overlapping, with duplicate ids), the daily
totals are exactly what the stored rows add up to, and every total read through them equals the
same total computed from the rows.
"""

from __future__ import annotations

import random
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from nexgate_proxy.store import MAX_PICO, NewLedgerEntry, Store, UsageRecord, UsageTotal, open_store
from nexgate_proxy.store._common import whole_days

from .old_schema import migrate_up_to, write_old_rows

T0 = datetime(2030, 3, 1, tzinfo=UTC)
MODELS = ("gpt-a", "gpt-b", None)
STATUSES = (200, 200, 200, 201, 402, 429, 500)


def usage(request_id: str, **overrides: Any) -> UsageRecord:
    fields: dict[str, Any] = {
        "request_id": request_id, "ts": T0, "endpoint": "chat.completions", "model": "gpt-a", "provider": "fake",
        "upstream_model": "up", "account_id": "usr_a", "org_id": None, "key_id": "key_a", "key_prefix": "ng-a",
        "prompt_tokens": 10, "completion_tokens": 20, "cached_tokens": 0, "usage_estimated": False,
        "estimated_cost_pico": None, "actual_cost_pico": None, "latency_ms": 5, "status": 200, "error_code": None,
        "stream": False, "client_ip": None, "attempts": 1,
    }
    fields.update(overrides)
    return UsageRecord(**fields)


def mixed_rows(n: int, seed: int = 3) -> list[UsageRecord]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        account = rng.choice(("usr_a", "usr_b", "org_o", None))
        # costs near MAX_PICO only without an account (nothing debited): their sums pass 2**63
        costs = (None, 0, rng.randrange(1, 10**12)) + ((MAX_PICO - rng.randrange(10**6),) if account is None else ())
        rows.append(usage(
            f"req{i:05d}", ts=T0 + timedelta(seconds=rng.randrange(0, 5 * 86400)),
            model=rng.choice(MODELS), account_id=account,
            org_id=rng.choice((None, "org_o")), key_id=rng.choice(("key_a", "key_b", None)),
            prompt_tokens=rng.randrange(0, 5000), completion_tokens=rng.randrange(0, 5000),
            cached_tokens=rng.randrange(0, 100), status=rng.choice(STATUSES), latency_ms=rng.randrange(1, 9000),
            actual_cost_pico=rng.choice(costs),
        ))
    return rows


async def record_with_replays(store: Store, rows: list[UsageRecord]) -> None:
    """Batches of 40, each replayed whole, the next overlapping the previous, with in-batch duplicates."""
    for start in range(0, len(rows), 40):
        batch = rows[max(0, start - 10):start + 40]
        await store.record_usage(batch + batch[:3])  # duplicates inside the batch: the first wins
        assert await store.record_usage(batch) == 0  # replayed: nothing moves


def expected_totals(rows: list[UsageRecord], group_by: str, since: datetime | None = None,
                    until: datetime | None = None, **scope: Any) -> list[UsageTotal]:
    totals: dict[str, list[int]] = {}
    for r in rows:
        if since is not None and r.ts < since or until is not None and r.ts >= until:
            continue
        if any(getattr(r, column) != value for column, value in scope.items()):
            continue
        group = {"day": r.ts.date().isoformat(), "model": r.model or "", "key": r.key_id or ""}[group_by]
        t = totals.setdefault(group, [0, 0, 0, 0])
        t[0] += 1
        t[1] += r.prompt_tokens
        t[2] += r.completion_tokens
        t[3] += r.actual_cost_pico or 0
    return [UsageTotal(g, *v) for g, v in sorted(totals.items())]


async def daily_cells(store: Store) -> dict[tuple[Any, ...], tuple[int, ...]]:
    # SQLite keeps the cost in two parts (a sum may pass 2**63): add them here
    parts = "cost_pico, 0" if store.dialect == "postgres" else "cost_high, cost_low"
    rows = await store._select(  # type: ignore[attr-defined]
        "SELECT account_id, day, model, key_id, status, org_id, requests, prompt_tokens, completion_tokens,"
        f" cached_tokens, {parts}, latency_ms_sum, latency_ms_max FROM usage_daily", [])
    cells = {}
    for r in rows:
        high, low = int(r[10]), int(r[11])
        total_cost = high if store.dialect == "postgres" else high * 10**6 + low
        cells[(r[0], str(r[1])[:10], r[2], r[3], r[4], r[5])] = (
            int(r[6]), int(r[7]), int(r[8]), int(r[9]), total_cost, int(r[12]), int(r[13]))
    return cells


def cells_of(rows: list[UsageRecord]) -> dict[tuple[Any, ...], tuple[int, ...]]:
    cells: dict[tuple[Any, ...], list[int]] = {}
    for r in rows:
        key = (r.account_id or "", r.ts.date().isoformat(), r.model or "", r.key_id or "", r.status, r.org_id or "")
        c = cells.setdefault(key, [0, 0, 0, 0, 0, 0, 0])
        c[0] += 1
        c[1] += r.prompt_tokens
        c[2] += r.completion_tokens
        c[3] += r.cached_tokens
        c[4] += r.actual_cost_pico or 0
        c[5] += r.latency_ms
        c[6] = max(c[6], r.latency_ms)
    return {k: tuple(v) for k, v in cells.items()}


async def test_daily_totals_equal_the_rows_after_replays(store: Store) -> None:
    rows = mixed_rows(400)
    await record_with_replays(store, rows)
    assert len(await store.list_usage(account_id="usr_a", limit=1000)) == sum(r.account_id == "usr_a" for r in rows)
    assert await daily_cells(store) == cells_of(rows)
    # Every read through the daily totals equals the rows' own totals, aligned to days or not.
    midday = T0 + timedelta(days=1, hours=13, minutes=7)
    ranges = [(None, None), (T0 + timedelta(days=1), T0 + timedelta(days=3)), (midday, None), (None, midday),
              (midday, midday + timedelta(days=2, hours=3)), (midday, midday + timedelta(hours=2)),
              (T0 + timedelta(days=2), midday + timedelta(days=1))]
    for since, until in ranges:
        for group_by in ("day", "model", "key"):
            for scope in ({}, {"account_id": "usr_a"}, {"org_id": "org_o"}, {"key_id": "key_b"},
                          {"account_id": "usr_b", "model": "gpt-b"}):
                got = await store.usage_totals(since=since, until=until, group_by=group_by, **scope)
                assert got == expected_totals(rows, group_by, since, until, **scope), (since, until, group_by, scope)


async def test_usage_by_day_and_model(store: Store) -> None:
    rows = mixed_rows(300, seed=5)
    await record_with_replays(store, rows)
    got = await store.usage_by_day_and_model(account_id="usr_b", since=date(2030, 3, 2), until=date(2030, 3, 5))
    expected = []
    for day in ("2030-03-02", "2030-03-03", "2030-03-04"):
        start = datetime.fromisoformat(day).replace(tzinfo=UTC)
        expected += [(day, t) for t in expected_totals(rows, "model", start, start + timedelta(days=1),
                                                       account_id="usr_b")]
    assert got == expected
    assert await store.usage_by_day_and_model(account_id="usr_b", since=date(2030, 4, 1)) == []


async def test_migration_backfills_the_daily_totals_from_existing_rows(store_url: str, monkeypatch) -> None:
    rows = mixed_rows(200, seed=9)
    store = await open_store(store_url)
    try:
        # Version 6 with rows as it wrote them, then migrate: 0007 builds the totals from the rows.
        await migrate_up_to(store, 6, monkeypatch)
        await write_old_rows(store, rows)
        assert await migrate_up_to(store, 7, monkeypatch) == [7]
        assert await daily_cells(store) == cells_of(rows)
        assert await store.migrate() == [8]
        assert await store.record_usage(rows) == 0  # stored already: the totals stay
        assert await daily_cells(store) == cells_of(rows)
    finally:
        await store.close()


async def test_list_usage_filters_by_status(store: Store) -> None:
    rows = mixed_rows(200, seed=11)
    await store.record_usage(rows)
    mine = sorted((r for r in rows if r.account_id == "usr_a"), key=lambda r: (r.ts, r.request_id), reverse=True)
    for status, keep in ((402, lambda s: s == 402), (range(200, 300), lambda s: 200 <= s < 300),
                         (range(400, 600), lambda s: s >= 400), (304, lambda s: False)):
        got = await store.list_usage(account_id="usr_a", status=status, limit=1000)
        assert got == [r for r in mine if keep(r.status)]
    page = await store.list_usage(account_id="usr_a", status=range(400, 600), limit=3, offset=2)
    assert page == [r for r in mine if r.status >= 400][2:5]
    for bad in ("402", range(200, 300, 2), True):
        with pytest.raises(ValueError):
            await store.list_usage(account_id="usr_a", status=bad)  # type: ignore[arg-type]


async def test_ledger_days_and_snapshot_sum_exactly(store: Store) -> None:
    big = [usage(f"d{i}", ts=T0, actual_cost_pico=MAX_PICO // 4 + i) for i in range(3)]
    await store.record_usage(big)
    assert await store.record_usage(big) == 0  # replayed: the day's debits stay as they are
    assert await store.apply_ledger_entry(NewLedgerEntry("usr_a", "grant", MAX_PICO, "admin", "g1"))
    entries = await store.list_ledger("usr_a", limit=100)
    head = entries[0].id
    await store.record_usage([usage("late", ts=T0, actual_cost_pico=7), usage("free", ts=T0)])
    all_days = await store.ledger_days("usr_a")
    assert sum(d.amount_pico for d in all_days) == await store.ledger_sum("usr_a")
    assert sum(d.count for d in all_days) == 3  # entries: a debit per batch, the grant
    assert [(d.amount_pico, d.count) for d in await store.ledger_days("usr_a", up_to_id=head)] == [
        (MAX_PICO - sum(MAX_PICO // 4 + i for i in range(3)), 2)]
    others = await store.ledger_days("usr_a", without_request_debits=True)
    assert [(d.amount_pico, d.count) for d in others] == [(MAX_PICO, 1)]
    listed = await store.list_ledger("usr_a", without_request_debits=True)
    assert [(e.source, e.external_id) for e in listed] == [("admin", "g1")]
    assert await store.ledger_days("usr_a", since=datetime.now(UTC) + timedelta(days=1)) == []
    # The snapshot: balance, newest entry, and the request debits per day, from the daily sums.
    balance, newest, days = await store.ledger_snapshot("usr_a", since=datetime.now(UTC) - timedelta(days=1))
    ledger = await store.list_ledger("usr_a", limit=100)
    assert (balance, newest) == (await store.ledger_sum("usr_a"), ledger[0].id)
    debits = [e for e in ledger if e.source == "request"]
    assert [(d.amount_pico, d.count, d.last_at) for d in days] == [
        (sum(e.amount_pico for e in debits), 4, max(e.created_at for e in debits))]
    assert (await store.ledger_snapshot("usr_a", since=datetime.now(UTC) + timedelta(days=1)))[2] == []
    assert await store.ledger_snapshot("usr_nobody", since=T0) == (0, 0, [])


async def test_migration_backfills_the_request_debit_days(store_url: str, monkeypatch) -> None:
    store = await open_store(store_url)
    try:
        await migrate_up_to(store, 6, monkeypatch)
        await write_old_rows(store, [usage(f"b{i}", account_id=("usr_a", "usr_b")[i % 2],
                                           actual_cost_pico=MAX_PICO // 8) for i in range(6)])
        since = datetime.now(UTC) - timedelta(days=1)
        assert await migrate_up_to(store, 7, monkeypatch) == [7]
        kept = {a: await store.ledger_snapshot(a, since=since) for a in ("usr_a", "usr_b")}
        assert [(d.amount_pico, d.count) for d in kept["usr_a"][2]] == [(-3 * (MAX_PICO // 8), 3)]
        assert await store.migrate() == [8]
        assert {a: await store.ledger_snapshot(a, since=since) for a in ("usr_a", "usr_b")} == kept
    finally:
        await store.close()


def test_whole_days_split_a_range_into_days_and_edges() -> None:
    d = datetime(2030, 3, 1, tzinfo=UTC)
    assert whole_days(None, None) == ((None, None), [])
    assert whole_days(d, d + timedelta(days=2)) == ((date(2030, 3, 1), date(2030, 3, 3)), [])
    noon = d + timedelta(hours=12)
    assert whole_days(noon, None) == ((date(2030, 3, 2), None), [(noon, d + timedelta(days=1))])
    assert whole_days(None, noon) == ((None, date(2030, 3, 1)), [(d, noon)])
    assert whole_days(noon, noon + timedelta(hours=3)) == (None, [(noon, noon + timedelta(hours=3))])
    assert whole_days(noon, noon + timedelta(days=1)) == (None, [(noon, noon + timedelta(days=1))])
    assert whole_days(noon, noon + timedelta(days=2)) == (
        (date(2030, 3, 2), date(2030, 3, 3)), [(noon, d + timedelta(days=1)), (d + timedelta(days=2),
                                                                             noon + timedelta(days=2))])
