"""Secure by default: brute-force bans without a `limits` section, /v1/models inside the IP controls,
and forged secrets for a known key id that cannot turn bcrypt into a CPU weapon."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import aiohttp
import pytest

import nexgate_proxy.keys as keys
from nexgate_plugins.auth import AUTH
from nexgate_plugins.auth.cache import MAX_VERIFICATIONS_PER_KEY_ID
from nexgate_proxy.keys import BASE62_ALPHABET, KEY_PREFIX, parse_key
from nexgate_proxy.testing import FakeUpstream, Gateway, StartGateway, gateway_config

HI = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


def forged(public_id: str) -> str:
    """A well-formed key (valid checksum) for a real public key id, with a secret nobody issued."""
    body = f"{KEY_PREFIX}{public_id}_" + "".join(secrets.choice(BASE62_ALPHABET) for _ in range(32))
    key = body + keys._checksum(body)
    assert parse_key(key) is not None
    return key


def wrong_key() -> str:
    return forged("".join(secrets.choice(BASE62_ALPHABET) for _ in range(12)))


async def call(session: aiohttp.ClientSession, gw: Gateway, method: str, path: str, key: str | None,
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    h = dict(headers or {})
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    kwargs: dict[str, Any] = {"headers": h}
    if method == "POST":
        kwargs["json"] = HI
    async with session.request(method, gw.url + path, **kwargs) as resp:
        return resp.status, await resp.json()


# ------------------------------------------------------------ secure defaults


@pytest.mark.parametrize("surface", ["chat", "models"])
async def test_with_no_limits_section_wrong_keys_get_the_ip_banned(upstream: FakeUpstream, start_gateway: StartGateway,
                                                                   surface: str) -> None:
    gw = await start_gateway(gateway_config(upstream))  # no `limits` at all, like the README's minimal config
    method, path = ("POST", "/v1/chat/completions") if surface == "chat" else ("GET", "/v1/models")
    async with aiohttp.ClientSession() as session:
        for _ in range(20):  # the default budget: 20 failures per IP in 5 minutes
            status, body = await call(session, gw, method, path, wrong_key())
            assert status == 401, body
        for method2, path2 in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/v1/models/gpt-test")):
            status, body = await call(session, gw, method2, path2, gw.api_key)  # even a good key, from that IP
            assert status == 403 and body["error"]["code"] == "ip_banned", (path2, body)
            assert "15m0s" in body["error"]["message"] or "14m5" in body["error"]["message"], body


@pytest.mark.parametrize("limits", [{"brute_force": False}, {"brute_force": {"max_failures": 0, "max_key_failures": 0}}])
async def test_operators_can_turn_the_bans_off(upstream: FakeUpstream, start_gateway: StartGateway,
                                               limits: dict[str, Any]) -> None:
    gw = await start_gateway(gateway_config(upstream, limits=limits))
    async with aiohttp.ClientSession() as session:
        for _ in range(30):
            assert (await call(session, gw, "GET", "/v1/models", wrong_key()))[0] == 401
        assert (await call(session, gw, "GET", "/v1/models", gw.api_key))[0] == 200


async def test_v1_models_is_counted_by_the_ip_rate(upstream: FakeUpstream, start_gateway: StartGateway) -> None:
    gw = await start_gateway(gateway_config(upstream, limits={"ip": {"rpm": 5}}))
    async with aiohttp.ClientSession() as session:
        statuses = [(await call(session, gw, "GET", "/v1/models", gw.api_key))[0] for _ in range(3)]
        statuses += [(await call(session, gw, "GET", "/v1/models/gpt-test", gw.api_key))[0] for _ in range(2)]
        assert statuses == [200] * 5
        status, body = await call(session, gw, "GET", "/v1/models", gw.api_key)
        assert status == 429 and body["error"]["code"] == "ip_rate_limit", body
        status, body = await call(session, gw, "POST", "/v1/chat/completions", gw.api_key)
        assert status == 429 and body["error"]["code"] == "ip_rate_limit", body


# ------------------------------------------------------------ bcrypt as a weapon


async def test_forged_secrets_for_a_known_key_id_cost_bounded_bcrypt_and_the_real_key_stays_fast(
        upstream: FakeUpstream, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    verified = []
    real_verify = keys.verify_secret

    def counting(secret: str, secret_hash: str) -> bool:
        verified.append(secret)
        return real_verify(secret, secret_hash)

    monkeypatch.setattr(keys, "verify_secret", counting)
    # Real bcrypt cost; every forged request from its own address (behind a trusted proxy), so the
    # per-IP budget never trips: only the per-key-id budget and the queue cap can bound the work.
    config = gateway_config(upstream, server={"trusted_proxies": ["127.0.0.1/32"]})
    config["auth"] = {"bcrypt_rounds": 10}
    gw = await start_gateway(config)
    public_id = parse_key(gw.api_key).public_id  # type: ignore[union-attr]
    legit = {"X-Forwarded-For": "198.51.100.7"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as session:
        assert (await call(session, gw, "POST", "/v1/chat/completions", gw.api_key, legit))[0] == 200
        before = len(verified)
        statuses: list[int] = []
        gate = asyncio.Semaphore(50)

        async def attack(i: int) -> None:
            async with gate:
                headers = {"X-Forwarded-For": f"203.0.{i // 250}.{i % 250 + 1}"}
                statuses.append((await call(session, gw, "POST", "/v1/chat/completions", forged(public_id), headers))[0])

        latencies: list[float] = []

        async def real_user() -> None:
            while len(statuses) < 200 or len(latencies) < 10:
                started = time.perf_counter()
                status, body = await call(session, gw, "POST", "/v1/chat/completions", gw.api_key, legit)
                assert status == 200, body
                latencies.append(time.perf_counter() - started)
                await asyncio.sleep(0.01)

        await asyncio.gather(real_user(), *(attack(i) for i in range(200)))
    print(f"bcrypts for 200 forged keys: {len(verified) - before}; real key latency max "
          f"{max(latencies) * 1000:.0f} ms over {len(latencies)} requests; statuses {sorted(set(statuses))}")
    # 401: a bcrypt said no; 429: the key id's budget is spent (no bcrypt); 503: its verifications are busy
    assert set(statuses) <= {401, 429, 503}, statuses
    assert latencies and max(latencies) < 1.0, sorted(latencies)[-5:]
    # The attack goes on, one at a time: once 10 failures are counted it costs no bcrypt at all.
    later: list[int] = []
    async with aiohttp.ClientSession() as session:
        for i in range(20):
            status, body = await call(session, gw, "POST", "/v1/chat/completions", forged(public_id),
                                      {"X-Forwarded-For": f"192.0.2.{i + 1}"})
            later.append(status)
        assert later[-5:] == [429] * 5 and body["error"]["code"] == "key_verification_limited", (later, body)
        assert (await call(session, gw, "POST", "/v1/chat/completions", gw.api_key, legit))[0] == 200
    bcrypts = len(verified) - before
    # 10 failures lock the key id; at most MAX_VERIFICATIONS_PER_KEY_ID more were already running.
    assert bcrypts <= 10 + MAX_VERIFICATIONS_PER_KEY_ID, bcrypts
    assert gw.app[AUTH].bcrypt_skipped >= 220 - bcrypts - 1


@pytest.mark.redis
async def test_the_key_id_budget_is_shared_through_redis(upstream: FakeUpstream, start_gateway: StartGateway,
                                                         redis_url: str) -> None:
    config = gateway_config(upstream, server={"trusted_proxies": ["127.0.0.1/32"]}, state={"url": redis_url},
                            limits={"redis_prefix": f"abuse-{secrets.token_hex(4)}",
                                    "brute_force": {"max_key_failures": 3}})
    gw = await start_gateway(config)
    public_id = parse_key(gw.api_key).public_id  # type: ignore[union-attr]
    auth = gw.app[AUTH]
    real = {"X-Forwarded-For": "198.51.100.1"}
    async with aiohttp.ClientSession() as session:
        assert (await call(session, gw, "GET", "/v1/models", gw.api_key, real))[0] == 200
        for i in range(3):
            headers = {"X-Forwarded-For": f"192.0.2.{i + 1}"}
            status, body = await call(session, gw, "GET", "/v1/models", forged(public_id), headers)
            assert status == 401 and "Incorrect API key" in body["error"]["message"]
        calls, lookups = auth.bcrypt_calls, auth.store_lookups
        status, body = await call(session, gw, "GET", "/v1/models", forged(public_id), {"X-Forwarded-For": "192.0.2.50"})
        assert status == 429 and body["error"]["code"] == "key_verification_limited", body
        assert (auth.bcrypt_calls, auth.store_lookups) == (calls, lookups)  # no bcrypt, not even a lookup
        # The verified key keeps working during the lock, from anywhere.
        assert (await call(session, gw, "GET", "/v1/models", gw.api_key, real))[0] == 200
        assert (await call(session, gw, "GET", "/v1/models", gw.api_key, {"X-Forwarded-For": "192.0.2.50"}))[0] == 200
