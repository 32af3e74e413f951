"""usage.rollup_after_days: a real gateway rolls old request rows up into the daily totals.

Rows over 5 UTC days; with N=2 only those of days older than 2 days go, statements and totals
read the same, the data export gives the rolled-up days as marked daily totals; off by default.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from nexgate_plugins.admin.privacy import build_export
from nexgate_plugins.credits.statements import build_statement, find_account, statement_json
from nexgate_plugins.usage_log import OUTBOX, ROLLUP
from nexgate_plugins.usage_log.rollup import ROLLUP_RACE_MARGIN, rollup_before, run_rollup
from nexgate_proxy.config import ConfigError, parse_config
from nexgate_proxy.plugins import resolve_config
from nexgate_proxy.store import Store, UsageRecord, open_store
from nexgate_proxy.testing import FakeUpstream, gateway_config

NOW = datetime.now(UTC)


def row(i: int, account: str, ts: datetime) -> UsageRecord:
    return UsageRecord(
        request_id=f"req-rollup-{i:04d}", ts=ts, endpoint="chat.completions", model=("gpt-a", "gpt-b", None)[i % 3],
        provider="fake", upstream_model="up", account_id=account, org_id=None, key_id=("key_a", "key_b")[i % 2],
        key_prefix="ng-a", prompt_tokens=i, completion_tokens=2 * i, cached_tokens=0, usage_estimated=False,
        estimated_cost_pico=None, actual_cost_pico=1000 * i, latency_ms=5, status=(200, 200, 429)[i % 3],
        error_code=None, stream=False, client_ip=None, attempts=1)


async def seeded(store_url: str) -> tuple[Store, str, list[UsageRecord]]:
    store = await open_store(store_url)
    await store.migrate()
    user = await store.create_user(email="rollup@example.com")
    start = datetime.combine(NOW.date(), datetime.min.time(), UTC) - timedelta(days=4)
    rows = [row(i, user.id, start + timedelta(minutes=29 * i)) for i in range(240)]  # 240 * 29 min: 4.8 days
    rows = [r for r in rows if r.ts < NOW - timedelta(minutes=1)]
    await store.record_usage(rows)
    return store, user.id, rows


async def figures(store: Store, account_id: str) -> dict[str, Any]:
    account = await find_account(store, account_id)
    assert account is not None
    months = sorted({(NOW - timedelta(days=d)).strftime("%Y-%m") for d in range(5)})
    out: dict[str, Any] = {m: statement_json(await build_statement(store, account, m, now=NOW)) for m in months}
    for group in ("day", "model", "key"):
        out[group] = await store.usage_totals(account_id=account_id, group_by=group,
                                              since=NOW.replace(hour=0, minute=0, second=0, microsecond=0)
                                              - timedelta(days=10), until=NOW.replace(
                                                  hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1))
    out["ledger"] = await store.ledger_sum(account_id)
    return out


async def stored_ids(store: Store, account_id: str) -> set[str]:
    return {r.request_id for r in await store.list_usage(account_id=account_id, limit=10_000)}


@pytest.mark.parametrize("days", [2])
async def test_the_gateway_rolls_up_only_rows_older_than_n_days(upstream: FakeUpstream, start_gateway, store_url: str,
                                                              days: int) -> None:
    store, account_id, rows = await seeded(store_url)
    try:
        before = await figures(store, account_id)
        export_before = await build_export(store, account_id, now=NOW)
        assert export_before["usage_daily"] == []  # every day still has its rows
        first_kept = rollup_before(days).isoformat()
        kept = {r.request_id for r in rows if r.ts.date().isoformat() >= first_kept}
        assert 0 < len(kept) < len(rows)

        gw = await start_gateway(gateway_config(upstream, storage={"url": store_url},
                                                usage={"rollup_after_days": days}))
        for _ in range(200):  # the job runs at start
            if await stored_ids(store, account_id) == kept:
                break
            await asyncio.sleep(0.05)
        assert await stored_ids(store, account_id) == kept
        assert gw.app[ROLLUP].rows_deleted == len(rows) - len(kept)
        assert await figures(store, account_id) == before  # statements, totals, ledger: unchanged

        export = await build_export(store, account_id, now=NOW)
        assert {u["request_id"] for u in export["usage"]} == kept
        daily = export["usage_daily"]
        assert daily and all(d["object"] == "usage.daily_rollup" and d["day"] < first_kept for d in daily)
        gone = [r for r in rows if r.request_id not in kept]
        assert sum(d["requests"] for d in daily) == len(gone)
        assert sum(d["cost_pico"] for d in daily) == sum(r.actual_cost_pico or 0 for r in gone)
        assert sum(d["prompt_tokens"] for d in daily) == sum(r.prompt_tokens for r in gone)
        assert {d["model"] for d in daily} == {"gpt-a", "gpt-b", None}
        assert await run_rollup(store, days) == 0  # idempotent
    finally:
        await store.close()


async def test_off_by_default_nothing_is_deleted(upstream: FakeUpstream, start_gateway, store_url: str) -> None:
    store, account_id, rows = await seeded(store_url)
    try:
        gw = await start_gateway(gateway_config(upstream, storage={"url": store_url}))
        await asyncio.sleep(0.3)
        assert ROLLUP not in gw.app
        assert await stored_ids(store, account_id) == {r.request_id for r in rows}
    finally:
        await store.close()


@pytest.mark.parametrize("value", [-1, 36_501, "x"])
def test_bad_values_are_refused(value: Any) -> None:
    with pytest.raises(ConfigError, match="rollup_after_days"):
        resolve_config(parse_config({"usage": {"rollup_after_days": value}}))


def test_run_rollup_refuses_off() -> None:
    with pytest.raises(ValueError):
        asyncio.run(run_rollup(None, 0))  # type: ignore[arg-type]


async def test_an_outbox_row_of_a_rolled_up_day_is_never_charged_twice(
        upstream: FakeUpstream, start_gateway, store_url: str, tmp_path) -> None:
    """A spool replayed after its day was rolled up: the store no longer knows the request id, so
    the gateway keeps the row out instead of charging it a second time; rows of kept days pass (and,
    being stored already, are not charged again), a new row is charged once."""
    store, account_id, rows = await seeded(store_url)
    days = 2
    try:
        gw = await start_gateway(gateway_config(upstream, storage={"url": store_url},
                                                usage={"rollup_after_days": days}))
        kept_from = rollup_before(days).isoformat()
        for _ in range(200):
            if all(r.ts.date().isoformat() >= kept_from for r in await store.list_usage(account_id=account_id,
                                                                                         limit=10_000)):
                break
            await asyncio.sleep(0.05)
        balance = await store.get_balance(account_id)
        old = [r for r in rows if r.ts.date() < rollup_before(days)]  # rolled up: ids gone from the store
        kept = [r for r in rows if r.ts.date() >= rollup_before(days)]  # still stored: a replay inserts nothing
        fresh = row(9999, account_id, NOW - timedelta(minutes=5))
        assert old and kept
        # Within ROLLUP_RACE_MARGIN of midnight the oldest kept day is refused too (the next run takes it).
        first_safe = rollup_before(days, datetime.now(UTC) + ROLLUP_RACE_MARGIN)
        refused = [r for r in [*old, *kept] if r.ts.date() < first_safe]

        sink = gw.app[OUTBOX].sink
        await sink([*old, *kept, fresh])  # what a late replay of a spool hands the store

        assert gw.app[ROLLUP].rows_refused == len(refused) >= len(old)
        stored = await stored_ids(store, account_id)
        assert fresh.request_id in stored and not {r.request_id for r in old} & stored
        assert await store.get_balance(account_id) == balance - fresh.actual_cost_pico  # only the new row
        assert await store.ledger_sum(account_id) == await store.get_balance(account_id)
    finally:
        await store.close()


@pytest.mark.parametrize(("clock", "passes"), [
    ("00:00:01", True),   # one day of rows kept: yesterday's last requests, flushed after midnight
    ("12:00:00", True),
    ("23:56:00", False),  # the run after midnight rolls yesterday up: not stored, not charged twice
])
def test_with_one_day_kept_yesterdays_rows_pass_until_the_race_margin(clock: str, passes: bool) -> None:
    from nexgate_plugins.usage_log.rollup import RollupState, refuse_late_rows

    today = datetime(2026, 3, 10, tzinfo=UTC)
    now = datetime.combine(today.date(), datetime.strptime(clock, "%H:%M:%S").time(), UTC)
    yesterday_late = row(1, "acct", today - timedelta(seconds=1))
    stored: list[UsageRecord] = []

    async def sink(rows):  # type: ignore[no-untyped-def]
        stored.extend(rows)
        return len(rows)

    state = RollupState(days=1)
    asyncio.run(refuse_late_rows(sink, state, now=lambda: now)([yesterday_late]))
    assert (stored == [yesterday_late]) is passes and state.rows_refused == (0 if passes else 1)
