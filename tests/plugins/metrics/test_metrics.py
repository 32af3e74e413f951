"""/metrics after a known mix of traffic: exact counters, bounded labels, honest times, restricted access."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

import aiohttp
import openai
import pytest

from nexgate_proxy.appkeys import STORE
from nexgate_proxy.money import usd_to_pico
from nexgate_proxy.store import NewLedgerEntry
from nexgate_proxy.testing import Behaviour, FakeUpstream, gateway_config

from .scrape import samples, scrape_text, total, value

HI = [{"role": "user", "content": "hi"}]
PRICE = {"input": "1.5", "output": "2"}  # USD per 1M tokens
ALLOWED_LABELS = {"endpoint", "model", "provider", "status", "status_class", "kind", "reason", "upstream_model", "code",
                  "component", "le", "sink"}


def mixed_config(upstream: FakeUpstream, bad: FakeUpstream) -> dict[str, Any]:
    config = gateway_config(upstream, limits={"key": {"rpm": 10}})
    config["providers"]["bad"] = {"type": "openai", "base_url": bad.url, "api_key": "sk-bad-provider-key-000"}
    config["models"].update({
        "gpt-paid": {"route": [{"provider": "fake", "model": "upstream-model"}], "price": PRICE},
        "flaky": {"route": [{"provider": "bad", "model": "m-flaky"}], "fallbacks": ["gpt-test"], "free": True},
        "broken": {"route": [{"provider": "bad", "model": "m-broken"}], "free": True},
    })
    return config


async def test_a_known_mix_of_traffic_gives_exact_counters(upstream: FakeUpstream, start_gateway) -> None:
    async with FakeUpstream() as bad:
        bad.behaviour = Behaviour(status=500)
        gw = await start_gateway(mixed_config(upstream, bad))
        await gw.app[STORE].apply_ledger_entry(NewLedgerEntry(
            account_id=gw.user_id, kind="grant", amount_pico=usd_to_pico(Decimal(1)), source="test", external_id="g"))
        client = gw.openai_client()
        for _ in range(3):
            await client.chat.completions.create(model="gpt-test", messages=HI)
        for _ in range(2):
            async for _chunk in await client.chat.completions.create(model="gpt-test", messages=HI, stream=True):
                pass
        fallback = await client.chat.completions.with_raw_response.create(model="flaky", messages=HI)
        assert fallback.headers["x-nexgate-attempts"] == "2"
        with pytest.raises(openai.InternalServerError):  # the upstream's 500 is a 502 here
            await client.chat.completions.create(model="broken", messages=HI)
        with pytest.raises(openai.AuthenticationError):
            await gw.openai_client("ngk_notarealkey0_secret").chat.completions.create(model="gpt-test", messages=HI)
        with pytest.raises(openai.APIStatusError) as no_money:  # may cost up to $1.80; the balance is $1
            await client.chat.completions.create(model="gpt-paid", messages=HI, max_tokens=900_000)
        assert no_money.value.status_code == 402
        await client.chat.completions.create(model="gpt-paid", messages=HI)
        more = 0  # the key's 10 requests a minute: the rest are 429s
        with pytest.raises(openai.RateLimitError):
            for _ in range(10):
                await client.chat.completions.create(model="gpt-test", messages=HI)
                more += 1
        text = await scrape_text(gw.url)

    found = samples(text)  # parses as Prometheus would
    requests = "nexgate_requests_total"

    def served(model: str, provider: str, status: str) -> float:
        return value(found, requests, endpoint="chat.completions", model=model, provider=provider, status=status,
                     status_class=f"{status[0]}xx")

    assert served("gpt-test", "fake", "200") == 3 + 2 + more
    assert served("flaky", "fake", "200") == 1  # the fallback that served
    assert served("broken", "bad", "502") == 1
    assert served("-", "-", "401") == 1
    assert served("gpt-paid", "-", "402") == 1
    assert served("gpt-paid", "fake", "200") == 1
    assert served("-", "-", "429") == 1
    assert total(found, requests) == 3 + 2 + more + 1 + 1 + 1 + 1 + 1 + 1
    for reason, n in {"auth": 1, "credits": 1, "rate_limit": 1, "ip": 0, "validation": 0, "other": 0}.items():
        assert value(found, "nexgate_rejections_total", reason=reason) == n, reason
    errors = "nexgate_upstream_errors_total"
    assert value(found, errors, provider="bad", upstream_model="m-flaky", code="upstream_error") == 1
    assert value(found, errors, provider="bad", upstream_model="m-broken", code="upstream_error") == 1
    assert total(found, errors) == 2
    attempts = "nexgate_upstream_attempts_total"
    assert value(found, attempts, provider="fake", upstream_model="upstream-model",
                 status_class="2xx") == 3 + 2 + 1 + 1 + more
    assert value(found, attempts, provider="bad", upstream_model="m-flaky", status_class="5xx") == 1
    # The fake upstream reports 11 prompt tokens, and 7 completion tokens per answer, 3 per stream (its 3 words).
    answers = 3 + more
    assert value(found, "nexgate_tokens_total", model="gpt-test", provider="fake", kind="prompt") == 11 * (answers + 2)
    assert value(found, "nexgate_tokens_total", model="gpt-test", provider="fake",
                 kind="completion") == 7 * answers + 3 * 2
    assert value(found, "nexgate_cost_usd_total", model="gpt-paid", provider="fake") == pytest.approx(
        (11 * 1.5 + 7 * 2) / 1e6)
    assert value(found, "nexgate_time_to_first_token_seconds_count", model="gpt-test", provider="fake") == 2
    assert value(found, "nexgate_gateway_overhead_seconds_count", endpoint="chat.completions",
                 provider="fake") == 3 + 2 + 1 + 1 + more
    assert value(found, "nexgate_in_flight_requests") == 0
    assert value(found, "nexgate_credit_holds_in_flight") == 0  # every hold settled
    assert value(found, "nexgate_auth_bcrypt_verifications_total") == 1  # the test key, once; then the cache
    assert value(found, "nexgate_auth_cache_hits_total") >= 3 + 2 + more
    assert ("nexgate_usage_outbox_pending", frozenset()) in found
    assert value(found, "nexgate_open_streams") == 0

    # Bounded cardinality: label names from a fixed set, no value a key, user, request id or IP.
    secret_like = re.compile(r"ngk_|req_|usr_|key_|org_|127\.0\.0\.1|@")
    for (name, labels) in found:
        for label, label_value in labels:
            assert label in ALLOWED_LABELS, (name, label)
            assert not secret_like.search(label_value), (name, label, label_value)
    assert gw.api_key not in text and gw.user_id not in text


async def test_overhead_stays_small_while_the_upstream_takes_200_ms(upstream: FakeUpstream, start_gateway) -> None:
    gw = await start_gateway(gateway_config(upstream))
    client = gw.openai_client()
    upstream.behaviour = Behaviour(delay_headers=0.2)
    for _ in range(3):
        await client.chat.completions.create(model="gpt-test", messages=HI)
    upstream.behaviour = Behaviour(chunk_delay=0.1)  # every event, the first one too, after 100 ms
    async for _chunk in await client.chat.completions.create(model="gpt-test", messages=HI, stream=True):
        pass
    found = samples(await scrape_text(gw.url))
    labels = {"endpoint": "chat.completions", "model": "gpt-test", "provider": "fake"}
    duration = value(found, "nexgate_request_duration_seconds_sum", **labels)
    count = value(found, "nexgate_request_duration_seconds_count", **labels)
    assert count == 4
    upstream_sum = value(found, "nexgate_upstream_duration_seconds_sum", model="gpt-test", provider="fake")
    overhead_sum = value(found, "nexgate_gateway_overhead_seconds_sum", endpoint="chat.completions", provider="fake")
    # Three answers after 200 ms, a stream of events 100 ms apart: the time is the upstream's.
    assert 3 * 0.2 + 0.5 <= duration < 3 * 0.2 + 0.7 + 1.0
    assert upstream_sum == pytest.approx(duration - overhead_sum)
    assert overhead_sum / count < 0.02  # a few ms at most per request, on a loaded test machine
    # Every overhead observation below 25 ms (the buckets resolve tenths of a millisecond).
    assert value(found, "nexgate_gateway_overhead_seconds_bucket", endpoint="chat.completions", provider="fake",
                 le="0.025") == 4
    ttft_sum = value(found, "nexgate_time_to_first_token_seconds_sum", model="gpt-test", provider="fake")
    assert 0.1 <= ttft_sum < 0.4


async def test_metrics_can_require_a_token_and_an_address(upstream: FakeUpstream, start_gateway) -> None:
    gw = await start_gateway(gateway_config(upstream, metrics={"token": "scrape-token-123456"}))
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{gw.url}/metrics") as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["code"] == "invalid_metrics_token"
        async with session.get(f"{gw.url}/metrics", headers={"Authorization": "Bearer wrong"}) as resp:
            assert resp.status == 401
    assert "nexgate_requests" in await scrape_text(gw.url, {"Authorization": "Bearer scrape-token-123456"})

    walled = await start_gateway(gateway_config(upstream, metrics={"allow_ips": ["10.0.0.0/8"]}))
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{walled.url}/metrics") as resp:
            assert resp.status == 403
            assert (await resp.json())["error"]["code"] == "ip_not_allowed"


async def test_metrics_can_have_a_listener_of_their_own(upstream: FakeUpstream, start_gateway) -> None:
    from nexgate_proxy.testing import free_port

    port = free_port()
    gw = await start_gateway(gateway_config(upstream, metrics={"listen": f"127.0.0.1:{port}"}))
    await gw.openai_client().chat.completions.create(model="gpt-test", messages=HI)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{gw.url}/metrics") as resp:
            assert resp.status == 404  # not on the gateway's port
    found = samples(await scrape_text(f"http://127.0.0.1:{port}"))
    assert total(found, "nexgate_requests_total", model="gpt-test") == 1
