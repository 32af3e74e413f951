"""Routing that survives real providers: transitive fallbacks, cooldowns, served-by headers.

Real gateways on sockets, fake upstreams that fail, stall or throttle, the official SDK.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import textwrap
import time
from decimal import Decimal
from pathlib import Path

import openai
import pytest
from aiohttp import web

from nexgate_proxy.appkeys import STORE
from nexgate_proxy.config import ConfigError, parse_config
from nexgate_proxy.cooldown import CooldownSettings, Cooldowns, retry_after_seconds
from nexgate_proxy.money import usd_to_pico
from nexgate_proxy.usage import estimate_output_tokens
from nexgate_plugins.usage_log import OUTBOX
from nexgate_proxy.store import NewLedgerEntry
from nexgate_proxy.testing import Behaviour, FakeUpstream, RecordingPlugin, gateway_config

from .test_cli import nexgate

HI = [{"role": "user", "content": "hi"}]


def _with_upstreams(upstream: FakeUpstream, others: dict[str, FakeUpstream]) -> dict:
    config = gateway_config(upstream)
    for name, fake in others.items():
        config["providers"][name] = {"type": "openai", "base_url": fake.url, "api_key": "k"}
    return config


# ------------------------------------------------------------ transitive fallbacks

async def test_fallbacks_are_transitive_breadth_first_and_priced_by_the_model_that_served(
        upstream: FakeUpstream, start_gateway) -> None:
    async with FakeUpstream() as down_a, FakeUpstream() as down_b, FakeUpstream() as down_d:
        for fake in (down_a, down_b, down_d):
            fake.behaviour = Behaviour(status=503)
        config = _with_upstreams(upstream, {"pa": down_a, "pb": down_b, "pd": down_d})
        price = {"input": 1, "output": 2}
        config["models"].update({
            "a": {"route": [{"provider": "pa", "model": "ma"}], "fallbacks": ["b", "d"], "price": price},
            "b": {"route": [{"provider": "pb", "model": "mb"}], "fallbacks": ["c"], "price": price},
            "d": {"route": [{"provider": "pd", "model": "md"}], "fallbacks": ["c"], "price": price},  # a diamond
            "c": {"route": [{"provider": "fake", "model": "mc"}],
                  "price": {"input": 10, "output": 20}},
        })
        recorder = RecordingPlugin()
        gw = await start_gateway(config, plugins=[recorder])
        await gw.app[STORE].apply_ledger_entry(NewLedgerEntry(
            account_id=gw.user_id, kind="grant", amount_pico=usd_to_pico(Decimal("1")), source="test", external_id="g"))
        reply = await gw.openai_client().chat.completions.create(model="a", messages=HI)
        assert reply.choices[0].message.content == "Hello from upstream"
        # a's own fallbacks first (b, d), then theirs (c): breadth-first, every target once.
        assert [len(f.received) for f in (down_a, down_b, down_d)] == [1, 1, 1]
        assert [r.body["model"] for r in upstream.received] == ["mc"]
        record = recorder.records[-1]
        assert (record.provider, record.upstream_model, record.attempts) == ("fake", "mc", 4)
        # Charged at c's price (the model that served): 11 input and 7 output tokens at $10 / $20 per 1M.
        assert record.actual_cost_pico == 11 * 10_000_000 + 7 * 20_000_000
        # The hold took the worst price of every target tried: 4096 output tokens (the default cap) at c's $20.
        assert record.estimated_cost_pico >= 4096 * 20_000_000


def test_a_fallback_cycle_fails_the_config_with_its_key_path() -> None:
    models = {
        "a": {"route": [{"provider": "p"}], "fallbacks": ["b"], "free": True},
        "b": {"route": [{"provider": "p"}], "fallbacks": ["c"], "free": True},
        "c": {"route": [{"provider": "p"}], "fallbacks": ["a"], "free": True},
        "d": {"route": [{"provider": "p"}], "fallbacks": ["e"], "free": True},
        "e": {"route": [{"provider": "p"}], "fallbacks": ["d"], "free": True},
        "f": {"route": [{"provider": "p"}], "fallbacks": ["a"], "free": True},  # leads into a cycle, is none
    }
    with pytest.raises(ConfigError) as raised:
        parse_config({"providers": {"p": {"type": "echo"}}, "models": models})
    cycles = [p for p in raised.value.problems if "cycle" in p]
    assert cycles == [
        "models.a.fallbacks: a -> b -> c -> a is a cycle (a model must not fall back to itself through other models)",
        "models.d.fallbacks: d -> e -> d is a cycle (a model must not fall back to itself through other models)",
    ]


def test_config_check_refuses_a_fallback_cycle(tmp_path: Path) -> None:
    (tmp_path / "nexgate.yaml").write_text(textwrap.dedent("""
        providers: {echo: {type: echo}}
        models:
          a: {route: [{provider: echo, model: x}], fallbacks: [b], free: true}
          b: {route: [{provider: echo, model: y}], fallbacks: [a], free: true}
    """))
    result = nexgate("config", "check", "nexgate.yaml", cwd=tmp_path)
    assert result.returncode != 0
    assert "models.a.fallbacks: a -> b -> a is a cycle" in result.stdout + result.stderr


# ------------------------------------------------------------ cooldowns

def _fallback_model(config: dict, alias: str, provider: str, **extra: object) -> None:
    config["models"][alias] = {"route": [{"provider": provider, "model": f"{alias}-up"}],
                               "fallbacks": ["gpt-test"], "free": True, **extra}


async def _until_reached(fake: FakeUpstream, client, model: str, deadline: float) -> float:
    """Send requests every 0.1 s until one reaches ``fake``; returns the loop time when it did."""
    loop = asyncio.get_running_loop()
    seen = len(fake.received)
    while loop.time() < deadline:
        await client.chat.completions.create(model=model, messages=HI)
        if len(fake.received) > seen:
            return loop.time()
        await asyncio.sleep(0.1)
    raise AssertionError(f"{model}'s target got no traffic again before the deadline")


async def test_a_failing_target_is_skipped_until_its_cooldown_ends_then_probed_back(
        upstream: FakeUpstream, start_gateway) -> None:
    loop = asyncio.get_running_loop()
    async with FakeUpstream() as flaky:
        flaky.behaviour = Behaviour(status=500)
        config = _with_upstreams(upstream, {"flaky": flaky})
        _fallback_model(config, "m", "flaky", cooldown={"failures": 2, "cooldown": 2})
        recorder = RecordingPlugin()
        gw = await start_gateway(config, plugins=[recorder])
        client = gw.openai_client()
        for _ in range(2):  # two failures in a row open the breaker; the fallback serves both
            assert (await client.chat.completions.create(model="m", messages=HI)).choices[0].message.content
        opened = loop.time()
        assert len(flaky.received) == 2
        for _ in range(3):
            await client.chat.completions.create(model="m", messages=HI)
        if loop.time() - opened < 1.5:  # on a very slow machine the cooldown may already be over
            assert len(flaky.received) == 2
            assert recorder.records[-1].attempts == 1  # skipped, not tried: no time spent on it
        flaky.behaviour = Behaviour()  # the provider recovers
        back = await _until_reached(flaky, client, "m", opened + 20)
        assert back - opened >= 1.9
        assert recorder.records[-1].provider == "flaky"  # the probe served, which closes the breaker
        for _ in range(3):
            await client.chat.completions.create(model="m", messages=HI)
        assert [r.provider for r in recorder.records[-3:]] == ["flaky"] * 3


async def test_a_429_with_retry_after_keeps_the_target_out_that_long(upstream: FakeUpstream, start_gateway) -> None:
    loop = asyncio.get_running_loop()
    async with FakeUpstream() as throttled:
        throttled.behaviour = Behaviour(status=429, extra_headers={"Retry-After": "2"})
        config = _with_upstreams(upstream, {"throttled": throttled})
        _fallback_model(config, "m", "throttled")  # default settings: 3 failures, but Retry-After opens at once
        gw = await start_gateway(config)
        client = gw.openai_client()
        await client.chat.completions.create(model="m", messages=HI)
        throttled_at = loop.time()
        assert len(throttled.received) == 1
        back = await _until_reached(throttled, client, "m", throttled_at + 20)
        assert 1.9 <= back - throttled_at


async def test_when_every_target_cools_down_the_client_gets_503_with_retry_after_and_no_call_is_made(
        start_gateway) -> None:
    async with FakeUpstream() as one, FakeUpstream() as two:
        one.behaviour = Behaviour(status=503, extra_headers={"Retry-After": "30"})
        two.behaviour = Behaviour(status=429, extra_headers={"Retry-After": "20"})
        config = _with_upstreams(one, {"one": one, "two": two})
        config["models"]["m"] = {"route": [{"provider": "one", "model": "x"}, {"provider": "two", "model": "y"}],
                                 "free": True}
        recorder = RecordingPlugin()
        gw = await start_gateway(config, plugins=[recorder])
        client = gw.openai_client()
        with pytest.raises(openai.APIStatusError):  # both tried (in a weighted order), both failed
            await client.chat.completions.create(model="m", messages=HI)
        assert (len(one.received), len(two.received)) == (1, 1)
        with pytest.raises(openai.APIStatusError) as err:
            await client.chat.completions.create(model="m", messages=HI)
        assert err.value.status_code == 503
        assert err.value.body["code"] == "all_targets_cooling_down"
        assert 10 <= int(err.value.response.headers["Retry-After"]) <= 20  # the soonest end
        assert (len(one.received), len(two.received)) == (1, 1)
        record = recorder.records[-1]
        assert (record.status, record.error_code, record.attempts) == (503, "all_targets_cooling_down", 0)


async def test_a_stalled_target_stops_costing_the_first_byte_timeout_once_its_breaker_opens(
        upstream: FakeUpstream, start_gateway) -> None:
    loop = asyncio.get_running_loop()
    async with FakeUpstream() as stalled:
        stalled.behaviour = Behaviour(delay_headers=30)
        config = _with_upstreams(upstream, {"stalled": stalled})
        _fallback_model(config, "m", "stalled", timeouts={"first_byte": 1.0}, cooldown={"failures": 2})
        gw = await start_gateway(config)
        client = gw.openai_client()
        for _ in range(2):
            start = loop.time()
            await client.chat.completions.create(model="m", messages=HI)
            assert loop.time() - start >= 0.9  # each waited for the timeout, then the fallback served
        start = loop.time()
        for _ in range(3):
            await client.chat.completions.create(model="m", messages=HI)
        assert loop.time() - start < 2.0  # three requests, not one first-byte timeout each (3 s)
        assert len(stalled.received) == 2


def test_cooldown_settings_merge_model_over_provider_over_defaults_and_bad_ones_are_reported() -> None:
    config = parse_config({
        "providers": {"p": {"type": "echo", "cooldown": {"failures": 5, "cooldown": 10}}, "q": {"type": "echo"}},
        "models": {"m": {"route": [{"provider": "p"}, {"provider": "q"}], "cooldown": {"cooldown": 7},
                         "free": True},
                   "n": {"route": [{"provider": "p"}], "free": True}},
    })
    p_target, q_target = config.models["m"].targets
    assert p_target.cooldown == CooldownSettings(failures=5, cooldown=7)
    assert q_target.cooldown == CooldownSettings(cooldown=7)
    assert config.models["n"].targets[0].cooldown == CooldownSettings(failures=5, cooldown=10)
    with pytest.raises(ConfigError) as raised:
        parse_config({"providers": {"p": {"type": "echo", "cooldown": {"failures": -1, "colldown": 1}}},
                      "models": {"m": {"route": [{"provider": "p"}, {"provider": "p", "model": "b"}],
                                       "cooldown": {"cooldown": 600}, "free": True}}})
    assert raised.value.problems == [
        "providers.p.cooldown.colldown: unknown key; did you mean 'cooldown'?",
        "providers.p.cooldown.failures: must not be negative",
        "models.m.cooldown.max_cooldown: must not be below cooldown (600)",
    ]


def test_the_breaker_backs_off_probes_once_and_honours_retry_after_dates() -> None:
    health = Cooldowns()
    key, settings = ("p", "m"), CooldownSettings(failures=2, cooldown=10, max_cooldown=25)
    health.failed(key, 0.0, settings)
    assert health.available(key, 0.0)  # one failure is not enough
    health.failed(key, 1.0, settings)
    assert not health.available(key, 10.9) and health.reopens_at(key) == 11.0
    assert health.available(key, 11.0)  # half-open: this caller probes...
    assert not health.available(key, 11.5)  # ...and the others keep out while it does
    health.failed(key, 12.0, settings)  # the probe failed: open again, twice as long
    assert health.reopens_at(key) == 32.0
    assert health.available(key, 32.0)
    health.failed(key, 33.0, settings)
    assert health.reopens_at(key) == 33.0 + 25  # capped
    assert health.available(key, 58.0)
    health.succeeded(key, 58.0)  # the probe served: closed, and the count starts again
    health.failed(key, 60.0, settings)
    assert health.available(key, 60.0)
    assert retry_after_seconds({"Retry-After": "2"}) == 2.0
    assert retry_after_seconds({"Retry-After": "soon"}) is None
    assert retry_after_seconds({}) is None
    date = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert 55 <= (retry_after_seconds({"Retry-After": date}) or 0) <= 61
    health.failed(("p", "x"), 0.0, settings, retry_after=9999)
    assert health.reopens_at(("p", "x")) == settings.max_retry_after


# ------------------------------------------------------------ served-by headers

async def test_every_relayed_answer_says_which_alias_provider_and_how_many_attempts_served_it(
        upstream: FakeUpstream, start_gateway) -> None:
    async with FakeUpstream() as down:
        down.behaviour = Behaviour(status=502)
        config = _with_upstreams(upstream, {"down": down})
        _fallback_model(config, "m", "down", cooldown={"failures": 0})
        gw = await start_gateway(config)
        client = gw.openai_client()
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=HI)
        served = {k: raw.headers.get(k) for k in ("x-nexgate-model", "x-nexgate-provider", "x-nexgate-attempts")}
        assert served == {"x-nexgate-model": "gpt-test", "x-nexgate-provider": "fake", "x-nexgate-attempts": "2"}
        async with client.chat.completions.with_streaming_response.create(
                model="m", messages=HI, stream=True) as streamed:
            assert {k: streamed.headers.get(k) for k in served} == served
            assert "Hello" in "".join([line async for line in streamed.iter_lines()])
        raw = await client.chat.completions.with_raw_response.create(model="gpt-test", messages=HI)
        assert (raw.headers["x-nexgate-model"], raw.headers["x-nexgate-attempts"]) == ("gpt-test", "1")
        everything = "\n".join(f"{k}: {v}" for k, v in raw.headers.items())
        assert upstream.url not in everything and "127.0.0.1" not in everything
        assert "sk-provider" not in everything


# ------------------------------------------------------------ usage an upstream did not report

async def test_a_non_streamed_answer_without_usage_is_charged_an_output_estimate_marked_estimated(
        upstream: FakeUpstream, start_gateway) -> None:
    content = "word " * 40  # 200 characters: about 50 tokens
    arguments = json.dumps({"city": "Paris", "unit": "celsius"})
    upstream.behaviour = Behaviour(omit_usage=True, chat_message={"content": content, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": arguments}}]})
    config = gateway_config(upstream)
    config["models"]["gpt-test"] = {"route": [{"provider": "fake", "model": "upstream-model"}],
                                    "price": {"input": 1, "output": 2}}
    gw = await start_gateway(config)
    store = gw.app[STORE]
    await store.apply_ledger_entry(NewLedgerEntry(
        account_id=gw.user_id, kind="grant", amount_pico=usd_to_pico(Decimal("1")), source="test", external_id="g"))
    reply = await gw.openai_client().chat.completions.create(model="gpt-test", messages=HI)
    assert reply.usage is None and reply.choices[0].message.content == content
    assert await gw.app[OUTBOX].flush()
    [row] = await store.list_usage(account_id=gw.user_id)
    expected = -(-(len(content) + len(arguments)) // 4)
    assert row.usage_estimated and row.completion_tokens == expected > 0
    assert row.actual_cost_pico == row.prompt_tokens * 1_000_000 + expected * 2_000_000
    # Embeddings have no output to estimate.
    await gw.openai_client().embeddings.create(model="gpt-test", input="x")
    assert await gw.app[OUTBOX].flush()
    assert (await store.list_usage(account_id=gw.user_id))[0].completion_tokens == 0


def test_the_output_estimate_counts_generated_text_in_every_dialect() -> None:
    anthropic = {"id": "msg_1", "model": "claude", "content": [
        {"type": "thinking", "thinking": "abcd" * 3, "signature": "s" * 400},
        {"type": "text", "text": "abcd"}, {"type": "tool_use", "id": "t", "name": "f", "input": {"a": 1}}]}
    assert estimate_output_tokens(json.dumps(anthropic).encode()) == -(-(12 + 4 + len('{"a": 1}')) // 4)
    responses = {"id": "resp_1", "output": [{"type": "message", "content": [{"type": "output_text", "text": "x" * 8}]},
                                            {"type": "function_call", "arguments": "y" * 4}]}
    assert estimate_output_tokens(json.dumps(responses).encode()) == 3
    assert estimate_output_tokens(b"not json") == 0


# ------------------------------------------------------------ failure paths

class BrokenAnswers:
    """An upstream whose answers break after their headers: cut (reset) or stalled.

    ``stream``: the headers of an SSE stream, flushed alone, then nothing (written by hand, so
    that the headers surely went out before the first event would have).
    """

    def __init__(self, how: str, stream: bool = False) -> None:
        self.how = how
        self.stream = stream
        self.calls = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> BrokenAnswers:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._answer)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.calls += 1
        if self.stream:
            assert request.transport is not None
            request.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                    b"Transfer-Encoding: chunked\r\n\r\n")
            if self.how == "cut":
                await asyncio.sleep(0.05)
                request.transport.abort()
            await asyncio.sleep(3600)
        response = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": "400"})
        await response.prepare(request)
        await response.write(b'{"id": "chatcmpl-broken", "object": "chat.completion", "choices": [')
        if self.how == "cut":
            assert request.transport is not None
            request.transport.abort()
        else:
            await asyncio.sleep(3600)
        return response


@pytest.mark.parametrize("how", ["cut", "stalled"])
async def test_a_non_streamed_answer_that_breaks_after_its_headers_falls_back(
        upstream: FakeUpstream, start_gateway, how: str) -> None:
    async with BrokenAnswers(how) as broken:
        config = gateway_config(upstream)
        config["providers"]["broken"] = {"type": "openai", "base_url": broken.url, "api_key": "k"}
        _fallback_model(config, "m", "broken", timeouts={"idle": 0.5})
        recorder = RecordingPlugin()
        gw = await start_gateway(config, plugins=[recorder])
        raw = await gw.openai_client().chat.completions.with_raw_response.create(model="m", messages=HI)
        assert raw.parse().choices[0].message.content == "Hello from upstream"
        assert broken.calls == 1 and raw.headers["x-nexgate-attempts"] == "2"
        record = recorder.records[-1]
        assert (record.status, record.provider, record.attempts) == (200, "fake", 2)


@pytest.mark.parametrize("how", ["cut", "stalled"])
async def test_a_stream_that_dies_before_its_first_event_falls_back(
        upstream: FakeUpstream, start_gateway, how: str) -> None:
    async with BrokenAnswers(how, stream=True) as broken:
        config = gateway_config(upstream)
        config["providers"]["broken"] = {"type": "openai", "base_url": broken.url, "api_key": "k"}
        _fallback_model(config, "m", "broken", timeouts={"idle": 0.5})
        recorder = RecordingPlugin()
        gw = await start_gateway(config, plugins=[recorder])
        stream = await gw.openai_client().chat.completions.create(model="m", messages=HI, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "Hello from upstream" and broken.calls == 1
        record = recorder.records[-1]
        assert (record.status, record.provider, record.attempts) == (200, "fake", 2)


async def test_when_every_target_fails_the_most_meaningful_failure_is_reported_whatever_the_order(
        start_gateway) -> None:
    async with FakeUpstream() as failing, FakeUpstream() as stalled, FakeUpstream() as refusing:
        failing.behaviour = Behaviour(status=500)
        stalled.behaviour = Behaviour(delay_headers=30)
        refusing.behaviour = Behaviour(status=401)
        config = _with_upstreams(failing, {"p-failing": failing, "p-stalled": stalled, "p-refusing": refusing})
        config["models"]["m"] = {"route": [{"provider": p, "model": "x"} for p in
                                           ("p-failing", "p-stalled", "p-refusing")],
                                 "timeouts": {"first_byte": 0.3}, "cooldown": {"failures": 0}, "free": True}
        gw = await start_gateway(config)
        errors = set()
        for _ in range(5):  # the weighted order is random: the answer must not be
            with pytest.raises(openai.APIStatusError) as err:
                await gw.openai_client().chat.completions.create(model="m", messages=HI)
            errors.add((err.value.status_code, err.value.body["code"], err.value.body["message"]))
            assert err.value.response.headers["x-nexgate-attempts"] == "3"
        assert errors == {(504, "upstream_timeout", "The upstream provider 'p-stalled' did not answer in time.")}
        # Without the timeout: the 5xx, not the refused key.
        config["models"]["m"]["route"] = [{"provider": "p-refusing", "model": "x"},
                                          {"provider": "p-failing", "model": "x"}]
        gw = await start_gateway(config)
        for _ in range(3):
            with pytest.raises(openai.APIStatusError) as err:
                await gw.openai_client().chat.completions.create(model="m", messages=HI)
            assert (err.value.status_code, err.value.body["code"]) == (502, "upstream_error")
