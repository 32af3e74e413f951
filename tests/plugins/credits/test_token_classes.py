"""Each token class at its own price: cache reads, cache writes and audio, in both dialects and across translation.

Anthropic's input_tokens excludes cache reads and writes; OpenAI's prompt_tokens includes cached,
cache-write and audio tokens. The same work reported either way costs the same pico-dollars.
"""

from __future__ import annotations

from decimal import Decimal

import anthropic
import pytest

from nexgate_plugins.usage_log import OUTBOX
from nexgate_proxy.appkeys import STORE
from nexgate_proxy.money import usd_to_pico
from nexgate_proxy.testing import Behaviour, FakeUpstream, Gateway, gateway_config

from .test_credits import grant

MTOK = 1_000_000  # pUSD per token for a price of 1 USD per 1M tokens
CLAUDE = {"input": "3", "output": "15", "cached_input": "0.3"}
CLAUDE_WRITES = {**CLAUDE, "cache_write": "3.75"}
# The same call in each dialect: 100 plain input tokens, 1000 read from the cache, 400 written to it, 50 out.
ANTHROPIC_USAGE = {"input_tokens": 100, "cache_read_input_tokens": 1000, "cache_creation_input_tokens": 400,
                   "output_tokens": 50}
OPENAI_USAGE = {"prompt_tokens": 1500, "completion_tokens": 50, "total_tokens": 1550,
                "prompt_tokens_details": {"cached_tokens": 1000, "cache_write_tokens": 400}}
WITH_WRITES = 100 * 3 * MTOK + 1000 * 300_000 + 400 * 3_750_000 + 50 * 15 * MTOK
WRITES_AT_INPUT = 100 * 3 * MTOK + 1000 * 300_000 + 400 * 3 * MTOK + 50 * 15 * MTOK
TEXT = [{"type": "text", "text": "Bonjour"}]
MESSAGE = {"role": "assistant", "content": "Bonjour"}


def priced(upstream: FakeUpstream, **models: dict) -> dict:
    config = gateway_config(upstream)
    config["models"].update(models)
    return config


def claude_models() -> dict:
    return {
        "claude-writes": {"route": [{"provider": "fake-anthropic", "model": "claude-upstream"}], "price": CLAUDE_WRITES},
        "claude-plain": {"route": [{"provider": "fake-anthropic", "model": "claude-upstream"}], "price": CLAUDE},
    }


def claude(gw: Gateway) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=gw.url, api_key=gw.api_key, max_retries=0)


async def charged(gw: Gateway, n: int) -> list[tuple[str, int, int, int | None]]:
    """(model, prompt tokens, pUSD charged, ledger debit) per usage row, sorted."""
    assert await gw.app[OUTBOX].flush()
    store = gw.app[STORE]
    rows = await store.list_usage(account_id=gw.user_id)
    assert len(rows) == n
    # each request's cost as the debit that charged it lists it (one debit per account and batch)
    debits = {request_id: cost for e in await store.list_ledger(gw.user_id) if e.kind == "debit"
              for request_id, cost in await store.debited_requests(gw.user_id, e.id)}
    assert await store.ledger_sum(gw.user_id) == await store.get_balance(gw.user_id)
    return sorted((r.model, r.prompt_tokens, r.actual_cost_pico, debits.get(r.request_id)) for r in rows)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_anthropic_cache_writes_cost_cache_write_or_else_input(
        upstream: FakeUpstream, start_gateway, stream: bool) -> None:
    gw = await start_gateway(priced(upstream, **claude_models()))
    await grant(gw, "1")
    upstream.behaviour = Behaviour(anthropic_content=TEXT, usage=ANTHROPIC_USAGE)
    for model in ("claude-writes", "claude-plain"):
        kwargs = dict(model=model, max_tokens=100, messages=[{"role": "user", "content": "hi"}])
        if stream:
            async with claude(gw).messages.stream(**kwargs) as s:
                message = await s.get_final_message()
        else:
            message = await claude(gw).messages.create(**kwargs)
        assert message.usage.cache_creation_input_tokens == 400
    assert await charged(gw, 2) == [("claude-plain", 1500, WRITES_AT_INPUT, WRITES_AT_INPUT),
                                    ("claude-writes", 1500, WITH_WRITES, WITH_WRITES)]
    assert WITH_WRITES - WRITES_AT_INPUT == 400 * 750_000  # the 1.25x surcharge, to the pico-dollar


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_openai_sdk_to_anthropic_cache_writes_are_priced_the_same(
        upstream: FakeUpstream, start_gateway, stream: bool) -> None:
    gw = await start_gateway(priced(upstream, **claude_models()))
    await grant(gw, "1")
    upstream.behaviour = Behaviour(anthropic_content=TEXT, usage=ANTHROPIC_USAGE)
    client = gw.openai_client()
    for model in ("claude-writes", "claude-plain"):
        kwargs = dict(model=model, max_tokens=100, messages=[{"role": "user", "content": "hi"}])
        if stream:
            chunks = [c async for c in await client.chat.completions.create(
                **kwargs, stream=True, stream_options={"include_usage": True})]
            usage = chunks[-1].usage
        else:
            raw = await client.chat.completions.with_raw_response.create(**kwargs)
            usage = raw.parse().usage
            assert raw.headers["x-nexgate-cost-usd"] == str(Decimal(WITH_WRITES if model == "claude-writes"
                                                                  else WRITES_AT_INPUT).scaleb(-12).normalize())
        assert (usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens) == (1500, 1000)
        assert usage.prompt_tokens_details.cache_write_tokens == 400
    assert await charged(gw, 2) == [("claude-plain", 1500, WRITES_AT_INPUT, WRITES_AT_INPUT),
                                    ("claude-writes", 1500, WITH_WRITES, WITH_WRITES)]


