"""The canary: content, keys and provider secrets that pass through the gateway are stored nowhere.

A unique string rides in prompts, in the upstream's completions, in streamed
chunks and in upstream error bodies, through every endpoint and the error
paths, on SQLite and on PostgreSQL. Afterwards it is not in a full dump of the
database, not in the outbox spool files (before and after the flush), not in
anything logged at DEBUG (aiohttp's loggers included), nor in those log lines
formatted as JSON, not in /metrics and not in the traces (an in-memory exporter).
The same holds for the client's full API key and the provider's key.
"""

from __future__ import annotations

import json
import logging
import secrets
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from nexgate_plugins.usage_log import OUTBOX
from nexgate_proxy import hookimpl
from nexgate_proxy.logs import JsonFormatter
from nexgate_proxy.testing import PROVIDER_KEY, Behaviour, FakeUpstream, Gateway, gateway_config
from tests.plugins.metrics.test_tracing import InMemoryTraces
from tests.privacy_helpers import PLUGINS, dump_database

plugin_log = logging.getLogger("thirdparty.plugin")


class CarelessPlugin:
    """A third-party plugin with the mistakes the guard exists for."""

    @hookimpl
    def nexgate_admit(self, ctx: Any) -> None:
        plugin_log.debug("admitting %s", ctx.body)  # the whole body, at DEBUG
        plugin_log.info("context %r", ctx)  # a dataclass whose repr includes the body
        if (ctx.body or {}).get("user") == "trigger-bug":
            raise ValueError(f"cannot handle {ctx.body}")  # a bug whose message quotes the body


def spool_text(directory: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(directory.rglob("*")) if p.is_file())


def everything_logged(caplog: pytest.LogCaptureFixture) -> str:
    parts = [caplog.text]
    for record in caplog.records:
        parts += [record.getMessage(), str(record.exc_text or ""), str(record.stack_info or ""),
                  repr({k: v for k, v in record.__dict__.items() if k != "exc_info"})]
    return "\n".join(parts)


async def drain(stream: Any) -> str:
    text = ""
    async for line in stream.iter_lines():
        text += line
    return text


