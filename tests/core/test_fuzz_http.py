"""Fuzz every route family with raw bytes, odd headers and spoiled encodings: never a 5xx, never an
ERROR line (or a traceback) in the gateway's log because of what a client sent.

Bounded (a few hundred derandomized cases, a few seconds). Hypothesis drives a blocking socket
from a worker thread while the gateway serves on the test's event loop.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import logging
import socket
import zlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nexgate_plugins.payments as payments
from nexgate_proxy.testing import FakeUpstream, gateway_config

ADMIN_TOKEN = "admin-token-for-the-fuzzer"

ROUTES = [
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/messages", "/v1/responses",  # proxy
    "/v1/models", "/v1/models/gpt-test",  # models
    "/admin/v1/me", "/admin/v1/keys", "/admin/v1/users", "/admin/v1/orgs", "/admin/v1/openapi.json",  # admin
    "/webhooks/dodopayments",  # webhooks
    "/metrics",  # metrics
    "/healthz", "/readyz",  # health
]

VALID_CHAT = json.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}).encode()

header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
bodies = st.one_of(
    st.binary(max_size=300),
    st.just(VALID_CHAT),
    st.just(gzip.compress(VALID_CHAT)),
    st.just(gzip.compress(VALID_CHAT)[:20]),  # a truncated gzip stream
    st.just(zlib.compress(VALID_CHAT)),
    st.builds(lambda d: json.dumps(d).encode(), st.dictionaries(st.sampled_from(
        ["model", "messages", "stream", "limits", "name", "user_id", "max_tokens", "input"]),
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), header_text,
                  st.lists(st.integers(), max_size=3)), max_size=5)),
)


@st.composite
def http_requests(draw: Any, api_key: str) -> bytes:
    method = draw(st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "CONNECT",
                                   "TRACE", "BREW", "get"]))
    path = draw(st.sampled_from(ROUTES)) + draw(st.sampled_from(
        ["", "/", "?x=1", "/%2e%2e/%00", "//x", "?" + "a" * 300, "#frag", "/../../etc/passwd"]))
    if draw(st.booleans()):
        path = draw(st.sampled_from(["*", "http://evil.example" + path, "example.com:443", path]))
    headers = {"Host": "gateway", "Connection": "close"}
    auth = draw(st.sampled_from([None, api_key, ADMIN_TOKEN, "ng-garbage", "a" * 600, "", "Bearer"]))
    if auth is not None:
        headers[draw(st.sampled_from(["Authorization", "x-api-key"]))] = f"Bearer {auth}"
    headers["Content-Type"] = draw(st.sampled_from(
        ["application/json", "text/plain", "multipart/form-data; boundary=x", "application/json; charset=latin-1", ""]))
    encoding = draw(st.sampled_from([None, "gzip", "deflate", "br", "zstd", "identity", "x-evil", "gzip, deflate",
                                     "GZIP", ""]))
    if encoding is not None:
        headers["Content-Encoding"] = encoding
    for _ in range(draw(st.integers(0, 3))):
        headers[draw(st.sampled_from(["X-Forwarded-For", "Expect", "Transfer-Encoding", "X-Junk", "Accept-Encoding",
                                      "Upgrade", "Range", "If-None-Match"]))] = draw(header_text)
    body = draw(bodies)
    chunked = draw(st.booleans()) and "Transfer-Encoding" not in headers
    if chunked:
        headers["Transfer-Encoding"] = "chunked"
        payload = (f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n") if body else b"0\r\n\r\n"
    else:
        headers["Content-Length"] = str(len(body))
        payload = body
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    return head.encode("latin-1") + payload


def status_of(port: int, data: bytes) -> int | None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionError):
            pass
    while out.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"):
        out = out[len(b"HTTP/1.1 100 Continue\r\n\r\n"):]
    if not out:
        return None
    return int(out.split(b" ", 2)[1])


async def test_fuzzed_requests_never_get_a_5xx_or_an_error_log(
        upstream: FakeUpstream, start_gateway, caplog: pytest.LogCaptureFixture) -> None:
    config = gateway_config(
        upstream,
        auth={"bcrypt_rounds": 4, "admin_token_sha256": hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()},
        payments={"dodopayments": {"webhook_secrets": ["whsec_" + "A" * 44],
                                   "products": {"prod_1": {"credit_usd": "10"}}}},
        server={"header_timeout": 2, "body_timeout": 2},
    )
    gw = await start_gateway(config, plugins=[payments])
    failures: list[tuple[int | None, bytes]] = []

    @settings(max_examples=300, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(http_requests(gw.api_key))
    def run(data: bytes) -> None:
        status = status_of(gw.port, data)
        if status is None or status >= 500:
            failures.append((status, data[:300]))

    await asyncio.to_thread(run)
    assert failures == [], f"{len(failures)} cases; first: {failures[:3]}"
    logged = [f"{r.name}: {r.getMessage()}" for r in caplog.records
              if r.name.startswith(("nexgate", "aiohttp")) and (r.levelno >= logging.ERROR or r.exc_info)]
    assert logged == []
