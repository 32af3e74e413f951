"""delete_rolled_up_usage, the usage roll-up's store half: on SQLite and PostgreSQL alike.

Only rows of UTC days before the cutoff go; every total read from the daily tables and the
ledger stay exactly what they were.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from nexgate_proxy.store import Store
from tests.store.test_usage_daily import mixed_rows

T0 = datetime(2030, 3, 1, tzinfo=UTC)
"""mixed_rows spreads its rows over the 5 days from T0 (2030-03-01 .. 03-05)."""
CUTOFF = date(2030, 3, 3)


async def figures(store: Store) -> dict[str, object]:
    out: dict[str, object] = {}
    for account in ("usr_a", "usr_b", "org_o"):
        out[f"by_day_model {account}"] = await store.usage_by_day_and_model(account_id=account, since=date(2030, 1, 1))
        out[f"ledger {account}"] = await store.ledger_snapshot(account, since=T0 - timedelta(days=1))
        out[f"sum {account}"] = await store.ledger_sum(account)
        for group in ("day", "model", "key"):
            # whole days, as statements (a month) and the dashboard overview ask
            out[f"{group} {account}"] = await store.usage_totals(account_id=account, since=T0 - timedelta(days=30),
                                                                until=T0 + timedelta(days=30), group_by=group)
    out["all by day"] = await store.usage_totals(group_by="day", since=T0, until=T0 + timedelta(days=5))
    out["org by model"] = await store.usage_totals(org_id="org_o", group_by="model", since=T0,
                                                   until=T0 + timedelta(days=5))
    return out


async def row_days(store: Store) -> dict[str, int]:
    days: dict[str, int] = {}
    for account in ("usr_a", "usr_b", "org_o"):
        for row in await store.list_usage(account_id=account, limit=10_000):
            day = row.ts.date().isoformat()
            days[day] = days.get(day, 0) + 1
    return days


async def test_deletes_only_rows_before_the_cutoff_and_totals_do_not_move(store: Store) -> None:
    rows = mixed_rows(400)
    await store.record_usage(rows)
    before = await figures(store)
    days_before = await row_days(store)
    assert sorted(days_before) == ["2030-03-01", "2030-03-02", "2030-03-03", "2030-03-04", "2030-03-05"]
    old = sum(1 for r in rows if r.ts < datetime(2030, 3, 3, tzinfo=UTC))

    deleted = 0
    while (batch := await store.delete_rolled_up_usage(CUTOFF, 37)) == 37:  # bounded batches
        deleted += batch
    deleted += batch
    assert deleted == old > 0
    assert await store.delete_rolled_up_usage(CUTOFF, 37) == 0  # idempotent

    days_after = await row_days(store)
    assert {d: n for d, n in days_before.items() if d >= "2030-03-03"} == days_after
    assert await figures(store) == before


async def test_arguments_are_checked(store: Store) -> None:
    with pytest.raises(TypeError):
        await store.delete_rolled_up_usage(datetime(2030, 3, 3, tzinfo=UTC), 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await store.delete_rolled_up_usage(CUTOFF, 0)
