"""Rate limits, IP controls and brute-force bans, end to end through real gateways."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from nexgate_proxy import Identity, RequestContext
from nexgate_proxy.accounts import create_api_key
from nexgate_proxy.app import build_app
from nexgate_proxy.appkeys import STORE
from nexgate_proxy.config import ConfigError, parse_config
from nexgate_proxy.estimate import estimate_prompt_tokens
from nexgate_proxy.keys import generate_key
from nexgate_proxy.store import open_store
from nexgate_plugins.auth import AUTH
from nexgate_plugins.ratelimit import LIMITER
from nexgate_plugins.ratelimit.limiter import RateLimiter, format_duration
from nexgate_plugins.ratelimit.settings import LimitSettings, Quota
from nexgate_proxy.testing import FakeUpstream, Gateway, StartGateway, gateway_config
from tests.plugins.ratelimit.test_counters import wire_commands

CHAT = "/v1/chat/completions"
HI = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


def reserved_tokens(body: dict, max_tokens: int) -> int:
    """What the limiter reserves for a body aiohttp sends with json=: its prompt estimate plus the cap."""
    return estimate_prompt_tokens(body, len(json.dumps(body).encode())) + max_tokens


def prefix() -> str:
    return f"test:rl:{secrets.token_hex(6)}"


async def post(session: aiohttp.ClientSession, gw: Gateway, key: str | None, body: dict[str, Any] | None = None,
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], dict[str, Any]]:
    h = dict(headers or {})
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    async with session.post(gw.url + CHAT, json=body or HI, headers=h) as resp:
        return resp.status, dict(resp.headers), json.loads(await resp.read())


async def burst(gateways: list[Gateway], key: str, n: int, concurrency: int = 50) -> list[tuple[int, dict, dict]]:
    """n requests spread round-robin over the gateways, at most `concurrency` in flight."""
    gate = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one(i: int) -> tuple[int, dict, dict]:
            async with gate:
                return await post(session, gateways[i % len(gateways)], key)
        return await asyncio.gather(*[one(i) for i in range(n)])


def count_redis_calls(gw: Gateway) -> list[str]:
    """The name of every command the gateway's rate limiter writes to Redis, read off the wire."""
    return wire_commands(gw.app[LIMITER].redis)  # type: ignore[arg-type]


# ----------------------------------------------------------------- headers


def test_reset_is_written_like_openai() -> None:
    assert [format_duration(ms) for ms in (0, 20, 1000, 1500, 59_990, 60_000, 360_000, 3_723_000)] == \
        ["0s", "20ms", "1s", "1.5s", "59.99s", "1m0s", "6m0s", "1h2m3s"]


async def test_headers_on_successes_and_errors(upstream: FakeUpstream, start_gateway: StartGateway) -> None:
    gw = await start_gateway(gateway_config(upstream, limits={"key": {"rpm": 10, "tpm": 10_000}}))
    async with aiohttp.ClientSession() as session:
        status, headers, _ = await post(session, gw, gw.api_key)
        assert status == 200
        assert headers["x-ratelimit-limit-requests"] == "10"
        assert headers["x-ratelimit-remaining-requests"] == "9"
        assert re.fullmatch(r"(\d+(\.\d+)?s|1m0s)", headers["x-ratelimit-reset-requests"])
        assert headers["x-ratelimit-limit-tokens"] == "10000"
        assert 0 < int(headers["x-ratelimit-remaining-tokens"]) < 10_000
        assert headers["x-ratelimit-reset-tokens"]
        # An error after admission carries them too.
        status, headers, body = await post(session, gw, gw.api_key, {"model": "no-such-model"})
        assert status == 404 and headers["x-ratelimit-remaining-requests"] == "8"
        # The provider's own rate limit headers never reach the client; ours do.
        assert "999" not in headers.values()


async def test_no_limits_configured_costs_a_good_request_no_state_call(upstream: FakeUpstream,
                                                                       start_gateway: StartGateway) -> None:
    gw = await start_gateway(gateway_config(upstream))
    limiter = gw.app[LIMITER]
    async with aiohttp.ClientSession() as session:
        for _ in range(5):
            status, headers, _ = await post(session, gw, gw.api_key)
            assert status == 200 and not any(h.startswith("x-ratelimit") for h in headers)
        assert limiter.state_calls == 0
        await post(session, gw, "ngk_bad")
    assert limiter.state_calls == 1  # brute-force counting is on by default: only the failure is counted


