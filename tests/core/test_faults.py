"""Bad input gets a clean 4xx; upstream faults get 502/504 or an SSE error event. Never a 500."""

from __future__ import annotations

import asyncio
import json
import socket

import aiohttp
import openai
import pytest

from nexgate_proxy.testing import PROVIDER_KEY, FakeUpstream, Gateway, RecordingPlugin, gateway_config


async def post(gw: Gateway, path: str, data: bytes | str, headers: dict[str, str] | None = None,
               method: str = "POST") -> tuple[int, dict]:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {gw.api_key}"}) as session:
        async with session.request(method, gw.url + path, data=data, headers=headers or {}) as resp:
            text = await resp.text()
            return resp.status, json.loads(text)


def assert_openai_error(body: dict, code: str | None) -> None:
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]


@pytest.mark.parametrize(
    ("data", "status", "code", "param"),
    [
        (b"{not json", 400, "invalid_json", None),
        (b"", 400, "invalid_json", None),
        (b"[1, 2]", 400, "invalid_json", None),
        (b'{"messages": []}', 400, "missing_required_parameter", "model"),
        (b'{"model": 42}', 400, "invalid_type", "model"),
        (b'{"model": "gpt-test", "stream": "yes"}', 400, "invalid_type", "stream"),
        (b'{"model": "no-such-model"}', 404, "model_not_found", "model"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json", None),
    ],
)
async def test_bad_bodies(gateway: Gateway, upstream: FakeUpstream, data: bytes, status: int, code: str,
                          param: str | None) -> None:
    got, body = await post(gateway, "/v1/chat/completions", data, {"Content-Type": "application/json"})
    assert got == status
    assert_openai_error(body, code)
    assert body["error"]["param"] == param
    assert upstream.received == []


async def test_unknown_model_lists_nothing(gateway: Gateway) -> None:
    _, body = await post(gateway, "/v1/chat/completions", b'{"model": "gpt-5-secret"}')
    assert "gpt-test" not in body["error"]["message"] and "fake" not in body["error"]["message"]


async def test_oversized_body_is_413(upstream: FakeUpstream, start_gateway) -> None:
    gw = await start_gateway(gateway_config(upstream, server={"max_body_bytes": 1024}))
    big = json.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": "x" * 5000}]})
    status, body = await post(gw, "/v1/chat/completions", big)
    assert status == 413
    assert_openai_error(body, "request_too_large")
    # Also without a Content-Length (chunked upload).
    async def gen():
        yield big.encode()
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {gw.api_key}"}) as session:
        async with session.post(gw.url + "/v1/chat/completions", data=gen()) as resp:
            assert resp.status == 413
            assert_openai_error(await resp.json(), "request_too_large")


async def test_oversized_headers_are_rejected_cleanly(upstream: FakeUpstream, start_gateway) -> None:
    gw = await start_gateway(gateway_config(upstream, server={"max_header_bytes": 2048}))
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.url + "/v1/chat/completions", data=b"{}",
                                headers={"X-Big": "a" * 5000}) as resp:
            assert resp.status == 431
            body = await resp.json()
    assert_openai_error(body, "headers_too_large")
    assert "aaaa" not in json.dumps(body)
    assert upstream.received == []


async def test_wrong_method_and_unknown_path(gateway: Gateway) -> None:
    status, body = await post(gateway, "/v1/chat/completions", b"", method="GET")
    assert status == 405
    assert_openai_error(body, "method_not_allowed")
    status, body = await post(gateway, "/v1/nope", b"{}")
    assert status == 404
    assert_openai_error(body, "unknown_url")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_refused_connection_is_502_without_secrets(start_gateway, upstream: FakeUpstream) -> None:
    config = gateway_config(upstream)
    dead_url = f"http://127.0.0.1:{_closed_port()}/v1"
    config["providers"]["fake"]["base_url"] = dead_url
    recorder = RecordingPlugin()
    gw = await start_gateway(config, plugins=[recorder])
    with pytest.raises(openai.APIStatusError) as err:
        await openai.AsyncOpenAI(base_url=gw.openai_base, api_key=gw.api_key, max_retries=0).chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 502
    assert err.value.body["code"] == "upstream_unreachable"
    text = json.dumps(err.value.body)
    assert PROVIDER_KEY not in text and "127.0.0.1" not in text
    assert recorder.records[-1].status == 502 and recorder.records[-1].error_code == "upstream_unreachable"


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_upstream_5xx_is_502(gateway: Gateway, upstream: FakeUpstream, status: int) -> None:
    upstream.behaviour.status = status
    upstream.behaviour.error_body = b'{"error": {"message": "internal at http://10.0.0.5:9000"}}'
    got, body = await post(gateway, "/v1/chat/completions", b'{"model": "gpt-test", "messages": []}')
    assert got == 502
    assert_openai_error(body, "upstream_error")
    assert "10.0.0.5" not in json.dumps(body)


