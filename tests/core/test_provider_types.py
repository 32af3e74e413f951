"""`type: azure` and `type: gemini` against local upstreams speaking their exact wire formats."""

from __future__ import annotations

import json
import re
from pathlib import Path

import openai
import pytest

from nexgate_proxy.app import build_app
from nexgate_proxy.config import ConfigError, parse_config
from nexgate_proxy.testing import RecordingPlugin
from tests.wire import Wire, json_answer, sse_answer

AZURE_KEY = "azure-key-0123456789abcdef"
GEMINI_KEY = "AIza-gemini-key-0123456789"
SAFE = {"hate": {"filtered": False, "severity": "safe"}, "self_harm": {"filtered": False, "severity": "safe"},
        "sexual": {"filtered": False, "severity": "safe"}, "violence": {"filtered": False, "severity": "safe"}}
PROMPT_FILTER = [{"prompt_index": 0, "content_filter_results": SAFE}]


def config(wire: Wire, **provider_options) -> dict:
    return {
        "providers": {
            "az": {"type": "azure", "base_url": wire.base, "api_key": AZURE_KEY, **provider_options},
            "gem": {"type": "gemini", "base_url": f"{wire.base}/v1beta/openai", "api_key": GEMINI_KEY},
        },
        "models": {
            "gpt-azure": {"route": [{"provider": "az", "model": "my-gpt4o"}], "free": True},
            "embed-azure": {"route": [{"provider": "az", "model": "emb-small"}], "free": True},
            "gemini-flash": {"route": [{"provider": "gem", "model": "gemini-2.0-flash"}], "free": True},
        },
        "auth": {"bcrypt_rounds": 4},
    }