# ------------------------------------------------------------ exactly N


async def test_1000_requests_against_100_per_minute_in_process(upstream: FakeUpstream,
                                                               start_gateway: StartGateway) -> None:
    gw = await start_gateway(gateway_config(upstream, limits={"key": {"rpm": 100}}))
    results = await burst([gw], gw.api_key, 1000)
    statuses = [status for status, _, _ in results]
    assert statuses.count(200) == 100 and statuses.count(429) == 900
    assert len(upstream.received) == 100
    refused = next(r for r in results if r[0] == 429)
    assert refused[2]["error"]["code"] == "rate_limit_requests"
    assert refused[2]["error"]["type"] == "rate_limit_error"
    assert 1 <= int(refused[1]["Retry-After"]) <= 60 and refused[1]["x-ratelimit-remaining-requests"] == "0"


@pytest.mark.postgres
@pytest.mark.redis
async def test_1000_requests_over_two_instances_on_redis(upstream: FakeUpstream, start_gateway: StartGateway,
                                                         postgres_url: str, redis_url: str) -> None:
    # This process runs the client, both gateways and the upstream on one event loop, whose lag counts
    # against Redis timeouts; a generous timeout keeps a busy loop from failing over to in-process limits.
    shared = gateway_config(upstream, storage={"url": postgres_url}, state={"url": redis_url},
                            limits={"key": {"rpm": 100}, "redis_prefix": prefix(), "redis_timeout_ms": 2000})
    first = await start_gateway(shared)
    second = await start_gateway(shared)
    first_calls, second_calls = count_redis_calls(first), count_redis_calls(second)
    results = await burst([first, second], first.api_key, 1000)
    statuses = [status for status, _, _ in results]
    assert statuses.count(200) == 100 and statuses.count(429) == 900
    assert len(upstream.received) == 100
    # Both instances served some of the 100, so the limit really was shared.
    served_by = {gw.port for gw, (status, _, _) in zip([first, second] * 500, results) if status == 200}
    assert served_by == {first.port, second.port}
    # At most one round trip per request; refusals known to be final are answered without one.
    total = len(first_calls) + len(second_calls)
    assert set(first_calls + second_calls) == {"EVALSHA"}
    assert first.app[LIMITER].fallback_decisions == second.app[LIMITER].fallback_decisions == 0
    assert 100 <= total <= 1000
    logging.getLogger("nexgate.test").warning("redis round trips for 1000 requests on 2 instances: %d", total)


@pytest.mark.redis
async def test_redis_round_trips_per_request(upstream: FakeUpstream, start_gateway: StartGateway,
                                             redis_url: str) -> None:
    every_limit = {"key": {"rpm": 1000, "tpm": 1_000_000, "concurrent": 50}, "ip": {"rpm": 1000},
                   "brute_force": {"max_failures": 50}, "redis_prefix": prefix()}
    gw = await start_gateway(gateway_config(upstream, state={"url": redis_url}, limits=every_limit))
    calls = count_redis_calls(gw)
    async with aiohttp.ClientSession() as session:
        for _ in range(20):
            assert (await post(session, gw, gw.api_key))[0] == 200
    # One EVALSHA checks everything; one more settles tokens and frees the slot.
    assert calls == ["EVALSHA"] * 40

    # Requests-per-minute only: the second admit also leases 16 entries (a limit's first lease, see
    # window_leases), and the next 18 requests are admitted from leases without waiting for Redis
    # (the next lease is asked for in the background when one is a quarter used).
    rpm_only = {"key": {"rpm": 1000}, "redis_prefix": prefix()}
    gw2 = await start_gateway(gateway_config(upstream, state={"url": redis_url}, limits=rpm_only))
    calls2 = count_redis_calls(gw2)
    remaining = []
    async with aiohttp.ClientSession() as session:
        for _ in range(20):
            status, headers, _ = await post(session, gw2, gw2.api_key)
            assert status == 200
            remaining.append(int(headers["x-ratelimit-remaining-requests"]))
    assert remaining == list(range(999, 979, -1))
    async with aiohttp.ClientSession() as session:
        async with session.get(gw2.url + "/metrics") as resp:
            assert "nexgate_ratelimit_leased_admits_total 18.0" in await resp.text()
    # Two admits, the asks ahead (16 -> 31 entries, at most 1/32 of the limit), and perhaps the give-back
    # of unused entries if a lease's span ended meanwhile.
    assert 2 <= calls2.count("EVALSHA") <= 6 and set(calls2) == {"EVALSHA"}


