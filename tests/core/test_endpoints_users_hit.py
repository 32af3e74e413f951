"""The endpoints real clients hit: count_tokens, moderations, CORS preflights, paths without /v1."""

from __future__ import annotations

import aiohttp
import anthropic
import openai
import pytest

from nexgate_proxy.appkeys import STORE
from nexgate_proxy.config import ConfigError, parse_config
from nexgate_proxy.testing import PROVIDER_KEY, FakeUpstream, Gateway, RecordingPlugin, gateway_config
from nexgate_plugins.usage_log import OUTBOX
from tests.wire import Wire, json_answer

PRICE = {"input": "3", "output": "15"}
UNBILLED = ("messages.count_tokens", "moderations")
MESSAGES = [{"role": "user", "content": "Count the tokens in this sentence, please."}]


def priced(wire: Wire) -> dict:
    """Priced models while credits are on, and a user with no balance: any charge would be a 402."""
    return {
        "providers": {
            "claude": {"type": "anthropic", "base_url": wire.base, "api_key": PROVIDER_KEY},
            "oai": {"type": "openai", "base_url": f"{wire.base}/v1", "api_key": PROVIDER_KEY},
        },
        "models": {
            "claude-paid": {"route": [{"provider": "claude", "model": "claude-upstream"}], "price": PRICE},
            "gpt-paid": {"route": [{"provider": "oai", "model": "gpt-upstream"}], "price": PRICE},
            "omni-moderation-latest": {"route": [{"provider": "oai", "model": "omni-moderation-2024-09-26"}],
                                       "price": PRICE},
        },
        "auth": {"bcrypt_rounds": 4},
    }


def anthropic_client(gw: Gateway, base_url: str | None = None) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=base_url or gw.url, api_key=gw.api_key, max_retries=0)


async def assert_nothing_billed(gw: Gateway) -> None:
    assert await gw.app[OUTBOX].flush()
    store = gw.app[STORE]
    assert await store.list_ledger(gw.user_id) == []
    assert await store.get_balance(gw.user_id) == 0
    rows = [r for r in await store.list_usage(account_id=gw.user_id) if r.endpoint in UNBILLED]
    assert rows and all(r.actual_cost_pico is None and r.estimated_cost_pico is None for r in rows)


# -------------------------------------------------------------- count_tokens


async def test_count_tokens_is_forwarded_to_anthropic_and_never_charged(start_gateway) -> None:
    async with Wire() as wire:
        wire.on("/v1/messages/count_tokens", json_answer({"input_tokens": 42}))
        gw = await start_gateway(priced(wire))
        client = anthropic_client(gw)
        raw = await client.messages.with_raw_response.count_tokens(
            model="claude-paid", system="Be brief.", messages=MESSAGES)
        # Credits are on and the balance is empty: a real call is refused, counting is not.
        with pytest.raises(anthropic.APIStatusError) as err:
            await client.messages.create(model="claude-paid", max_tokens=10, messages=MESSAGES)
    assert err.value.status_code == 402
    assert (await raw.parse()).input_tokens == 42
    assert "x-nexgate-estimated" not in raw.headers and "x-nexgate-cost-usd" not in raw.headers
    seen = wire.seen[0]
    assert seen.path == "/v1/messages/count_tokens"
    assert seen.headers["x-api-key"] == PROVIDER_KEY and seen.headers["anthropic-version"]
    assert gw.api_key not in str(seen.headers)
    assert seen.body == {"model": "claude-upstream", "system": "Be brief.", "messages": MESSAGES}
    assert len(wire.seen) == 1
    await assert_nothing_billed(gw)


async def test_count_tokens_for_an_openai_model_is_an_estimate_marked_so(start_gateway) -> None:
    async with Wire() as wire:
        recorder = RecordingPlugin()
        gw = await start_gateway(priced(wire), plugins=[recorder])
        raw = await anthropic_client(gw).messages.with_raw_response.count_tokens(
            model="gpt-paid", messages=MESSAGES,
            tools=[{"name": "lookup", "description": "Look a word up.",
                    "input_schema": {"type": "object", "properties": {"word": {"type": "string"}}}}])
    assert wire.seen == []  # no provider can count for another dialect: nothing goes upstream
    assert raw.headers["x-nexgate-estimated"] == "true"
    count = (await raw.parse()).input_tokens
    assert 10 <= count <= 60  # ~4 bytes a token over the messages and the tool, plus per-message overhead
    assert recorder.records[-1].endpoint == "messages.count_tokens" and recorder.records[-1].status == 200
    await assert_nothing_billed(gw)


