"""Retries, strategies, caps, client-named fallbacks, shared breakers, honest disconnects, usage.cost.

Real gateways on sockets, real local upstreams that fail, stall or hang, the official SDK.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from decimal import Decimal

import aiohttp
import openai
import pytest
from aiohttp import web

from nexgate_proxy.accounts import create_api_key
from nexgate_proxy.appkeys import PROXY, STORE
from nexgate_proxy.config import ConfigError, parse_config
from nexgate_proxy.cooldown import CooldownSettings, Cooldowns
from nexgate_proxy.money import usd_to_pico
from nexgate_proxy.store import NewLedgerEntry
from nexgate_proxy.testing.net import free_port
from nexgate_proxy.testing import Behaviour, FakeUpstream, RecordingPlugin, gateway_config
from nexgate_plugins.usage_log import OUTBOX
from tests.wire import Wire

from .test_routing import _with_upstreams

HI = [{"role": "user", "content": "hi"}]


class Scripted(Wire):
    """An upstream answering each call from a list of statuses (then 200s), recording when each came."""

    def __init__(self, statuses: list[int], delay: float = 0.0) -> None:
        super().__init__()
        self.statuses = list(statuses)
        self.delay = delay
        self.times: list[float] = []
        self.on("/v1/chat/completions", self._answer)

    @property
    def url(self) -> str:
        return f"{self.base}/v1"

    async def _answer(self, request: web.Request, body: dict) -> web.Response:
        self.times.append(asyncio.get_running_loop().time())
        if self.delay:
            await asyncio.sleep(self.delay)
        status = self.statuses.pop(0) if self.statuses else 200
        if status != 200:
            return web.json_response({"error": {"message": "no", "type": "server_error"}}, status=status)
        return web.json_response({"id": "x", "object": "chat.completion", "created": 1, "model": body["model"],
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                               "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}})


# ------------------------------------------------------------ retries

async def test_retries_back_off_on_the_same_target_and_are_bounded(upstream: FakeUpstream, start_gateway) -> None:
    async with Scripted([503, 500]) as flaky, Scripted([500] * 10) as down:
        config = gateway_config(upstream)
        for name, fake in (("flaky", flaky), ("down", down)):
            config["providers"][name] = {"type": "openai", "base_url": fake.url, "api_key": "k"}
        retry = {"retries": 2, "backoff": 0.2, "max_backoff": 0.3}
        config["models"]["m"] = {"route": [{"provider": "flaky", "model": "x"}], "free": True, "retry": retry,
                                 "cooldown": {"failures": 0}}
        recorder = RecordingPlugin()
        gw = await start_gateway(config, plugins=[recorder])
        client = gw.openai_client()
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=HI)
        assert raw.parse().choices[0].message.content == "ok"
        assert raw.headers["x-nexgate-attempts"] == "3" and recorder.records[-1].attempts == 3
        gaps = [b - a for a, b in zip(flaky.times, flaky.times[1:])]
        # 0.2 s then 0.4 s capped at 0.3 s, each with 50-100 % jitter.
        assert 0.09 <= gaps[0] <= 1.0 and 0.14 <= gaps[1] <= 1.0
        # Bounded: a target failing for good gets 1 + retries calls, then the fallback serves.
        config["models"]["n"] = {"route": [{"provider": "down", "model": "y"}], "free": True, "retry": retry,
                                 "fallbacks": ["gpt-test"], "cooldown": {"failures": 0}}
        # And max_attempts caps retries and fallbacks together.
        config["models"]["o"] = {"route": [{"provider": "down", "model": "z"}], "free": True, "fallbacks": ["gpt-test"],
                                 "retry": {**retry, "max_attempts": 2}, "cooldown": {"failures": 0}}
        gw = await start_gateway(config, plugins=[recorder])
        client = gw.openai_client()
        assert (await client.chat.completions.create(model="n", messages=HI)).choices[0].message.content
        assert len(down.times) == 3 and recorder.records[-1].attempts == 4
        with pytest.raises(openai.APIStatusError) as err:
            await client.chat.completions.create(model="o", messages=HI)
        assert err.value.status_code == 502 and len(down.times) == 5 and len(upstream.received) == 1


async def test_a_refused_connection_and_a_timeout_are_retried_too(upstream: FakeUpstream, start_gateway) -> None:
    async with Scripted([], delay=2) as stalled:
        config = gateway_config(upstream)
        config["providers"]["gone"] = {"type": "openai", "base_url": f"http://127.0.0.1:{free_port()}/v1",
                                       "api_key": "k"}
        config["providers"]["stalled"] = {"type": "openai", "base_url": stalled.url, "api_key": "k"}
        retry = {"retries": 2, "backoff": 0.01}
        for alias, provider in (("gone", "gone"), ("slow", "stalled")):
            config["models"][alias] = {"route": [{"provider": provider, "model": "x"}], "fallbacks": ["gpt-test"],
                                       "free": True, "retry": retry, "cooldown": {"failures": 0},
                                       "timeouts": {"first_byte": 0.3}}
        gw = await start_gateway(config)
        for alias in ("gone", "slow"):
            raw = await gw.openai_client().chat.completions.with_raw_response.create(model=alias, messages=HI)
            assert raw.headers["x-nexgate-attempts"] == "4" and raw.headers["x-nexgate-model"] == "gpt-test"
        assert len(stalled.times) == 3


async def test_no_retry_once_a_byte_reached_the_client(upstream: FakeUpstream, start_gateway) -> None:
    upstream.behaviour = Behaviour(cut_after_chunks=2)
    config = gateway_config(upstream)
    config["models"]["gpt-test"]["retry"] = {"retries": 3, "backoff": 0.01}
    gw = await start_gateway(config)
    stream = await gw.openai_client().chat.completions.create(model="gpt-test", messages=HI, stream=True)
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass
    assert len(upstream.received) == 1


def test_retry_and_strategy_settings_are_checked() -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config({"providers": {"p": {"type": "echo"}}, "models": {"m": {
            "route": [{"provider": "p", "rpm": 0}], "free": True, "strategy": "fastest",
            "retry": {"retries": -1, "backoff": 2, "max_backoff": 1}, "cooldown": {"failure_ratio": 2}}}})
    assert raised.value.problems == [
        "models.m.route[0].rpm: must be greater than 0",
        "models.m.cooldown.failure_ratio: must be between 0 and 1",
        "models.m.strategy: unknown strategy 'fastest' (one of: weighted, priority, least-latency, lowest-cost)",
        "models.m.retry.retries: must not be negative",
        "models.m.retry.max_backoff: must not be below backoff (2)",
    ]


# ------------------------------------------------------------ breakers: ratio, shared

def test_a_failure_ratio_over_a_window_opens_a_breaker_that_never_failed_three_in_a_row() -> None:
    health = Cooldowns()
    key, settings = ("p", "m"), CooldownSettings(failures=3, failure_ratio=0.5, window=60, min_calls=6)
    for i in range(5):  # fail, succeed, fail, succeed, ...: never two in a row
        if i % 2:
            health.succeeded(key, float(i))
        else:
            health.failed(key, float(i), settings)
    assert health.available(key, 5.0)
    health.failed(key, 5.0, settings)  # 4 failures of 6 calls
    assert health.is_open(key, 5.1)
    # Outside the window, old failures do not count.
    other = ("p", "n")
    health.failed(other, 0.0, settings)
    for t in range(1, 6):
        health.succeeded(other, 70.0 + t)  # the window ended at 60: forgotten
    assert other not in health._breakers


def test_a_breaker_announces_its_openings_and_closings_and_learns_the_others() -> None:
    told: list[tuple[tuple[str, str], float]] = []
    mine, theirs = Cooldowns(), Cooldowns()
    mine.announce = lambda key, seconds: told.append((key, seconds))
    key = ("p", "m")
    mine.failed(key, 0.0, CooldownSettings(), retry_after=5)
    assert told == [(key, 5.0)]
    theirs.learned(key, 100.0, 5.0)  # another instance, another clock
    assert theirs.is_open(key, 104.9) and theirs.available(key, 105.0)  # then probes on its own
    mine.available(key, 5.0)  # mine probes, and the probe serves
    mine.succeeded(key, 5.1)
    assert told[-1] == (key, 0.0)
    theirs.learned(key, 105.2, 0.0)
    assert theirs.available(key, 105.3) and theirs.available(key, 105.4)  # closed: no probe hold


async def test_two_instances_on_redis_share_a_breaker(upstream: FakeUpstream, start_gateway, redis_url: str) -> None:
    async with FakeUpstream() as down:
        down.behaviour = Behaviour(status=503, extra_headers={"Retry-After": "30"})
        config = _with_upstreams(upstream, {"down": down})
        config["models"]["m"] = {"route": [{"provider": "down", "model": "x"}], "fallbacks": ["gpt-test"],
                                 "free": True}
        config["state"] = {"url": redis_url}
        one = await start_gateway(config)
        two = await start_gateway(config)
        assert (await one.openai_client().chat.completions.create(model="m", messages=HI)).choices
        assert len(down.received) == 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while not _open(two, ("down", "x")):
            assert loop.time() < deadline, "the other instance never learned of the opened breaker"
            await asyncio.sleep(0.02)
        for _ in range(3):
            assert (await two.openai_client().chat.completions.create(model="m", messages=HI)).choices
        assert len(down.received) == 1  # the second instance spared the failing target


def _open(gw, key: tuple[str, str]) -> bool:
    return gw.app[PROXY].health.is_open(key, asyncio.get_running_loop().time())


# ------------------------------------------------------------ strategies

async def test_least_latency_prefers_the_fast_target_after_warm_up(start_gateway) -> None:
    async with Scripted([], delay=0.08) as slow, Scripted([]) as fast:
        config = {"providers": {n: {"type": "openai", "base_url": f.url, "api_key": "k"}
                                for n, f in (("slow", slow), ("fast", fast))},
                  "models": {"m": {"route": [{"provider": "slow", "model": "s"}, {"provider": "fast", "model": "f"}],
                                   "strategy": "least-latency", "free": True}},
                  "auth": {"bcrypt_rounds": 4}}
        recorder = RecordingPlugin()
        gw = await start_gateway(config, plugins=[recorder])
        client = gw.openai_client()
        for _ in range(4):  # warm-up: every target measured
            await client.chat.completions.create(model="m", messages=HI)
        recorder.records.clear()
        # One at a time: the test's client, gateway and upstreams share one event loop, so concurrent
        # calls would measure the loop's queue, not the upstreams.
        for _ in range(200):
            await client.chat.completions.create(model="m", messages=HI)
        served = Counter(r.provider for r in recorder.records)
        assert sum(served.values()) == 200 and served["fast"] >= 180, (served, gw.app[PROXY].stats.ttfb)


async def test_lowest_cost_always_takes_the_cheapest_healthy_and_priority_keeps_the_order(start_gateway) -> None:
    async with Scripted([]) as cheap, Scripted([]) as mid, Scripted([]) as dear:
        fakes = {"cheap": cheap, "mid": mid, "dear": dear}
        config = {"providers": {n: {"type": "openai", "base_url": f.url, "api_key": "k"} for n, f in fakes.items()},
                  "models": {"m": {"strategy": "lowest-cost", "route": [
                      {"provider": "dear", "model": "d", "price": {"input": 5, "output": 15}, "weight": 50},
                      {"provider": "cheap", "model": "c", "price": {"input": 0.1, "output": 0.2}},
                      {"provider": "mid", "model": "x", "price": {"input": 1, "output": 2}, "weight": 50}]},
                             "p": {"strategy": "priority", "free": True, "route": [
                                 {"provider": "mid", "model": "x"}, {"provider": "dear", "model": "d", "weight": 99}]}},
                  "auth": {"bcrypt_rounds": 4}}
        recorder = RecordingPlugin()
        gw = await start_gateway(config, plugins=[recorder])
        await gw.app[STORE].apply_ledger_entry(NewLedgerEntry(
            account_id=gw.user_id, kind="grant", amount_pico=usd_to_pico(Decimal("10")), source="t", external_id="g"))
        client = gw.openai_client()
        for _ in range(20):
            await client.chat.completions.create(model="m", messages=HI, max_tokens=10)
        assert {r.provider for r in recorder.records} == {"cheap"}
        cheap.statuses = [500] * 100  # the cheapest is down: the next cheapest serves
        for _ in range(5):
            await client.chat.completions.create(model="m", messages=HI, max_tokens=10)
        assert [r.provider for r in recorder.records[-5:]] == ["mid"] * 5
        for _ in range(10):
            await client.chat.completions.create(model="p", messages=HI)
        assert [r.provider for r in recorder.records[-10:]] == ["mid"] * 10


async def test_a_target_at_its_rpm_cap_is_skipped_and_all_capped_is_a_429(start_gateway) -> None:
    async with Scripted([]) as capped, Scripted([]) as spare:
        config = {"providers": {n: {"type": "openai", "base_url": f.url, "api_key": "k"}
                                for n, f in (("capped", capped), ("spare", spare))},
                  "models": {"m": {"strategy": "priority", "free": True, "route": [
                      {"provider": "capped", "model": "c", "rpm": 3}, {"provider": "spare", "model": "s"}]},
                      "only": {"free": True, "route": [{"provider": "capped", "model": "o", "tpm": 10}]}},
                  "auth": {"bcrypt_rounds": 4}}
        gw = await start_gateway(config)
        client = gw.openai_client()
        for _ in range(6):
            await client.chat.completions.create(model="m", messages=HI)
        assert (len(capped.times), len(spare.times)) == (3, 3)
        await client.chat.completions.create(model="only", messages=HI)  # 7 tokens
        await client.chat.completions.create(model="only", messages=HI)  # 14: at the cap
        with pytest.raises(openai.RateLimitError) as err:
            await client.chat.completions.create(model="only", messages=HI)
        assert err.value.body["code"] == "all_targets_at_capacity"
        assert 1 <= int(err.value.response.headers["Retry-After"]) <= 60
        assert len(capped.times) == 5


# ------------------------------------------------------------ request-level fallbacks

async def test_a_client_names_its_own_fallbacks_among_the_models_its_key_may_use(
        upstream: FakeUpstream, start_gateway) -> None:
    async with FakeUpstream() as down:
        down.behaviour = Behaviour(status=500)
        config = _with_upstreams(upstream, {"down": down})
        config["models"]["m"] = {"route": [{"provider": "down", "model": "x"}], "free": True}
        config["models"]["secret"] = {"route": [{"provider": "fake", "model": "s"}], "free": True}
        recorder = RecordingPlugin()
        gw = await start_gateway(config, plugins=[recorder])
        client = gw.openai_client()
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=HI, extra_body={"models": ["gpt-test"]})
        assert raw.headers["x-nexgate-model"] == "gpt-test" and raw.headers["x-nexgate-attempts"] == "2"
        assert "models" not in upstream.received[-1].body and "models" not in down.received[-1].body
        with pytest.raises(openai.NotFoundError) as err:
            await client.chat.completions.create(model="m", messages=HI, extra_body={"models": ["nope"]})
        assert err.value.body["param"] == "models"
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="m", messages=HI, extra_body={"models": "gpt-test"})
        limited = await create_api_key(gw.app[STORE], name="l", user_id=gw.user_id, bcrypt_rounds=4,
                                       allowed_models=["m", "gpt-test"])
        with pytest.raises(openai.PermissionDeniedError) as denied:
            await gw.openai_client(limited.plaintext).chat.completions.create(
                model="m", messages=HI, extra_body={"models": ["gpt-test", "secret"]})
        assert denied.value.body["code"] == "model_not_allowed" and "secret" in denied.value.body["message"]
        assert len(upstream.received) == 1  # refused before any call


# ------------------------------------------------------------ honest disconnects

class Silent:
    """A raw upstream that reads a request and then says nothing; records when the gateway hangs up."""

    def __init__(self, after_headers: bool = False) -> None:
        self.after_headers = after_headers
        self.received = asyncio.Event()
        self.hung_up_at: float | None = None
        self.server: asyncio.Server | None = None
        self.url = ""

    async def __aenter__(self) -> Silent:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        await reader.readexactly(length)
        if self.after_headers:  # a stream that started and then went silent
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            chunk = b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n'
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.received.set()
        while await reader.read(1024):
            pass
        self.hung_up_at = asyncio.get_running_loop().time()
        writer.close()


@pytest.mark.parametrize("stream", [False, True])
async def test_a_client_that_hangs_up_cancels_the_upstream_at_once_and_is_recorded_499(
        upstream: FakeUpstream, start_gateway, stream: bool) -> None:
    async with Silent(after_headers=stream) as silent:
        config = gateway_config(upstream)
        config["providers"]["silent"] = {"type": "openai", "base_url": silent.url, "api_key": "k"}
        config["models"]["m"] = {"route": [{"provider": "silent", "model": "x"}],
                                 "price": {"input": 1, "output": 2}}
        recorder = RecordingPlugin()
        gw = await start_gateway(config, plugins=[recorder])
        store = gw.app[STORE]
        await store.apply_ledger_entry(NewLedgerEntry(
            account_id=gw.user_id, kind="grant", amount_pico=usd_to_pico(Decimal("1")), source="t", external_id="g"))
        loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession() as session:
            call = asyncio.ensure_future(session.post(
                f"{gw.openai_base}/chat/completions", headers={"Authorization": f"Bearer {gw.api_key}"},
                json={"model": "m", "messages": HI, "stream": stream}))
            await asyncio.wait_for(silent.received.wait(), 5)
            if stream:
                response = await asyncio.wait_for(call, 5)
                assert b"Hi" in await response.content.readuntil(b"\n\n")
            await asyncio.sleep(0.1)
            hung_up = loop.time()
            if stream:
                response.close()
            else:
                call.cancel()
        for _ in range(100):
            if silent.hung_up_at is not None:
                break
            await asyncio.sleep(0.01)
        assert silent.hung_up_at is not None and silent.hung_up_at - hung_up < 0.1
        assert await gw.app[OUTBOX].flush()
        [row] = await store.list_usage(account_id=gw.user_id)
        assert (row.status, row.error_code) == (499, "client_disconnected")
        assert recorder.settled == [row.request_id]  # settle ran once: the hold is released
        # Charged the estimated input, and the output relayed (one event of a stream; none otherwise).
        assert row.completion_tokens == (1 if stream else 0) and row.prompt_tokens > 0
        assert row.actual_cost_pico == row.prompt_tokens * 1_000_000 + row.completion_tokens * 2_000_000


# ------------------------------------------------------------ usage.cost

async def test_priced_answers_carry_usage_cost_in_the_body_and_the_usage_chunk(
        upstream: FakeUpstream, start_gateway) -> None:
    config = gateway_config(upstream)
    config["models"]["gpt-test"] = {"route": [{"provider": "fake", "model": "u"}], "price": {"input": 1, "output": 2}}
    gw = await start_gateway(config)
    await gw.app[STORE].apply_ledger_entry(NewLedgerEntry(
        account_id=gw.user_id, kind="grant", amount_pico=usd_to_pico(Decimal("1")), source="t", external_id="g"))
    client = gw.openai_client()
    raw = await client.chat.completions.with_raw_response.create(model="gpt-test", messages=HI)
    body = json.loads(raw.http_response.content)
    expected = (11 * 1 + 7 * 2) / 1_000_000
    assert body["usage"]["cost"] == pytest.approx(expected) and raw.headers["x-nexgate-cost-usd"] == "0.000025"
    stream = await client.chat.completions.create(model="gpt-test", messages=HI, stream=True,
                                                  stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[-1].usage is not None and chunks[-1].usage.model_extra["cost"] == pytest.approx(
        (11 + 3 * 2) / 1_000_000)
    stream = await client.chat.completions.create(model="gpt-test", messages=HI, stream=True)
    assert all(c.usage is None for c in [c async for c in stream])  # not asked for: no usage chunk at all


# ------------------------------------------------------------ metrics

async def test_metrics_show_breakers_retries_and_fallbacks(upstream: FakeUpstream, start_gateway) -> None:
    async with Scripted([500] * 10) as down:
        config = gateway_config(upstream)
        config["providers"]["down"] = {"type": "openai", "base_url": down.url, "api_key": "k"}
        config["models"]["m"] = {"route": [{"provider": "down", "model": "x"}], "fallbacks": ["gpt-test"],
                                 "free": True, "retry": {"retries": 1, "backoff": 0.01}, "cooldown": {"failures": 2}}
        gw = await start_gateway(config)
        assert (await gw.openai_client().chat.completions.create(model="m", messages=HI)).choices
        async with aiohttp.ClientSession() as session, session.get(f"{gw.url}/metrics") as response:
            text = await response.text()
        assert 'nexgate_target_breaker_state{provider="down",upstream_model="x"} 2.0' in text
        assert 'nexgate_upstream_retries_total{provider="down",upstream_model="x"} 1.0' in text
        assert 'nexgate_fallbacks_total{model="gpt-test"} 1.0' in text


def test_usage_cost_is_appended_to_the_usage_object_and_replaces_a_providers_own() -> None:
    from nexgate_proxy.context import Usage
    from nexgate_proxy.usage import add_cost, usage_from_body, with_cost

    body = b'{"id": "x", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}'
    end = usage_from_body(Usage(), body)
    assert with_cost(body, end, "0.5") == body[:-2] + b',"cost":0.5}}'
    assert add_cost(body, "0.5") == with_cost(body, end, "0.5")
    theirs = b'{"usage": {"prompt_tokens": 1, "cost": 9.99}, "x": "\xc3\xa9"}'
    assert usage_from_body(Usage(), theirs) == -2
    assert json.loads(add_cost(theirs, "0.5")) == {"usage": {"prompt_tokens": 1, "cost": 0.5}, "x": "é"}
    assert add_cost(b'{"no": "usage"}', "1") == b'{"no": "usage"}'