# ------------------------------------------------------------------ tokens


async def test_tokens_per_minute_are_reserved_then_charged_from_usage(upstream: FakeUpstream,
                                                                      start_gateway: StartGateway) -> None:
    body = {**HI, "max_tokens": 50}
    reserve = reserved_tokens(body, 50)
    used_per_request = 11 + 7  # what the fake upstream reports
    tpm = 2 * used_per_request + reserve
    assert 2 * reserve > tpm  # without correction from usage the 2nd request would be refused
    gw = await start_gateway(gateway_config(upstream, limits={"key": {"tpm": tpm}}))
    async with aiohttp.ClientSession() as session:
        results = [await post(session, gw, gw.api_key, body) for _ in range(4)]
    assert [r[0] for r in results] == [200, 200, 200, 429]
    assert results[0][1]["x-ratelimit-remaining-tokens"] == str(tpm - reserve)
    assert results[2][1]["x-ratelimit-remaining-tokens"] == str(tpm - 2 * used_per_request - reserve)
    refused = results[3]
    assert refused[2]["error"]["code"] == "rate_limit_tokens" and int(refused[1]["Retry-After"]) >= 1
    # Streams are charged from their usage too; a request larger than the whole budget is refused outright.
    async with aiohttp.ClientSession() as session:
        status, _, err = await post(session, gw, gw.api_key, {**HI, "max_tokens": 500})
    assert status == 429 and "too large" in err["error"]["message"]


async def test_streams_are_charged_from_their_usage(upstream: FakeUpstream, start_gateway: StartGateway) -> None:
    body = {**HI, "max_tokens": 50, "stream": True}
    reserve = reserved_tokens(body, 50)
    used = 11 + 3  # the fake stream's usage chunk: 11 prompt tokens, one per word
    tpm = 2 * used + reserve
    assert 2 * reserve > tpm
    gw = await start_gateway(gateway_config(upstream, limits={"key": {"tpm": tpm}}))
    statuses, remaining = [], []
    async with aiohttp.ClientSession() as session:
        for _ in range(4):
            async with session.post(gw.url + CHAT, json=body,
                                    headers={"Authorization": f"Bearer {gw.api_key}"}) as resp:
                await resp.read()
                statuses.append(resp.status)
                remaining.append(resp.headers.get("x-ratelimit-remaining-tokens"))
    assert statuses == [200, 200, 200, 429]
    assert remaining[2] == str(tpm - 2 * used - reserve)


# -------------------------------------------------------------- concurrency


async def test_concurrency_limit_with_streams_held_open(upstream: FakeUpstream,
                                                        start_gateway: StartGateway) -> None:
    gw = await start_gateway(gateway_config(upstream, limits={"key": {"concurrent": 2}}))
    upstream.behaviour.chunk_delay = 0.15
    stream = {**HI, "stream": True}
    headers = {"Authorization": f"Bearer {gw.api_key}"}
    async with aiohttp.ClientSession() as session:
        held = [await session.post(gw.url + CHAT, json=stream, headers=headers) for _ in range(2)]
        assert [r.status for r in held] == [200, 200]
        status, resp_headers, err = await post(session, gw, gw.api_key)
        assert status == 429 and err["error"]["code"] == "concurrency_limit" and resp_headers["Retry-After"]
        for resp in held:
            assert b"[DONE]" in await resp.read()  # the slot is free before the last byte
            resp.release()
        assert (await post(session, gw, gw.api_key))[0] == 200
        # A client that walks away mid-stream frees its slot too.
        gone = [await session.post(gw.url + CHAT, json=stream, headers=headers) for _ in range(2)]
        for resp in gone:
            resp.close()
        upstream.behaviour.chunk_delay = 0
        deadline = time.monotonic() + 3
        while (status := (await post(session, gw, gw.api_key))[0]) == 429 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert status == 200


# --------------------------------------------------------------------- IPs


