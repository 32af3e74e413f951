"""Migration 0008 (lean usage rows, a debit per account and batch) on a store the old schema wrote."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from nexgate_proxy.store import Store, open_store

from .old_schema import migrate_up_to, write_old_rows
from .test_usage_daily import T0, mixed_rows, usage

ACCOUNTS = ("usr_a", "usr_b", "org_o")


async def _ledger(store: Store) -> dict[str, object]:
    """What statements and balances read, per account (tables 0008 leaves as they are)."""
    return {account: (await store.get_balance(account), await store.ledger_sum(account),
                      await store.ledger_snapshot(account, since=T0 - timedelta(days=1)),
                      await store.list_ledger(account, limit=1000), await store.ledger_days(account),
                      await store.usage_by_day_and_model(account_id=account, since=T0.date()))
            for account in ACCOUNTS}


async def _usage(store: Store) -> dict[str, object]:
    """What the dashboard and the export read from the rows, per account."""
    return {account: (
        await store.list_usage(account_id=account, limit=1000),
        await store.list_usage(account_id=account, since=T0 + timedelta(hours=30), until=T0 + timedelta(days=3),
                               key_id="key_a", limit=1000),
        *[await store.usage_totals(account_id=account, since=T0 + timedelta(hours=5), group_by=g)
          for g in ("day", "model", "key")],
    ) for account in ACCOUNTS}


async def test_migration_converts_old_rows_without_loss(store_url: str, monkeypatch) -> None:
    rows = [r._replace(endpoint=("chat.completions", "embeddings", "messages")[i % 3],
                       upstream_model=(r.model, None, "up-x")[i % 3],
                       ts=r.ts + timedelta(microseconds=i), client_ip=f"203.0.113.{i % 200}")
            for i, r in enumerate(mixed_rows(240, seed=21))]
    store = await open_store(store_url)
    try:
        await migrate_up_to(store, 6, monkeypatch)
        # a real key (its prefix is read back from it): rows with its prefix, none, another one
        user = await store.create_user(email="a@example.com")
        key = await store.create_api_key(public_id="pub1", prefix="ngk_pub1", secret_hash="x", name="k",
                                         user_id=user.id)
        rows = [r._replace(key_id=key.id, key_prefix=("ngk_pub1", None, "ngk_other")[i % 3]) if i % 2 else r
                for i, r in enumerate(rows)]
        await write_old_rows(store, rows)
        assert await migrate_up_to(store, 7, monkeypatch) == [7]
        before = await _ledger(store)
        assert await store.migrate() == [8]
        assert await _ledger(store) == before
        # the rows read back as written: as a store that recorded them after 0008 reads them
        reference = await open_store("sqlite://:memory:")
        try:
            await reference.migrate()
            await reference.record_usage(rows)
            assert await _usage(store) == await _usage(reference)
        finally:
            await reference.close()
        assert await store.list_usage(account_id="usr_a", limit=1000) == sorted(
            (r for r in rows if r.account_id == "usr_a"), key=lambda r: (r.ts, r.request_id), reverse=True)
        # every old row names its own per-request debit
        for account in ACCOUNTS:
            for debit in await store.list_ledger(account, limit=1000):
                assert await store.debited_requests(account, debit.id) == [(debit.external_id, -debit.amount_pico)]
        # a replay of the old rows stores and charges nothing
        assert await store.record_usage(rows) == 0
        assert await _ledger(store) == before
        # new rows: one debit per account, which lists them
        new = [usage(f"new{i}", ts=datetime.now(UTC), account_id=("usr_a", "usr_b")[i % 2], actual_cost_pico=i + 1,
                     key_id=key.id, key_prefix=(None, "ngk_pub1", "ngk_other")[i % 3]) for i in range(6)]
        assert await store.record_usage(new) == 6
        for n, account in enumerate(("usr_a", "usr_b")):
            [debit] = [e for e in await store.list_ledger(account, limit=1000) if e.external_id.startswith("new")]
            mine = [(r.request_id, r.actual_cost_pico) for r in new[n::2]]
            assert (debit.amount_pico, debit.external_id) == (-sum(c for _, c in mine), mine[0][0])
            assert await store.debited_requests(account, debit.id) == mine
            assert await store.get_balance(account) == await store.ledger_sum(account)
        assert [r for r in await store.list_usage(account_id="usr_a", limit=1000) if r.request_id.startswith("new")] == \
            sorted(new[0::2], key=lambda r: (r.ts, r.request_id), reverse=True)
    finally:
        await store.close()