async def test_upstream_rejecting_our_key_is_not_relayed(gateway: Gateway, upstream: FakeUpstream) -> None:
    upstream.behaviour.status = 401
    upstream.behaviour.error_body = b'{"error": {"message": "Incorrect API key provided: sk-pro****6789"}}'
    got, body = await post(gateway, "/v1/chat/completions", b'{"model": "gpt-test", "messages": []}')
    assert got == 502
    assert_openai_error(body, "upstream_auth_failed")
    assert "6789" not in json.dumps(body)


async def test_upstream_client_errors_are_relayed_verbatim(gateway: Gateway, upstream: FakeUpstream) -> None:
    upstream.behaviour.status = 400
    upstream.behaviour.error_body = b'{"error": {"message": "max_tokens is too large", "type": "invalid_request_error"}}'
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {gateway.api_key}"}) as session:
        async with session.post(gateway.url + "/v1/chat/completions", json={"model": "gpt-test"}) as resp:
            assert resp.status == 400
            assert await resp.read() == upstream.behaviour.error_body


async def test_first_byte_timeout_is_504(start_gateway, upstream: FakeUpstream) -> None:
    config = gateway_config(upstream)
    config["models"]["gpt-test"]["timeouts"] = {"first_byte": 0.3}
    gw = await start_gateway(config)
    upstream.behaviour.delay_headers = 2
    got, body = await post(gw, "/v1/chat/completions", b'{"model": "gpt-test", "messages": []}')
    assert got == 504
    assert_openai_error(body, "upstream_timeout")


async def test_reset_mid_stream_surfaces_as_sdk_error(start_gateway, upstream: FakeUpstream) -> None:
    recorder = RecordingPlugin()
    gw = await start_gateway(gateway_config(upstream), plugins=[recorder])
    upstream.behaviour.cut_after_chunks = 2
    client = openai.AsyncOpenAI(base_url=gw.openai_base, api_key=gw.api_key, max_retries=0)
    stream = await client.chat.completions.create(model="gpt-test", stream=True,
                                                  messages=[{"role": "user", "content": "hi"}])
    received = []
    with pytest.raises(openai.APIError) as err:
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content)
    assert received == ["Hello", " from"]
    assert "broke" in err.value.message
    record = recorder.records[-1]
    assert record.error_code == "upstream_stream_interrupted"
    assert record.usage_estimated is True and record.stream


async def test_idle_stream_times_out_with_error_event(start_gateway, upstream: FakeUpstream) -> None:
    config = gateway_config(upstream)
    config["models"]["gpt-test"]["timeouts"] = {"idle": 0.3}
    gw = await start_gateway(config)
    upstream.behaviour.stall_after_chunks = 1
    client = openai.AsyncOpenAI(base_url=gw.openai_base, api_key=gw.api_key, max_retries=0)
    stream = await client.chat.completions.create(model="gpt-test", stream=True,
                                                  messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.APIError) as err:
        async for _ in stream:
            pass
    assert err.value.body["code"] == "upstream_timeout"


async def test_client_disconnect_mid_stream_is_recorded(start_gateway, upstream: FakeUpstream) -> None:
    recorder = RecordingPlugin()
    gw = await start_gateway(gateway_config(upstream), plugins=[recorder])
    upstream.behaviour.words = ["w"] * 200
    upstream.behaviour.chunk_delay = 0.01
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {gw.api_key}"}) as session:
        resp = await session.post(gw.url + "/v1/chat/completions",
                                  json={"model": "gpt-test", "stream": True, "messages": []})
        await resp.content.readline()
        resp.close()
    for _ in range(100):
        if recorder.records:
            break
        await asyncio.sleep(0.05)
    record = recorder.records[-1]
    assert record.status == 499 and record.error_code == "client_disconnected"
    assert record.usage_estimated is True


async def test_a_providers_429_is_relayed_as_sent(gateway: Gateway, upstream: FakeUpstream) -> None:
    # Distinct from NexGate's own 429s (rate_limit_requests, ...): the provider's body and status pass through.
    upstream.behaviour.status = 429
    upstream.behaviour.error_body = b'{"error": {"message": "slow down", "type": "rate_limit_error", "code": null}}'
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {gateway.api_key}"}) as session:
        async with session.post(gateway.url + "/v1/chat/completions", json={"model": "gpt-test"}) as resp:
            assert resp.status == 429
            assert await resp.read() == upstream.behaviour.error_body
