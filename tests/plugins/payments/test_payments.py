"""DodoPayments webhooks: Standard Webhooks signatures, exactly-once credits, refunds and disputes.

Also the property that the hot credit state never lets holds overdraw and ends
where the ledger does.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import time
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nexgate_plugins.payments as payments
from nexgate_plugins.credits import CREDITS
from nexgate_proxy.app import build_app
from nexgate_proxy.appkeys import STORE
from nexgate_proxy.config import ConfigError, parse_config
from nexgate_plugins.credits.holds import Booker, Credited, MemoryCreditState, StoreBalance
from nexgate_proxy.money import usd_to_pico
from nexgate_proxy.plugins import resolve_config
from nexgate_proxy.testing import FakeUpstream, Gateway, gateway_config


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


SECRET = new_secret()
OLD_SECRET = new_secret()
PRODUCTS = {"prod_small": {"credit_usd": "10"}, "prod_tiny": {"credit_usd": "0.000000000001"}}


def payments_config(upstream: FakeUpstream, secrets_: list[str] | None = None, **sections: Any) -> dict:
    return gateway_config(upstream, payments={"dodopayments": {
        "webhook_secrets": secrets_ or [SECRET], "tolerance_seconds": 300,
        "account_metadata_key": "nexgate_account_id", "products": PRODUCTS}}, **sections)


async def start(start_gateway, upstream: FakeUpstream, **kwargs: Any) -> Gateway:
    return await start_gateway(payments_config(upstream, **kwargs), plugins=[payments])


def usd(text: str) -> int:
    return usd_to_pico(Decimal(text))


def payment(account: str, payment_id: str = "pay_1", cart: Any = None, total: int = 2360, **data: Any) -> dict:
    return {"business_id": "bus_1", "type": "payment.succeeded", "timestamp": "2025-01-15T10:00:00Z",
            "data": {"payload_type": "Payment", "payment_id": payment_id, "total_amount": total, "tax": 360,
                     "currency": "USD", "status": "succeeded", "metadata": {"nexgate_account_id": account},
                     "product_cart": [{"product_id": "prod_small", "quantity": 2}] if cart is None else cart,
                     **data}}


def refund(payment_id: str, refund_id: str, amount: int, account: str | None = None) -> dict:
    data: dict[str, Any] = {"payload_type": "Refund", "refund_id": refund_id, "payment_id": payment_id,
                            "amount": amount, "currency": "USD", "status": "succeeded", "is_partial": True}
    if account:
        data["metadata"] = {"nexgate_account_id": account}
    return {"business_id": "bus_1", "type": "refund.succeeded", "timestamp": "2025-01-16T10:00:00Z", "data": data}


def dispute(payment_id: str, dispute_id: str, amount: str, account: str | None = None,
            event: str = "dispute.lost") -> dict:
    data: dict[str, Any] = {"payload_type": "Dispute", "dispute_id": dispute_id, "payment_id": payment_id,
                            "amount": amount, "currency": "USD", "dispute_stage": "chargeback",
                            "dispute_status": "dispute_lost"}
    if account:
        data["metadata"] = {"nexgate_account_id": account}
    return {"business_id": "bus_1", "type": event, "timestamp": "2025-01-17T10:00:00Z", "data": data}


def signature(secret: str, webhook_id: str, timestamp: str, body: bytes) -> str:
    return "v1," + payments.sign(payments.decode_secret(secret), webhook_id, timestamp, body)


async def deliver(gw: Gateway, event: Any = None, *, body: bytes | None = None, secret: str = SECRET,
                  webhook_id: str | None = None, timestamp: int | str | None = None,
                  signatures: str | None = None, headers: dict[str, str] | None = None,
                  drop: tuple[str, ...] = (), session: aiohttp.ClientSession | None = None) -> tuple[int, Any]:
    """POST one signed delivery; returns (status, JSON body). Never a 500."""
    body = json.dumps(event).encode() if body is None else body
    webhook_id = webhook_id or f"msg_{secrets.token_hex(8)}"
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    all_headers = {"content-type": "application/json", "webhook-id": webhook_id, "webhook-timestamp": stamp,
                   "webhook-signature": signatures or signature(secret, webhook_id, stamp, body), **(headers or {})}
    for name in drop:
        del all_headers[name]
    own = session is None
    session = session or aiohttp.ClientSession()
    try:
        async with session.post(gw.url + "/webhooks/dodopayments", data=body, headers=all_headers) as resp:
            text = await resp.text()
            assert resp.status < 500, text
            return resp.status, json.loads(text)
    finally:
        if own:
            await session.close()


async def ledger(gw: Gateway, account: str | None = None) -> list:
    return await gw.app[STORE].list_ledger(account or gw.user_id, limit=1000)


async def assert_consistent(gw: Gateway, account: str | None = None) -> int:
    store = gw.app[STORE]
    balance = await store.get_balance(account or gw.user_id)
    assert balance == await store.ledger_sum(account or gw.user_id)
    return balance


# ------------------------------------------------------------------ payments


async def test_a_payment_credits_what_its_products_buy_not_the_taxed_total(upstream, start_gateway) -> None:
    gw = await start(start_gateway, upstream)
    status, body = await deliver(gw, payment(gw.user_id), webhook_id="msg_first")
    assert (status, body) == (200, {"received": True, "status": "applied", "webhook_id": "msg_first"})
    assert await assert_consistent(gw) == usd("20")  # 2 x 10 USD; the 23.60 paid includes tax
    [entry] = await ledger(gw)
    assert (entry.kind, entry.source, entry.external_id) == ("payment", "dodopayments", "payment:pay_1")
    assert entry.description.endswith("; paid 23.60 USD")  # major units, as a person reads them


async def test_signatures_are_checked_on_the_raw_body(upstream, start_gateway) -> None:
    gw = await start(start_gateway, upstream)
    event = payment(gw.user_id)
    body = json.dumps(event).encode()
    stamp = str(int(time.time()))
    good = signature(SECRET, "msg_x", stamp, body)
    tampered = body.replace(b'"quantity": 2', b'"quantity": 9')
    assert tampered != body
    status, answer = await deliver(gw, body=tampered, webhook_id="msg_x", timestamp=stamp, signatures=good)
    assert status == 401 and answer["error"]["code"] == "invalid_signature"
    # The same signature does not cover another id or timestamp either.
    assert (await deliver(gw, body=body, webhook_id="msg_y", timestamp=stamp, signatures=good))[0] == 401
    assert (await deliver(gw, body=body, webhook_id="msg_x", timestamp=int(stamp) - 1, signatures=good))[0] == 401
    assert (await deliver(gw, event, secret=new_secret()))[0] == 401  # the wrong secret
    assert (await deliver(gw, event, signatures="v1," + base64.b64encode(b"x" * 32).decode()))[0] == 401
    assert (await deliver(gw, event, signatures="v1,"))[0] == 401
    assert (await deliver(gw, event, signatures="v2," + good.split(",", 1)[1]))[0] == 401  # only v1 is HMAC
    assert await ledger(gw) == []
    assert (await deliver(gw, body=body, webhook_id="msg_x", timestamp=stamp, signatures=good))[0] == 200


async def test_timestamps_outside_the_tolerance_are_refused_both_ways(upstream, start_gateway) -> None:
    gw = await start(start_gateway, upstream)
    now = int(time.time())
    for stamp in (now - 330, now + 330, 0, 10**11):
        status, answer = await deliver(gw, payment(gw.user_id), timestamp=stamp)
        assert status == 401 and answer["error"]["param"] == "webhook-timestamp", stamp
    assert await ledger(gw) == []
    assert (await deliver(gw, payment(gw.user_id, "pay_late"), timestamp=now - 280))[0] == 200
    assert (await deliver(gw, payment(gw.user_id, "pay_early"), timestamp=now + 280))[0] == 200
    assert len(await ledger(gw)) == 2


async def test_a_rotated_secret_and_several_signatures(upstream, start_gateway) -> None:
    gw = await start(start_gateway, upstream, secrets_=[OLD_SECRET, SECRET])
    assert (await deliver(gw, payment(gw.user_id, "pay_old"), secret=OLD_SECRET))[0] == 200
    assert (await deliver(gw, payment(gw.user_id, "pay_new"), secret=SECRET))[0] == 200
    assert (await deliver(gw, payment(gw.user_id, "pay_other"), secret=new_secret()))[0] == 401
    # Standard Webhooks senders may sign with several secrets at once: any valid one is enough.
    event = payment(gw.user_id, "pay_multi")
    body = json.dumps(event).encode()
    stamp = str(int(time.time()))
    wrong = signature(new_secret(), "msg_m", stamp, body)
    right = signature(OLD_SECRET, "msg_m", stamp, body)
    header = f"v1a,{base64.b64encode(b'ed25519').decode()} {wrong} {right}"
    assert (await deliver(gw, body=body, webhook_id="msg_m", timestamp=stamp, signatures=header))[0] == 200
    assert {e.external_id for e in await ledger(gw)} == {"payment:pay_old", "payment:pay_new", "payment:pay_multi"}
    assert await assert_consistent(gw) == usd("60")


@pytest.fixture
async def durable_gw(upstream: FakeUpstream, start_gateway, store_url: str) -> Gateway:
    """A payments gateway on the backend under test (SQLite and PostgreSQL)."""
    return await start(start_gateway, upstream, storage={"url": store_url})


async def test_a_delivery_replayed_100_times_credits_once(durable_gw: Gateway) -> None:
    gw = durable_gw
    event = payment(gw.user_id, "pay_replayed")
    body = json.dumps(event).encode()
    stamp = str(int(time.time()))
    header = signature(SECRET, "msg_replayed", stamp, body)
    answers = []
    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            answers.append(await deliver(gw, body=body, webhook_id="msg_replayed", timestamp=stamp,
                                         signatures=header, session=session))
    assert [status for status, _ in answers] == [200] * 100
    assert [a["status"] for _, a in answers] == ["applied"] + ["duplicate"] * 99
    assert await assert_consistent(gw) == usd("20")
    assert len(await ledger(gw)) == 1


async def test_20_concurrent_duplicates_credit_once(durable_gw: Gateway) -> None:
    gw = durable_gw
    event = payment(gw.user_id, "pay_concurrent")
    body = json.dumps(event).encode()
    stamp = str(int(time.time()))
    header = signature(SECRET, "msg_concurrent", stamp, body)
    async with aiohttp.ClientSession() as session:
        answers = await asyncio.gather(*[
            deliver(gw, body=body, webhook_id="msg_concurrent", timestamp=stamp, signatures=header, session=session)
            for _ in range(20)])
    assert {status for status, _ in answers} == {200}
    assert sorted(a["status"] for _, a in answers) == ["applied"] + ["duplicate"] * 19
    assert await assert_consistent(gw) == usd("20")
    assert len(await ledger(gw)) == 1


async def test_one_payment_under_several_webhook_ids_credits_once(durable_gw: Gateway) -> None:
    gw = durable_gw
    event = payment(gw.user_id, "pay_twice")
    first = await deliver(gw, event, webhook_id="msg_a")
    second = await deliver(gw, event, webhook_id="msg_b")
    assert (first[1]["status"], second[1]["status"]) == ("applied", "duplicate")
    async with aiohttp.ClientSession() as session:  # and concurrently, under 20 fresh ids
        answers = await asyncio.gather(*[deliver(gw, payment(gw.user_id, "pay_race"), session=session)
                                         for _ in range(20)])
    assert sorted(a["status"] for _, a in answers) == ["applied"] + ["duplicate"] * 19
    assert await assert_consistent(gw) == usd("40")
    assert sorted(e.external_id for e in await ledger(gw)) == ["payment:pay_race", "payment:pay_twice"]


async def test_refunds_and_lost_disputes_debit_their_share(durable_gw: Gateway) -> None:
    gw = durable_gw
    account = gw.user_id
    assert (await deliver(gw, payment(account, "pay_r", total=2360)))[0] == 200  # 20 USD of credits
    # Half the paid total refunded: half the credits, once, however often it is delivered.
    for webhook_id in ("msg_r1", "msg_r1", "msg_r2"):
        status, body = await deliver(gw, refund("pay_r", "ref_1", 1180, account), webhook_id=webhook_id)
        assert status == 200
    assert await assert_consistent(gw) == usd("10")
    # A lost dispute over a quarter (DodoPayments sends a dispute's amount as a string).
    assert (await deliver(gw, dispute("pay_r", "dsp_1", "590", account)))[0] == 200
    assert (await deliver(gw, dispute("pay_r", "dsp_1", "590", account)))[1]["status"] == "duplicate"
    assert await assert_consistent(gw) == usd("5")
    entries = {e.external_id: e for e in await ledger(gw)}
    assert entries["refund:ref_1"].kind == "refund" and entries["refund:ref_1"].amount_pico == -usd("10")
    assert entries["dispute:dsp_1"].kind == "dispute" and entries["dispute:dsp_1"].amount_pico == -usd("5")
    # Other dispute events move nothing; a refund of more than was paid takes back at most what is left.
    status, body = await deliver(gw, dispute("pay_r", "dsp_2", "2360", account, event="dispute.opened"))
    assert (status, body["status"]) == (202, "ignored")
    assert (await deliver(gw, refund("pay_r", "ref_2", 99_999, account)))[0] == 200
    assert await assert_consistent(gw) == 0
    assert entries["payment:pay_r"].amount_pico == usd("20")


async def test_a_dispute_without_metadata_debits_the_paying_account(durable_gw: Gateway) -> None:
    # DodoPayments' dispute payloads carry no metadata: the payment's own ledger entry names the account.
    gw = durable_gw
    assert (await deliver(gw, payment(gw.user_id, "pay_d", total=2360)))[0] == 200
    assert (await deliver(gw, dispute("pay_d", "dsp_nometa", "1180")))[0] == 200
    assert await assert_consistent(gw) == usd("10")
    entries = {e.external_id: e for e in await ledger(gw)}
    assert entries["dispute:dsp_nometa"].account_id == gw.user_id


async def test_refund_shares_round_up_to_the_pico_dollar(upstream, start_gateway) -> None:
    gw = await start(start_gateway, upstream)
    await deliver(gw, payment(gw.user_id, "pay_odd", cart=[{"product_id": "prod_tiny", "quantity": 10}], total=3))
    assert await assert_consistent(gw) == 10
    await deliver(gw, refund("pay_odd", "ref_odd", 1, gw.user_id))  # a third of 10 pUSD
    assert await assert_consistent(gw) == 6
    assert payments.reversed_total(10, 1, 3) == 4 and payments.reversed_total(10, 3, 3) == 10
    assert payments.reversed_total(10, 0, 3) == 0


async def test_a_refund_of_an_unknown_payment_debits_nothing(upstream, start_gateway, caplog) -> None:
    gw = await start(start_gateway, upstream)
    with caplog.at_level(logging.WARNING, "nexgate.payments"):
        status, body = await deliver(gw, refund("pay_never", "ref_x", 100, gw.user_id))
        assert (status, body["status"]) == (202, "ignored")
        status, body = await deliver(gw, dispute("pay_never", "dsp_x", "100"))
        assert (status, body["status"]) == (202, "ignored")
    assert "pay_never" in caplog.text
    assert await ledger(gw) == []


async def test_malformed_deliveries_get_4xx_never_500(upstream, start_gateway) -> None:
    gw = await start(start_gateway, upstream)
    event = payment(gw.user_id)
    for header in ("webhook-id", "webhook-timestamp", "webhook-signature"):
        status, body = await deliver(gw, event, drop=(header,))
        assert (status, body["error"]["code"], body["error"]["param"]) == (400, "missing_header", header)
    assert (await deliver(gw, event, timestamp="12.5"))[0] == 400
    assert (await deliver(gw, event, timestamp="-1"))[0] == 400
    assert (await deliver(gw, event, webhook_id="msg with spaces"))[0] == 400
    assert (await deliver(gw, event, signatures="v1," + "A" * 9000))[0] == 400
    # Signed, but not an event.
    for body in (b"{not json", b"\xff\xfe", b"[1, 2]", b'"text"', b"{}", b'{"type": 5}', b"NaN", b""):
        status, answer = await deliver(gw, body=body)
        assert status == 400, body
        assert answer["error"]["code"] in ("invalid_json", "invalid_event")
    bad_data = [
        {"payment_id": 5},
        {"payment_id": "pay_1", "product_cart": "prod_small"},
        {"payment_id": "pay_1", "product_cart": [{"product_id": "prod_small", "quantity": -1}]},
        {"payment_id": "pay_1", "product_cart": [{"product_id": "prod_small", "quantity": True}]},
        {"payment_id": "pay_1", "product_cart": [{"quantity": 1}]},
        {"payment_id": "pay_1", "product_cart": [7]},
        {"payment_id": "pay_1", "metadata": ["x"], "product_cart": []},
    ]
    for data in bad_data:
        status, _ = await deliver(gw, {"type": "payment.succeeded", "data": data})
        assert status == 400, data
    for data in ({"refund_id": "ref_1", "payment_id": "pay_1", "amount": "lots"},
                 {"refund_id": "ref_1", "payment_id": "pay_1", "amount": -5},
                 {"refund_id": "ref_1", "payment_id": "pay_1"},
                 {"payment_id": "pay_1", "amount": 5}):
        assert (await deliver(gw, {"type": "refund.succeeded", "data": data}))[0] == 400, data
    assert (await deliver(gw, body=b"x" * (300 * 1024)))[0] == 413
    async with aiohttp.ClientSession() as session:
        async with session.get(gw.url + "/webhooks/dodopayments") as resp:
            assert resp.status == 405 and resp.headers["Allow"] == "POST"
    assert await ledger(gw) == []


async def test_what_nexgate_does_not_handle_is_acknowledged_and_logged(upstream, start_gateway, caplog) -> None:
    gw = await start(start_gateway, upstream)
    org = await gw.app[STORE].create_org("Acme", gw.user_id)
    cases = [
        ({"type": "subscription.active", "data": {"subscription_id": "sub_1"}}, "not handled"),
        ({"type": "payment.failed", "data": {}}, "not handled"),
        (payment(gw.user_id, "pay_u", cart=[{"product_id": "prod_unknown", "quantity": 1}]), "no configured product"),
        (payment(gw.user_id, "pay_n", cart=[]), "no configured product"),
        (payment(gw.user_id, "pay_c", product_cart=None), "no product cart"),
    ]
    for event, reason in cases:
        caplog.clear()
        with caplog.at_level(logging.WARNING, "nexgate.payments"):
            status, body = await deliver(gw, event)
        assert (status, body["status"]) == (202, "ignored"), event
        assert reason in caplog.text, (reason, caplog.text)
    assert await ledger(gw) == []
    # A cart mixing products credits the known ones; an organization can be the account.
    mixed = [{"product_id": "prod_unknown", "quantity": 1}, {"product_id": "prod_small", "quantity": 1}]
    assert (await deliver(gw, payment(org.id, "pay_org", cart=mixed)))[0] == 200
    assert await assert_consistent(gw, org.id) == usd("10")


async def test_an_ignored_delivery_is_applied_when_resent_after_the_config_names_it(
        upstream: FakeUpstream, start_gateway, tmp_path) -> None:
    storage = {"url": f"sqlite:///{tmp_path / 'shared.db'}"}
    before = await start(start_gateway, upstream, storage=storage)
    event = payment(before.user_id, "pay_later", cart=[{"product_id": "prod_new", "quantity": 1}])
    body = json.dumps(event).encode()
    stamp = str(int(time.time()))
    header = signature(SECRET, "msg_later", stamp, body)
    assert (await deliver(before, body=body, webhook_id="msg_later", timestamp=stamp, signatures=header))[0] == 202
    config = payments_config(upstream, storage=storage)
    config["payments"]["dodopayments"]["products"]["prod_new"] = {"credit_usd": "5"}
    after = await start_gateway(config, plugins=[payments])
    status, answer = await deliver(after, body=body, webhook_id="msg_later", timestamp=stamp, signatures=header)
    assert (status, answer["status"]) == (200, "applied")
    assert await assert_consistent(after, before.user_id) == usd("5")


async def test_a_credit_raises_the_cached_balance_once(upstream, start_gateway) -> None:
    gw = await start(start_gateway, upstream)
    credits = gw.app[CREDITS]
    state = credits.state
    store = gw.app[STORE]
    reservation = await state.reserve(gw.user_id, "warm-up", 0, 0, 60,
                                      lambda: credits.load_balance(store, gw.user_id))
    assert reservation.ok and await state.available(gw.user_id) == 0

    async def settles_at(expected: int) -> None:
        # The store feed brings the webhook's credits within a second; then nothing more comes.
        deadline = time.monotonic() + 1.0
        while await state.available(gw.user_id) != expected:
            assert time.monotonic() < deadline, await state.available(gw.user_id)
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)
        assert await state.available(gw.user_id) == expected

    for webhook_id in ("msg_1", "msg_1", "msg_2"):
        await deliver(gw, payment(gw.user_id, "pay_hot"), webhook_id=webhook_id)
    await settles_at(usd("20"))
    await deliver(gw, refund("pay_hot", "ref_hot", 590, gw.user_id))
    await settles_at(usd("15"))
    assert await store.get_balance(gw.user_id) == usd("15")


async def test_a_failing_hot_state_does_not_fail_the_webhook(upstream, start_gateway, caplog) -> None:
    gw = await start(start_gateway, upstream)

    class Broken(MemoryCreditState):
        async def credit(self, account_id: str, amount_pico: int, book: Booker) -> Credited:
            return Credited(await book(), reached_state=False)  # redis is down: booked, not heard of

    gw.app[CREDITS].state = Broken()
    with caplog.at_level(logging.WARNING, "nexgate.payments"):
        status, body = await deliver(gw, payment(gw.user_id, "pay_broken"))
    assert (status, body["status"]) == (200, "applied")
    assert "cached balance" in caplog.text
    assert await assert_consistent(gw) == usd("20")


async def test_without_the_section_there_is_no_webhook(upstream, start_gateway) -> None:
    gw = await start_gateway(gateway_config(upstream), plugins=[payments])
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.url + "/webhooks/dodopayments", data=b"{}") as resp:
            assert resp.status == 404


def check(section: Any) -> list[str]:
    try:
        resolve_config(parse_config({"providers": {}, "models": {}, "payments": section}, "test.yaml"))
    except ConfigError as exc:
        return exc.problems
    return []


def test_the_payments_section_is_validated() -> None:
    good = {"dodopayments": {"webhook_secrets": [SECRET, OLD_SECRET], "products": {"prod_1": {"credit_usd": 10}}}}
    assert check(good) == []
    settings_ = resolve_config(parse_config({"payments": good})).section(payments.PAYMENTS_SECTION)
    assert settings_.dodopayments is not None
    assert settings_.dodopayments.products == {"prod_1": usd("10")}
    assert settings_.dodopayments.tolerance_seconds == 300
    assert SECRET not in repr(settings_)
    assert check(None) == [] and check({}) == []
    problems = check({"dodopayments": {
        "webhook_secrets": ["", "whsec_not base64!", "whsec_" + base64.b64encode(b"short").decode()],
        "tolerance_seconds": 0, "account_metadata_key": "", "products": {
            "prod_a": {"credit_usd": "-1"}, "prod_b": {}, "prod_c": {"credit_usd": "0.0000000000001"},
            "prod_d": {"credit_usd": "ten"}, "prod_e": {"credit": 1}},
        "secret": "typo"}})
    text = "\n".join(problems)
    for expected in ("webhook_secrets[0]: empty", "webhook_secrets[1]: is not a webhook secret",
                     "webhook_secrets[2]: is too short", "tolerance_seconds: must be between",
                     "account_metadata_key: must be", "prod_a.credit_usd: must be greater than 0",
                     "prod_b.credit_usd: required", "prod_c.credit_usd: has more than 12 decimals",
                     "prod_d.credit_usd: expected a number", "prod_e.credit: unknown key",
                     "payments.dodopayments.secret: unknown key"):
        assert expected in text, (expected, text)
    assert "whsec_not" not in text  # secrets never appear in messages
    missing = "\n".join(check({"dodopayments": {}}))
    assert "webhook_secrets: required" in missing and "products: required" in missing
    assert "payments.stripe: unknown key" in "\n".join(check({"stripe": {}}))


def test_a_bad_payments_section_stops_the_gateway() -> None:
    with pytest.raises(ConfigError) as err:
        build_app(parse_config({"payments": {"dodopayments": {"webhook_secrets": ["nope"], "products": {}}}}),
                  extra_plugins=[payments])
    assert "payments.dodopayments.webhook_secrets[0]" in str(err.value)


# ---------------------------------------------------------- hot state property


OPS = st.lists(st.one_of(
    st.tuples(st.just("reserve"), st.integers(0, 5_000)),
    st.tuples(st.just("settle"), st.integers(0, 50), st.integers(0, 100)),
    st.tuples(st.just("credit"), st.integers(1, 5_000)),
    st.tuples(st.just("deliver"), st.integers(1, 3)),
    st.tuples(st.just("redeliver"), st.integers(0, 50)),
), max_size=60)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(initial=st.integers(0, 10_000), overdraft=st.integers(0, 2_000), ops=OPS, batch=st.integers(1, 8))
def test_the_memory_credit_state_never_overdraws_and_ends_at_the_ledger(
        initial: int, overdraft: int, ops: list[tuple], batch: int) -> None:
    """Any interleaving of reserve / settle / credits booked elsewhere and brought late (or twice) by the feed.

    Settled costs are at most what was held; the store commits a credit at once, the feed delivers
    it later, in order, and may deliver one again: the cached balance takes each exactly once.
    """

    async def scenario() -> None:
        state = MemoryCreditState()
        ledger = {"balance": initial, "credits": 0, "settled": 0, "position": 0}
        feed: list[tuple[int, int]] = []  # committed, not delivered yet: (position, amount)
        delivered: list[tuple[int, int]] = []
        holds: dict[str, int] = {}
        counter = iter(range(10**6))

        async def load() -> StoreBalance:
            read = StoreBalance(ledger["balance"], ledger["position"])  # one snapshot...
            await asyncio.sleep(0)  # ...whose answer arrives after other operations
            return read

        def deliver(count: int) -> None:
            for _ in range(min(count, len(feed))):
                position, amount = feed.pop(0)
                delivered.append((position, amount))
                state.credit_from_store("acct", amount, position)

        async def check() -> None:
            available = await state.available("acct")
            if available is not None and not feed:
                assert available >= -overdraft, (available, overdraft)

        async def booked() -> bool:  # the ledger entry, committed by the op itself below
            return True

        async def run(op: tuple) -> None:
            if op[0] == "reserve":
                rid = f"r{next(counter)}"
                result = await state.reserve("acct", rid, op[1], overdraft, 3600, load)
                if result.ok:
                    holds[rid] = op[1]
            elif op[0] == "settle":
                if holds:
                    rid = sorted(holds)[op[1] % len(holds)]
                    cost = holds.pop(rid) * op[2] // 100
                    ledger["balance"] -= cost
                    ledger["settled"] += cost
                    state.settle("acct", rid, cost)
            elif op[0] == "credit":
                ledger["balance"] += op[1]
                ledger["credits"] += op[1]
                ledger["position"] += 1
                feed.append((ledger["position"], op[1]))
                credited = await state.credit("acct", op[1], booked)  # the booker's call: nothing moves in process
                assert credited.booked
            elif op[0] == "deliver":
                deliver(op[1])
            elif delivered:  # redeliver
                position, amount = delivered[op[1] % len(delivered)]
                state.credit_from_store("acct", amount, position)
            await check()

        for i in range(0, len(ops), batch):
            await asyncio.gather(*[run(op) for op in ops[i:i + batch]])
        deliver(len(feed))
        for rid in sorted(holds):
            cost = holds.pop(rid)
            ledger["balance"] -= cost
            ledger["settled"] += cost
            state.settle("acct", rid, cost)
            await check()
        available = await state.available("acct")
        if available is not None:  # cached: exactly the ledger
            assert available == initial + ledger["credits"] - ledger["settled"] == ledger["balance"]

    asyncio.run(scenario())


async def test_a_credit_during_the_first_balance_load_is_not_lost() -> None:
    state = MemoryCreditState()
    ledger = {"balance": 0, "position": 0}

    async def load() -> StoreBalance:
        read = StoreBalance(ledger["balance"], ledger["position"])  # the SELECT runs here...
        await asyncio.sleep(0)  # ...and its answer arrives after the payment was booked and delivered
        return read

    async def book() -> bool:
        ledger["balance"] += 100
        ledger["position"] += 1
        return True

    async def pay() -> None:
        assert (await state.credit("acct", 100, book)).booked  # nothing cached yet, and nothing moves here
        state.credit_from_store("acct", 100, ledger["position"])  # the feed delivers it

    await asyncio.gather(state.reserve("acct", "r1", 0, 0, 60, load), pay())
    assert await state.available("acct") == ledger["balance"] == 100


async def test_a_credit_the_balance_load_already_includes_is_not_added_again() -> None:
    state = MemoryCreditState()
    ledger = {"balance": 0, "position": 0}

    async def load() -> StoreBalance:
        return StoreBalance(ledger["balance"], ledger["position"])

    ledger["balance"] += 100
    ledger["position"] += 1  # committed...
    assert (await state.reserve("acct", "r1", 0, 0, 60, load)).ok  # ...read...
    state.credit_from_store("acct", 100, 1)  # ...and only then delivered by the feed
    assert await state.available("acct") == 100
    state.credit_from_store("acct", 50, 2)  # after the read: taken
    state.credit_from_store("acct", 50, 2)  # delivered twice: once
    assert await state.available("acct") == 150


async def test_when_the_feed_may_have_missed_credits_the_balance_is_read_again() -> None:
    state = MemoryCreditState()
    ledger = {"balance": 100, "position": 7}

    async def load() -> StoreBalance:
        return StoreBalance(ledger["balance"], ledger["position"])

    assert (await state.reserve("acct", "r1", 40, 0, 60, load)).ok
    ledger["balance"], ledger["position"] = 300, 9  # credits the feed never brought
    state.reload_balances()
    assert (await state.reserve("acct", "r2", 10, 0, 60, load)).ok
    assert await state.available("acct") == 300 - 40 - 10  # read again; the open holds stay
    state.credit_from_store("acct", 200, 9)  # the read had it
    assert await state.available("acct") == 250


async def test_a_memory_hold_that_never_settles_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    """A request that never settled (a cancelled handler) must not pin the balance forever."""
    clock = [1_000.0]
    monkeypatch.setattr("nexgate_plugins.credits.holds.memory.time.monotonic", lambda: clock[0])
    state = MemoryCreditState()

    async def load() -> int:
        return 100

    assert (await state.reserve("acct", "lost", 80, 0, 30, load)).ok
    refused = await state.reserve("acct", "next", 80, 0, 30, load)
    assert not refused.ok and refused.available_pico == 20
    clock[0] += 31  # past the lost hold's expiry: a refusal sweeps first, so this one passes
    assert (await state.reserve("acct", "next", 80, 0, 30, load)).ok
    assert await state.available("acct") == 20
    state.settle("acct", "lost", 0)  # a late settle of the expired hold changes nothing
    assert await state.available("acct") == 20
    state.settle("acct", "next", 50)
    assert await state.available("acct") == 50
