"""The gateway end to end: real sockets, a real fake upstream, the official SDKs."""

from __future__ import annotations

import json

import anthropic
import openai
import pytest

from nexgate_proxy.testing import PROVIDER_KEY, FakeUpstream, Gateway, RecordingPlugin, gateway_config

def openai_client(gw: Gateway, **kw) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.openai_base, api_key=gw.api_key, max_retries=0, **kw)


async def test_chat_completion_bytes_and_usage(upstream: FakeUpstream, start_gateway) -> None:
    recorder = RecordingPlugin()
    gw = await start_gateway(gateway_config(upstream), plugins=[recorder])
    client = openai_client(gw)
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    completion = raw.parse()
    assert completion.choices[0].message.content == "Hello from upstream"
    # Byte for byte as the upstream sent it, but for OpenRouter's usage.cost (a free model: 0) at the
    # end of the usage object.
    sent_bytes = upstream.sent[-1]
    assert sent_bytes.endswith(b"}}}") and raw.http_response.content == sent_bytes[:-2] + b',"cost":0}}'
    assert completion.usage is not None and completion.usage.model_extra == {"cost": 0}
    # The alias is mapped to the upstream's model name; the client's key never travels.
    sent = upstream.received[-1]
    assert sent.body["model"] == "upstream-model"
    assert sent.headers["Authorization"] == f"Bearer {PROVIDER_KEY}"
    assert gw.api_key not in json.dumps(sent.headers)
    # Provider account details and rate limits are not relayed.
    assert "openai-organization" not in raw.headers
    assert "x-ratelimit-remaining-requests" not in raw.headers
    assert raw.headers["x-request-id"] == "up-req-1"
    assert raw.headers["x-nexgate-request-id"].startswith("req_")
    record = recorder.records[-1]
    assert (record.model, record.provider, record.upstream_model) == ("gpt-test", "fake", "upstream-model")
    assert (record.prompt_tokens, record.completion_tokens, record.cached_tokens) == (11, 7, 3)
    assert not record.usage_estimated and record.status == 200 and record.stream is False
    assert recorder.settled == [record.request_id]


async def test_streaming_relays_upstream_bytes(upstream: FakeUpstream, start_gateway) -> None:
    recorder = RecordingPlugin()
    gw = await start_gateway(gateway_config(upstream), plugins=[recorder])
    client = openai_client(gw)
    async with client.chat.completions.with_streaming_response.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True},
    ) as response:
        body = b"".join([chunk async for chunk in response.http_response.aiter_bytes()])
    # The upstream's bytes, but for usage.cost added to the usage chunk the client asked for.
    usage_end = upstream.sent[-1].index(b"}}\n\ndata: [DONE]")
    assert body == upstream.sent[-1][:usage_end] + b',"cost":0' + upstream.sent[-1][usage_end:]
    record = recorder.records[-1]
    assert (record.prompt_tokens, record.completion_tokens, record.stream) == (11, 3, True)


async def test_streaming_asks_for_usage_and_hides_it_from_clients_that_did_not(
        upstream: FakeUpstream, start_gateway) -> None:
    recorder = RecordingPlugin()
    gw = await start_gateway(gateway_config(upstream), plugins=[recorder])
    client = openai_client(gw)
    stream = await client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True)
    chunks = [chunk async for chunk in stream]
    assert upstream.received[-1].body["stream_options"] == {"include_usage": True}
    # Every chunk the client sees has a choice: the usage-only chunk was for NexGate.
    assert all(chunk.choices for chunk in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello from upstream"
    assert recorder.records[-1].completion_tokens == 3
    assert not recorder.records[-1].usage_estimated


async def test_completions_embeddings_models(gateway: Gateway, upstream: FakeUpstream) -> None:
    client = openai_client(gateway)
    completion = await client.completions.create(model="gpt-test", prompt="hello")
    assert completion.choices[0].text == " world"
    embedding = await client.embeddings.create(model="gpt-test", input=["a", "b"])
    assert [e.embedding for e in embedding.data] == [[0.1, 0.2, 0.3]] * 2
    assert [r.path for r in upstream.received] == ["/v1/completions", "/v1/embeddings"]
    models = await client.models.list()
    assert sorted(m.id for m in models.data) == ["claude-test", "gpt-test"]
    assert (await client.models.retrieve("gpt-test")).id == "gpt-test"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("nope")


async def test_responses_api_plain_and_streamed(upstream: FakeUpstream, start_gateway) -> None:
    recorder = RecordingPlugin()
    gw = await start_gateway(gateway_config(upstream), plugins=[recorder])
    client = openai_client(gw)
    response = await client.responses.create(model="gpt-test", input="hello")
    assert response.output_text == "Hi there"
    assert (recorder.records[-1].prompt_tokens, recorder.records[-1].completion_tokens) == (9, 2)
    stream = await client.responses.create(model="gpt-test", input="hello", stream=True)
    kinds = [event.type async for event in stream]
    assert kinds == ["response.output_text.delta", "response.completed"]
    assert "stream_options" not in upstream.received[-1].body
    assert (recorder.records[-1].prompt_tokens, recorder.records[-1].completion_tokens) == (9, 2)


async def test_anthropic_messages_through_the_anthropic_sdk(upstream: FakeUpstream, start_gateway) -> None:
    recorder = RecordingPlugin()
    gw = await start_gateway(gateway_config(upstream), plugins=[recorder])
    client = anthropic.AsyncAnthropic(base_url=gw.url, api_key=gw.api_key, max_retries=0)
    message = await client.messages.create(model="claude-test", max_tokens=10,
                                           messages=[{"role": "user", "content": "salut"}])
    assert message.content[0].text == "Bonjour"
    sent = upstream.received[-1]
    assert sent.path == "/v1/messages" and sent.body["model"] == "claude-upstream"
    assert sent.headers["x-api-key"] == PROVIDER_KEY
    assert sent.headers["anthropic-version"]
    # Anthropic counts cache reads apart from input_tokens; NexGate bills them as prompt tokens.
    assert (recorder.records[-1].prompt_tokens, recorder.records[-1].cached_tokens) == (17, 5)

    async with client.messages.stream(model="claude-test", max_tokens=10,
                                      messages=[{"role": "user", "content": "salut"}]) as stream:
        text = "".join([t async for t in stream.text_stream])
    assert text == "Bonjour"
    assert (recorder.records[-1].prompt_tokens, recorder.records[-1].completion_tokens) == (17, 3)


async def test_an_endpoint_no_provider_of_the_model_serves_is_refused(gateway: Gateway) -> None:
    # Chat and Messages cross dialects through translation; embeddings have nothing to translate to.
    with pytest.raises(openai.BadRequestError) as err:
        await openai_client(gateway).embeddings.create(model="claude-test", input="x")
    assert err.value.body["code"] == "unsupported_endpoint"


async def test_client_cannot_choose_upstream_or_leak_credentials(gateway: Gateway, upstream: FakeUpstream) -> None:
    client = openai_client(gateway, default_headers={"Cookie": "session=abc", "Connection": "keep-alive, X-Drop-Me",
                                                     "X-Drop-Me": "1", "X-Forwarded-For": "6.6.6.6",
                                                     "X-Custom": "kept"})
    await client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}],
        extra_body={"api_base": "http://evil.example", "base_url": "http://evil.example"})
    sent = upstream.received[-1]
    assert "api_base" not in sent.body and "base_url" not in sent.body
    lowered = {k.lower(): v for k, v in sent.headers.items()}
    assert "cookie" not in lowered and "x-drop-me" not in lowered and "x-forwarded-for" not in lowered
    assert lowered["x-custom"] == "kept"
    assert lowered["authorization"] == f"Bearer {PROVIDER_KEY}"


