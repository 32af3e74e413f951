"""The overview's per-day, per-model totals equal the store's own totals, and completed days are read once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from nexgate_plugins.admin.dashboard.rollup import DayTotals
from nexgate_proxy.store import UsageRecord, open_store


def _row(i: int, account: str, ts: datetime, model: str | None) -> UsageRecord:
    return UsageRecord(request_id=f"r{i}", ts=ts, endpoint="chat.completions", model=model, provider="p",
                       upstream_model="m", account_id=account, org_id=None, key_id=None, key_prefix=None,
                       prompt_tokens=i, completion_tokens=2 * i, cached_tokens=0, usage_estimated=False,
                       estimated_cost_pico=None, actual_cost_pico=1000 * i, latency_ms=5, status=200,
                       error_code=None, stream=False, client_ip=None, attempts=1)


class CountingStore:
    """The store, counting usage_totals calls."""

    def __init__(self, store) -> None:  # type: ignore[no-untyped-def]
        self.store, self.calls = store, 0

    async def usage_totals(self, **kwargs):  # type: ignore[no-untyped-def]
        self.calls += 1
        return await self.store.usage_totals(**kwargs)


async def test_day_totals_match_the_store_and_read_completed_days_once(store_url: str) -> None:
    store = await open_store(store_url)
    try:
        await store.migrate()
        user = await store.create_user(email="a@example.com")
        now = datetime.now(UTC)
        rows = [_row(i, user.id, now - timedelta(days=i % 60, seconds=i), ("a", "b", None)[i % 3])
                for i in range(1, 181)]
        await store.record_usage(rows)
        counting = CountingStore(store)
        totals = DayTotals()
        cells30 = await totals.cells(counting, user.id, now, 30)  # type: ignore[arg-type]
        since = datetime.combine((now - timedelta(days=29)).date(), datetime.min.time(), UTC)
        expected = {(t.group, t.requests) for t in await store.usage_totals(account_id=user.id, since=since,
                                                                             group_by="day")}
        by_day: dict[str, int] = {}
        for (day, _model), cell in cells30.items():
            by_day[day] = by_day.get(day, 0) + cell[0]
        assert set(by_day.items()) == expected
        for model in ("a", "b"):
            store_model = sum(t.cost_pico for t in await store.usage_totals(account_id=user.id, since=since,
                                                                             model=model, group_by="day"))
            assert sum(c[3] for (d, m), c in cells30.items() if m == model) == store_model
        assert sum(c[0] for (d, m), c in cells30.items() if m == "") == sum(
            1 for r in rows if r.model is None and r.ts >= since)
        first = counting.calls
        await totals.cells(counting, user.id, now, 30)
        assert counting.calls == first + 1  # only today's totals again
        cells90 = await totals.cells(counting, user.id, now, 90)
        assert sum(c[0] for c in cells90.values()) == len(rows)
        assert sum(c[0] for c in (await totals.cells(counting, user.id, now, 30)).values()) == \
            sum(c[0] for c in cells30.values())
    finally:
        await store.close()
