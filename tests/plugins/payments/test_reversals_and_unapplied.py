"""Money back and money nobody owns: cumulative reversals, dispute.accepted, major units, held payments."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import aiohttp
import pytest

import nexgate_plugins.payments as payments
import nexgate_plugins.payments.unapplied as payments_unapplied
from nexgate_plugins.credits.statements import shown_description, transaction_json
from nexgate_proxy.appkeys import STORE
from nexgate_proxy.money import format_minor_units
from nexgate_proxy.store import Conflict, NewLedgerEntry, open_store
from nexgate_proxy.testing import FakeUpstream, Gateway
from tests.cli_runner import Cli

from .test_payments import assert_consistent, deliver, dispute, ledger, payment, refund, start, usd


async def test_a_dispute_accepted_by_the_merchant_takes_the_credit_back_once(upstream, start_gateway) -> None:
    gw = await start(start_gateway, upstream)
    assert (await deliver(gw, payment(gw.user_id, "pay_acc", total=2360)))[0] == 200
    status, body = await deliver(gw, dispute("pay_acc", "dsp_acc", "2360", event="dispute.accepted"))
    assert (status, body["status"]) == (200, "applied")
    assert await assert_consistent(gw) == 0
    # The same dispute lost later (or the accepted one resent) takes nothing more.
    for event in ("dispute.lost", "dispute.accepted"):
        status, body = await deliver(gw, dispute("pay_acc", "dsp_acc", "2360", event=event))
        assert (status, body["status"]) == (200, "duplicate")
    assert await assert_consistent(gw) == 0
    [debit] = [e for e in await ledger(gw) if e.kind == "dispute"]
    assert debit.amount_pico == -usd("20") and debit.external_id == "dispute:dsp_acc"


async def test_partial_refunds_adding_up_to_the_payment_take_back_exactly_its_credit(upstream,
                                                                                     start_gateway) -> None:
    gw = await start(start_gateway, upstream)
    # 20 USD of credits for 3 minor units: each third is 6.666...67 USD rounded up on its own.
    assert (await deliver(gw, payment(gw.user_id, "pay_3", total=3)))[0] == 200
    for i in range(3):
        assert (await deliver(gw, refund("pay_3", f"ref_3_{i}", 1)))[0] == 200
        assert await assert_consistent(gw) == usd("20") - payments.reversed_total(usd("20"), i + 1, 3)
    assert await assert_consistent(gw) == 0  # not -2 pico-dollars
    debits = sorted(-e.amount_pico for e in await ledger(gw) if e.kind == "refund")
    assert sum(debits) == usd("20") and debits == [6_666_666_666_666, 6_666_666_666_667, 6_666_666_666_667]


async def test_a_refund_plus_a_lost_dispute_never_take_back_more_than_was_credited(upstream,
                                                                                  start_gateway) -> None:
    gw = await start(start_gateway, upstream)
    assert (await deliver(gw, payment(gw.user_id, "pay_both", total=2360)))[0] == 200
    assert (await deliver(gw, refund("pay_both", "ref_both", 1180)))[0] == 200  # half
    assert await assert_consistent(gw) == usd("10")
    assert (await deliver(gw, dispute("pay_both", "dsp_both", "2360")))[0] == 200  # the whole payment
    assert await assert_consistent(gw) == 0  # the other half only, not 20 more
    status, body = await deliver(gw, refund("pay_both", "ref_late", 100))
    assert (status, body["status"]) == (202, "ignored")  # nothing left to take back
    assert await assert_consistent(gw) == 0


@pytest.mark.parametrize("total, currency, shown", [(1099, "USD", "10.99 USD"), (1099, "JPY", "1099 JPY"),
                                                    (12345, "KWD", "12.345 KWD"), (5, "EUR", "0.05 EUR")])
async def test_paid_amounts_read_in_major_units(upstream, start_gateway, total: int, currency: str,
                                                shown: str) -> None:
    gw = await start(start_gateway, upstream)
    assert (await deliver(gw, payment(gw.user_id, "pay_cur", total=total, currency=currency)))[0] == 200
    event = refund("pay_cur", "ref_cur", total // 2 or 1)
    event["data"]["currency"] = currency
    assert (await deliver(gw, event))[0] == 200
    entries = {e.external_id: e for e in await ledger(gw)}
    assert entries["payment:pay_cur"].description.endswith(f"; paid {shown}")
    half = format_minor_units(total // 2 or 1, currency)
    assert entries["refund:ref_cur"].description.endswith(f": {half} of {shown}")
    # The share is of the minor units paid, whatever the currency's decimals.
    assert entries["refund:ref_cur"].amount_pico == -payments.reversed_total(usd("20"), total // 2 or 1, total)


async def test_reversals_recorded_in_minor_units_before_are_still_read(upstream, start_gateway) -> None:
    # A payment credited before amounts were shown in major units ("paid 2360 USD").
    gw = await start(start_gateway, upstream)
    await gw.app[STORE].apply_ledger_entry(NewLedgerEntry(
        account_id=gw.user_id, kind="payment", amount_pico=usd("20"), source="dodopayments",
        external_id="payment:pay_old", description="DodoPayments payment pay_old: 2 x prod_small; paid 2360 USD"))
    assert (await deliver(gw, refund("pay_old", "ref_old", 590)))[0] == 200
    assert await assert_consistent(gw) == usd("15")
    # A person reads the old entry in major units too (transactions, statements).
    old = await gw.app[STORE].get_ledger_entry("dodopayments", "payment:pay_old")
    assert transaction_json(old)["description"].endswith("; paid 23.60 USD")
    legacy_refund = replace(old, kind="refund", description="DodoPayments refund r of payment pay_old: 590 of 2360 USD")
    assert shown_description(legacy_refund).endswith(": 5.90 USD of 23.60 USD")
    assert shown_description(replace(old, description="x; paid 500 JPY")) == "x; paid 500 JPY"


async def test_concurrent_reversals_of_one_payment_compare_and_set(store_url: str) -> None:
    from nexgate_proxy import cli

    assert await asyncio.to_thread(cli.main, ["db", "migrate", "--storage-url", store_url]) == 0
    async with await open_store(store_url) as store:
        user = await store.create_user(email="c@example.com")
        await store.apply_ledger_entry(NewLedgerEntry(user.id, "payment", 100, "dodopayments", "payment:p"))

        def debit(ref: str, pico: int) -> NewLedgerEntry:
            return NewLedgerEntry(user.id, "refund", -pico, "dodopayments", f"refund:{ref}")

        assert await store.apply_reversal(debit("a", 40), "p", (0, 0), (4, 40))
        with pytest.raises(Conflict):  # computed from the total before "a": must compute again
            await store.apply_reversal(debit("b", 40), "p", (0, 0), (4, 40))
        assert not await store.apply_reversal(debit("a", 40), "p", (4, 40), (8, 80))  # "a" again: nothing
        assert await store.get_payment_reversed("dodopayments", "p") == (4, 40)
        assert await store.apply_reversal(debit("b", 60), "p", (4, 40), (10, 100))
        assert await store.get_payment_reversed("dodopayments", "p") == (10, 100)
        assert await store.get_balance(user.id) == await store.ledger_sum(user.id) == 0


# ------------------------------------------------------- unapplied payments


async def metric(gw: Gateway, name: str) -> float | None:
    async with aiohttp.ClientSession() as session:
        async with session.get(gw.url + "/metrics") as resp:
            text = await resp.text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


async def test_a_payment_for_a_deleted_account_is_held_visible_and_applied_once(
        upstream: FakeUpstream, start_gateway, tmp_path, capsys) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    gw = await start(start_gateway, upstream, storage={"url": url})
    store = gw.app[STORE]
    gone = await store.create_user(email="gone@example.com")
    await store.anonymize_user(gone.id)
    heir = await store.create_user(email="heir@example.com")
    cases = [("pay_deleted", gone.id, "was deleted"), ("pay_unknown", "usr_nobody", "does not exist")]
    for payment_id, account, why in cases:
        status, body = await deliver(gw, payment(account, payment_id))
        assert (status, body["status"]) == (200, "held")
        assert (await deliver(gw, payment(account, payment_id)))[1]["status"] == "duplicate"
    status, body = await deliver(gw, payment(gw.user_id, "pay_none", metadata={}))
    assert (status, body["status"]) == (200, "held")
    assert await store.get_balance(gone.id) == 0 and await ledger(gw, gone.id) == []
    held = {p.payment_id: p for p in await store.list_unapplied_payments()}
    assert set(held) == {"pay_deleted", "pay_unknown", "pay_none"}
    assert "was deleted" in held["pay_deleted"].reason and held["pay_deleted"].amount_pico == usd("20")
    assert await metric(gw, "nexgate_payments_unapplied") == 3

    cli = Cli(capsys, "--storage-url", url)
    listed = await cli.json("payments", "unapplied")
    assert {p["payment_id"] for p in listed["data"]} == set(held)
    code, out, _ = await cli("payments", "unapplied")
    assert code == 0 and "pay_deleted" in out and "3 unapplied, $60 of credits" in out
    applied = await cli.json("payments", "apply", "pay_deleted", heir.id)
    assert applied["applied"] is True and applied["applied_to"] == heir.id and applied["balance_usd"] == "20"
    again = await cli.json("payments", "apply", "pay_deleted", heir.id)
    assert again["applied"] is False and again["balance_usd"] == "20"
    assert heir.id in await cli.fails("payments", "apply", "pay_deleted", gw.user_id)  # applied elsewhere
    assert "was deleted" in await cli.fails("payments", "apply", "pay_unknown", gone.id)
    assert "no unapplied payment" in (await cli.fails("payments", "apply", "pay_never", heir.id)).lower()
    assert await store.get_balance(heir.id) == await store.ledger_sum(heir.id) == usd("20")
    assert await store.get_balance(gw.user_id) == 0
    # Applied, it is a payment like any: its refund finds it and debits the account it went to.
    assert (await deliver(gw, refund("pay_deleted", "ref_heir", 1180)))[0] == 200
    assert await store.get_balance(heir.id) == usd("10")
    assert {p.payment_id for p in await store.list_unapplied_payments()} == {"pay_unknown", "pay_none"}
    await gw.app[payments_unapplied.PAYMENT_STATS].refresh(store)
    assert await metric(gw, "nexgate_payments_unapplied") == 2


async def test_the_operator_sees_and_applies_held_payments_over_the_admin_api(upstream: FakeUpstream,
                                                                              start_gateway) -> None:
    import hashlib

    from tests.plugins.admin.test_admin_api import ADMIN_TOKEN

    gw = await start(start_gateway, upstream, auth={
        "bcrypt_rounds": 4, "admin_token_sha256": hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()})
    assert (await deliver(gw, payment("usr_gone", "pay_http")))[1]["status"] == "held"
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession(base_url=gw.url) as session:
        async with session.get("/admin/v1/payments/unapplied", headers=headers) as resp:
            listed = await resp.json()
        assert resp.status == 200 and [p["payment_id"] for p in listed["data"]] == ["pay_http"]
        [held] = listed["data"]
        assert (held["account_hint"], held["credit_usd"], held["applied_to"]) == ("usr_gone", "20", None)
        assert held["description"].endswith("; paid 23.60 USD") and "does not exist" in held["reason"]
        apply = "/admin/v1/payments/unapplied/pay_http/apply"
        async with session.post(apply, json={"account_id": gw.user_id}, headers=headers) as resp:
            applied = await resp.json()
        assert resp.status == 200 and applied["applied"] is True and applied["balance_usd"] == "20"
        async with session.post(apply, json={"account_id": gw.user_id}, headers=headers) as resp:
            assert resp.status == 200 and (await resp.json())["applied"] is False
        other = await gw.app[STORE].create_user(email="x@example.com")
        async with session.post(apply, json={"account_id": other.id}, headers=headers) as resp:
            error = (await resp.json())["error"]
        assert resp.status == 409 and gw.user_id in error["message"]
        async with session.post("/admin/v1/payments/unapplied/pay_nope/apply", json={"account_id": other.id},
                                headers=headers) as resp:
            assert resp.status == 404
        async with session.get("/admin/v1/payments/unapplied", headers=headers) as resp:
            assert (await resp.json())["data"] == []
    assert await assert_consistent(gw) == usd("20")
    assert await metric(gw, "nexgate_payments_unapplied") == 0