async def test_a_cookie_an_upstream_sets_never_reaches_the_next_call(start_gateway, upstream: FakeUpstream) -> None:
    # Providers do set cookies (load balancer affinity); one client's must not ride along on another's call.
    # A host name, not an IP: aiohttp's cookie jar would ignore cookies from an IP address anyway.
    config = gateway_config(upstream)
    config["providers"]["fake"]["base_url"] = upstream.url.replace("127.0.0.1", "localhost")
    gateway = await start_gateway(config)
    upstream.behaviour.extra_headers = {"Set-Cookie": "affinity=client-a; Path=/"}
    client = openai_client(gateway)
    await client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "first"}])
    upstream.behaviour.extra_headers = {}
    await client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "second"}])
    assert len(upstream.received) == 2
    assert all("cookie" not in {k.lower() for k in r.headers} for r in upstream.received)


async def test_fallback_to_next_target_on_upstream_failure(start_gateway, upstream: FakeUpstream) -> None:
    broken = FakeUpstream()
    await broken.start()
    try:
        broken.behaviour.status = 503
        config = gateway_config(upstream)
        config["providers"]["broken"] = {"type": "openai", "base_url": broken.url, "api_key": "k"}
        config["models"]["primary"] = {"route": [{"provider": "broken", "model": "m1"}],
                                       "fallbacks": ["gpt-test"], "free": True}
        recorder = RecordingPlugin()
        gw = await start_gateway(config, plugins=[recorder])
        completion = await openai_client(gw).chat.completions.create(
            model="primary", messages=[{"role": "user", "content": "hi"}])
        assert completion.choices[0].message.content == "Hello from upstream"
        assert len(broken.received) == 1 and upstream.received[-1].body["model"] == "upstream-model"
        record = recorder.records[-1]
        assert (record.attempts, record.provider, record.model) == (2, "fake", "primary")
    finally:
        await broken.stop()


async def test_weighted_targets_spread_by_weight(start_gateway, upstream: FakeUpstream) -> None:
    config = gateway_config(upstream)
    config["models"]["spread"] = {"route": [{"provider": "fake", "model": "heavy", "weight": 3},
                                            {"provider": "fake", "model": "light", "weight": 1}], "free": True}
    gw = await start_gateway(config)
    client = openai_client(gw)
    for _ in range(200):
        await client.embeddings.create(model="spread", input="x")
    heavy = sum(1 for r in upstream.received if r.body["model"] == "heavy")
    assert 120 <= heavy <= 180  # expected 150; far outside 5 sigma would be a bug


@pytest.mark.parametrize(("trusted", "expected"), [([], "127.0.0.1"), (["127.0.0.0/8"], "198.51.100.7")])
async def test_client_ip_honours_forwarded_for_only_from_trusted_proxies(
        upstream: FakeUpstream, start_gateway, trusted: list[str], expected: str) -> None:
    recorder = RecordingPlugin()
    gw = await start_gateway(gateway_config(upstream, server={"trusted_proxies": trusted}), plugins=[recorder])
    await openai_client(gw, default_headers={"X-Forwarded-For": "6.6.6.6, 198.51.100.7"}).embeddings.create(
        model="gpt-test", input="x")
    assert recorder.records[-1].client_ip == expected