def azure_chat(text: str) -> dict:
    return {
        "choices": [{"content_filter_results": SAFE, "finish_reason": "stop", "index": 0, "logprobs": None,
                     "message": {"content": text, "refusal": None, "role": "assistant"}}],
        "created": 1733000000, "id": "chatcmpl-Az1", "model": "gpt-4o-2024-08-06", "object": "chat.completion",
        "prompt_filter_results": PROMPT_FILTER, "system_fingerprint": "fp_az",
        "usage": {"completion_tokens": 4, "prompt_tokens": 9, "total_tokens": 13,
                  "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}},
    }


def azure_stream(words: list[str], usage: bool) -> list:
    # Azure opens with a chunk that has no choices and only the prompt's filter results.
    events: list = [{"choices": [], "created": 0, "id": "", "model": "", "object": "",
                     "prompt_filter_results": PROMPT_FILTER}]
    for i, word in enumerate(words):
        chunk = {"choices": [{"content_filter_results": SAFE, "delta": {"content": word}, "finish_reason": None,
                              "index": 0, "logprobs": None}],
                 "created": 1733000000, "id": "chatcmpl-Az2", "model": "gpt-4o-2024-08-06",
                 "object": "chat.completion.chunk", "system_fingerprint": "fp_az"}
        if usage:
            chunk["usage"] = None
        events.append(chunk)
    events.append({"choices": [{"content_filter_results": {}, "delta": {}, "finish_reason": "stop", "index": 0,
                                "logprobs": None}], "created": 1733000000, "id": "chatcmpl-Az2",
                   "model": "gpt-4o-2024-08-06", "object": "chat.completion.chunk", "system_fingerprint": "fp_az",
                   **({"usage": None} if usage else {})})
    if usage:
        events.append({"choices": [], "created": 1733000000, "id": "chatcmpl-Az2", "model": "gpt-4o-2024-08-06",
                       "object": "chat.completion.chunk", "system_fingerprint": "fp_az",
                       "usage": {"completion_tokens": len(words), "prompt_tokens": 9,
                                 "total_tokens": 9 + len(words)}})
    return [*events, "[DONE]"]


async def test_azure_chat_goes_to_the_deployment_with_the_api_key_header(start_gateway) -> None:
    async with Wire() as wire:
        wire.on("/openai/deployments/my-gpt4o/chat/completions", json_answer(azure_chat("Hi from Azure")))
        recorder = RecordingPlugin()
        gw = await start_gateway(config(wire), plugins=[recorder])
        reply = await gw.openai_client().chat.completions.create(
            model="gpt-azure", messages=[{"role": "user", "content": "hello"}], temperature=0.2)
    assert reply.choices[0].message.content == "Hi from Azure"
    seen = wire.seen[-1]
    assert seen.path == "/openai/deployments/my-gpt4o/chat/completions"
    assert seen.query == {"api-version": "2024-10-21"}
    assert seen.headers["api-key"] == AZURE_KEY
    assert "Authorization" not in seen.headers  # neither the client's key nor a Bearer of the provider's
    assert gw.api_key not in json.dumps(seen.headers)
    assert seen.body == {"model": "my-gpt4o", "messages": [{"role": "user", "content": "hello"}], "temperature": 0.2}
    record = recorder.records[-1]
    assert (record.provider, record.upstream_model, record.prompt_tokens, record.completion_tokens) == (
        "az", "my-gpt4o", 9, 4)
    assert not record.usage_estimated


async def test_azure_stream_reports_usage_whether_or_not_the_client_asked(start_gateway) -> None:
    async with Wire() as wire:
        wire.on("/openai/deployments/my-gpt4o/chat/completions", sse_answer(azure_stream(["Hi", " there"], True)))
        recorder = RecordingPlugin()
        gw = await start_gateway(config(wire, options={"api_version": "2025-01-01-preview"}), plugins=[recorder])
        client = gw.openai_client()
        # The client did not ask for usage: NexGate asks Azure, counts it, and hides that chunk.
        stream = await client.chat.completions.create(
            model="gpt-azure", messages=[{"role": "user", "content": "hello"}], stream=True)
        chunks = [c async for c in stream]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hi there"
        assert all(c.usage is None for c in chunks)
        seen = wire.seen[-1]
        assert seen.query == {"api-version": "2025-01-01-preview"}
        assert seen.body["stream"] is True and seen.body["stream_options"] == {"include_usage": True}
        assert (recorder.records[-1].prompt_tokens, recorder.records[-1].completion_tokens) == (9, 2)
        # A client that asks gets Azure's usage chunk.
        stream = await client.chat.completions.create(
            model="gpt-azure", messages=[{"role": "user", "content": "hello"}], stream=True,
            stream_options={"include_usage": True})
        chunks = [c async for c in stream]
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 9
    assert recorder.records[-1].stream and not recorder.records[-1].usage_estimated


async def test_azure_embeddings_and_responses_urls(start_gateway) -> None:
    async with Wire() as wire:
        wire.on("/openai/deployments/emb-small/embeddings", json_answer({
            "data": [{"embedding": [0.25, -0.5], "index": 0, "object": "embedding"}],
            "model": "text-embedding-3-small", "object": "list", "usage": {"prompt_tokens": 2, "total_tokens": 2}}))
        wire.on("/openai/responses", json_answer({
            "id": "resp_az", "object": "response", "created_at": 1733000000, "status": "completed",
            "model": "my-gpt4o", "output": [{"type": "message", "id": "msg_az", "status": "completed",
                                             "role": "assistant", "content": [
                                                 {"type": "output_text", "text": "Hi", "annotations": []}]}],
            "usage": {"input_tokens": 5, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 1,
                      "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 6}}))
        gw = await start_gateway(config(wire))
        client = gw.openai_client()
        embedding = await client.embeddings.create(model="embed-azure", input="two words")
        assert embedding.data[0].embedding == [0.25, -0.5]
        emb_seen = wire.seen[-1]
        response = await client.responses.create(model="gpt-azure", input="hello")
    assert (emb_seen.path, emb_seen.query) == ("/openai/deployments/emb-small/embeddings", {"api-version": "2024-10-21"})
    assert emb_seen.headers["api-key"] == AZURE_KEY and emb_seen.body["input"] == "two words"
    assert response.output_text == "Hi"
    seen = wire.seen[-1]
    assert (seen.path, seen.query) == ("/openai/responses", {"api-version": "2025-04-01-preview"})
    assert seen.body["model"] == "my-gpt4o"  # Azure's Responses API takes the deployment in the body


async def test_operations_a_provider_type_lacks_are_a_clear_400(start_gateway) -> None:
    async with Wire() as wire:
        gw = await start_gateway(config(wire))
        client = gw.openai_client()
        with pytest.raises(openai.BadRequestError) as azure_err:
            await client.moderations.create(model="gpt-azure", input="x")
        with pytest.raises(openai.BadRequestError) as gemini_err:
            await client.completions.create(model="gemini-flash", prompt="x")
    for err in (azure_err, gemini_err):
        assert err.value.body["code"] == "unsupported_endpoint" and err.value.body["param"] == "model"
    assert wire.seen == []


async def test_routing_skips_a_target_whose_type_lacks_the_operation(start_gateway) -> None:
    async with Wire() as wire:
        wire.on("/v1/moderations", json_answer({"id": "modr-1", "model": "omni-moderation-2024-09-26", "results": [
            {"flagged": False, "categories": {}, "category_scores": {}}]}))
        cfg = config(wire)
        cfg["providers"]["oai"] = {"type": "openai", "base_url": f"{wire.base}/v1", "api_key": "sk-oai"}
        cfg["models"]["mod"] = {"route": [{"provider": "az", "model": "my-gpt4o"}], "fallbacks": ["mod-openai"],
                                "free": True}
        cfg["models"]["mod-openai"] = {"route": [{"provider": "oai", "model": "omni-moderation-latest"}], "free": True}
        gw = await start_gateway(cfg)
        result = await gw.openai_client().moderations.create(model="mod", input="x")
    assert result.results[0].flagged is False
    assert [(s.path, s.body["model"]) for s in wire.seen] == [("/v1/moderations", "omni-moderation-latest")]


def test_azure_options_are_checked_at_start() -> None:
    raw = {"providers": {"az": {"type": "azure", "base_url": "https://r.openai.azure.com",
                                "options": {"api_version": 2024, "deployment": "x"}}}}
    with pytest.raises(ConfigError) as err:
        build_app(parse_config(raw, "t"))
    assert err.value.problems == [
        "providers.az.options: unknown option(s) deployment (known: api_version, responses_api_version)"]
    raw["providers"]["az"]["options"] = {"api_versio": "2024-10-21"}
    with pytest.raises(ConfigError) as err:
        build_app(parse_config(raw, "t"))
    assert err.value.problems == ["providers.az.options: unknown option(s) api_versio; did you mean 'api_version'?"]
    raw["providers"]["az"]["options"] = {"api_version": "2024-10-21&x=1"}
    with pytest.raises(ConfigError) as err:
        build_app(parse_config(raw, "t"))
    assert "api_version must be an Azure API version" in err.value.problems[0]


async def test_the_provider_plugin_example_in_the_docs_works(start_gateway, tmp_path: Path) -> None:
    docs = (Path(__file__).parents[2] / "docs" / "plugins.md").read_text()
    section = docs.split("### `nexgate_register_providers`", 1)[1].split("\n### ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None, "docs/plugins.md: nexgate_register_providers has no example"
    # Under its own type name: the built-in azure type is registered already.
    (tmp_path / "plugins.d").mkdir()
    (tmp_path / "plugins.d" / "my_azure.py").write_text(code.group(1).replace('"azure"', '"my-azure"'))
    async with Wire() as wire:
        wire.on("/openai/deployments/my-gpt4o/chat/completions", json_answer(azure_chat("Hi from a plugin")))
        cfg = config(wire)
        cfg["providers"]["az"]["type"] = "my-azure"
        cfg["plugins"] = {"directory": str(tmp_path / "plugins.d")}
        gw = await start_gateway(cfg)
        reply = await gw.openai_client().chat.completions.create(
            model="gpt-azure", messages=[{"role": "user", "content": "hello"}])
    assert reply.choices[0].message.content == "Hi from a plugin"
    seen = wire.seen[-1]
    assert (seen.query, seen.headers["api-key"]) == ({"api-version": "2024-10-21"}, AZURE_KEY)


# ------------------------------------------------------------------ gemini


def gemini_chat(text: str) -> dict:
    # Google's compatible endpoint: no system_fingerprint, no logprobs, usage without details.
    return {"choices": [{"finish_reason": "stop", "index": 0, "message": {"content": text, "role": "assistant"}}],
            "created": 1733000001, "id": "gem-resp-1", "model": "gemini-2.0-flash", "object": "chat.completion",
            "usage": {"completion_tokens": 3, "prompt_tokens": 6, "total_tokens": 9}}


def gemini_stream(words: list[str]) -> list:
    # Google sends usage on the last content chunk (with its finish_reason), not on a chunk without choices.
    events: list = []
    for i, word in enumerate(words):
        last = i == len(words) - 1
        chunk = {"choices": [{"delta": {"content": word, "role": "assistant"}, "index": 0,
                              **({"finish_reason": "stop"} if last else {})}],
                 "created": 1733000002, "id": "gem-resp-2", "model": "gemini-2.0-flash",
                 "object": "chat.completion.chunk"}
        if last:
            chunk["usage"] = {"completion_tokens": len(words), "prompt_tokens": 6, "total_tokens": 6 + len(words)}
        events.append(chunk)
    return [*events, "[DONE]"]


async def test_gemini_chat_uses_googles_openai_endpoint_with_a_bearer_key(start_gateway) -> None:
    async with Wire() as wire:
        wire.on("/v1beta/openai/chat/completions", json_answer(gemini_chat("Hi from Gemini")))
        recorder = RecordingPlugin()
        gw = await start_gateway(config(wire), plugins=[recorder])
        reply = await gw.openai_client().chat.completions.create(
            model="gemini-flash", messages=[{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "hello"}],
            extra_body={"reasoning_effort": "low"})
    assert reply.choices[0].message.content == "Hi from Gemini"
    seen = wire.seen[-1]
    assert seen.path == "/v1beta/openai/chat/completions" and seen.query == {}
    assert seen.headers["Authorization"] == f"Bearer {GEMINI_KEY}"
    assert seen.body == {"model": "gemini-2.0-flash", "reasoning_effort": "low",
                         "messages": [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "hello"}]}
    assert (recorder.records[-1].prompt_tokens, recorder.records[-1].completion_tokens) == (6, 3)


async def test_gemini_stream_counts_usage_from_its_last_content_chunk(start_gateway) -> None:
    async with Wire() as wire:
        wire.on("/v1beta/openai/chat/completions", sse_answer(gemini_stream(["Hel", "lo", "!"])))
        recorder = RecordingPlugin()
        gw = await start_gateway(config(wire), plugins=[recorder])
        stream = await gw.openai_client().chat.completions.create(
            model="gemini-flash", messages=[{"role": "user", "content": "hello"}], stream=True)
        chunks = [c async for c in stream]
    # The usage rides on a content chunk: the text is all there, none of it stripped.
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello!"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert wire.seen[-1].body["stream_options"] == {"include_usage": True}
    record = recorder.records[-1]
    assert (record.prompt_tokens, record.completion_tokens, record.usage_estimated) == (6, 3, False)


async def test_gemini_errors_reach_the_sdk_in_openais_shape(start_gateway) -> None:
    google_error = [{"error": {"code": 400, "message": "Invalid JSON payload received. Unknown name \"foo\".",
                               "status": "INVALID_ARGUMENT"}}]
    async with Wire() as wire:
        wire.on("/v1beta/openai/chat/completions", json_answer(google_error, status=400))
        gw = await start_gateway(config(wire))
        with pytest.raises(openai.BadRequestError) as err:
            await gw.openai_client().chat.completions.create(
                model="gemini-flash", messages=[{"role": "user", "content": "x"}], extra_body={"foo": 1})
    assert err.value.status_code == 400
    assert err.value.body == {"message": "Invalid JSON payload received. Unknown name \"foo\".",
                              "type": "invalid_request_error", "param": None, "code": "INVALID_ARGUMENT"}
