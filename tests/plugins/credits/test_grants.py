"""Grants and adjustments: plain decimals, refs applied once and never to a second account, CLI and admin API alike."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import AsyncIterator

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from nexgate_plugins.credits import CREDITS
from nexgate_plugins.credits.grants import GrantError, parse_usd
from nexgate_proxy import cli
from nexgate_proxy.appkeys import STORE
from nexgate_proxy.money import usd_to_pico
from nexgate_proxy.store import open_store
from nexgate_proxy.testing import FakeUpstream, gateway_config
from tests.cli_runner import Cli
from tests.plugins.admin.test_admin_api import Admin, admin_auth


def usd(text: str) -> int:
    return usd_to_pico(Decimal(text))


def test_amounts_are_plain_decimals_only() -> None:
    assert parse_usd("10") == usd("10") and parse_usd("$2.50") == usd("2.5")
    assert parse_usd(" 0.000000000001 ") == 1 and parse_usd("-3", signed=True) == -usd("3")
    for text in ("1e3", "1E3", "1_000", "1,000", "+5", "0x10", "NaN", "Infinity", "", ".5", "5.", "0", "0.00",
                 "-3", "１０", "0.0000000000001", "99999999"):
        with pytest.raises(GrantError):
            parse_usd(text)
    with pytest.raises(GrantError):
        parse_usd("-0", signed=True)


async def test_the_cli_refuses_exponents_and_a_ref_used_for_another_account(store_url: str,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert await asyncio.to_thread(cli.main, ["db", "migrate", "--storage-url", store_url]) == 0
    async with await open_store(store_url) as store:
        ann = await store.create_user(email="ann@example.com")
        bob = await store.create_user(email="bob@example.com")
    run = Cli(capsys, "--storage-url", store_url)
    assert "plain decimal" in await run.fails("credits", "grant", ann.id, "1e3", "--reason", "typo")
    assert (await run.json("credits", "grant", ann.id, "5", "--reason", "promo", "--ref", "r-1"))["applied"]
    # The same ref, the same account: idempotent, exit 0.
    again = await run.json("credits", "grant", ann.id, "5", "--reason", "promo", "--ref", "r-1")
    assert again["applied"] is False and again["balance_usd"] == "5"
    # The same ref for another account: an error naming the account that has it, nothing booked.
    error = await run.fails("credits", "grant", bob.id, "5", "--reason", "promo", "--ref", "r-1")
    assert ann.id in error and "r-1" in error
    assert ann.id in await run.fails("credits", "adjust", bob.id, "-1", "--reason", "fix", "--ref", "r-1")
    assert "$5" in await run.fails("credits", "grant", ann.id, "6", "--reason", "promo", "--ref", "r-1")
    # Adjustments are signed; grants are not.
    adjusted = await run.json("credits", "adjust", ann.id, "-1.25", "--reason", "correction", "--ref", "a-1")
    assert adjusted["object"] == "adjustment" and adjusted["balance_usd"] == "3.75"
    assert "plain decimal" in await run.fails("credits", "grant", ann.id, "-1", "--reason", "x")
    async with await open_store(store_url) as store:
        assert await store.get_balance(bob.id) == 0
        assert await store.get_balance(ann.id) == await store.ledger_sum(ann.id) == usd("3.75")


@pytest.fixture(scope="module")
def clerk_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
async def admin(upstream: FakeUpstream, start_gateway, store_url: str,
                clerk_key: rsa.RSAPrivateKey) -> AsyncIterator[Admin]:
    gw = await start_gateway(gateway_config(upstream, storage={"url": store_url}, auth=admin_auth(clerk_key)))
    async with aiohttp.ClientSession() as session:
        yield Admin(gw, session, clerk_key)


async def test_the_superadmin_grants_and_adjusts_over_http(admin: Admin) -> None:
    gw = admin.gw
    store = gw.app[STORE]
    other = await store.create_user(email="other@example.com")
    body = {"account_id": gw.user_id, "amount_usd": "2.500000000001", "reason": "support", "ref": "t-1"}
    reply = await admin.call("POST", "/credits/grants", json_body=body)
    assert reply.status == 201, reply.body
    assert reply.body == {"object": "grant", "applied": True, "account_id": gw.user_id, "account_type": "user",
                          "external_id": "grant:t-1", "reason": "support", "amount_usd": "2.500000000001",
                          "amount_pico": usd("2.500000000001"), "balance_usd": "2.500000000001",
                          "balance_pico": usd("2.500000000001")}
    again = await admin.call("POST", "/credits/grants", json_body=body)
    assert again.status == 200 and again.body["applied"] is False
    # The ref is the CLI's too: reusing it for another account is a 409 naming the first.
    reused = await admin.call("POST", "/credits/grants", json_body={**body, "account_id": other.id})
    assert reused.status == 409 and gw.user_id in reused.error["message"] and reused.error["param"] == "ref"
    down = await admin.call("POST", "/credits/adjustments",
                            json_body={"account_id": gw.user_id, "amount_usd": "-0.5", "reason": "overcharge fix"})
    assert down.status == 201 and down.body["object"] == "adjustment" and down.body["balance_usd"] == "2.000000000001"
    for bad_body, param in [({**body, "amount_usd": "1e3", "ref": "t-2"}, "amount_usd"),
                            ({**body, "amount_usd": "-1", "ref": "t-3"}, "amount_usd"),
                            ({**body, "amount_usd": 5}, "amount_usd"),
                            ({"account_id": gw.user_id, "amount_usd": "1"}, "reason"),
                            ({**body, "reason": "two\nlines", "ref": "t-4"}, "reason")]:
        reply = await admin.call("POST", "/credits/grants", json_body=bad_body)
        assert (reply.status, reply.error["param"]) == (400, param), (bad_body, reply.body)
    missing = await admin.call("POST", "/credits/grants", json_body={**body, "account_id": "usr_nobody"})
    assert missing.status == 404
    # Only the superadmin: a user granting themself credit is refused.
    token = admin.jwt("user_clerk_self")
    assert (await admin.call("GET", "/me", token)).status == 200
    refused = await admin.call("POST", "/credits/grants", token, json_body={**body, "ref": "self"})
    assert refused.status == 403
    assert await store.get_balance(gw.user_id) == await store.ledger_sum(gw.user_id) == usd("2.000000000001")
    assert await store.get_balance(other.id) == 0
    # The gateway's cached balance took both, once.
    state = gw.app[CREDITS].state
    assert (await state.reserve(gw.user_id, "probe", 0, 0, 60, lambda: gw.app[CREDITS].load_balance(
        store, gw.user_id))).ok
    assert await state.available(gw.user_id) == usd("2.000000000001")
