"""Any client to any model: the official OpenAI SDK against an Anthropic upstream and the Anthropic SDK
against an OpenAI-compatible one, through a real gateway, with what the upstream received checked too."""

from __future__ import annotations

import asyncio
import base64
import json
from decimal import Decimal
from typing import Any

import anthropic
import openai
import pydantic
import pytest

from nexgate_proxy.appkeys import STORE
from nexgate_proxy.money import usd_to_pico
from nexgate_proxy.store import NewLedgerEntry
from nexgate_proxy.testing import Behaviour, FakeUpstream, Gateway, RecordingPlugin, gateway_config
from nexgate_proxy.translate import DEFAULT_MAX_TOKENS

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
OPENAI_TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Weather in a city",
                                                  "parameters": WEATHER}},
                {"type": "function", "function": {"name": "time", "parameters": WEATHER}}]
ANTHROPIC_TOOLS = [{"name": "weather", "description": "Weather in a city", "input_schema": WEATHER},
                   {"name": "time", "input_schema": WEATHER}]


def claude(gw: Gateway) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=gw.url, api_key=gw.api_key, max_retries=0)


async def started(upstream: FakeUpstream, start_gateway, **config: Any) -> tuple[Gateway, RecordingPlugin]:
    recorder = RecordingPlugin()
    return await start_gateway(gateway_config(upstream, **config), plugins=[recorder]), recorder


def same_completion(streamed: Any, direct: Any) -> None:
    """A stream helper's final completion equals the direct answer (the clock-based field aside)."""
    a, b = streamed.model_dump(warnings=False), direct.model_dump(warnings=False)
    for d in (a, b):
        d.pop("created")
        for choice in d["choices"]:
            choice["message"].pop("parsed", None)
            for call in choice["message"].get("tool_calls") or []:
                call["function"].pop("parsed_arguments", None)
                call.pop("index", None)  # the SDK's stream helper keeps the chunks' index
            for block in choice["message"].get("thinking_blocks") or []:
                block.pop("index", None)
    assert a == b


def same_message(streamed: Any, direct: Any) -> None:
    a, b = streamed.model_dump(), direct.model_dump()
    for block in a["content"]:
        block.pop("parsed_output", None)
    assert a == b


# ------------------------------------------------------------ OpenAI SDK -> Anthropic upstream

async def test_openai_sdk_chats_with_a_claude_model(upstream: FakeUpstream, start_gateway) -> None:
    gw, recorder = await started(upstream, start_gateway)
    client = gw.openai_client()
    reply = await client.chat.completions.create(
        model="claude-test", temperature=0.5, top_p=0.9, stop=["END"], user="u-1",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Speak French"}])
    assert reply.choices[0].message.content == "Bonjour"
    assert reply.choices[0].finish_reason == "stop"
    # Anthropic's input_tokens excludes cache reads: the OpenAI client sees them inside prompt_tokens.
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (17, 3)
    assert reply.usage.prompt_tokens_details.cached_tokens == 5
    sent = upstream.received[-1]
    assert sent.path == "/v1/messages" and sent.headers["anthropic-version"]
    assert sent.body == {
        "model": "claude-upstream", "system": [{"type": "text", "text": "Be brief."}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                     {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]},
                     {"role": "user", "content": [{"type": "text", "text": "Speak French"}]}],
        "max_tokens": DEFAULT_MAX_TOKENS, "temperature": 0.5, "top_p": 0.9, "stop_sequences": ["END"],
        "metadata": {"user_id": "u-1"}}
    record = recorder.records[-1]
    assert (record.provider, record.prompt_tokens, record.completion_tokens, record.cached_tokens) == (
        "fake-anthropic", 17, 3, 5)
    assert not record.usage_estimated and record.status == 200


