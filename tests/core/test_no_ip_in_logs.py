"""No client IP in the gateway's log, at any level: a brute-force run and malformed requests write tags."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket

import aiohttp
import pytest

import nexgate_plugins.admin as admin_plugin
import nexgate_plugins.redaction as redaction
from nexgate_proxy import iplog
from nexgate_proxy.testing import FakeUpstream, gateway_config
from tests.plugins.ratelimit.test_abuse import wrong_key

CLIENTS = ("198.51.100.136", "2001:db8:4:2::bad", "203.0.113.9")
PEER = "127.0.0.77"
"""A loopback source address of the malformed requests' own (Linux answers on all of 127/8)."""
_V4 = re.compile(r"(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}(?![\w.])")
_V6 = re.compile(r"(?<![\w:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?:/\d+)?(?![\w:])")


def addresses_in(text: str) -> list[str]:
    """Every IPv4 or IPv6 literal in the text (times such as 12:30:01 are not addresses)."""
    found = []
    for match in [*_V4.findall(text), *_V6.findall(text)]:
        try:
            ipaddress.ip_network(match, strict=False)
        except ValueError:
            continue
        found.append(match)
    return found


def everything_logged(caplog: pytest.LogCaptureFixture) -> str:
    parts = [caplog.text]
    for record in caplog.records:
        parts += [record.getMessage(), str(record.exc_text or ""), repr(record.args)]
    return "\n".join(parts)


def raw_request(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(PEER, 0)) as conn:
        conn.sendall(payload)
        chunks = []
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


async def test_a_brute_force_run_and_malformed_requests_log_no_client_ip(
        upstream: FakeUpstream, start_gateway, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    gw = await start_gateway(gateway_config(
        upstream, server={"trusted_proxies": ["127.0.0.0/8"]},
        limits={"brute_force": {"max_failures": 3, "max_key_failures": 0, "window": 60, "ban": 60}},
        auth={"bcrypt_rounds": 4, "admin_token_sha256": "0" * 64}), plugins=[redaction, admin_plugin])
    async with aiohttp.ClientSession() as session:
        for client in CLIENTS[:2]:  # wrong API keys on /v1 until banned
            statuses = []
            for _ in range(5):
                async with session.post(gw.url + "/v1/chat/completions", json={"model": "gpt-test", "messages": []},
                                        headers={"Authorization": f"Bearer {wrong_key()}",
                                                 "X-Forwarded-For": client}) as resp:
                    statuses.append(resp.status)
            assert statuses[:3] == [401] * 3 and statuses[-1] == 403, statuses
        for _ in range(5):  # wrong admin tokens until banned
            async with session.get(gw.url + "/admin/v1/me", headers={"Authorization": "Bearer wrong-admin-token",
                                                                     "X-Forwarded-For": CLIENTS[2]}) as resp:
                last = resp.status
        assert last == 403
    loop = asyncio.get_running_loop()
    for payload in (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", b"\x16\x03\x01garbage\r\n\r\n",
                    b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n"):
        answer = await loop.run_in_executor(None, raw_request, gw.port, payload)
        assert re.match(rb"HTTP/1\.[01] 4\d\d ", answer), answer[:80]
    await asyncio.sleep(0.05)

    logged = everything_logged(caplog)
    assert caplog.text.count("after repeated failed authentications") == 3  # the bans are logged...
    assert "banned ip~" in logged and "malformed HTTP request from ip~" in logged  # ...with tags
    for client in (*CLIENTS, PEER, "2001:db8:4:2::/64"):
        assert client not in logged, client
    assert addresses_in(logged) == [], addresses_in(logged)


def test_tags_are_stable_within_a_period_and_unlinkable_across_periods(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1_000_000_000.0]
    monkeypatch.setattr(iplog.time, "time", lambda: now[0])
    iplog.set_rotation(30)
    first = iplog.ip_tag("198.51.100.136")
    assert first == iplog.ip_tag("198.51.100.136") != iplog.ip_tag("198.51.100.137")
    assert re.fullmatch(r"ip~[0-9a-f]{12}", first)
    now[0] += 30 * 86400  # the next retention period: a new key
    assert iplog.ip_tag("198.51.100.136") != first
    iplog.set_rotation(0)  # retention 0: hourly
    tag = iplog.ip_tag("198.51.100.136")
    now[0] += 3600
    assert iplog.ip_tag("198.51.100.136") != tag
    iplog.set_rotation(30)