async def test_ip_rate_applies_before_authentication(upstream: FakeUpstream, start_gateway: StartGateway) -> None:
    gw = await start_gateway(gateway_config(upstream, limits={"ip": {"rpm": 3}}))
    auth = gw.app[AUTH]
    async with aiohttp.ClientSession() as session:
        results = [await post(session, gw, generate_key().plaintext) for _ in range(5)]
        assert [r[0] for r in results] == [401, 401, 401, 429, 429]
        assert results[3][2]["error"]["code"] == "ip_rate_limit" and int(results[3][1]["Retry-After"]) >= 1
        assert auth.store_lookups == 3  # the refused ones never reached the key lookup
        status, _, body = await post(session, gw, gw.api_key)
    assert status == 429 and body["error"]["code"] == "ip_rate_limit"


async def test_spoofed_forwarded_for_does_not_dodge_the_ip_limit(upstream: FakeUpstream,
                                                                 start_gateway: StartGateway) -> None:
    untrusted = await start_gateway(gateway_config(upstream, limits={"ip": {"rpm": 3}},
                                                   server={"trusted_proxies": ["10.0.0.0/8"]}))
    async with aiohttp.ClientSession() as session:
        statuses = [(await post(session, untrusted, untrusted.api_key,
                                headers={"X-Forwarded-For": f"198.51.100.{i}"}))[0] for i in range(6)]
    assert statuses == [200, 200, 200, 429, 429, 429]
    # Through a trusted proxy the forwarded client is the one limited.
    trusted = await start_gateway(gateway_config(upstream, limits={"ip": {"rpm": 3}},
                                                 server={"trusted_proxies": ["127.0.0.1/32", "::1/128"]}))
    async with aiohttp.ClientSession() as session:
        distinct = [(await post(session, trusted, trusted.api_key,
                                headers={"X-Forwarded-For": f"198.51.100.{i}"}))[0] for i in range(6)]
        same = [(await post(session, trusted, trusted.api_key,
                            headers={"X-Forwarded-For": "203.0.113.7"}))[0] for _ in range(4)]
    assert distinct == [200] * 6 and same == [200, 200, 200, 429]


async def test_ipv6_clients_are_limited_per_64(upstream: FakeUpstream, start_gateway: StartGateway) -> None:
    gw = await start_gateway(gateway_config(upstream, limits={"ip": {"rpm": 2}},
                                            server={"trusted_proxies": ["127.0.0.1/32", "::1/128"]}))
    async with aiohttp.ClientSession() as session:
        async def from_(ip: str) -> int:
            return (await post(session, gw, gw.api_key, headers={"X-Forwarded-For": ip}))[0]

        # Addresses of one /64 (one end site) share a budget; another /64 has its own.
        assert [await from_(ip) for ip in ("2001:db8::1", "2001:db8::ffff:2", "2001:db8::3")] == [200, 200, 429]
        assert await from_("2001:db8:0:1::1") == 200


async def test_absurd_forwarded_for_does_not_crash(upstream: FakeUpstream, start_gateway: StartGateway) -> None:
    huge = ", ".join(f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}" for i in range(10_000))
    for trusted in (["127.0.0.1/32", "::1/128", "10.0.0.0/8"], []):
        gw = await start_gateway(gateway_config(
            upstream, limits={"ip": {"rpm": 100}, "deny": ["192.0.2.0/24"], "brute_force": {"max_failures": 5}},
            server={"trusted_proxies": trusted, "max_header_bytes": 1_048_576}))
        async with aiohttp.ClientSession() as session:
            for value in (huge, "garbage, " * 5000, "[" * 10_000, "::ffff:" * 1000):
                status, _, _ = await post(session, gw, gw.api_key, headers={"X-Forwarded-For": value})
                assert status == 200