async def test_openai_format_cache_writes_in_the_prompt_are_priced_once(upstream: FakeUpstream, start_gateway) -> None:
    # OpenRouter (and NexGate's translation) report cache writes inside prompt_tokens.
    gw = await start_gateway(priced(upstream, **{
        "gpt-writes": {"route": [{"provider": "fake", "model": "m"}], "price": CLAUDE_WRITES},
        "gpt-plain": {"route": [{"provider": "fake", "model": "m"}], "price": CLAUDE}}))
    await grant(gw, "1")
    upstream.behaviour = Behaviour(chat_message=MESSAGE, usage=OPENAI_USAGE)
    for model in ("gpt-writes", "gpt-plain"):
        await gw.openai_client().chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    # Through the Anthropic SDK (translated to chat completions) the same usage costs the same.
    message = await claude(gw).messages.create(model="gpt-writes", max_tokens=100,
                                               messages=[{"role": "user", "content": "hi"}])
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens,
            message.usage.cache_creation_input_tokens) == (100, 1000, 400)
    assert await charged(gw, 3) == [("gpt-plain", 1500, WRITES_AT_INPUT, WRITES_AT_INPUT),
                                    ("gpt-writes", 1500, WITH_WRITES, WITH_WRITES),
                                    ("gpt-writes", 1500, WITH_WRITES, WITH_WRITES)]


async def test_openai_cached_tokens_are_charged_as_before(upstream: FakeUpstream, start_gateway) -> None:
    # A price with cache_write changes nothing for an upstream that reports no cache writes.
    gw = await start_gateway(priced(upstream, **{
        "gpt-writes": {"route": [{"provider": "fake", "model": "m"}], "price": CLAUDE_WRITES}}))
    await grant(gw, "1")
    await gw.openai_client().chat.completions.create(model="gpt-writes", messages=[{"role": "user", "content": "hi"}])
    # The fake's default answer: 11 prompt tokens, 3 of them cached, 7 completion tokens.
    expected = 8 * 3 * MTOK + 3 * 300_000 + 7 * 15 * MTOK
    assert await charged(gw, 1) == [("gpt-writes", 11, expected, expected)]


AUDIO_USAGE = {"prompt_tokens": 120, "completion_tokens": 80, "total_tokens": 200,
               "prompt_tokens_details": {"cached_tokens": 20, "audio_tokens": 60},
               "completion_tokens_details": {"audio_tokens": 50, "reasoning_tokens": 0}}


async def test_audio_tokens_cost_audio_rates_or_else_input_and_output(upstream: FakeUpstream, start_gateway) -> None:
    gw = await start_gateway(priced(upstream, **{
        "audio": {"route": [{"provider": "fake", "model": "m"}],
                  "price": {"input": "2.5", "output": "10", "cached_input": "1.25",
                            "audio_input": "40", "audio_output": "80"}},
        "audio-unpriced": {"route": [{"provider": "fake", "model": "m"}],
                           "price": {"input": "2.5", "output": "10", "cached_input": "1.25"}}}))
    await grant(gw, "1")
    upstream.behaviour = Behaviour(chat_message=MESSAGE, usage=AUDIO_USAGE)
    for model in ("audio", "audio-unpriced"):
        await gw.openai_client().chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    # 40 text input, 20 cached, 60 audio input; 30 text output, 50 audio output.
    audio = 40 * 2_500_000 + 20 * 1_250_000 + 60 * 40 * MTOK + 30 * 10 * MTOK + 50 * 80 * MTOK
    unpriced = 100 * 2_500_000 + 20 * 1_250_000 + 80 * 10 * MTOK
    assert await charged(gw, 2) == [("audio", 120, audio, audio), ("audio-unpriced", 120, unpriced, unpriced)]


