"""A provider's max_concurrent: past it a clear 503 + Retry-After at once, never a silent queue."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from nexgate_proxy.appkeys import PROVIDERS
from nexgate_proxy.config import ConfigError, parse_config
from nexgate_proxy.testing import FakeUpstream, StartGateway, gateway_config

HI = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


def capped(upstream: FakeUpstream, cap: int) -> dict:
    config = gateway_config(upstream)
    config["providers"]["fake"]["max_concurrent"] = cap
    return config


async def test_past_the_cap_requests_get_503_with_retry_after_and_the_places_come_back(
        upstream: FakeUpstream, start_gateway: StartGateway) -> None:
    gw = await start_gateway(capped(upstream, 2))
    provider = gw.app[PROVIDERS]["fake"]
    upstream.behaviour.delay_headers = 0.5
    headers = {"Authorization": f"Bearer {gw.api_key}"}
    async with aiohttp.ClientSession(headers=headers) as session:

        async def post(body: dict) -> tuple[int, dict, dict]:
            async with session.post(gw.openai_base + "/chat/completions", json=body) as resp:
                return resp.status, dict(resp.headers), await resp.json()

        slow = [asyncio.create_task(post(HI)) for _ in range(2)]
        for _ in range(100):
            if provider.in_flight == 2:
                break
            await asyncio.sleep(0.01)
        assert provider.in_flight == 2
        status, resp_headers, body = await post(HI)
        assert status == 503 and resp_headers["Retry-After"] == "1"
        assert body["error"]["code"] == "provider_concurrency_limit"
        assert "fake" in body["error"]["message"] and set(body["error"]) == {"message", "type", "param", "code"}
        assert [s for s, _, _ in await asyncio.gather(*slow)] == [200, 200]
        assert provider.in_flight == 0

        # A stream holds its place until it ends; then the place is free again.
        upstream.behaviour.delay_headers = 0
        upstream.behaviour.chunk_delay = 0.2
        async with session.post(gw.openai_base + "/chat/completions", json={**HI, "stream": True}) as stream:
            assert stream.status == 200
            await stream.content.readany()
            assert provider.in_flight == 1
            await stream.read()
        for _ in range(50):
            if provider.in_flight == 0:
                break
            await asyncio.sleep(0.01)
        assert provider.in_flight == 0
        upstream.behaviour.chunk_delay = 0
        assert (await post(HI))[0] == 200


async def test_a_full_provider_falls_back_to_another_target(upstream: FakeUpstream, start_gateway: StartGateway) -> None:
    config = capped(upstream, 1)
    config["providers"]["spare"] = {"type": "openai", "base_url": upstream.url, "api_key": "sk-spare"}
    config["models"]["gpt-test"]["fallbacks"] = ["spare-model"]
    config["models"]["spare-model"] = {"route": [{"provider": "spare", "model": "m"}], "free": True}
    gw = await start_gateway(config)
    upstream.behaviour.delay_headers = 0.3
    headers = {"Authorization": f"Bearer {gw.api_key}"}
    async with aiohttp.ClientSession(headers=headers) as session:

        async def post() -> tuple[int, str]:
            async with session.post(gw.openai_base + "/chat/completions", json=HI) as resp:
                await resp.read()
                return resp.status, resp.headers.get("x-nexgate-provider", "")

        served = await asyncio.gather(*(post() for _ in range(3)))
    assert [s for s, _ in served] == [200] * 3
    assert sorted(p for _, p in served).count("spare") >= 1


def test_caps_above_the_pool_are_a_config_problem(upstream: FakeUpstream) -> None:
    config = capped(upstream, 600)
    config["providers"]["fake-anthropic"]["max_concurrent"] = 600
    with pytest.raises(ConfigError) as err:
        parse_config(config, "test")
    assert any("add up to 1200, above upstream.max_connections (1000)" in p for p in err.value.problems)
    config["upstream"] = {"max_connections": 1200}
    assert parse_config(config, "test").providers["fake"].max_concurrent == 600