async def test_the_canary_appears_nowhere(upstream: FakeUpstream, start_gateway, store_url: str, backend: str,
                                          tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    canary = f"ZqCANARY{secrets.token_hex(8)}"
    caplog.set_level(logging.DEBUG)
    for name in ("aiohttp", "aiohttp.access", "aiohttp.server", "aiohttp.client", "aiohttp.web", "nexgate"):
        caplog.set_level(logging.DEBUG, logger=name)
    outbox = tmp_path / "canary-outbox"
    config = gateway_config(upstream, storage={"url": store_url},
                            usage={"outbox_dir": str(outbox), "flush_interval": 60})
    traces = InMemoryTraces()
    gw: Gateway = await start_gateway(config, plugins=[*PLUGINS, CarelessPlugin(), traces])
    client = openai.AsyncOpenAI(base_url=gw.openai_base, api_key=gw.api_key, max_retries=0)
    claude = anthropic.AsyncAnthropic(base_url=gw.url, api_key=gw.api_key, max_retries=0)
    prompt = [{"role": "user", "content": f"please repeat {canary} back"}]
    seen_by_client: list[str] = []

    # 1. Canary in the prompt and in the completion.
    upstream.behaviour = Behaviour(words=["Sure:", canary])
    reply = await client.chat.completions.create(model="gpt-test", messages=prompt)
    seen_by_client.append(reply.choices[0].message.content or "")
    # 2. In streamed chunks.
    async with client.chat.completions.with_streaming_response.create(
            model="gpt-test", messages=prompt, stream=True) as stream:
        seen_by_client.append(await drain(stream))
    # 3. A stream cut after its first chunk (the canary) by the upstream.
    upstream.behaviour = Behaviour(words=[canary, "and", "more"], cut_after_chunks=1)
    async with client.chat.completions.with_streaming_response.create(
            model="gpt-test", messages=prompt, stream=True) as stream:
        seen_by_client.append(await drain(stream))
    # 4. Upstream error bodies that echo the prompt: a 400 is relayed to its client, a 500 is not.
    echo = json.dumps({"error": {"message": f"bad prompt: {canary}", "type": "invalid_request_error",
                                 "param": "messages", "code": f"echo_{canary}"}}).encode()
    upstream.behaviour = Behaviour(status=400, error_body=echo)
    with pytest.raises(openai.BadRequestError) as relayed:
        await client.chat.completions.create(model="gpt-test", messages=prompt)
    seen_by_client.append(json.dumps(relayed.value.body))
    upstream.behaviour = Behaviour(status=500, error_body=echo)
    with pytest.raises(openai.InternalServerError) as hidden:
        await client.chat.completions.create(model="gpt-test", messages=prompt)
    assert canary not in json.dumps(hidden.value.body)
    # 5. The other endpoints, both dialects, streams included.
    upstream.behaviour = Behaviour(words=[canary])
    await claude.messages.create(model="claude-test", max_tokens=5, messages=prompt)
    async with claude.messages.with_streaming_response.create(model="claude-test", max_tokens=5, messages=prompt,
                                                              stream=True) as stream:
        await drain(stream)
    await client.embeddings.create(model="gpt-test", input=[canary, f"more {canary}"])
    await client.completions.create(model="gpt-test", prompt=f"complete {canary}")
    await client.responses.create(model="gpt-test", input=f"respond to {canary}")
    # 5b. Translated both ways (OpenAI SDK -> Claude, Anthropic SDK -> OpenAI model), streams and a 400 too.
    upstream.behaviour = Behaviour(anthropic_content=[{"type": "text", "text": f"Sure: {canary}"}],
                                   chat_message={"content": f"Sure: {canary}"})
    translated = await client.chat.completions.create(model="claude-test", messages=prompt)
    seen_by_client.append(translated.choices[0].message.content or "")
    chunks = await client.chat.completions.create(model="claude-test", messages=prompt, stream=True)
    seen_by_client.append("".join([c.choices[0].delta.content or "" async for c in chunks if c.choices]))
    message = await claude.messages.create(model="gpt-test", max_tokens=5, messages=prompt)
    seen_by_client.append(message.content[0].text)
    async with claude.messages.stream(model="gpt-test", max_tokens=5, messages=prompt) as events:
        seen_by_client.append("".join([text async for text in events.text_stream]))
    upstream.behaviour = Behaviour(status=400, error_body=json.dumps({"type": "error", "error": {
        "type": "invalid_request_error", "message": f"bad prompt: {canary}"}}).encode())
    with pytest.raises(openai.BadRequestError) as relayed:
        await client.chat.completions.create(model="claude-test", messages=prompt)
    seen_by_client.append(json.dumps(relayed.value.body))
    # 6. The canary as the model name (unknown) and as an API key.
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model=canary, messages=prompt)
    with pytest.raises(openai.AuthenticationError):
        await openai.AsyncOpenAI(base_url=gw.openai_base, api_key=f"ngk_{canary}", max_retries=0).models.list()
    # 7. A plugin bug whose exception quotes the body: a 500, logged with a traceback.
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model="gpt-test", messages=prompt, user="trigger-bug")
    # 8. A client that puts its key in the URL.
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{gw.url}/v1/models?api_key={gw.api_key}",
                               headers={"Authorization": f"Bearer {gw.api_key}"}) as resp:
            assert resp.status == 200

    # The canary really went through: to the upstream, and back to its client.
    assert sum(canary in json.dumps(r.body) for r in upstream.received) >= 15
    assert all(canary in text for text in seen_by_client)
    # The plugin's bug was logged, naming it (nexgate_proxy.plugins isolates request-phase hooks).
    assert "hook nexgate_admit of plugin 'CarelessPlugin" in everything_logged(caplog)
    forbidden = {"canary": canary, "api key": gw.api_key, "key secret": gw.api_key.split("_")[2],
                 "provider key": PROVIDER_KEY}

    def assert_clean(where: str, text: str) -> None:
        for what, value in forbidden.items():
            assert value not in text, f"the {what} leaked into {where}"

    # The client's key is never sent upstream either (the provider's is, as it should).
    upstream_headers = json.dumps([r.headers for r in upstream.received])
    assert gw.api_key not in upstream_headers and PROVIDER_KEY in upstream_headers

    # Spool files, before the flush: the rows are there, with metadata only.
    before = spool_text(outbox)
    assert before.count('"req_') >= 10
    assert_clean("the outbox spool (before the flush)", before)
    assert await gw.app[OUTBOX].flush()
    assert_clean("the outbox spool (after the flush)", spool_text(outbox))

    dump = await dump_database(store_url, backend)
    assert dump.count("req_") >= 10 and gw.api_key[:16] in dump  # rows and the key's public prefix
    assert_clean("the database", dump)

    async with aiohttp.ClientSession() as session:
        async with session.get(gw.url + "/metrics") as resp:
            metrics = await resp.text()
    assert_clean("/metrics", metrics)
    assert 'nexgate_requests_total{endpoint="chat.completions",model="-",provider="-",status="404",status_class="4xx"} 1.0' in metrics
    assert 'nexgate_redaction_dropped_total{sink="record"} 0.0' in metrics  # no false positive on any path

    logged = everything_logged(caplog)
    assert any(r.name == "aiohttp.access" for r in caplog.records)
    assert any(r.name == "thirdparty.plugin" and r.levelno == logging.DEBUG for r in caplog.records)
    assert "ValueError: [message withheld" in logged  # the bug's traceback: frames and type only
    assert "GET /v1/models 200" in logged and "api_key=" not in logged  # the access line, without its query
    assert_clean("the logs", logged)
    json_logs = "\n".join(JsonFormatter().format(record) for record in caplog.records)
    assert '"request_id": "req_' in json_logs  # the request lines, as JSON
    assert_clean("the JSON logs", json_logs)

    spans = traces.spans()
    assert len([s for s in spans if s.name.startswith("chat ")]) >= 10
    assert_clean("the traces", "\n".join(span.to_json() for span in spans))