async def test_cidr_allow_and_deny_lists(upstream: FakeUpstream, start_gateway: StartGateway) -> None:
    async def status_of(limits: dict[str, Any], xff: str | None = None, **server: Any) -> tuple[int, str | None]:
        gw = await start_gateway(gateway_config(upstream, limits=limits, server=server))
        async with aiohttp.ClientSession() as session:
            status, _, body = await post(session, gw, gw.api_key,
                                         headers={"X-Forwarded-For": xff} if xff else None)
        assert gw.app[AUTH].store_lookups == (1 if status == 200 else 0)  # refused before any key lookup
        return status, (body.get("error") or {}).get("code")

    assert await status_of({"deny": ["127.0.0.0/8", "::1"]}) == (403, "ip_not_allowed")
    assert await status_of({"allow": ["10.0.0.0/8"]}) == (403, "ip_not_allowed")
    assert (await status_of({"allow": ["127.0.0.1/32", "::1/128"]}))[0] == 200
    assert await status_of({"allow": ["0.0.0.0/0"], "deny": ["127.0.0.1"]}) == (403, "ip_not_allowed")
    # IPv6 through a trusted proxy.
    proxy = {"trusted_proxies": ["127.0.0.1/32", "::1/128"]}
    assert await status_of({"deny": ["2001:db8::/32"]}, "2001:db8::5", **proxy) == (403, "ip_not_allowed")
    assert (await status_of({"deny": ["2001:db8::/32"]}, "2001:db9::1", **proxy))[0] == 200
    assert (await status_of({"deny": ["2001:db8::/32"]}, "192.0.2.1", **proxy))[0] == 200
    assert await status_of({"allow": ["2001:db8::/32"]}, "192.0.2.1", **proxy) == (403, "ip_not_allowed")


async def test_per_key_allow_and_deny(upstream: FakeUpstream, start_gateway: StartGateway) -> None:
    gw = await start_gateway(gateway_config(upstream))
    store = gw.app[STORE]

    async def key_with(limits: dict[str, Any]) -> str:
        return (await create_api_key(store, name="k", user_id=gw.user_id, bcrypt_rounds=4, limits=limits)).plaintext

    async with aiohttp.ClientSession() as session:
        for limits, expected in [({"allow": ["10.0.0.0/8"]}, 403), ({"deny": "127.0.0.1/32"}, 403),
                                 ({"allow": "127.0.0.0/8, ::1"}, 200), ({"deny": ["2001:db8::/32"]}, 200),
                                 ({"allow": ["not-an-ip"]}, 403)]:
            status, _, body = await post(session, gw, await key_with(limits))
            assert status == expected, limits
            if status == 403:
                assert body["error"]["code"] == "ip_not_allowed"


async def test_per_key_and_per_org_overrides(upstream: FakeUpstream, start_gateway: StartGateway,
                                             tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'orgs.db'}"
    store = await open_store(url)
    async with store:
        await store.migrate()
        owner = await store.create_user(email="owner@example.com", name="Owner")
        org = await store.create_org("Acme", owner.id)
    gw = await start_gateway(gateway_config(upstream, storage={"url": url},
                                            limits={"key": {"rpm": 50}, "orgs": {org.id: {"rpm": 3}}}))
    store = gw.app[STORE]
    own = (await create_api_key(store, name="slow", user_id=gw.user_id, bcrypt_rounds=4,
                                limits={"rpm": 2})).plaintext
    org_keys = [(await create_api_key(store, name=f"o{i}", org_id=org.id, bcrypt_rounds=4)).plaintext
                for i in range(2)]
    async with aiohttp.ClientSession() as session:
        assert [(await post(session, gw, own))[0] for _ in range(3)] == [200, 200, 429]
        mixed = [(await post(session, gw, org_keys[i % 2]))[0] for i in range(4)]
        assert mixed == [200, 200, 200, 429]
        status, headers, body = await post(session, gw, gw.api_key)  # the default key limit
        assert status == 200 and headers["x-ratelimit-limit-requests"] == "50"


# ------------------------------------------------------------- brute force


async def test_repeated_bad_keys_ban_the_ip_before_any_lookup(upstream: FakeUpstream,
                                                              start_gateway: StartGateway) -> None:
    gw = await start_gateway(gateway_config(upstream, limits={"brute_force": {"max_failures": 3, "ban": 60}}))
    auth = gw.app[AUTH]
    async with aiohttp.ClientSession() as session:
        assert [(await post(session, gw, generate_key().plaintext))[0] for _ in range(3)] == [401] * 3
        lookups = auth.store_lookups
        for key in (generate_key().plaintext, gw.api_key, None):
            status, headers, body = await post(session, gw, key)
            assert status == 403 and body["error"]["code"] == "ip_banned"
            assert 55 <= int(headers["Retry-After"]) <= 60
        assert auth.store_lookups == lookups
        async with session.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {gw.api_key}"}) as resp:
            assert resp.status == 403