async def test_the_hold_covers_a_prompt_written_to_the_cache_whole(upstream: FakeUpstream, start_gateway) -> None:
    # Cache writes cost 10x input: the hold prices every prompt token as a write.
    price = {"input": "1", "output": "2", "cache_write": "10"}
    gw = await start_gateway(priced(upstream, **{
        "claude-w": {"route": [{"provider": "fake-anthropic", "model": "claude-upstream"}], "price": price},
        # A second target dearer on output only: the call ends on one target, so the hold is the
        # dearest target's worst case (here the first's: its prompt written whole).
        "claude-x": {"route": [{"provider": "fake-anthropic", "model": "a", "price": price},
                                {"provider": "fake-anthropic", "model": "b",
                                 "price": {"input": "1", "output": "3"}}]}}))
    await grant(gw, "1")
    kwargs = dict(max_tokens=40, messages=[{"role": "user", "content": "please remember all of this " * 20}])
    upstream.behaviour = Behaviour(anthropic_content=TEXT, usage={"input_tokens": 0, "output_tokens": 40})
    await claude(gw).messages.create(model="claude-w", **kwargs)
    [(_, _, first_cost, _)] = await charged(gw, 1)
    assert first_cost == 40 * 2 * MTOK
    hold = (await gw.app[STORE].list_usage(account_id=gw.user_id))[0].estimated_cost_pico
    prompt_estimate, rest = divmod(hold - 40 * 2 * MTOK, 10 * MTOK)
    assert rest == 0 and prompt_estimate > 0  # the hold: every prompt token at the cache-write rate
    # Now the upstream writes that whole prompt to the cache: the charge meets the hold, never more.
    upstream.behaviour = Behaviour(anthropic_content=TEXT, usage={
        "input_tokens": 0, "cache_creation_input_tokens": prompt_estimate, "output_tokens": 40})
    await claude(gw).messages.create(model="claude-w", **kwargs)
    await claude(gw).messages.create(model="claude-x", **kwargs)
    assert await charged(gw, 3)
    rows = await gw.app[STORE].list_usage(account_id=gw.user_id)
    [written] = [r for r in rows if r.model == "claude-w" and r.actual_cost_pico != first_cost]
    assert written.actual_cost_pico == written.estimated_cost_pico == hold
    [two_targets] = [r for r in rows if r.model == "claude-x"]
    assert two_targets.estimated_cost_pico == max(prompt_estimate * 10 * MTOK + 40 * 2 * MTOK,
                                                  prompt_estimate * MTOK + 40 * 3 * MTOK)
    assert 0 < two_targets.actual_cost_pico <= two_targets.estimated_cost_pico
    assert await gw.app[STORE].get_balance(gw.user_id) == usd_to_pico(Decimal(1)) - sum(
        r.actual_cost_pico for r in rows)


async def test_anthropic_one_hour_cache_writes_cost_cache_write_1h(upstream: FakeUpstream, start_gateway) -> None:
    hour = {**CLAUDE_WRITES, "cache_write_1h": "6"}
    gw = await start_gateway(priced(upstream, **{
        "claude-hour": {"route": [{"provider": "fake-anthropic", "model": "claude-upstream"}], "price": hour},
        **claude_models()}))
    await grant(gw, "1")
    upstream.behaviour = Behaviour(anthropic_content=TEXT, usage={
        **ANTHROPIC_USAGE, "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 300}})
    for model in ("claude-hour", "claude-writes"):
        async with claude(gw).messages.stream(model=model, max_tokens=100,
                                              messages=[{"role": "user", "content": "hi"}]) as s:
            await s.get_final_message()
    hour_cost = 100 * 3 * MTOK + 1000 * 300_000 + 100 * 3_750_000 + 300 * 6 * MTOK + 50 * 15 * MTOK
    assert await charged(gw, 2) == [("claude-hour", 1500, hour_cost, hour_cost),
                                    ("claude-writes", 1500, WITH_WRITES, WITH_WRITES)]  # 1h at cache_write