async def test_max_tokens_comes_from_the_model_then_the_client(upstream: FakeUpstream, start_gateway) -> None:
    models = gateway_config(upstream)["models"]
    models["claude-test"]["max_output_tokens"] = 1234
    gw, _ = await started(upstream, start_gateway, models=models)
    client = gw.openai_client()
    await client.chat.completions.create(model="claude-test", messages=[{"role": "user", "content": "x"}])
    assert upstream.received[-1].body["max_tokens"] == 1234
    await client.chat.completions.create(model="claude-test", max_completion_tokens=77,
                                         messages=[{"role": "user", "content": "x"}])
    assert upstream.received[-1].body["max_tokens"] == 77


async def test_openai_stream_helper_matches_the_direct_answer_with_thinking(
        upstream: FakeUpstream, start_gateway) -> None:
    gw, recorder = await started(upstream, start_gateway)
    upstream.behaviour = Behaviour(anthropic_content=[
        {"type": "thinking", "thinking": "The user wants a greeting.", "signature": "sig"},
        {"type": "text", "text": "Hello there, \"friend\" \\ é\n🎉."}])
    client = gw.openai_client()
    kw: dict[str, Any] = {"model": "claude-test", "messages": [{"role": "user", "content": "greet"}],
                          "reasoning_effort": "low", "max_completion_tokens": 5000}
    direct = await client.chat.completions.create(**kw)
    assert direct.choices[0].message.content == "Hello there, \"friend\" \\ é\n🎉."
    assert direct.choices[0].message.model_extra["reasoning_content"] == "The user wants a greeting."
    assert upstream.received[-1].body["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    assert direct.usage.prompt_tokens == 30 + 6 + 2 and direct.usage.prompt_tokens_details.cached_tokens == 6
    async with client.chat.completions.stream(**kw, stream_options={"include_usage": True}) as stream:
        chunks = [event async for event in stream if event.type == "chunk"]
        final = await stream.get_final_completion()
    same_completion(final, direct)
    assert upstream.received[-1].body["stream"] is True
    assert len(chunks) > 5  # translated event by event, not as one answer
    # Sent back (as after a tool call), the answer's signed thinking reaches Claude again.
    for answer in (direct, final):
        await client.chat.completions.create(model="claude-test", messages=[
            {"role": "user", "content": "greet"}, answer.choices[0].message.model_dump(exclude_none=True),
            {"role": "user", "content": "again"}])
        assert upstream.received[-1].body["messages"][1] == {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "The user wants a greeting.", "signature": "sig"},
            {"type": "text", "text": "Hello there, \"friend\" \\ é\n🎉."}]}
    record = recorder.records[-3]
    assert (record.stream, record.prompt_tokens, record.completion_tokens, record.cached_tokens) == (
        True, 38, 15, 6)