@pytest.mark.postgres
@pytest.mark.redis
async def test_a_ban_holds_on_every_instance(upstream: FakeUpstream, start_gateway: StartGateway,
                                            postgres_url: str, redis_url: str) -> None:
    shared = gateway_config(upstream, storage={"url": postgres_url}, state={"url": redis_url},
                            limits={"brute_force": {"max_failures": 3, "ban": 60}, "redis_prefix": prefix()})
    first = await start_gateway(shared)
    second = await start_gateway(shared)
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            assert (await post(session, first, generate_key().plaintext))[0] == 401
        deadline = time.monotonic() + 1.0
        while not second.app[LIMITER].ban_ms("ip:127.0.0.1") and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # the bus delivers the ban
        status, _, body = await post(session, second, generate_key().plaintext)
    assert status == 403 and body["error"]["code"] == "ip_banned"
    assert second.app[AUTH].store_lookups == 0


# --------------------------------------------------------- Redis failures


async def _timed(session: aiohttp.ClientSession, gw: Gateway) -> tuple[int, dict, dict, float]:
    started = time.monotonic()
    status, headers, body = await post(session, gw, gw.api_key)
    return status, headers, body, time.monotonic() - started


async def test_redis_down_fails_open_to_in_process_limits(upstream: FakeUpstream, start_gateway: StartGateway,
                                                          own_redis, caplog: pytest.LogCaptureFixture) -> None:
    url, proc = own_redis
    gw = await start_gateway(gateway_config(upstream, state={"url": url},
                                            limits={"key": {"rpm": 5, "concurrent": 10}, "redis_timeout_ms": 50}))
    limiter = gw.app[LIMITER]
    async with aiohttp.ClientSession() as session:
        assert [(await post(session, gw, gw.api_key))[0] for _ in range(2)] == [200, 200]
        proc.kill()
        proc.wait()
        results = [await _timed(session, gw) for _ in range(6)]
        assert [r[0] for r in results] == [200] * 5 + [429]  # limited in-process meanwhile
        assert max(r[3] for r in results) < 0.5  # never hangs
        assert limiter.redis.breaker.open and limiter.fallback_decisions >= 5
        async with session.get(gw.url + "/metrics") as resp:
            metrics = await resp.text()
    assert re.search(r"nexgate_ratelimit_fallback_total [1-9]", metrics)
    assert "nexgate_ratelimit_circuit_open 1.0" in metrics
    assert any("circuit open" in r.getMessage() for r in caplog.records)


async def test_redis_down_fails_closed_with_503(upstream: FakeUpstream, start_gateway: StartGateway,
                                                own_redis) -> None:
    url, proc = own_redis
    gw = await start_gateway(gateway_config(upstream, state={"url": url},
                                            limits={"key": {"rpm": 100}, "redis_failure": "closed",
                                                    "redis_timeout_ms": 50}))
    async with aiohttp.ClientSession() as session:
        assert (await post(session, gw, gw.api_key))[0] == 200
        proc.kill()
        proc.wait()
        results = [await _timed(session, gw) for _ in range(5)]
        async with session.get(gw.url + "/readyz") as resp:
            assert resp.status == 503
    assert all(r[0] == 503 and r[2]["error"]["code"] == "rate_limit_unavailable" and r[1]["Retry-After"]
               for r in results)
    assert max(r[3] for r in results) < 0.5
    assert len(upstream.received) == 1


# ------------------------------------------------------------------ config


def test_malformed_limits_are_rejected_with_their_key_paths(upstream: FakeUpstream) -> None:
    bad = {
        "kye": {},
        "key": {"rpm": "lots", "tpm": -5, "burst": 3},
        "org": "fast",
        "orgs": {"org_1": {"concurrent": 1.5}},
        "ip": {"rpm": True},
        "brute_force": {"max_failures": -1, "ban": -1},
        "allow": ["10.0.0.0/8", "nope", {"a": 1}],
        "deny": "10.0.0.0/8",
        "redis_failure": "maybe",
        "redis_timeout_ms": 0,
    }
    with pytest.raises(ConfigError) as err:
        build_app(parse_config(gateway_config(upstream, limits=bad), "test-config"))
    problems = "\n".join(err.value.problems)
    for expected in ["limits.kye: unknown key; did you mean 'key'?", "limits.key.rpm: expected an integer",
                     "limits.key.tpm: must be an integer >= 0", "limits.key.burst: unknown key",
                     "limits.org: expected a mapping", "limits.orgs.org_1.concurrent: expected an integer",
                     "limits.ip.rpm: expected an integer", "limits.brute_force.max_failures: must be an integer >= 0",
                     "limits.brute_force.ban: must be greater than 0", "limits.allow[1]: 'nope' is not an IP",
                     "limits.allow[2]: expected an IP address or CIDR", "limits.deny: expected a list",
                     "limits.redis_failure: must be 'open'", "limits.redis_timeout_ms: must be between"]:
        assert expected in problems, expected
    with pytest.raises(ConfigError, match="limits: expected a mapping"):
        build_app(parse_config(gateway_config(upstream, limits=[1, 2]), "test-config"))


