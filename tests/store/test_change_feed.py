"""The store's change feed: each change recorded with the change, delivered in order, exactly once."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from datetime import timedelta

import asyncpg
import pytest

from nexgate_proxy.store import (
    API_KEY_CHANGE,
    CREDIT_CHANGE,
    MISSED,
    ORG_CHANGE,
    NewLedgerEntry,
    Store,
    StoreChange,
    open_store,
)
from nexgate_proxy.store.feed import RETENTION, ChangeFeed
from tests.store.test_credits_store import usage


def grant(account_id: str, ref: str, amount: int = 1_000) -> NewLedgerEntry:
    return NewLedgerEntry(account_id=account_id, kind="grant", amount_pico=amount, source="admin",
                          external_id=f"grant:{ref}")


async def key(store: Store, user_id: str | None = None, org_id: str | None = None, name: str = "k") -> str:
    row = await store.create_api_key(public_id=f"pub{name}{time.monotonic_ns()}", prefix="ngk_x", secret_hash="$2b$x",
                                     name=name, user_id=user_id, org_id=org_id, created_by=user_id)
    return row.id


def shape(changes: list[StoreChange]) -> list[tuple]:
    return [(c.kind, c.subject, c.amount_pico) for c in changes]


async def test_each_change_gateways_must_know_is_recorded_with_it_in_commit_order(store: Store) -> None:
    ann = await store.create_user(email="ann@example.com")
    bob = await store.create_user(email="bob@example.com")
    org = await store.create_org("Acme", ann.id)
    await store.add_member(org.id, bob.id, "member")
    ann_key = await key(store, user_id=ann.id, name="ann")
    start = await store.latest_change_id()
    assert start == 0  # creating things tells nobody: nothing is cached of them yet

    assert await store.revoke_api_key(ann_key)
    assert not await store.revoke_api_key(ann_key)  # already revoked: nothing new
    await store.set_org_limits(org.id, {"rpm": 5})
    assert await store.apply_ledger_entry(grant(ann.id, "g1", 7_000))
    assert not await store.apply_ledger_entry(grant(ann.id, "g1", 7_000))  # applied once, recorded once
    refund = NewLedgerEntry(account_id=ann.id, kind="refund", amount_pico=-2_000, source="stripe", external_id="re1")
    assert await store.apply_webhook("stripe", "evt_1", "charge.refunded", [refund])
    assert not await store.apply_webhook("stripe", "evt_1", "charge.refunded", [refund])
    row = usage("req-1", account_id=ann.id, actual_cost_pico=500)
    assert await store.record_usage([row]) == 1  # a request's own debit: the gateway that served it knows
    await store.remove_member(org.id, bob.id)
    await store.add_member(org.id, bob.id, "member")
    deleted = await store.anonymize_user(bob.id)
    assert deleted.left_org_ids == (org.id,)

    changes = await store.changes_since(start, 100)
    assert shape(changes) == [
        (API_KEY_CHANGE, ann_key, None),
        (ORG_CHANGE, org.id, None),
        (CREDIT_CHANGE, ann.id, 7_000),
        (CREDIT_CHANGE, ann.id, -2_000),
        (ORG_CHANGE, org.id, None),
        (ORG_CHANGE, org.id, None),
    ]
    assert [c.id for c in changes] == sorted({c.id for c in changes})
    credits = [c for c in changes if c.kind == CREDIT_CHANGE]
    assert [c.ledger_id for c in credits] == [
        (await store.get_ledger_entry("admin", "grant:g1")).id,  # type: ignore[union-attr]
        (await store.get_ledger_entry("stripe", "re1")).id,  # type: ignore[union-attr]
    ]
    assert all(c.ledger_id is None for c in changes if c.kind != CREDIT_CHANGE)
    assert await store.changes_since(changes[2].id, 2) == changes[3:5]
    assert await store.latest_change_id() == changes[-1].id
    assert await store.balance_snapshot(ann.id) == (7_000 - 2_000 - 500, changes[-1].id)
    assert await store.balance_snapshot("usr_nobody") == (0, changes[-1].id)


async def test_account_deletion_announces_every_key_it_revokes(store: Store) -> None:
    eve = await store.create_user(email="eve@example.com")
    org = await store.create_org("Eve Corp", eve.id)
    other = await store.create_user(email="o@example.com")
    await store.add_member(org.id, other.id, "owner")
    personal, gone = await key(store, user_id=eve.id, name="p"), await key(store, user_id=eve.id, name="g")
    await store.revoke_api_key(gone)
    start = await store.latest_change_id()
    result = await store.anonymize_user(eve.id)
    assert set(result.revoked_key_ids) == {personal}
    assert shape(await store.changes_since(start, 100)) == [(API_KEY_CHANGE, personal, None), (ORG_CHANGE, org.id, None)]
    start = await store.latest_change_id()
    assert (await store.anonymize_user(eve.id)).already_deleted
    assert await store.changes_since(start, 100) == []


async def test_pruning_keeps_the_newest_and_a_long_silence_delivers_missed(store: Store) -> None:
    user = await store.create_user()
    for i in range(3):
        await store.apply_ledger_entry(grant(user.id, f"p{i}"))
    assert await store.prune_changes(timedelta(days=1)) == 0  # all recent
    newest = await store.latest_change_id()
    assert await store.prune_changes(timedelta(0)) == 2
    assert [c.id for c in await store.changes_since(0, 10)] == [newest]  # never the newest: positions hold

    feed = store.change_feed()
    got: list[StoreChange] = []
    feed.subscribe(got.append)
    feed.position, feed._last_read = 0, time.monotonic() - RETENTION.total_seconds()
    assert await feed.catch_up() == 1
    assert [c.kind for c in got] == [MISSED.kind, CREDIT_CHANGE]  # rows may be gone: caches drop everything
    got.clear()
    await store.apply_ledger_entry(grant(user.id, "p9"))
    assert await feed.catch_up() == 1 and [c.kind for c in got] == [CREDIT_CHANGE]


async def wait_for(condition, timeout: float = 1.0) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, "not delivered in time"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def started_feed(store: Store, **options: object) -> tuple[ChangeFeed, list[StoreChange]]:
    feed = store.change_feed()
    for name, value in options.items():
        setattr(feed, name, value)
    got: list[StoreChange] = []
    feed.subscribe(got.append)
    await feed.start()
    return feed, got


def assert_each_once_in_order(got: list[StoreChange], refs: int) -> None:
    credits = [c for c in got if c.kind == CREDIT_CHANGE]
    assert [c.id for c in got] == sorted({c.id for c in got})  # in order, none twice
    assert len({c.ledger_id for c in credits}) == len(credits) == refs


async def test_a_feed_delivers_what_another_process_commits_in_order_within_a_second(
        store: Store, store_url: str) -> None:
    user = await store.create_user()
    feed, got = await started_feed(store)
    writer = await open_store(store_url)  # another process: the CLI, another instance
    try:
        await writer.apply_ledger_entry(grant(user.id, "first"))
        assert await wait_for(lambda: len(got) == 1) < 1.0
        await asyncio.gather(*(writer.apply_ledger_entry(grant(user.id, f"burst{i}", 1_000 + i)) for i in range(40)))
        await wait_for(lambda: len(got) == 41)
        await asyncio.sleep(0.5)  # nothing more comes
        assert_each_once_in_order(got, 41)
        assert sum(c.amount_pico or 0 for c in got) == await store.get_balance(user.id)
        assert feed.position == await store.latest_change_id()
        # This process's own writes come through the feed too.
        own_key = await key(store, user_id=user.id)
        await store.revoke_api_key(own_key)
        await wait_for(lambda: got[-1].subject == own_key)
    finally:
        await writer.close()
        await feed.close()


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_sqlite_polls_that_fail_lose_and_duplicate_nothing(store: Store, store_url: str) -> None:
    user = await store.create_user()
    feed, got = await started_feed(store, poll_interval=0.05)
    real = feed._data_version
    broken = {"on": True}

    def flaky() -> int | None:
        if broken["on"]:
            raise sqlite3.OperationalError("disk I/O error")
        return real()

    feed._data_version = flaky  # type: ignore[method-assign]
    writer = await open_store(store_url)
    try:
        for i in range(10):
            await writer.apply_ledger_entry(grant(user.id, f"while-down{i}"))
        await asyncio.sleep(0.3)  # several polls fail
        assert got == []
        broken["on"] = False
        await wait_for(lambda: len(got) == 10)
        for i in range(10):  # many commits between two polls: one read brings them all
            await writer.apply_ledger_entry(grant(user.id, f"between{i}"))
        await wait_for(lambda: len(got) == 20)
        await asyncio.sleep(0.3)
        assert_each_once_in_order(got, 20)
    finally:
        await writer.close()
        await feed.close()


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgres"])
async def test_postgres_reconnects_and_reads_what_it_missed_exactly_once(store: Store, store_url: str) -> None:
    user = await store.create_user()
    feed, got = await started_feed(store, initial_backoff=0.3, max_backoff=0.3)
    writer = await open_store(store_url)
    admin = await asyncpg.connect(store_url)
    try:
        await wait_for(lambda: feed.connected)
        await writer.apply_ledger_entry(grant(user.id, "before"))
        await wait_for(lambda: len(got) == 1)
        for round_ in range(2):
            pid = feed._conn.get_server_pid()  # type: ignore[union-attr]
            await admin.execute("SELECT pg_terminate_backend($1)", pid)
            # Booked while nobody listens: no NOTIFY reaches this feed for them.
            for i in range(5):
                await writer.apply_ledger_entry(grant(user.id, f"down{round_}-{i}"))
            await wait_for(lambda: len(got) == 1 + 5 * (round_ + 1), timeout=3.0)
            assert feed._conn.get_server_pid() != pid  # type: ignore[union-attr]
        await asyncio.sleep(0.5)
        assert_each_once_in_order(got, 11)
        assert MISSED.kind not in {c.kind for c in got}  # read from the table: nothing was missed
        assert sum(c.amount_pico or 0 for c in got) == await store.get_balance(user.id)
    finally:
        await admin.close()
        await writer.close()
        await feed.close()


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgres"])
async def test_postgres_ids_follow_commit_order_even_when_a_writer_commits_late(store: Store) -> None:
    """A transaction that took its id first but commits last must not be skipped by a reader."""
    user = await store.create_user()
    feed = store.change_feed()
    got: list[StoreChange] = []
    feed.subscribe(got.append)
    feed.position = await store.latest_change_id()
    slow = asyncio.create_task(_slow_grant(store, user.id))
    await asyncio.sleep(0.2)  # the slow one holds the feed lock...
    fast = asyncio.create_task(store.apply_ledger_entry(grant(user.id, "fast")))
    await asyncio.sleep(0.2)
    await feed.catch_up()  # ...so the fast one waits, and nothing committed yet
    assert got == []
    await slow
    await fast
    await feed.catch_up()
    assert [c.amount_pico for c in got] == [111, 1_000]


async def _slow_grant(store: Store, account_id: str) -> None:
    from nexgate_proxy.store.postgres import _record_changes

    async with store._pool.acquire() as conn, conn.transaction():  # type: ignore[attr-defined]
        await _record_changes(conn, [(CREDIT_CHANGE, account_id, 111, None)])
        await asyncio.sleep(0.6)

