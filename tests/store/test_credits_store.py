"""Usage records, the money ledger and balances, run against SQLite and PostgreSQL alike.

Money is integer pico-USD everywhere; the invariant every test ends on is
get_balance(account) == ledger_sum(account).
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nexgate_proxy.store import (
    MAX_PICO,
    MIN_PICO,
    PICO_PER_USD,
    NewLedgerEntry,
    Store,
    StoreError,
    UsageRecord,
    UsageTotal,
    open_store,
)
from nexgate_proxy.store.sqlite import parse_sqlite_url

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def usage(request_id: str, **overrides: Any) -> UsageRecord:
    fields: dict[str, Any] = {
        "request_id": request_id,
        "ts": T0,
        "endpoint": "chat.completions",
        "model": "gpt-test",
        "provider": "fake",
        "upstream_model": "upstream-model",
        "account_id": "usr_a",
        "org_id": None,
        "key_id": "key_a",
        "key_prefix": "ng-abc",
        "prompt_tokens": 10,
        "completion_tokens": 20,
        "cached_tokens": 0,
        "usage_estimated": False,
        "estimated_cost_pico": None,
        "actual_cost_pico": None,
        "latency_ms": 5,
        "status": 200,
        "error_code": None,
        "stream": False,
        "client_ip": "203.0.113.7",
        "attempts": 1,
    }
    fields.update(overrides)
    return UsageRecord(**fields)


def entry(account_id: str, amount: int, external_id: str, kind: str = "payment", source: str = "stripe", **kw: Any):
    return NewLedgerEntry(
        account_id=account_id, kind=kind, amount_pico=amount, source=source, external_id=external_id, **kw
    )


async def assert_consistent(store: Store, *accounts: str) -> None:
    for account in accounts:
        assert await store.get_balance(account) == await store.ledger_sum(account), account


# --- record_usage -----------------------------------------------------------


async def test_record_usage_stores_rows_and_debits_their_cost(store: Store) -> None:
    rows = [
        usage("r1", actual_cost_pico=1_500, estimated_cost_pico=1_000),
        usage("r2", actual_cost_pico=0),  # free: stored, not debited
        usage("r3", account_id=None, actual_cost_pico=99),  # no account to debit
        usage("r4", actual_cost_pico=None),  # cost unknown
        usage("r5", actual_cost_pico=2, ts=T0 + timedelta(seconds=1)),
    ]
    assert await store.record_usage(rows) == 5
    assert await store.get_balance("usr_a") == -1_502
    # One debit for the account's charged rows of the batch, named after the first; it lists them.
    [debit] = await store.list_ledger("usr_a")
    assert (debit.kind, debit.amount_pico, debit.source, debit.external_id, debit.request_id, debit.description) == (
        "debit", -1_502, "request", "r1", "r1", "2 requests")
    assert await store.debited_requests("usr_a", debit.id) == [("r1", 1_500), ("r5", 2)]
    assert await store.debited_requests("usr_b", debit.id) == []
    assert await store.list_usage(account_id="usr_a") == [rows[4], rows[3], rows[1], rows[0]]
    await assert_consistent(store, "usr_a")


async def test_usage_row_round_trips_exactly(store: Store) -> None:
    row = usage(
        "r-all",
        ts=datetime(2030, 6, 1, 12, 0, 0, 123456, tzinfo=timezone(timedelta(hours=-7))),
        model=None,
        provider=None,
        upstream_model=None,
        org_id="org_x",
        key_id=None,
        key_prefix=None,
        prompt_tokens=2**31 - 1,
        completion_tokens=0,
        cached_tokens=7,
        usage_estimated=True,
        estimated_cost_pico=MAX_PICO,
        actual_cost_pico=123_456_789_012_345_678,  # not representable as a float
        latency_ms=0,
        status=502,
        error_code="upstream_error",
        stream=True,
        client_ip=None,
        attempts=3,
    )
    assert await store.record_usage([row]) == 1
    [stored] = await store.list_usage(org_id="org_x")
    assert stored == row
    assert stored.ts.utcoffset() == timedelta(0) and stored.ts.hour == 19
    assert type(stored.actual_cost_pico) is int and type(stored.usage_estimated) is bool


async def test_record_usage_replays_change_nothing(store: Store) -> None:
    batch = [usage(f"r{i:03d}", account_id=f"acc{i % 3}", actual_cost_pico=i) for i in range(60)]
    assert await store.record_usage(batch) == 60
    balances = {a: await store.get_balance(a) for a in ("acc0", "acc1", "acc2")}
    ledgers = {a: await store.list_ledger(a, limit=1000) for a in balances}
    assert balances == {a: -sum(i for i in range(60) if i % 3 == n) for n, a in enumerate(balances)}
    for _ in range(3):
        assert await store.record_usage(batch) == 0
    assert {a: await store.get_balance(a) for a in balances} == balances
    assert {a: await store.list_ledger(a, limit=1000) for a in balances} == ledgers
    # Half old, half new: only the new half is stored and charged.
    overlap = batch[30:] + [usage(f"n{i}", account_id="acc0", actual_cost_pico=1_000) for i in range(30)]
    assert await store.record_usage(overlap) == 30
    assert await store.get_balance("acc0") == balances["acc0"] - 30_000
    assert len(await store.list_usage(account_id="acc0", limit=1000)) == 20 + 30
    await assert_consistent(store, *balances)


async def test_record_usage_duplicates_within_a_batch_count_once(store: Store) -> None:
    first = usage("dup", actual_cost_pico=10)
    second = usage("dup", actual_cost_pico=999, model="other")  # the first of a key wins
    assert await store.record_usage([first, second, usage("solo", actual_cost_pico=1)]) == 2
    assert await store.get_balance("usr_a") == -11
    assert (await store.list_usage(account_id="usr_a", model="gpt-test"))[-1] == first
    assert await store.record_usage([]) == 0


async def test_concurrent_record_usage_from_two_stores_applies_once(store_url: str, store: Store) -> None:
    # Two gateway processes flushing the same buffered batch: separate connections, same database.
    other = await open_store(store_url)
    try:
        rng = random.Random(7)
        batch = [
            usage(f"req-{i:04d}", account_id=f"acc{i % 5}", actual_cost_pico=rng.randint(0, 10**9))
            for i in range(500)
        ]
        results = await asyncio.gather(store.record_usage(batch), other.record_usage(batch))
        assert sorted(results) == [0, 500]
        # Again, racing four calls over overlapping batches in different orders.
        more = [usage(f"more-{i:03d}", account_id=f"acc{i % 5}", actual_cost_pico=i + 1) for i in range(200)]
        shuffled = batch + more
        rng.shuffle(shuffled)
        results = await asyncio.gather(
            store.record_usage(more + batch[:100]),
            other.record_usage(list(reversed(more))),
            store.record_usage(shuffled),
            other.record_usage(shuffled[::-1]),
        )
        assert sum(results) == 200
        for n in range(5):
            account = f"acc{n}"
            charged = [r for r in batch + more if r.account_id == account]
            assert await store.get_balance(account) == -sum(r.actual_cost_pico for r in charged)
            # one debit per account and storing call; together they list every charged row once
            debits = await other.list_ledger(account, limit=1000)
            listed = [pair for d in debits for pair in await store.debited_requests(account, d.id)]
            assert sorted(listed) == sorted((r.request_id, r.actual_cost_pico) for r in charged if r.actual_cost_pico)
            assert len(debits) <= 3
            assert len(await store.list_usage(account_id=account, limit=1000)) == len(charged)
            await assert_consistent(store, account)
    finally:
        await other.close()


async def test_record_usage_is_one_transaction(store: Store) -> None:
    assert await store.apply_ledger_entry(entry("big", MIN_PICO + 10, "adj-1", kind="adjustment", source="admin"))
    batch = [
        usage("ok-1", account_id="other", actual_cost_pico=5),
        usage("too-much", account_id="big", actual_cost_pico=11),
    ]
    with pytest.raises(StoreError, match="BIGINT"):
        await store.record_usage(batch)
    assert await store.list_usage(account_id="other") == []
    assert await store.get_balance("other") == 0
    assert await store.get_balance("big") == MIN_PICO + 10
    # Nothing was burnt: the corrected batch goes through, to the exact bound.
    batch[1] = batch[1]._replace(actual_cost_pico=10)
    assert await store.record_usage(batch) == 2
    assert await store.get_balance("big") == MIN_PICO
    await assert_consistent(store, "big", "other")


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"ts": datetime(2030, 1, 1)}, ValueError),  # naive
        ({"actual_cost_pico": 1.5}, TypeError),
        ({"actual_cost_pico": Decimal("1")}, TypeError),
        ({"estimated_cost_pico": 2.0}, TypeError),
        ({"actual_cost_pico": True}, TypeError),
        ({"actual_cost_pico": -1}, ValueError),
        ({"actual_cost_pico": MAX_PICO + 1}, ValueError),
        ({"prompt_tokens": -1}, ValueError),
        ({"completion_tokens": 2**31}, ValueError),
        ({"latency_ms": 1.0}, ValueError),
        ({"request_id": ""}, ValueError),
    ],
)
async def test_record_usage_refuses_bad_rows_before_writing(store: Store, overrides: dict, error: type) -> None:
    with pytest.raises(error):
        await store.record_usage([usage("good", actual_cost_pico=5), usage("bad")._replace(**overrides)])
    assert await store.list_usage(account_id="usr_a") == []
    assert await store.get_balance("usr_a") == 0


async def test_record_usage_of_500_rows_then_their_replay(store: Store) -> None:
    batch = [usage(f"req-{i:04d}", account_id=f"acc{i % 50}", actual_cost_pico=1_000 + i) for i in range(500)]
    assert await store.record_usage(batch) == 500
    assert await store.record_usage(batch) == 0
    assert await store.record_usage([*batch[:3], batch[0]]) == 0  # a batch repeating itself books once too
    assert await store.get_balance("acc7") == -sum(1_000 + i for i in range(7, 500, 50))
    await assert_consistent(store, *(f"acc{i}" for i in range(50)))


async def test_record_usage_skips_a_debit_booked_before_its_row(store: Store) -> None:
    # A request debit already in the ledger (booked by an older version, or by hand) is not booked twice,
    # and the rest of the batch still is.
    assert await store.apply_ledger_entry(entry("usr_a", -7, "req-early", kind="debit", source="request"))
    rows = [usage("req-new", actual_cost_pico=5), usage("req-early", actual_cost_pico=7),
            usage("req-new-2", actual_cost_pico=11)]
    assert await store.record_usage(rows) == 3
    assert await store.get_balance("usr_a") == -23
    ledger = await store.list_ledger("usr_a")
    assert sorted((e.external_id, e.amount_pico) for e in ledger) == [("req-early", -7), ("req-new", -16)]
    # the early row names the debit booked before it
    assert {e.external_id: await store.debited_requests("usr_a", e.id) for e in ledger} == {
        "req-early": [("req-early", 7)], "req-new": [("req-new", 5), ("req-new-2", 11)]}
    await assert_consistent(store, "usr_a")


# --- ledger -----------------------------------------------------------------


async def test_apply_ledger_entry_once_per_source_and_external_id(store: Store) -> None:
    assert await store.apply_ledger_entry(entry("usr_a", 5 * PICO_PER_USD, "pi_1", description="top-up")) is True
    assert await store.apply_ledger_entry(entry("usr_a", 5 * PICO_PER_USD, "pi_1")) is False
    assert await store.apply_ledger_entry(entry("usr_a", 7, "pi_1", kind="grant")) is False  # the pair decides
    assert await store.apply_ledger_entry(entry("usr_a", 3, "pi_1", kind="grant", source="admin")) is True
    assert await store.get_balance("usr_a") == 5 * PICO_PER_USD + 3
    [grant, payment] = await store.list_ledger("usr_a")
    assert (payment.kind, payment.amount_pico, payment.source, payment.external_id) == (
        "payment", 5 * PICO_PER_USD, "stripe", "pi_1"
    )
    assert payment.description == "top-up" and payment.request_id is None
    assert type(payment.id) is int and grant.id > payment.id
    assert payment.created_at.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - payment.created_at) < timedelta(minutes=1)
    await assert_consistent(store, "usr_a")


async def test_unknown_account_has_nothing(store: Store) -> None:
    assert await store.get_balance("usr_nobody") == 0
    assert await store.ledger_sum("usr_nobody") == 0
    assert await store.list_ledger("usr_nobody") == []


@pytest.mark.parametrize(
    ("kind", "amount", "error"),
    [
        ("bonus", 5, ValueError),
        ("payment", 0, ValueError),
        ("payment", -5, ValueError),
        ("grant", -5, ValueError),
        ("debit", 5, ValueError),
        ("adjustment", 0.5, TypeError),
        ("adjustment", Decimal("5"), TypeError),
        ("adjustment", True, TypeError),
        ("payment", MAX_PICO + 1, ValueError),
        ("debit", MIN_PICO - 1, ValueError),
    ],
)
async def test_ledger_entries_are_checked(store: Store, kind: str, amount: Any, error: type) -> None:
    with pytest.raises(error):
        await store.apply_ledger_entry(entry("usr_a", amount, "x1", kind=kind))
    bad = entry("usr_a", amount, "x2", kind=kind)
    with pytest.raises(error):
        await store.apply_webhook("stripe", "evt_1", "t", [entry("usr_a", 1, "ok"), bad])
    assert await store.list_ledger("usr_a") == []
    assert await store.apply_webhook("stripe", "evt_1", "test", []) is True  # the refused call recorded nothing


async def test_ledger_entries_need_ids(store: Store) -> None:
    for bad in (entry("", 1, "x"), entry("usr_a", 1, ""), entry("usr_a", 1, "x", source="")):
        with pytest.raises(ValueError, match="non-empty"):
            await store.apply_ledger_entry(bad)


async def test_refund_dispute_and_adjustment_take_either_sign(store: Store) -> None:
    for i, (kind, amount) in enumerate(
        [("refund", -40), ("refund", 15), ("dispute", -100), ("dispute", 100), ("adjustment", -1), ("adjustment", 2)]
    ):
        assert await store.apply_ledger_entry(entry("usr_a", amount, f"e{i}", kind=kind))
    assert await store.get_balance("usr_a") == -24
    await assert_consistent(store, "usr_a")


async def test_money_is_exact_at_both_ends(store: Store) -> None:
    assert MAX_PICO // PICO_PER_USD == 9_223_372  # the documented bound: about 9.2 million USD
    assert await store.apply_ledger_entry(entry("tiny", 1, "one-pico", kind="grant"))
    assert await store.get_balance("tiny") == 1
    odd = 123_456_789_012_345_678
    assert float(odd) != odd
    assert await store.apply_ledger_entry(entry("odd", odd, "odd"))
    assert await store.get_balance("odd") == odd == (await store.list_ledger("odd"))[0].amount_pico

    # Up to the largest BIGINT, exactly; one more pUSD fails and changes nothing.
    assert await store.apply_ledger_entry(entry("rich", MAX_PICO - 1, "pi_big"))
    assert await store.apply_ledger_entry(entry("rich", 1, "pi_one"))
    assert await store.get_balance("rich") == MAX_PICO
    with pytest.raises(StoreError, match="BIGINT"):
        await store.apply_ledger_entry(entry("rich", 1, "pi_over"))
    assert await store.get_balance("rich") == await store.ledger_sum("rich") == MAX_PICO
    assert len(await store.list_ledger("rich")) == 2
    assert await store.apply_ledger_entry(entry("rich", -MAX_PICO, "spent", kind="debit", source="admin"))
    assert await store.apply_ledger_entry(entry("rich", 1, "pi_over"))  # not burnt by the failed attempt
    assert await store.get_balance("rich") == 1

    # And down to the smallest.
    assert await store.apply_ledger_entry(entry("poor", MIN_PICO, "adj", kind="adjustment", source="admin"))
    assert await store.get_balance("poor") == MIN_PICO
    with pytest.raises(StoreError, match="BIGINT"):
        await store.record_usage([usage("r-poor", account_id="poor", actual_cost_pico=1)])
    assert await store.get_balance("poor") == MIN_PICO
    assert await store.list_usage(account_id="poor") == []
    await assert_consistent(store, "tiny", "odd", "rich", "poor")


async def test_ledger_sum_survives_a_running_total_past_the_bound(store: Store) -> None:
    # MAX, then +MAX and -MAX in one call: each balance fits, a naive running SUM does not.
    assert await store.apply_ledger_entry(entry("acc", MAX_PICO, "a"))
    up_and_down = [entry("acc", MAX_PICO, "b", kind="adjustment"), entry("acc", -MAX_PICO, "c", kind="adjustment")]
    assert await store.apply_webhook("stripe", "evt", "t", up_and_down)
    assert await store.get_balance("acc") == await store.ledger_sum("acc") == MAX_PICO


async def test_list_ledger_newest_first_pages_and_periods(store: Store) -> None:
    for i in range(2):
        await store.apply_ledger_entry(entry("usr_a", i + 1, f"early{i}"))
    middle = datetime.now(UTC)
    for i in range(3):
        await store.apply_ledger_entry(entry("usr_a", 10 + i, f"late{i}"))
    await store.apply_ledger_entry(entry("usr_b", 99, "someone-else"))

    every = await store.list_ledger("usr_a")
    assert [e.external_id for e in every] == ["late2", "late1", "late0", "early1", "early0"]
    assert [e.created_at for e in every] == sorted((e.created_at for e in every), reverse=True)
    assert await store.list_ledger("usr_a", limit=2) == every[:2]
    assert await store.list_ledger("usr_a", limit=2, offset=2) == every[2:4]
    assert await store.list_ledger("usr_a", offset=5) == []
    assert await store.list_ledger("usr_a", since=middle) == every[:3]
    assert await store.list_ledger("usr_a", until=middle) == every[3:]
    assert await store.list_ledger("usr_a", since=every[1].created_at, until=every[0].created_at) == [every[1]]
    with pytest.raises(ValueError, match="timezone-aware"):
        await store.list_ledger("usr_a", since=datetime(2030, 1, 1))
    with pytest.raises(ValueError):
        await store.list_ledger("usr_a", limit=-1)


async def test_balance_equals_ledger_sum_after_many_operations(store: Store) -> None:
    rng = random.Random(2030)
    accounts = [f"acc{i}" for i in range(6)]
    expected = dict.fromkeys(accounts, 0)
    for step in range(150):
        account = rng.choice(accounts)
        choice = rng.random()
        if choice < 0.4:
            rows = [
                usage(f"r{rng.randrange(300)}", account_id=rng.choice(accounts), actual_cost_pico=rng.randrange(10**12))
                for _ in range(rng.randint(1, 20))
            ]
            await store.record_usage(rows)
        elif choice < 0.7:
            amount = rng.randint(1, 10**15)
            await store.apply_ledger_entry(entry(account, amount, f"pi_{rng.randrange(100)}"))
        else:
            entries = [
                entry(rng.choice(accounts), rng.randint(1, 10**13), f"pi_{rng.randrange(100)}") for _ in range(3)
            ]
            entries.append(entry(account, -rng.randint(1, 10**13), f"rf_{step}", kind="refund"))
            await store.apply_webhook("stripe", f"evt_{rng.randrange(60)}", "test", entries)
    for account in accounts:
        expected[account] = sum(e.amount_pico for e in await store.list_ledger(account, limit=10_000))
        assert await store.get_balance(account) == await store.ledger_sum(account) == expected[account]
    assert any(expected.values())


# --- webhooks ---------------------------------------------------------------


async def test_apply_webhook_exactly_once(store: Store) -> None:
    payment = entry("usr_a", 20 * PICO_PER_USD, "pi_1")
    assert await store.apply_webhook("stripe", "evt_1", "checkout.session.completed", [payment]) is True
    assert await store.apply_webhook("stripe", "evt_1", "checkout.session.completed", [payment]) is False
    assert await store.apply_webhook("stripe", "evt_1", "whatever", [entry("usr_a", 5, "pi_other")]) is False
    # The same payment announced by another event: the event is new, the money is not.
    assert await store.apply_webhook("stripe", "evt_2", "payment_intent.succeeded", [payment]) is True
    assert await store.get_balance("usr_a") == 20 * PICO_PER_USD
    # Mixed: only the entries not applied before move money, across accounts.
    refund = entry("usr_a", -5 * PICO_PER_USD, "re_1", kind="refund")
    assert await store.apply_webhook("stripe", "evt_3", "charge.refunded", [payment, refund, entry("usr_b", 7, "pi_2")])
    assert await store.get_balance("usr_a") == 15 * PICO_PER_USD
    assert await store.get_balance("usr_b") == 7
    # An event without money is recorded too; event ids are per source.
    assert await store.apply_webhook("stripe", "evt_4", "customer.created", []) is True
    assert await store.apply_webhook("stripe", "evt_4", "customer.created", []) is False
    other_source = [entry("usr_b", 1, "txn_1", source="paddle")]
    assert await store.apply_webhook("paddle", "evt_1", "transaction.completed", other_source)
    assert await store.get_balance("usr_b") == 8
    assert [e.external_id for e in await store.list_ledger("usr_a")] == ["re_1", "pi_1"]
    await assert_consistent(store, "usr_a", "usr_b")


async def test_apply_webhook_is_one_transaction(store: Store) -> None:
    assert await store.apply_ledger_entry(entry("rich", MAX_PICO, "pi_0"))
    entries = [entry("other", 5, "pi_1"), entry("rich", 1, "pi_2")]
    with pytest.raises(StoreError, match="BIGINT"):
        await store.apply_webhook("stripe", "evt_1", "test", entries)
    assert await store.get_balance("other") == 0
    assert await store.list_ledger("other") == []
    # The event was not recorded, so the provider's retry (after a fix) is processed.
    assert await store.apply_ledger_entry(entry("rich", -10, "fee", kind="adjustment", source="admin"))
    assert await store.apply_webhook("stripe", "evt_1", "test", entries) is True
    assert await store.get_balance("other") == 5
    assert await store.get_balance("rich") == MAX_PICO - 9
    await assert_consistent(store, "rich", "other")


async def test_concurrent_webhooks_from_two_stores_apply_once(store_url: str, store: Store) -> None:
    other = await open_store(store_url)
    try:
        for i in range(15):
            # The same delivery twice at once, plus another event id carrying the same payment.
            payment = entry(f"acc{i % 3}", 1_000 + i, f"pi_{i}")
            results = await asyncio.gather(
                store.apply_webhook("stripe", f"evt_{i}", "t", [payment]),
                other.apply_webhook("stripe", f"evt_{i}", "t", [payment]),
                other.apply_webhook("stripe", f"evt_dup_{i}", "t", [payment]),
            )
            assert sorted(results[:2]) == [False, True] and results[2] is True
        for n in range(3):
            assert await store.get_balance(f"acc{n}") == sum(1_000 + i for i in range(15) if i % 3 == n)
            await assert_consistent(other, f"acc{n}")
    finally:
        await other.close()


# --- reading usage ----------------------------------------------------------


async def seed_usage(store: Store) -> list[UsageRecord]:
    """Two accounts, an org, two keys, two models, one row per hour from T0."""
    rows = [
        usage(
            f"r{i:02d}",
            ts=T0 + timedelta(hours=i),
            account_id="usr_a" if i % 4 else "org_o",
            org_id=None if i % 4 else "org_o",
            key_id=f"key{i % 2}",
            model="m1" if i < 6 else "m2",
            prompt_tokens=i,
            completion_tokens=2 * i,
            actual_cost_pico=i * 1_000,
        )
        for i in range(12)
    ]
    assert await store.record_usage(rows) == 12
    return rows


async def test_list_usage_filters_newest_first(store: Store) -> None:
    rows = await seed_usage(store)
    newest_first = rows[::-1]
    assert await store.list_usage(account_id="usr_a") == [r for r in newest_first if r.account_id == "usr_a"]
    assert await store.list_usage(org_id="org_o") == [r for r in newest_first if r.org_id == "org_o"]
    assert await store.list_usage(key_id="key1") == [r for r in newest_first if r.key_id == "key1"]
    assert await store.list_usage(account_id="usr_a", key_id="key0", model="m2") == [
        r for r in newest_first if r.account_id == "usr_a" and r.key_id == "key0" and r.model == "m2"
    ]
    # since inclusive, until exclusive.
    window = await store.list_usage(key_id="key0", since=T0 + timedelta(hours=2), until=T0 + timedelta(hours=8))
    assert [r.request_id for r in window] == ["r06", "r04", "r02"]
    assert await store.list_usage(account_id="nobody") == []


async def test_list_usage_pages_and_breaks_ties(store: Store) -> None:
    same_time = [usage(f"t{i}", ts=T0) for i in range(5)]
    later = usage("a-later", ts=T0 + timedelta(microseconds=1))
    await store.record_usage([*same_time, later])
    every = await store.list_usage(account_id="usr_a")
    assert [r.request_id for r in every] == ["a-later", "t4", "t3", "t2", "t1", "t0"]
    pages = [await store.list_usage(account_id="usr_a", limit=4, offset=o) for o in (0, 4, 8)]
    assert pages[0] + pages[1] == every and pages[2] == []


async def test_list_usage_needs_a_scope_and_good_arguments(store: Store) -> None:
    with pytest.raises(ValueError, match="account_id, org_id or key_id"):
        await store.list_usage()
    with pytest.raises(ValueError, match="account_id, org_id or key_id"):
        await store.list_usage(model="m1", since=T0)
    with pytest.raises(ValueError, match="timezone-aware"):
        await store.list_usage(account_id="usr_a", until=datetime(2030, 1, 1))
    with pytest.raises(ValueError):
        await store.list_usage(account_id="usr_a", offset=-1)


async def test_usage_totals_by_model_and_key(store: Store) -> None:
    rows = await seed_usage(store)
    nokey = usage("nokey", key_id=None, model=None)
    await store.record_usage([nokey])

    def total(group: str, selected: list[UsageRecord]) -> UsageTotal:
        return UsageTotal(
            group=group,
            requests=len(selected),
            prompt_tokens=sum(r.prompt_tokens for r in selected),
            completion_tokens=sum(r.completion_tokens for r in selected),
            cost_pico=sum(r.actual_cost_pico or 0 for r in selected),
        )

    mine = [r for r in rows if r.account_id == "usr_a"]
    assert await store.usage_totals(account_id="usr_a", group_by="model") == [
        total("", [nokey]),
        total("m1", [r for r in mine if r.model == "m1"]),
        total("m2", [r for r in mine if r.model == "m2"]),
    ]
    assert await store.usage_totals(account_id="usr_a", group_by="key") == [
        total("", [nokey]),
        total("key0", [r for r in mine if r.key_id == "key0"]),
        total("key1", [r for r in mine if r.key_id == "key1"]),
    ]
    assert await store.usage_totals(key_id="key1", model="m2", group_by="model") == [
        total("m2", [r for r in rows if r.key_id == "key1" and r.model == "m2"])
    ]
    # Unscoped: the whole gateway (admin), here within a period.
    since, until = T0 + timedelta(hours=3), T0 + timedelta(hours=5)
    assert await store.usage_totals(since=since, until=until, group_by="key") == [
        total("key0", [rows[4]]),
        total("key1", [rows[3]]),
    ]
    assert await store.usage_totals(account_id="nobody", group_by="model") == []
    with pytest.raises(ValueError, match="group_by"):
        await store.usage_totals(account_id="usr_a", group_by="hour")  # type: ignore[arg-type]


async def test_usage_totals_by_utc_day(store: Store) -> None:
    new_york = timezone(timedelta(hours=-5))
    rows = [
        usage("d1", ts=datetime(2030, 1, 1, 0, 0, tzinfo=UTC), actual_cost_pico=1),
        usage("d2", ts=datetime(2030, 1, 1, 23, 59, 59, 999999, tzinfo=UTC), actual_cost_pico=2),
        usage("d3", ts=datetime(2030, 1, 1, 20, 0, tzinfo=new_york), actual_cost_pico=4),  # 01:00 UTC on the 2nd
        # No account, so no debit: a day's cost sum may pass the BIGINT bound and stays exact.
        usage("d4", ts=datetime(2030, 1, 3, 12, 0, tzinfo=UTC), account_id=None, actual_cost_pico=MAX_PICO),
        usage("d5", ts=datetime(2030, 1, 3, 13, 0, tzinfo=UTC), account_id=None, actual_cost_pico=MAX_PICO),
    ]
    await store.record_usage(rows[:3])
    await store.record_usage(rows[3:])
    totals = await store.usage_totals(key_id="key_a", group_by="day")
    assert [(t.group, t.requests, t.cost_pico) for t in totals] == [
        ("2030-01-01", 2, 3),
        ("2030-01-02", 1, 4),
        ("2030-01-03", 2, 2 * MAX_PICO),
    ]
    assert all(type(t.cost_pico) is int and type(t.requests) is int for t in totals)
    january_2 = await store.usage_totals(
        key_id="key_a", since=datetime(2030, 1, 2, tzinfo=UTC), until=datetime(2030, 1, 3, tzinfo=UTC), group_by="day"
    )
    assert [(t.group, t.requests) for t in january_2] == [("2030-01-02", 1)]


# --- retention --------------------------------------------------------------


async def test_clear_client_ips_touches_only_old_ips(store: Store) -> None:
    rows = [
        usage("old-1", ts=T0 - timedelta(days=2), actual_cost_pico=5),
        usage("old-2", ts=T0 - timedelta(microseconds=1), client_ip="2001:db8::1"),
        usage("old-none", ts=T0 - timedelta(days=3), client_ip=None),
        usage("boundary", ts=T0),  # not older than the cutoff
        usage("new", ts=T0 + timedelta(days=1)),
    ]
    await store.record_usage(rows)
    before = {r.request_id: r for r in await store.list_usage(account_id="usr_a")}
    ledger = await store.list_ledger("usr_a")

    assert await store.clear_client_ips(T0) == 2
    after = {r.request_id: r for r in await store.list_usage(account_id="usr_a")}
    for request_id, row in before.items():
        expected = row._replace(client_ip=None) if request_id.startswith("old") else row
        assert after[request_id] == expected
    assert after["boundary"].client_ip == after["new"].client_ip == "203.0.113.7"
    assert await store.clear_client_ips(T0) == 0
    assert await store.list_ledger("usr_a") == ledger
    assert await store.get_balance("usr_a") == -5
    # Replaying an old batch does not bring the IPs back.
    assert await store.record_usage(rows) == 0
    assert (await store.list_usage(account_id="usr_a", until=T0))[0].client_ip is None
    with pytest.raises(ValueError, match="timezone-aware"):
        await store.clear_client_ips(datetime(2030, 1, 1))


# --- schema -----------------------------------------------------------------


async def table_columns(url: str, table: str) -> list[str]:
    if url.startswith("sqlite"):
        with sqlite3.connect(parse_sqlite_url(url)) as conn:
            return [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position",
            table,
        )
        return [r["column_name"] for r in rows]
    finally:
        await conn.close()


async def test_usage_records_hold_metadata_only(store_url: str, store: Store) -> None:
    # Guard against a content column sneaking in: the table is exactly UsageRecord and the debit it names.
    assert sorted(await table_columns(store_url, "usage_records")) == sorted([*UsageRecord._fields, "debit_id"])


async def test_ledger_is_append_only_in_the_database(store_url: str, store: Store) -> None:
    assert await store.apply_ledger_entry(entry("usr_a", 5, "pi_1"))
    statements = ["UPDATE ledger_entries SET amount_pico = 500", "DELETE FROM ledger_entries"]
    if store_url.startswith("sqlite"):
        with sqlite3.connect(parse_sqlite_url(store_url)) as conn:
            for sql in statements:
                with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                    conn.execute(sql)
    else:
        conn = await asyncpg.connect(store_url)
        try:
            for sql in statements:
                with pytest.raises(asyncpg.PostgresError, match="append-only"):
                    await conn.execute(sql)
        finally:
            await conn.close()
    assert await store.ledger_sum("usr_a") == await store.get_balance("usr_a") == 5


# --- property: the balance is always the ledger's sum (SQLite) --------------

ACCOUNTS = st.sampled_from(["a", "b", "c"])
SOURCES = st.sampled_from(["stripe", "admin", "request"])  # "request" collides with usage debits
EXTERNAL_IDS = st.sampled_from(["r1", "r2", "r3", "pi_1", "pi_2"])
MAGNITUDES = st.one_of(st.integers(1, 10**6), st.integers(MAX_PICO // 3, MAX_PICO))  # big ones overflow


@st.composite
def ledger_entries(draw: st.DrawFn) -> NewLedgerEntry:
    kind = draw(st.sampled_from(["payment", "debit", "refund", "dispute", "grant", "adjustment"]))
    magnitude = draw(MAGNITUDES)
    if kind == "debit":
        amount = -magnitude
    elif kind in ("payment", "grant"):
        amount = magnitude
    else:
        amount = draw(st.sampled_from([magnitude, -magnitude]))
    return NewLedgerEntry(draw(ACCOUNTS), kind, amount, draw(SOURCES), draw(EXTERNAL_IDS))


usage_rows = st.builds(
    lambda request_id, account_id, cost: usage(request_id, account_id=account_id, actual_cost_pico=cost),
    st.sampled_from(["r1", "r2", "r3", "r4", "r5", "r6"]),
    st.one_of(st.none(), ACCOUNTS),
    st.one_of(st.none(), st.integers(0, 10**6), st.integers(MAX_PICO // 3, MAX_PICO)),
)

operations = st.lists(
    st.one_of(
        st.tuples(st.just("entry"), ledger_entries()),
        st.tuples(st.just("usage"), st.lists(usage_rows, max_size=5)),
        st.tuples(st.just("webhook"), st.sampled_from(["e1", "e2", "e3"]), st.lists(ledger_entries(), max_size=3)),
    ),
    max_size=25,
)


class LedgerModel:
    """What the store must do, in plain Python: first (source, external_id) wins; a call is all or nothing."""

    def __init__(self) -> None:
        self.balances: dict[str, int] = {}
        self.applied: set[tuple[str, str]] = set()
        self.requests: set[str] = set()
        self.events: set[str] = set()

    def plan(self, entries: list[NewLedgerEntry]) -> tuple[set[tuple[str, str]], dict[str, int]] | None:
        """The keys a call appends and the balances after it, or None when it must fail."""
        keys: set[tuple[str, str]] = set()
        changes: dict[str, int] = {}
        for e in entries:
            key = (e.source, e.external_id)
            if key not in self.applied and key not in keys:
                keys.add(key)
                changes[e.account_id] = changes.get(e.account_id, 0) + e.amount_pico
        balances = dict(self.balances)
        for account, change in changes.items():
            balances[account] = balances.get(account, 0) + change
            if not (MIN_PICO <= change <= MAX_PICO and MIN_PICO <= balances[account] <= MAX_PICO):
                return None
        return keys, balances

    def commit(self, keys: set[tuple[str, str]], balances: dict[str, int]) -> None:
        self.applied |= keys
        self.balances = balances


async def run_operations(ops: list[tuple]) -> None:
    store = await open_store("sqlite://:memory:")
    model = LedgerModel()
    try:
        await store.migrate()
        for op in ops:
            if op[0] == "entry":
                plan = model.plan([op[1]])
                call = store.apply_ledger_entry(op[1])
                expected: object = plan is not None and bool(plan[0])
            elif op[0] == "usage":
                new: dict[str, UsageRecord] = {}
                for row in op[1]:
                    if row.request_id not in model.requests:
                        new.setdefault(row.request_id, row)
                # one debit per account, named after its first row; a row whose id is booked already is not charged
                charged: dict[str, list[UsageRecord]] = {}
                for r in new.values():
                    if r.account_id is not None and r.actual_cost_pico and ("request", r.request_id) not in model.applied:
                        charged.setdefault(r.account_id, []).append(r)
                debits = [entry(account, -sum(r.actual_cost_pico for r in rs), min(r.request_id for r in rs),
                                kind="debit", source="request") for account, rs in charged.items()]
                plan = model.plan(debits)
                call = store.record_usage(op[1])
                expected = len(new)
            else:
                _, event_id, entries = op
                plan = model.plan(entries) if event_id not in model.events else (set(), model.balances)
                call = store.apply_webhook("stripe", event_id, "test", entries)
                expected = event_id not in model.events
            if plan is None:
                with pytest.raises(StoreError, match="BIGINT"):
                    await call
            else:
                assert await call == expected
                model.commit(*plan)
                if op[0] == "usage":
                    model.requests |= set(new)
                elif op[0] == "webhook":
                    model.events.add(op[1])
            for account in ("a", "b", "c"):
                balance = await store.get_balance(account)
                assert balance == await store.ledger_sum(account) == model.balances.get(account, 0)
    finally:
        await store.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations)
def test_balance_is_always_the_ledger_sum(ops: list[tuple]) -> None:
    asyncio.run(run_operations(ops))