async def test_openai_parallel_tools_with_a_claude_model(upstream: FakeUpstream, start_gateway) -> None:
    gw, _ = await started(upstream, start_gateway)
    upstream.behaviour = Behaviour(stop_reason="tool_use", anthropic_content=[
        {"type": "text", "text": "Checking both."},
        {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_2", "name": "time", "input": {"city": "Tokyo"}}])
    client = gw.openai_client()
    kw: dict[str, Any] = {"model": "claude-test", "tools": OPENAI_TOOLS, "tool_choice": "required",
                          "parallel_tool_calls": True, "messages": [{"role": "user", "content": "Paris, Tokyo?"}]}
    direct = await client.chat.completions.create(**kw)
    sent = upstream.received[-1].body
    assert sent["tools"] == ANTHROPIC_TOOLS and sent["tool_choice"] == {"type": "any"}
    message = direct.choices[0].message
    assert direct.choices[0].finish_reason == "tool_calls" and message.content == "Checking both."
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("toolu_1", "weather", {"city": "Paris"}), ("toolu_2", "time", {"city": "Tokyo"})]
    async with client.chat.completions.stream(**kw, stream_options={"include_usage": True}) as stream:
        final = await stream.get_final_completion()
    same_completion(final, direct)

    # The next turn: the calls and their results (two tool messages) become one user turn of tool_result blocks.
    upstream.behaviour = Behaviour()
    await client.chat.completions.create(model="claude-test", tools=OPENAI_TOOLS, parallel_tool_calls=False,
                                         tool_choice={"type": "function", "function": {"name": "weather"}},
                                         messages=[{"role": "user", "content": "Paris, Tokyo?"},
                                                   message.model_dump(exclude_none=True),
                                                   {"role": "tool", "tool_call_id": "toolu_1", "content": "Sunny"},
                                                   {"role": "tool", "tool_call_id": "toolu_2", "content": "9 am"}])
    sent = upstream.received[-1].body
    assert sent["tool_choice"] == {"type": "tool", "name": "weather", "disable_parallel_tool_use": True}
    assert sent["messages"][1:] == [
        {"role": "assistant", "content": [
            {"type": "text", "text": "Checking both."},
            {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_2", "name": "time", "input": {"city": "Tokyo"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "Sunny"}]},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "9 am"}]}]}]


async def test_openai_images_reach_claude_as_image_blocks(upstream: FakeUpstream, start_gateway) -> None:
    gw, _ = await started(upstream, start_gateway)
    await gw.openai_client().chat.completions.create(model="claude-test", messages=[{"role": "user", "content": [
        {"type": "text", "text": "Compare"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg", "detail": "low"}}]}])
    assert upstream.received[-1].body["messages"][0]["content"] == [
        {"type": "text", "text": "Compare"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}]


class City(pydantic.BaseModel):
    name: str
    population: int


async def test_openai_structured_output_with_a_claude_model(upstream: FakeUpstream, start_gateway) -> None:
    gw, _ = await started(upstream, start_gateway)
    upstream.behaviour = Behaviour(stop_reason="tool_use", anthropic_content=[
        {"type": "tool_use", "id": "toolu_j", "name": "json_response", "input": {"name": "Paris", "population": 2}}])
    client = gw.openai_client()
    kw: dict[str, Any] = {"model": "claude-test", "response_format": City,
                          "messages": [{"role": "user", "content": "A city"}]}
    direct = await client.chat.completions.parse(**kw)
    assert direct.choices[0].message.parsed == City(name="Paris", population=2)
    assert direct.choices[0].finish_reason == "stop" and not direct.choices[0].message.tool_calls
    sent = upstream.received[-1].body
    assert sent["tool_choice"] == {"type": "tool", "name": "json_response"}
    assert sent["tools"][0]["input_schema"]["properties"].keys() == {"name", "population"}
    async with client.chat.completions.stream(**kw, stream_options={"include_usage": True}) as stream:
        final = await stream.get_final_completion()
    assert final.choices[0].message.parsed == City(name="Paris", population=2)
    same_completion(final, direct)
    # JSON mode with tools cannot be served faithfully by Anthropic: refused, naming the parameter.
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="claude-test", tools=OPENAI_TOOLS,
                                             response_format={"type": "json_object"},
                                             messages=[{"role": "user", "content": "x"}])
    assert err.value.body["param"] == "response_format"


@pytest.mark.parametrize(("extra", "param"), [
    ({"n": 2}, "n"), ({"logprobs": True}, "logprobs"), ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"seed": 7}, "seed"), ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio",
                                                  "input_audio": {"data": "AAAA", "format": "wav"}}]}]},
     "messages[0].content[0]"),
])
async def test_untranslatable_openai_parameters_are_refused_by_name(
        upstream: FakeUpstream, start_gateway, extra: dict[str, Any], param: str) -> None:
    gw, recorder = await started(upstream, start_gateway)
    kw: dict[str, Any] = {"model": "claude-test", "messages": [{"role": "user", "content": "x"}], **extra}
    with pytest.raises(openai.BadRequestError) as err:
        await gw.openai_client().chat.completions.create(**kw)
    assert err.value.status_code == 400
    assert err.value.body["param"] == param and err.value.body["code"] == "unsupported_parameter"
    assert param.split("[")[0] in err.value.body["message"]
    assert upstream.received == []
    assert recorder.records[-1].status == 400


async def test_anthropic_errors_reach_openai_clients_in_their_dialect(upstream: FakeUpstream, start_gateway) -> None:
    gw, _ = await started(upstream, start_gateway)
    client = gw.openai_client()
    upstream.behaviour = Behaviour(status=400, error_body=json.dumps({"type": "error", "error": {
        "type": "invalid_request_error", "message": "messages: text content blocks must be non-empty"}}).encode())
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="claude-test", messages=[{"role": "user", "content": "x"}])
    assert err.value.body == {"message": "messages: text content blocks must be non-empty",
                              "type": "invalid_request_error", "param": None, "code": None}
    upstream.behaviour = Behaviour(status=429)
    with pytest.raises(openai.RateLimitError) as limited:
        await client.chat.completions.create(model="claude-test", messages=[{"role": "user", "content": "x"}])
    assert limited.value.body["message"] == "upstream says no"
    upstream.behaviour = Behaviour(status=529)
    with pytest.raises(openai.APIStatusError) as failed:
        await client.chat.completions.create(model="claude-test", messages=[{"role": "user", "content": "x"}])
    assert failed.value.status_code == 502 and failed.value.body["code"] == "upstream_error"
    # An error event in the middle of Anthropic's stream raises in the OpenAI SDK.
    upstream.behaviour = Behaviour(anthropic_content=[{"type": "text", "text": "Hello there"}], stream_error={
        "type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    stream = await client.chat.completions.create(model="claude-test", stream=True,
                                                  messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.APIError, match="Overloaded"):
        async for _ in stream:
            pass


# ------------------------------------------------------------ Anthropic SDK -> OpenAI upstream

async def test_anthropic_sdk_chats_with_an_openai_model(upstream: FakeUpstream, start_gateway) -> None:
    gw, recorder = await started(upstream, start_gateway)
    message = await claude(gw).messages.create(
        model="gpt-test", max_tokens=100, extra_body={"temperature": 0.2}, stop_sequences=["END"],
        metadata={"user_id": "u-2"},
        system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
        messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": [{"type": "text", "text": "More"}]}])
    assert message.content[0].text == "Hello from upstream" and message.stop_reason == "end_turn"
    # OpenAI's prompt_tokens include cached ones; Anthropic's input_tokens do not.
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens, message.usage.output_tokens) == (
        8, 3, 7)
    sent = upstream.received[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.body == {"model": "upstream-model", "max_tokens": 100, "temperature": 0.2, "stop": ["END"],
                         "user": "u-2", "messages": [
                             {"role": "system", "content": "Be brief.\n\nBe kind."},
                             {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                             {"role": "user", "content": "More"}]}
    record = recorder.records[-1]
    assert (record.provider, record.prompt_tokens, record.completion_tokens, record.cached_tokens) == (
        "fake", 11, 7, 3)


async def test_anthropic_stream_helper_matches_the_direct_answer_with_reasoning(
        upstream: FakeUpstream, start_gateway) -> None:
    gw, recorder = await started(upstream, start_gateway)
    upstream.behaviour = Behaviour(chat_message={"content": 'The answer is "42" \\ é\n🎉.',
                                                 "reasoning_content": "Six times seven."})
    client = claude(gw)
    kw: dict[str, Any] = {"model": "gpt-test", "max_tokens": 9000, "messages": [{"role": "user", "content": "?"}],
                          "thinking": {"type": "enabled", "budget_tokens": 8000}}
    direct = await client.messages.create(**kw)
    assert [b.type for b in direct.content] == ["thinking", "text"]
    assert direct.content[0].thinking == "Six times seven." and direct.content[1].text == 'The answer is "42" \\ é\n🎉.'
    assert upstream.received[-1].body["reasoning_effort"] == "medium"
    async with client.messages.stream(**kw) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_message()
    same_message(final, direct)
    assert upstream.received[-1].body["stream_options"] == {"include_usage": True}
    assert kinds.count("content_block_start") == 2 and kinds[-1] == "message_stop"
    record = recorder.records[-1]
    assert (record.stream, record.prompt_tokens, record.completion_tokens, record.cached_tokens) == (
        True, 20, 9, 4)


async def test_anthropic_parallel_tools_with_an_openai_model(upstream: FakeUpstream, start_gateway) -> None:
    gw, _ = await started(upstream, start_gateway)
    upstream.behaviour = Behaviour(finish_reason="tool_calls", chat_message={"tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "time", "arguments": '{"city": "Tokyo"}'}}]})
    client = claude(gw)
    kw: dict[str, Any] = {"model": "gpt-test", "max_tokens": 100, "tools": ANTHROPIC_TOOLS,
                          "tool_choice": {"type": "any"}, "messages": [{"role": "user", "content": "Paris, Tokyo?"}]}
    direct = await client.messages.create(**kw)
    sent = upstream.received[-1].body
    assert sent["tools"] == OPENAI_TOOLS and sent["tool_choice"] == "required"
    assert direct.stop_reason == "tool_use"
    assert [(b.type, b.id, b.name, b.input) for b in direct.content] == [
        ("tool_use", "call_1", "weather", {"city": "Paris"}), ("tool_use", "call_2", "time", {"city": "Tokyo"})]
    async with client.messages.stream(**kw) as stream:
        final = await stream.get_final_message()
    same_message(final, direct)

    upstream.behaviour = Behaviour()
    await client.messages.create(
        model="gpt-test", max_tokens=100, tools=ANTHROPIC_TOOLS,
        tool_choice={"type": "tool", "name": "weather", "disable_parallel_tool_use": True},
        messages=[{"role": "user", "content": "Paris, Tokyo?"},
                  {"role": "assistant", "content": [b.model_dump() for b in direct.content]},
                  {"role": "user", "content": [
                      {"type": "tool_result", "tool_use_id": "call_1", "content": "Sunny"},
                      {"type": "tool_result", "tool_use_id": "call_2", "content": [{"type": "text", "text": "9 am"}],
                       "is_error": True},
                      {"type": "text", "text": "Thanks"}]}])
    sent = upstream.received[-1].body
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    assert sent["parallel_tool_calls"] is False
    assert sent["messages"][1:] == [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "time", "arguments": '{"city": "Tokyo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "Error: 9 am"},
        {"role": "user", "content": "Thanks"}]


async def test_anthropic_images_reach_openai_as_image_urls(upstream: FakeUpstream, start_gateway) -> None:
    gw, _ = await started(upstream, start_gateway)
    await claude(gw).messages.create(model="gpt-test", max_tokens=10, messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
        {"type": "text", "text": "Compare"}]}])
    assert upstream.received[-1].body["messages"][0]["content"] == [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
        {"type": "text", "text": "Compare"}]


async def test_untranslatable_anthropic_parameters_are_refused_by_name(
        upstream: FakeUpstream, start_gateway) -> None:
    gw, _ = await started(upstream, start_gateway)
    client = claude(gw)
    with pytest.raises(anthropic.BadRequestError) as err:
        await client.messages.create(model="gpt-test", max_tokens=10, extra_body={"top_k": 5},
                                     messages=[{"role": "user", "content": "x"}])
    assert err.value.body["type"] == "error" and err.value.body["error"]["param"] == "top_k"
    with pytest.raises(anthropic.BadRequestError) as err:
        await client.messages.create(model="gpt-test", max_tokens=10, messages=[{"role": "user", "content": "x"}],
                                     tools=[{"type": "web_search_20250305", "name": "web_search"}])
    assert err.value.body["error"]["param"] == "tools[0]"
    assert upstream.received == []


async def test_openai_errors_reach_anthropic_clients_in_their_dialect(upstream: FakeUpstream, start_gateway) -> None:
    gw, _ = await started(upstream, start_gateway)
    client = claude(gw)
    upstream.behaviour = Behaviour(status=400, error_body=json.dumps({"error": {
        "message": "Invalid 'messages[0].content': string too long.", "type": "invalid_request_error",
        "param": "messages[0].content", "code": "string_above_max_length"}}).encode())
    with pytest.raises(anthropic.BadRequestError) as err:
        await client.messages.create(model="gpt-test", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert err.value.body == {"type": "error", "error": {
        "type": "invalid_request_error", "message": "Invalid 'messages[0].content': string too long."}}
    upstream.behaviour = Behaviour(status=404)
    with pytest.raises(anthropic.NotFoundError) as missing:
        await client.messages.create(model="gpt-test", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert missing.value.body["error"]["type"] == "not_found_error"
    upstream.behaviour = Behaviour(status=503)
    with pytest.raises(anthropic.APIStatusError) as failed:
        await client.messages.create(model="gpt-test", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert failed.value.status_code == 502 and failed.value.body["type"] == "error"
    upstream.behaviour = Behaviour(chat_message={"content": "Hello"}, stream_error={
        "error": {"message": "The server had an error", "type": "server_error", "param": None, "code": None}})
    with pytest.raises(anthropic.APIStatusError, match="The server had an error"):
        async with client.messages.stream(model="gpt-test", max_tokens=10,
                                          messages=[{"role": "user", "content": "x"}]) as stream:
            async for _ in stream:
                pass


# ------------------------------------------------------------ fallbacks across dialects

async def test_fallbacks_cross_dialects_both_ways(upstream: FakeUpstream, start_gateway) -> None:
    async with FakeUpstream() as broken:
        broken.behaviour = Behaviour(status=500)
        config = gateway_config(upstream)
        config["providers"]["broken-anthropic"] = {"type": "anthropic", "base_url": broken.base, "api_key": "k"}
        config["providers"]["broken-openai"] = {"type": "openai", "base_url": broken.url, "api_key": "k"}
        config["models"]["claude-down"] = {"route": [{"provider": "broken-anthropic", "model": "c"}],
                                           "fallbacks": ["gpt-test"], "free": True}
        config["models"]["gpt-down"] = {"route": [{"provider": "broken-openai", "model": "g"}],
                                        "fallbacks": ["claude-test"], "free": True}
        recorder = RecordingPlugin()
        gw = await start_gateway(config, plugins=[recorder])
        prompt = [{"role": "user", "content": "hi"}]
        # The OpenAI SDK: a Claude model falls back to an OpenAI one (native), and an OpenAI model to Claude.
        reply = await gw.openai_client().chat.completions.create(model="claude-down", messages=prompt)
        assert reply.choices[0].message.content == "Hello from upstream"
        assert (recorder.records[-1].provider, recorder.records[-1].attempts) == ("fake", 2)
        reply = await gw.openai_client().chat.completions.create(model="gpt-down", messages=prompt)
        assert reply.choices[0].message.content == "Bonjour"
        assert (recorder.records[-1].provider, recorder.records[-1].attempts) == ("fake-anthropic", 2)
        # The Anthropic SDK, streaming: the same two chains.
        async with claude(gw).messages.stream(model="claude-down", max_tokens=10, messages=prompt) as stream:
            assert (await stream.get_final_message()).content[0].text == "Hello from upstream"
        async with claude(gw).messages.stream(model="gpt-down", max_tokens=10, messages=prompt) as stream:
            assert (await stream.get_final_message()).content[0].text == "Bonjour"
        assert [r.path for r in broken.received] == ["/v1/messages", "/v1/chat/completions",
                                                     "/v1/messages", "/v1/chat/completions"]
        assert [r.path for r in upstream.received] == ["/v1/chat/completions", "/v1/messages",
                                                       "/v1/chat/completions", "/v1/messages"]


async def test_priced_translated_requests_are_charged_from_the_served_usage(
        upstream: FakeUpstream, start_gateway) -> None:
    price = {"input": 1, "output": 2, "cached_input": "0.5"}
    config = gateway_config(upstream)
    for model in config["models"].values():
        model.pop("free")
        model["price"] = price
    recorder = RecordingPlugin()
    gw = await start_gateway(config, plugins=[recorder])
    await gw.app[STORE].apply_ledger_entry(NewLedgerEntry(
        account_id=gw.user_id, kind="grant", amount_pico=usd_to_pico(Decimal("1")), source="test", external_id="g"))
    await gw.openai_client().chat.completions.create(model="claude-test", messages=[{"role": "user", "content": "x"}])
    direct = recorder.records[-1]
    await claude(gw).messages.create(model="claude-test", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    native = recorder.records[-1]
    # 12 input, 5 cache reads and 3 output tokens at the served model's price, to the pico-dollar.
    assert direct.actual_cost_pico == native.actual_cost_pico == 12 * 1_000_000 + 5 * 500_000 + 3 * 2_000_000
    assert (direct.prompt_tokens, direct.completion_tokens) == (native.prompt_tokens, native.completion_tokens)


async def test_translated_streams_flow_event_by_event(upstream: FakeUpstream, start_gateway) -> None:
    gw, _ = await started(upstream, start_gateway)
    upstream.behaviour = Behaviour(chunk_delay=0.15, anthropic_content=[{"type": "text", "text": "one two three four"}],
                                   chat_message={"content": "one two three four"})
    loop_time = asyncio.get_running_loop().time
    start = loop_time()
    stream = await gw.openai_client().chat.completions.create(
        model="claude-test", stream=True, messages=[{"role": "user", "content": "x"}])
    arrivals = [loop_time() - start async for chunk in stream if chunk.choices and chunk.choices[0].delta.content]
    # The upstream takes 0.15 s per event; the first words arrive long before the last.
    assert len(arrivals) == 4 and arrivals[-1] - arrivals[0] > 0.3
    start = loop_time()
    async with claude(gw).messages.stream(model="gpt-test", max_tokens=10,
                                          messages=[{"role": "user", "content": "x"}]) as events:
        arrivals = [loop_time() - start async for _ in events.text_stream]
    assert len(arrivals) == 4 and arrivals[-1] - arrivals[0] > 0.3


async def test_a_target_that_cannot_take_the_request_passes_it_to_the_next(
        upstream: FakeUpstream, start_gateway) -> None:
    config = gateway_config(upstream)
    config["models"]["claude-first"] = {"route": [{"provider": "fake-anthropic", "model": "c"}],
                                        "fallbacks": ["gpt-test"], "free": True}
    recorder = RecordingPlugin()
    gw = await start_gateway(config, plugins=[recorder])
    # n=2 has no Anthropic equivalent: the Claude target is skipped, the OpenAI fallback serves it as sent.
    reply = await gw.openai_client().chat.completions.create(model="claude-first", n=2, stop="END",
                                                             messages=[{"role": "user", "content": "x"}])
    assert reply.choices[0].message.content == "Hello from upstream"
    assert [(r.path, r.body.get("n"), r.body.get("stop")) for r in upstream.received] == [
        ("/v1/chat/completions", 2, "END")]
    assert (recorder.records[-1].provider, recorder.records[-1].attempts) == ("fake", 1)
    # Without the parameter the Claude target serves it; tool_choice none and a single stop string map too.
    await gw.openai_client().chat.completions.create(model="claude-first", stop="END", tool_choice="none",
                                                     messages=[{"role": "user", "content": "x"}])
    sent = upstream.received[-1]
    assert sent.path == "/v1/messages"
    assert (sent.body["stop_sequences"], sent.body["tool_choice"]) == (["END"], {"type": "none"})
