"""Prepaid credits end to end: exact charges, 402s, one debit per answer, holds under concurrency."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import aiohttp
import openai
import pytest

from nexgate_proxy.appkeys import STORE
from nexgate_proxy.money import usd_to_pico
from nexgate_proxy.store import NewLedgerEntry
from nexgate_plugins.usage_log import OUTBOX
from nexgate_proxy.testing import FakeUpstream, Gateway, gateway_config

PRICE = {"input": "1.5", "output": "2", "cached_input": "0.5"}  # USD per 1M tokens


def priced_config(upstream: FakeUpstream, **sections) -> dict:
    config = gateway_config(upstream, **sections)
    config["models"]["gpt-paid"] = {"route": [{"provider": "fake", "model": "upstream-model"}], "price": PRICE}
    return config


async def grant(gw: Gateway, usd: str, account_id: str | None = None, ref: str = "grant-1") -> None:
    await gw.app[STORE].apply_ledger_entry(NewLedgerEntry(
        account_id=account_id or gw.user_id, kind="grant", amount_pico=usd_to_pico(Decimal(usd)),
        source="test", external_id=ref))


async def test_a_request_is_charged_exactly_once_to_the_pico_dollar(upstream: FakeUpstream, start_gateway) -> None:
    gw = await start_gateway(priced_config(upstream))
    await grant(gw, "1")
    raw = await gw.openai_client().chat.completions.with_raw_response.create(
        model="gpt-paid", max_tokens=100, messages=[{"role": "user", "content": "hi"}])
    # Upstream reports 11 prompt tokens (3 cached) and 7 completion tokens.
    expected = 8 * 1_500_000 + 3 * 500_000 + 7 * 2_000_000  # pico-USD
    assert raw.headers["x-nexgate-cost-usd"] == "0.0000275"
    assert expected == usd_to_pico(Decimal("0.0000275"))
    assert await gw.app[OUTBOX].flush()
    store = gw.app[STORE]
    rows = await store.list_usage(account_id=gw.user_id)
    assert len(rows) == 1
    assert (rows[0].actual_cost_pico, rows[0].prompt_tokens, rows[0].completion_tokens) == (expected, 11, 7)
    assert rows[0].estimated_cost_pico >= expected
    assert await store.get_balance(gw.user_id) == usd_to_pico(Decimal(1)) - expected
    assert await store.ledger_sum(gw.user_id) == await store.get_balance(gw.user_id)
    # Flushing again, or replaying, books nothing twice.
    assert await gw.app[OUTBOX].flush()
    assert len(await store.list_ledger(gw.user_id)) == 2


async def test_no_balance_is_a_402_and_nothing_goes_upstream(upstream: FakeUpstream, start_gateway) -> None:
    gw = await start_gateway(priced_config(upstream))
    with pytest.raises(openai.APIStatusError) as err:
        await gw.openai_client().chat.completions.create(model="gpt-paid", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 402
    assert err.value.body["code"] == "insufficient_credits"
    assert upstream.received == []
    # Free models still work.
    assert (await gw.openai_client().embeddings.create(model="gpt-test", input="x")).data


async def test_failed_upstream_calls_cost_nothing(upstream: FakeUpstream, start_gateway) -> None:
    gw = await start_gateway(priced_config(upstream))
    await grant(gw, "1")
    upstream.behaviour.status = 500
    with pytest.raises(openai.APIStatusError):
        await gw.openai_client().chat.completions.create(model="gpt-paid", messages=[{"role": "user", "content": "hi"}])
    assert await gw.app[OUTBOX].flush()
    assert await gw.app[STORE].get_balance(gw.user_id) == usd_to_pico(Decimal(1))
    rows = await gw.app[STORE].list_usage(account_id=gw.user_id)
    assert rows[0].status == 502 and rows[0].actual_cost_pico == 0


async def test_a_client_that_hangs_up_pays_for_what_was_produced(upstream: FakeUpstream, start_gateway) -> None:
    gw = await start_gateway(priced_config(upstream))
    await grant(gw, "1")
    upstream.behaviour.words = ["w"] * 200
    upstream.behaviour.chunk_delay = 0.01
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {gw.api_key}"}) as session:
        resp = await session.post(gw.openai_base + "/chat/completions",
                                  json={"model": "gpt-paid", "stream": True, "max_tokens": 500, "messages": []})
        for _ in range(5):
            await resp.content.readline()
        resp.close()
    for _ in range(100):
        await gw.app[OUTBOX].flush()
        rows = await gw.app[STORE].list_usage(account_id=gw.user_id)
        if rows:
            break
        await asyncio.sleep(0.05)
    row = rows[0]
    assert row.status == 499 and row.usage_estimated
    assert 0 < row.completion_tokens < 200
    assert row.actual_cost_pico > 0
    assert await gw.app[STORE].get_balance(gw.user_id) == usd_to_pico(Decimal(1)) - row.actual_cost_pico


async def _hammer(gateways: list[Gateway], n: int) -> list[int]:
    async def one(i: int) -> int:
        gw = gateways[i % len(gateways)]
        async with session.post(gw.openai_base + "/chat/completions",
                                json={"model": "gpt-exact", "max_tokens": 7, "messages": []},
                                headers={"Authorization": f"Bearer {gw.api_key}"}) as resp:
            body = await resp.read()
            if resp.status not in (200, 402):
                print(resp.status, body[:300])
            return resp.status

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200)) as session:
        return await asyncio.gather(*[one(i) for i in range(n)])


def exact_config(upstream: FakeUpstream, **sections) -> dict:
    # Input is free and the fake always answers 7 tokens: the hold equals the actual cost.
    config = gateway_config(upstream, **sections)
    config["models"]["gpt-exact"] = {"route": [{"provider": "fake", "model": "m"}],
                                     "price": {"input": 0, "output": "1"}}
    return config


async def test_concurrent_requests_never_overdraw_in_process(upstream: FakeUpstream, start_gateway) -> None:
    gw = await start_gateway(exact_config(upstream))
    await grant(gw, "0.00007")  # 10 requests of 7 tokens at 1 USD / 1M
    statuses = await _hammer([gw], 200)
    assert statuses.count(200) == 10 and statuses.count(402) == 190
    assert await gw.app[OUTBOX].flush()
    assert await gw.app[STORE].get_balance(gw.user_id) == 0


@pytest.mark.postgres
@pytest.mark.redis
async def test_two_instances_share_one_balance(upstream: FakeUpstream, start_gateway, postgres_url: str,
                                               redis_url: str) -> None:
    import secrets
    # A fresh Redis key space: the hot balance is cached per account.
    shared = exact_config(upstream, storage={"url": postgres_url}, state={"url": redis_url})
    first = await start_gateway(shared)
    second = await start_gateway(shared)
    second.api_key, second.user_id = first.api_key, first.user_id  # one account, two doors
    await grant(first, "0.00007", ref=secrets.token_hex(4))
    statuses = await _hammer([first, second], 200)
    assert statuses.count(200) == 10 and statuses.count(402) == 190
    for gw in (first, second):
        assert await gw.app[OUTBOX].flush()
    store = first.app[STORE]
    rows = await store.list_usage(account_id=first.user_id, limit=1000)
    assert sum(r.actual_cost_pico or 0 for r in rows) == usd_to_pico(Decimal("0.00007"))
    assert await store.get_balance(first.user_id) == 0 == await store.ledger_sum(first.user_id)