async def test_count_tokens_bad_input_gets_anthropic_errors(start_gateway) -> None:
    async with Wire() as wire:
        gw = await start_gateway(priced(wire))
        client = anthropic_client(gw)
        with pytest.raises(anthropic.NotFoundError) as missing:
            await client.messages.count_tokens(model="no-such-model", messages=MESSAGES)
        with pytest.raises(anthropic.AuthenticationError):
            await anthropic.AsyncAnthropic(base_url=gw.url, api_key="sk-wrong", max_retries=0).messages.count_tokens(
                model="claude-paid", messages=MESSAGES)
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{gw.url}/v1/messages/count_tokens", data=b"{not json",
                                 headers={"x-api-key": gw.api_key}) as resp:
                bad_json = (resp.status, await resp.json())
    assert missing.value.body["type"] == "error" and missing.value.body["error"]["code"] == "model_not_found"
    assert bad_json[0] == 400 and bad_json[1]["error"]["code"] == "invalid_json"
    assert wire.seen == []


# --------------------------------------------------------------- moderations


async def test_moderations_pass_through_to_openai_and_are_free(start_gateway) -> None:
    answer = {"id": "modr-1", "model": "omni-moderation-2024-09-26", "results": [
        {"flagged": False, "categories": {"violence": False}, "category_scores": {"violence": 0.0001},
         "category_applied_input_types": {"violence": ["text"]}},
        {"flagged": True, "categories": {"violence": True}, "category_scores": {"violence": 0.97},
         "category_applied_input_types": {"violence": ["text"]}}]}
    async with Wire() as wire:
        wire.on("/v1/moderations", json_answer(answer))
        gw = await start_gateway(priced(wire))
        client = gw.openai_client()
        result = await client.moderations.create(model="omni-moderation-latest", input=["hello", "a threat"])
        with pytest.raises(openai.BadRequestError) as no_model:
            await client.post("/moderations", cast_to=object, body={"input": "x"})
    assert [r.flagged for r in result.results] == [False, True]
    seen = wire.seen[0]
    assert (seen.path, seen.headers["Authorization"]) == ("/v1/moderations", f"Bearer {PROVIDER_KEY}")
    assert seen.body == {"model": "omni-moderation-2024-09-26", "input": ["hello", "a threat"]}
    assert no_model.value.body["code"] == "missing_required_parameter"
    assert len(wire.seen) == 1
    await assert_nothing_billed(gw)


# ---------------------------------------------------------- paths without /v1


async def test_sdks_pointed_at_the_bare_host_work(upstream: FakeUpstream, start_gateway) -> None:
    gw = await start_gateway(gateway_config(upstream))
    client = openai.AsyncOpenAI(base_url=gw.url, api_key=gw.api_key, max_retries=0)  # no /v1
    reply = await client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "Hello from upstream"
    stream = await client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}],
                                                  stream=True)
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == "Hello from upstream"
    assert (await client.embeddings.create(model="gpt-test", input="x")).data
    assert {m.id for m in (await client.models.list()).data} == {"gpt-test", "claude-test"}
    assert (await client.models.retrieve("gpt-test")).id == "gpt-test"
    assert [r.path for r in upstream.received] == ["/v1/chat/completions"] * 2 + ["/v1/embeddings"]
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gw.url}/messages", headers={"x-api-key": gw.api_key}, json={
                "model": "claude-test", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}) as resp:
            assert resp.status == 200 and (await resp.json())["type"] == "message"
        async with http.get(f"{gw.url}/chat/completions", headers={"Authorization": f"Bearer {gw.api_key}"}) as resp:
            assert resp.status == 405 and (await resp.json())["error"]["code"] == "method_not_allowed"


# ----------------------------------------------------------------------- CORS

APP = "https://app.example.com"


async def preflight(gw: Gateway, origin: str, path: str = "/v1/chat/completions") -> aiohttp.ClientResponse:
    async with aiohttp.ClientSession() as http:
        async with http.options(f"{gw.url}{path}", headers={
                "Origin": origin, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}) as resp:
            await resp.read()
            return resp


