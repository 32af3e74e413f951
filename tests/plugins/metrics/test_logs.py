"""Log lines: one per request (JSON when asked), an access log without personal data, quiet hang-ups."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from nexgate_proxy.logs import JsonFormatter, SafeAccessLogger
from nexgate_proxy.testing import FakeUpstream, gateway_config

HI = [{"role": "user", "content": "hi"}]


async def test_each_request_gets_one_line_with_its_metadata(upstream: FakeUpstream, start_gateway,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nexgate.request")
    gw = await start_gateway(gateway_config(upstream))
    reply = await gw.openai_client().chat.completions.with_raw_response.create(model="gpt-test", messages=HI)
    [record] = [r for r in caplog.records if r.name == "nexgate.request"]
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "INFO" and line["timestamp"].endswith("+00:00")
    assert line["request_id"] == reply.headers["x-nexgate-request-id"]
    assert line["key_prefix"] == gw.api_key[:16]  # the public prefix, never the key
    assert (line["model"], line["provider"], line["status"], line["attempts"]) == ("gpt-test", "fake", 200, 1)
    assert (line["prompt_tokens"], line["completion_tokens"]) == (11, 7)
    assert isinstance(line["latency_ms"], int) and "cost_usd" in line
    assert gw.api_key not in json.dumps(line) and "127.0.0.1" not in json.dumps(line)
    assert reply.headers["x-nexgate-request-id"] in record.getMessage()  # the text form says the same


async def test_request_lines_can_be_turned_off(upstream: FakeUpstream, start_gateway,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nexgate.request")
    gw = await start_gateway(gateway_config(upstream, logging={"requests": False, "format": "json"}))
    await gw.openai_client().chat.completions.create(model="gpt-test", messages=HI)
    assert not [r for r in caplog.records if r.name == "nexgate.request"]


def test_the_access_log_has_no_ip_query_referer_or_user_agent(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nexgate.access")
    request = make_mocked_request("GET", "/v1/models?api_key=ngk_secret&email=a@b.c",
                                  headers={"Referer": "https://private.example/page", "User-Agent": "Secret/1.0",
                                           "X-Forwarded-For": "203.0.113.9"})
    SafeAccessLogger(logging.getLogger("nexgate.access"), "").log(request, web.Response(text="ok"), 0.0123)
    [record] = caplog.records
    text = record.getMessage() + json.dumps({k: str(v) for k, v in record.__dict__.items()})
    assert record.getMessage() == "GET /v1/models 200 0 bytes 12.3 ms"  # nothing sent: a mocked request
    for leak in ("api_key", "a@b.c", "private.example", "Secret/1.0", "203.0.113.9"):
        assert leak not in text


async def test_a_client_hanging_up_mid_body_is_no_internal_error(upstream: FakeUpstream, start_gateway,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    gw = await start_gateway(gateway_config(upstream))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + gw.api_key.encode() + b"\r\nContent-Length: 5000\r\n\r\n"
                 b'{"model": "gpt-test", "messages": [')
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()  # gone, 4960 bytes short
    await asyncio.sleep(0.5)
    ours = [r for r in caplog.records if r.name.startswith(("nexgate", "aiohttp"))]  # not an SDK's leftovers
    assert not [r for r in ours if r.levelno >= logging.ERROR], [r.getMessage() for r in ours]
    assert not any("Traceback" in (r.exc_text or "") for r in ours)
    requests = [r for r in caplog.records if r.name == "nexgate.request"]
    assert requests and requests[-1].status == 499