async def test_a_relayed_provider_429_is_told_apart(upstream: FakeUpstream, start_gateway: StartGateway) -> None:
    gw = await start_gateway(gateway_config(upstream, limits={"key": {"rpm": 100}}))
    upstream.behaviour.status = 429
    async with aiohttp.ClientSession() as session:
        status, headers, body = await post(session, gw, gw.api_key)
    assert status == 429
    assert body["error"]["code"] not in ("rate_limit_requests", "rate_limit_tokens", "concurrency_limit",
                                         "ip_rate_limit")
    assert headers["x-ratelimit-remaining-requests"] == "99"  # our own budget, still reported


# ------------------------------------------------------ compiled per identity


def _request_for(identity: Identity, n: int) -> RequestContext:
    return RequestContext(request_id=f"req_plan_{n}", endpoint="chat.completions", api_format="openai",
                          request=None, app=None, client_ip="192.0.2.10", body=dict(HI), body_size=60, model="gpt-test",
                          identity=identity)


async def test_checks_compiled_per_identity_follow_a_changed_key() -> None:
    limiter = RateLimiter(LimitSettings(key=Quota(rpm=1)))
    first = Identity(account_id="usr_1", key_id="key_plan")
    ctx = _request_for(first, 1)
    await limiter.admit(ctx)
    assert ctx.response_headers["x-ratelimit-remaining-requests"] == "0"
    # Auth hands out a new identity when the key row changed: its new limits apply at once.
    raised = Identity(account_id="usr_1", key_id="key_plan", limits={"rpm": 3})
    ctx = _request_for(raised, 2)
    await limiter.admit(ctx)
    assert ctx.response_headers["x-ratelimit-limit-requests"] == "3"
    assert ctx.response_headers["x-ratelimit-remaining-requests"] == "1"
    # The same identity object moved to an organization with its own limit: that one counts too.
    limiter = RateLimiter(LimitSettings(key=Quota(rpm=10), org=Quota(rpm=2, tpm=10_000)))
    moving = Identity(account_id="usr_2", key_id="key_moving")
    await limiter.admit(_request_for(moving, 4))
    moving.org_id = "org_plan"
    ctx = _request_for(moving, 5)
    await limiter.admit(ctx)
    assert ctx.response_headers["x-ratelimit-limit-requests"] == "2"
    assert "x-ratelimit-limit-tokens" in ctx.response_headers


async def test_settle_gives_back_only_what_admit_took() -> None:
    limiter = RateLimiter(LimitSettings(key=Quota(rpm=100, tpm=5000, concurrent=1)))
    identity = Identity(account_id="usr_3", key_id="key_settle")
    ctx = _request_for(identity, 1)
    await limiter.admit(ctx)
    reserved = 5000 - int(ctx.response_headers["x-ratelimit-remaining-tokens"])
    ctx.status, ctx.first_byte_at = 200, time.perf_counter()
    ctx.usage.prompt_tokens, ctx.usage.completion_tokens = 11, 7
    await limiter.settle(ctx)
    again = _request_for(identity, 2)
    await limiter.admit(again)  # the slot was freed, and the reservation corrected to 18 tokens
    assert again.response_headers["x-ratelimit-remaining-tokens"] == str(5000 - 18 - reserved)
    # A request with requests-per-minute limits only has nothing to give back.
    rpm_only = RateLimiter(LimitSettings(key=Quota(rpm=100)))
    ctx = _request_for(identity, 3)
    await rpm_only.admit(ctx)
    await rpm_only.settle(ctx)
    assert rpm_only.state_calls == 1