async def test_cors_preflight_allows_listed_origins_only(upstream: FakeUpstream, start_gateway) -> None:
    gw = await start_gateway(gateway_config(upstream, server={"cors": {"allow_origins": [APP, "http://localhost:5173"]}}))
    ok = await preflight(gw, APP)
    assert ok.status == 204
    assert ok.headers["Access-Control-Allow-Origin"] == APP
    assert "POST" in ok.headers["Access-Control-Allow-Methods"]
    assert ok.headers["Access-Control-Allow-Headers"] == "authorization, content-type, x-stainless-os"
    assert ok.headers["Access-Control-Max-Age"] == "600"
    assert "Origin" in ok.headers["Vary"]
    assert "Access-Control-Allow-Credentials" not in ok.headers
    assert (await preflight(gw, "http://localhost:5173", "/messages")).status == 204
    refused = await preflight(gw, "https://evil.example.net")
    assert refused.status == 403
    assert not any(h.lower().startswith("access-control-") for h in refused.headers)
    # The real call from an allowed page carries the origin and exposes the gateway's headers.
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gw.url}/v1/chat/completions", json={
                "model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
                headers={"Authorization": f"Bearer {gw.api_key}", "Origin": APP}) as resp:
            assert resp.status == 200 and b"[DONE]" in await resp.read()
            assert resp.headers["Access-Control-Allow-Origin"] == APP
            assert "x-nexgate-request-id" in resp.headers["Access-Control-Expose-Headers"]
        async with http.post(f"{gw.url}/v1/chat/completions", json={"model": "gpt-test", "messages": []},
                             headers={"Authorization": "Bearer wrong", "Origin": APP}) as resp:
            assert resp.status == 401 and resp.headers["Access-Control-Allow-Origin"] == APP  # errors readable too
        async with http.post(f"{gw.url}/v1/chat/completions", json={"model": "gpt-test", "messages": []},
                             headers={"Authorization": f"Bearer {gw.api_key}", "Origin": "https://evil.example.net"}
                             ) as resp:
            assert "Access-Control-Allow-Origin" not in resp.headers


async def test_cors_is_off_by_default(upstream: FakeUpstream, start_gateway) -> None:
    config = gateway_config(upstream)
    assert not parse_config(config).server.cors.enabled
    gw = await start_gateway(config)
    resp = await preflight(gw, APP)
    assert resp.status == 405
    assert not any(h.lower().startswith("access-control-") for h in resp.headers)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gw.url}/v1/models", headers={"Authorization": f"Bearer {gw.api_key}",
                                                             "Origin": APP}) as got:
            assert got.status == 200 and "Access-Control-Allow-Origin" not in got.headers


async def test_cors_any_origin_and_credentials(upstream: FakeUpstream, start_gateway) -> None:
    gw = await start_gateway(gateway_config(upstream, server={"cors": {"allow_origins": ["*"], "max_age": 60}}))
    resp = await preflight(gw, "https://anything.example")
    assert (resp.status, resp.headers["Access-Control-Allow-Origin"], resp.headers["Access-Control-Max-Age"]) == (
        204, "*", "60")
    gw = await start_gateway(gateway_config(upstream, server={"cors": {"allow_origins": [APP],
                                                                       "allow_credentials": True}}))
    resp = await preflight(gw, APP)
    assert resp.headers["Access-Control-Allow-Origin"] == APP
    assert resp.headers["Access-Control-Allow-Credentials"] == "true"


def test_cors_config_refuses_wildcard_with_credentials_and_malformed_origins() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"server": {"cors": {"allow_origins": ["*", "https://app.example.com/", "app.example.com"],
                                          "allow_credentials": True, "max_age": -1}}})
    assert sorted(err.value.problems) == sorted([
        "server.cors.allow_origins[1]: expected an origin like https://app.example.com (scheme and host, no path) "
        "or '*', got 'https://app.example.com/'",
        "server.cors.allow_origins[2]: expected an origin like https://app.example.com (scheme and host, no path) "
        "or '*', got 'app.example.com'",
        "server.cors.allow_credentials: cannot be true while allow_origins has '*': "
        "list the origins that may send credentials",
        "server.cors.max_age: must not be negative",
    ])



async def test_the_echo_demo_answers_count_tokens_and_moderations(start_gateway) -> None:
    gw = await start_gateway({"providers": {"echo": {"type": "echo"}},
                              "models": {"demo": {"route": [{"provider": "echo", "model": "echo-1"}], "free": True}},
                              "auth": {"bcrypt_rounds": 4}})
    raw = await anthropic_client(gw).messages.with_raw_response.count_tokens(model="demo", messages=MESSAGES)
    assert (await raw.parse()).input_tokens == len(MESSAGES[0]["content"].split())  # echo counts words
    assert "x-nexgate-estimated" not in raw.headers  # echo speaks Anthropic's API: it answered itself
    moderation = await gw.openai_client().moderations.create(model="demo", input=["a", "b"])
    assert [r.flagged for r in moderation.results] == [False, False]
