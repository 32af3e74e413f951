"""One Redis client per gateway process: one data connection, one subscriber connection, one breaker.

Real gateways on sockets with the rate limits and the credits both on Redis; the connections are
read off Redis's own ``CLIENT LIST``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from decimal import Decimal

import aiohttp
import pytest

from nexgate_plugins.ratelimit import LIMITER
from nexgate_proxy.accounts import create_api_key
from nexgate_proxy.appkeys import STORE
from nexgate_proxy.money import usd_to_pico
from nexgate_proxy.state.bus import RedisBus
from nexgate_proxy.state.redis import RedisClient, RedisScripts
from nexgate_proxy.store import NewLedgerEntry
from nexgate_proxy.testing import FakeUpstream, Gateway, StartGateway, gateway_config
from tests.core.test_bus import client_list

PRICE = {"input": "1", "output": "1"}  # USD per 1M tokens


def both_on_redis(upstream: FakeUpstream, url: str, **limits: object) -> dict:
    config = gateway_config(upstream, state={"url": url},
                            limits={"key": {"rpm": 1000, "concurrent": 10}, **limits})
    config["models"]["gpt-paid"] = {"route": [{"provider": "fake", "model": "upstream-model"}], "price": PRICE}
    return config


async def grant(gw: Gateway, account_id: str, usd: str = "1") -> None:
    await gw.app[STORE].apply_ledger_entry(NewLedgerEntry(
        account_id=account_id, kind="grant", amount_pico=usd_to_pico(Decimal(usd)), source="test",
        external_id=f"grant-{account_id}"))


async def another_paying_user(gw: Gateway) -> str:
    """A second account with credits: its first request has no lease yet, so it must call Redis."""
    user = await gw.app[STORE].create_user(email="second@example.com", name="Second")
    key = await create_api_key(gw.app[STORE], name="second", user_id=user.id, bcrypt_rounds=4)
    await grant(gw, user.id)
    return key.plaintext


async def chat(session: aiohttp.ClientSession, gw: Gateway, api_key: str) -> tuple[int, dict, float]:
    started = time.monotonic()
    async with session.post(f"{gw.openai_base}/chat/completions", headers={"Authorization": f"Bearer {api_key}"},
                            json={"model": "gpt-paid", "max_tokens": 20,
                                  "messages": [{"role": "user", "content": "hi"}]}) as resp:
        return resp.status, await resp.json(), time.monotonic() - started


def named(clients: list[dict[str, str]], name: str) -> int:
    return sum(1 for c in clients if c.get("name") == name)


@pytest.mark.redis
async def test_a_gateway_holds_one_data_connection_and_one_subscriber_connection(
        upstream: FakeUpstream, start_gateway: StartGateway, redis_url: str) -> None:
    data, subscriber = f"nexgate-{os.getpid()}", f"nexgate-bus-{os.getpid()}"
    before = await client_list(redis_url)
    gw = await start_gateway(both_on_redis(upstream, redis_url, redis_prefix=f"test:one:{os.urandom(4).hex()}"))
    await grant(gw, gw.user_id)
    async with aiohttp.ClientSession() as session:
        for _ in range(3):  # the rate limiter and the credit holds both call Redis
            status, body, _ = await chat(session, gw, gw.api_key)
            assert status == 200, body
    assert gw.app[LIMITER].redis.round_trips >= 3
    after = await client_list(redis_url)
    assert named(after, data) - named(before, data) == 1
    assert named(after, subscriber) - named(before, subscriber) == 1


async def circuit_open(session: aiohttp.ClientSession, gw: Gateway) -> bool:
    async with session.get(gw.url + "/metrics") as resp:
        return "nexgate_ratelimit_circuit_open 1.0" in await resp.text()


async def test_one_breaker_opens_for_both_plugins_and_closes_for_both(
        upstream: FakeUpstream, start_gateway: StartGateway,
        own_redis: tuple[str, subprocess.Popen]) -> None:
    url, proc = own_redis
    gw = await start_gateway(both_on_redis(upstream, url, redis_timeout_ms=50))
    await grant(gw, gw.user_id)
    second_key = await another_paying_user(gw)
    limiter = gw.app[LIMITER]
    async with aiohttp.ClientSession() as session:
        assert (await chat(session, gw, gw.api_key))[0] == 200
        os.kill(proc.pid, signal.SIGSTOP)  # Redis stops answering; its connections stay open
        try:
            # The rate limiter's calls time out (50 ms) and open the breaker; its limits go in-process.
            # The first account's credit holds come from its lease, without Redis.
            for _ in range(4):
                assert (await chat(session, gw, gw.api_key))[0] == 200
            assert await circuit_open(session, gw)
            # The credit holds share that breaker: a new account's first hold, which needs Redis, fails
            # at once instead of waiting out the credits' own 1 s timeout.
            status, body, took = await chat(session, gw, second_key)
            assert (status, body["error"]["code"]) == (503, "credits_unavailable")
            assert took < 0.4
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        # The one probe sees Redis back and closes the breaker for both.
        deadline = time.monotonic() + 10
        while await circuit_open(session, gw):
            assert time.monotonic() < deadline, "the circuit stayed open"
            await asyncio.sleep(0.1)
        fallbacks = limiter.fallback_decisions
        status, body, _ = await chat(session, gw, second_key)
        assert status == 200, body  # the credit hold grew its lease in Redis
        assert limiter.fallback_decisions == fallbacks  # and the limits were decided by Redis again


@pytest.mark.redis
async def test_scripts_registered_on_a_connected_client_are_there_for_their_first_call(redis_url: str) -> None:
    client = RedisClient(redis_url)
    await client.start()
    try:
        first = RedisScripts(client, {"seven": "return 7"}, label="first")
        # A plugin started later: its script is loaded on the open connection, ahead of its first call.
        second = RedisScripts(client, {"eight": "return 8"}, label="second")
        assert await first.call("seven", [], []) == 7 and await second.call("eight", [], []) == 8
        assert (first.round_trips, second.round_trips) == (1, 1)  # no NOSCRIPT and reload
        assert first.breaker is second.breaker is client.breaker
    finally:
        await client.close()


async def test_a_bus_on_an_open_circuit_reports_not_sent_at_once() -> None:
    client = RedisClient("redis://127.0.0.1:1/0")
    bus = RedisBus(client, connect_timeout=0.2)
    heard: list[tuple[str, str]] = []
    bus.subscribe(lambda kind, value: heard.append((kind, value)))
    await bus.start()
    try:
        for _ in range(client.breaker.threshold):
            client.breaker.failure()
        started = time.monotonic()
        assert [await bus.publish("api_key", str(i)) for i in range(100)] == [False] * 100
        assert time.monotonic() - started < 0.05  # no connection attempt behind an open circuit
        assert heard == [("api_key", str(i)) for i in range(100)]  # delivered locally all the same
    finally:
        await bus.close()
        await client.close()
