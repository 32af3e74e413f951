"""Connection hygiene and no 500 for client input: slow and idle sockets, connection caps, spoiled
bodies, odd methods and targets, the Server header, credentials in provider URLs, absurd JWT times.

Every test talks to a real gateway over a real socket (raw bytes where a client library would
refuse to send them) and checks the gateway's own log lines with caplog.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import logging
import resource
import socket
import time
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_response import Response
from aiohttp.web_runner import AppRunner
from aiohttp.web_server import Server
from cryptography.hazmat.primitives.asymmetric import rsa

import nexgate_plugins.payments as payments
from nexgate_plugins.auth.clerk import ClerkVerifier, JWTError
from nexgate_proxy.cli import main as cli_main
from nexgate_proxy.testing import FakeUpstream, Gateway, RecordingPlugin, gateway_config
from tests.jwt_signing import public_pem, sign_rs256

ADMIN_TOKEN = "admin-token-for-hygiene-tests"
ISSUER = "https://clerk.example.com"


# ------------------------------------------------------------------ helpers


async def exchange(port: int, data: bytes, *, wait: float = 5.0, source: str | None = None) -> bytes:
    """Send raw bytes, return everything the gateway sends until it closes (or ``wait`` passes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                   local_addr=(source, 0) if source else None)
    writer.write(data)
    await writer.drain()
    out = b""
    try:
        async with asyncio.timeout(wait):
            while not _complete(out) and (chunk := await reader.read(65536)):
                out += chunk
    except TimeoutError:
        pass
    writer.close()
    return out


def _complete(out: bytes) -> bool:
    """A whole final response (not a 100 Continue) with a Content-Length has arrived."""
    out = out.split(b"HTTP/1.1 100 Continue\r\n\r\n")[-1]
    head, sep, body = out.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def split(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def openai_error(body: bytes) -> dict[str, Any]:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def request(method: str, target: str, *, headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: gateway"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The gateway's ERROR lines and any of its lines carrying a traceback."""
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records
            if r.name.startswith(("nexgate", "aiohttp")) and (r.levelno >= logging.ERROR or r.exc_info)]


def hygiene_config(upstream: FakeUpstream, **server: Any) -> dict[str, Any]:
    return gateway_config(
        upstream,
        server=server,
        auth={"bcrypt_rounds": 4, "admin_token_sha256": hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()},
        payments={"dodopayments": {"webhook_secrets": ["whsec_" + "A" * 44],
                                   "products": {"prod_1": {"credit_usd": "10"}}}},
    )


async def start(start_gateway: Any, upstream: FakeUpstream, plugins: tuple[object, ...] = (), **server: Any) -> Gateway:
    """A gateway with the admin API (token ADMIN_TOKEN) and the DodoPayments webhook on."""
    return await start_gateway(hygiene_config(upstream, **server), plugins=[payments, *plugins])


async def closed_within(sock: socket.socket, seconds: float) -> bool:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(seconds):
            while await loop.sock_recv(sock, 65536):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


async def open_raw(port: int, source: str, data: bytes = b"") -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    sock.bind((source, 0))
    await loop.sock_connect(sock, ("127.0.0.1", port))
    if data:
        await loop.sock_sendall(sock, data)
    return sock


# --------------------------------------------------------- slow and idle sockets (break 5)


async def test_a_slowloris_socket_is_answered_408_and_closed(upstream: FakeUpstream, start_gateway) -> None:
    gw = await start(start_gateway, upstream, header_timeout=0.5)
    started = time.monotonic()
    out = await exchange(gw.port, b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n", wait=5)
    assert time.monotonic() - started < 3, "the half-sent headers were not timed out"
    status, headers, body = split(out)
    assert status == 408 and openai_error(body)["code"] == "request_timeout"


async def test_a_silent_socket_is_closed_without_an_answer(upstream: FakeUpstream, start_gateway) -> None:
    # An unsolicited 408 would be read by a client as the answer to the next request it sends.
    gw = await start(start_gateway, upstream, header_timeout=0.5)
    started = time.monotonic()
    assert await exchange(gw.port, b"", wait=5) == b""
    assert time.monotonic() - started < 3, "the silent socket was not closed"


async def test_dripping_header_bytes_does_not_extend_the_deadline(upstream: FakeUpstream, start_gateway) -> None:
    gw = await start(start_gateway, upstream, header_timeout=0.6)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /healthz HTTP/1.1\r\n")
    started = time.monotonic()
    closed_at = None
    for _ in range(30):
        try:
            writer.write(b"X-A: b\r\n")
            await writer.drain()
        except ConnectionError:
            break
        try:
            if await asyncio.wait_for(reader.read(65536), 0.1) == b"" or reader.at_eof():
                closed_at = time.monotonic()
                break
        except TimeoutError:
            pass
    writer.close()
    assert closed_at is not None and closed_at - started < 2


async def test_the_next_request_on_a_kept_alive_connection_is_timed_too(upstream: FakeUpstream,
                                                                        start_gateway) -> None:
    gw = await start(start_gateway, upstream, header_timeout=0.5, keepalive_timeout=30)
    loop = asyncio.get_running_loop()
    sock = await open_raw(gw.port, "127.0.0.1", request("GET", "/healthz"))
    assert b"200 OK" in await loop.sock_recv(sock, 65536)
    await asyncio.sleep(0.8)  # idle between requests: the keep-alive timeout's business, not this one
    await loop.sock_sendall(sock, b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n")
    started = time.monotonic()
    out = b""
    async with asyncio.timeout(5):
        while chunk := await loop.sock_recv(sock, 65536):
            out += chunk
    sock.close()
    assert time.monotonic() - started < 3
    assert split(out)[0] == 408


async def test_a_half_sent_body_is_408_and_closed(upstream: FakeUpstream, start_gateway) -> None:
    gw = await start(start_gateway, upstream, body_timeout=0.5)
    data = request("POST", "/v1/chat/completions", headers={"Authorization": f"Bearer {gw.api_key}"})
    data = data.replace(b"Content-Length: 0", b"Content-Length: 1000") + b'{"model": "gpt'
    started = time.monotonic()
    out = await exchange(gw.port, data, wait=5)
    assert time.monotonic() - started < 3
    status, _, body = split(out)
    assert status == 408 and openai_error(body)["code"] == "request_timeout"
    assert upstream.received == []


async def test_an_idle_keepalive_connection_is_closed(upstream: FakeUpstream, start_gateway) -> None:
    gw = await start(start_gateway, upstream, keepalive_timeout=0.5)
    sock = await open_raw(gw.port, "127.0.0.1", request("GET", "/healthz"))
    loop = asyncio.get_running_loop()
    assert b"200 OK" in await loop.sock_recv(sock, 65536)
    started = time.monotonic()
    assert await closed_within(sock, 5)
    assert 0.3 < time.monotonic() - started < 3
    sock.close()


async def test_a_thousand_idle_sockets_do_not_stop_other_clients(
        upstream: FakeUpstream, start_gateway, caplog: pytest.LogCaptureFixture) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 2600  # each socket is two descriptors in this process (client and gateway side)
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"the hard open-file limit ({hard}) is below {needed}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), hard))
    gw = await start(start_gateway, upstream, header_timeout=5, max_connections_per_ip=0)
    idle: list[socket.socket] = []
    try:
        for i in range(1000):
            # Half open and silent, half stuck after a request line and one header, over several peers.
            payload = b"" if i % 2 else b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
            idle.append(await open_raw(gw.port, f"127.0.0.{2 + i % 4}", payload))
        client = gw.openai_client()
        for _ in range(3):
            started = time.monotonic()
            assert await client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
            async with aiohttp.ClientSession() as session:
                async with session.get(gw.url + "/healthz") as resp:
                    assert resp.status == 200
            assert time.monotonic() - started < 1.5, "a normal client waited behind the idle sockets"
        await client.close()
        assert not any([await closed_within(s, 0) for s in idle[:50]]), "idle sockets closed before the timeout"
        results = await asyncio.gather(*(closed_within(s, 15) for s in idle))
        assert all(results), f"{results.count(False)} idle sockets are still open"
    finally:
        for s in idle:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert errors_logged(caplog) == []


async def test_connection_caps_per_ip_and_in_total(upstream: FakeUpstream, start_gateway) -> None:
    gw = await start(start_gateway, upstream, max_connections_per_ip=3, max_connections=6)
    held = [await open_raw(gw.port, "127.0.0.2") for _ in range(3)]
    out = await exchange(gw.port, request("GET", "/healthz"), source="127.0.0.2")
    status, _, body = split(out)
    assert status == 503 and openai_error(body)["code"] == "too_many_connections"
    # Another address is still served; closing one frees a slot for the first.
    assert split(await exchange(gw.port, request("GET", "/healthz", headers={"Connection": "close"}),
                                source="127.0.0.3"))[0] == 200
    held.pop().close()
    await asyncio.sleep(0.1)
    assert split(await exchange(gw.port, request("GET", "/healthz", headers={"Connection": "close"}),
                                source="127.0.0.2"))[0] == 200
    # The total: 2 held + 4 more from other addresses fill 6; the next is refused wherever it comes from.
    held += [await open_raw(gw.port, f"127.0.0.{4 + i}") for i in range(4)]
    await asyncio.sleep(0.1)
    assert split(await exchange(gw.port, request("GET", "/healthz"), source="127.0.0.9"))[0] == 503
    for s in held:
        s.close()


async def test_trusted_proxies_count_toward_the_total_only(upstream: FakeUpstream, start_gateway) -> None:
    gw = await start(start_gateway, upstream, max_connections_per_ip=2, trusted_proxies=["127.0.0.2/32"])
    held = [await open_raw(gw.port, "127.0.0.2") for _ in range(4)]
    assert split(await exchange(gw.port, request("GET", "/healthz", headers={"Connection": "close"}),
                                source="127.0.0.2"))[0] == 200
    for s in held:
        s.close()


# ----------------------------------------------------------- spoiled bodies (breaks 6, 7)


def surfaces(gw: Gateway) -> list[tuple[str, dict[str, str]]]:
    return [
        ("/v1/chat/completions", {"Authorization": f"Bearer {gw.api_key}"}),
        ("/admin/v1/keys", {"Authorization": f"Bearer {ADMIN_TOKEN}"}),
        ("/webhooks/dodopayments", {}),
    ]


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "GZIP"])
async def test_a_body_that_does_not_match_its_encoding_is_400(
        upstream: FakeUpstream, start_gateway, caplog: pytest.LogCaptureFixture, encoding: str) -> None:
    gw = await start(start_gateway, upstream)
    for path, headers in surfaces(gw):
        out = await exchange(gw.port, request("POST", path, headers={**headers, "Content-Encoding": encoding,
                                                                     "Content-Type": "application/json"},
                                              body=b'{"model": "gpt-test", "messages": []}'))
        status, _, body = split(out)
        assert (path, status, openai_error(body)["code"]) == (path, 400, "invalid_body_encoding")
    assert errors_logged(caplog) == []
    assert upstream.received == []
    # A body that really is compressed still works.
    body = zlib.compress(json.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}).encode())
    out = await exchange(gw.port, request("POST", "/v1/chat/completions", body=body, headers={
        "Authorization": f"Bearer {gw.api_key}", "Content-Encoding": "deflate", "Connection": "close"}))
    assert split(out)[0] == 200


@pytest.mark.parametrize("encoding", ["br", "zstd", "compress", "gzip, gzip", "x-evil"])
async def test_an_encoding_the_gateway_does_not_decode_is_415(
        upstream: FakeUpstream, start_gateway, caplog: pytest.LogCaptureFixture, encoding: str) -> None:
    gw = await start(start_gateway, upstream)
    for path, headers in surfaces(gw):
        out = await exchange(gw.port, request("POST", path, headers={**headers, "Content-Encoding": encoding},
                                              body=b"hello"))
        status, _, body = split(out)
        assert (path, status, openai_error(body)["code"]) == (path, 415, "unsupported_body_encoding")
    assert errors_logged(caplog) == []


async def test_a_client_aborting_mid_upload_is_499_not_500(
        upstream: FakeUpstream, start_gateway, caplog: pytest.LogCaptureFixture) -> None:
    recorder = RecordingPlugin()
    gw = await start(start_gateway, upstream, plugins=(recorder,))
    caplog.set_level(logging.DEBUG)
    data = request("POST", "/v1/chat/completions", headers={"Authorization": f"Bearer {gw.api_key}"})
    data = data.replace(b"Content-Length: 0", b"Content-Length: 5000") + b'{"model": "gpt-test", "mess'
    sock = await open_raw(gw.port, "127.0.0.1", data)
    await asyncio.sleep(0.2)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # close = RST
    sock.close()
    for _ in range(50):
        if recorder.records:
            break
        await asyncio.sleep(0.05)
    assert [(r.status, r.error_code) for r in recorder.records] == [(499, "client_disconnected")]
    async with aiohttp.ClientSession() as session:
        async with session.get(gw.url + "/metrics") as resp:
            metrics = await resp.text()
    lines = [line for line in metrics.splitlines() if line.startswith("nexgate_requests_total{")]
    assert any('status="499"' in line for line in lines), lines
    assert not any('status="500"' in line for line in lines), lines
    assert errors_logged(caplog) == []


# ------------------------------------------------------------ odd methods and targets


@pytest.mark.parametrize(("data", "status"), [
    (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 405),
    (b"OPTIONS * HTTP/1.1\r\nHost: gateway\r\n\r\n", 404),
    (b"TRACE / HTTP/1.1\r\nHost: gateway\r\n\r\n", 404),
    (b"PROPFIND /v1/models HTTP/1.1\r\nHost: gateway\r\n\r\n", 404),
    (b"BREW /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n\r\n", 400),
    (b"GET http://evil.example/v1/nope HTTP/1.1\r\nHost: gateway\r\n\r\n", 404),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nExpect: 200-ok\r\nContent-Length: 2\r\n\r\n{}", 417),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nExpect: 100-continue\r\n"
     b"Authorization: Bearer KEY\r\nContent-Length: 999999999999\r\n\r\n", 413),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nExpect: 100-continue\r\n"
     b"Authorization: Bearer KEY\r\nContent-Length: 2\r\n\r\n{}", 400),
    (b"GET /\x00 HTTP/1.1\r\nHost: gateway\r\n\r\n", 400),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),  # a TLS hello on the plain port
])
async def test_odd_methods_and_targets_answer_in_the_error_shape(
        gateway: Gateway, caplog: pytest.LogCaptureFixture, data: bytes, status: int) -> None:
    out = await exchange(gateway.port, data.replace(b"KEY", gateway.api_key.encode()), wait=3)
    got, headers, body = split(out.split(b"HTTP/1.1 100 Continue\r\n\r\n")[-1])
    assert got == status
    assert headers["content-type"].startswith("application/json")
    assert openai_error(body)["message"]
    assert errors_logged(caplog) == []


# ------------------------------------------------------------------- Server header (break 8)


@pytest.mark.parametrize(("setting", "expected"), [(None, "NexGate"), ("Acme", "Acme"), ("", None)])
async def test_the_server_header_names_no_versions(upstream: FakeUpstream, start_gateway,
                                                   setting: str | None, expected: str | None) -> None:
    server = {} if setting is None else {"server_header": setting}
    gw = await start(start_gateway, upstream, **server)
    answers = [
        await exchange(gw.port, request("GET", "/healthz", headers={"Connection": "close"})),
        await exchange(gw.port, request("GET", "/nowhere", headers={"Connection": "close"})),
        await exchange(gw.port, b"GET / HTTP/1.1\r\nHost: gateway\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n"),
        await exchange(gw.port, b"BREW / HTTP/1.1\r\n\r\n"),
    ]
    async with aiohttp.ClientSession() as session:  # a streamed (prepared by the handler) answer too
        async with session.post(gw.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {gw.api_key}"},
                                json={"model": "gpt-test", "messages": [], "stream": True}) as resp:
            streamed = resp.headers.get("Server")
            await resp.read()
    assert streamed == expected
    for out in answers:
        _, headers, _ = split(out)
        assert headers.get("server") == expected, out[:300]
        assert b"aiohttp" not in out and b"Python" not in out


# --------------------------------------------------------- credentials in URLs (break 9)


def test_config_check_refuses_credentials_in_a_provider_url(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "nexgate.yaml"
    path.write_text(json.dumps({
        "providers": {"corp": {"type": "openai", "base_url": "https://bob:hunter2secret@llm.corp.example/v1"},
                      "bad": {"type": "openai", "base_url": "https://llm.corp.example:99999/v1"}},
        "models": {"m": {"route": [{"provider": "corp"}, {"provider": "bad"}], "free": True}},
    }))
    code = cli_main(["config", "check", str(path)])
    out = capsys.readouterr()
    text = out.out + out.err
    assert code != 0
    assert "providers.corp.base_url" in text and "api_key" in text
    assert "providers.bad.base_url" in text
    assert "hunter2secret" not in text


# ------------------------------------------------------------------ absurd JWT times


@pytest.mark.parametrize("exp", [10**400, 1e400, "1e400", -(10**400), 2**64, [1]])
async def test_absurd_jwt_times_are_401_without_a_traceback(
        upstream: FakeUpstream, start_gateway, caplog: pytest.LogCaptureFixture, exp: Any) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    config = gateway_config(upstream, auth={"bcrypt_rounds": 4, "clerk": {
        "issuer": ISSUER, "public_key": public_pem(key).decode()}})
    gw = await start_gateway(config)
    claims = {"iss": ISSUER, "sub": "user_1", "sid": "sess_1", "iat": int(time.time()) - 5, "exp": exp}
    token = sign_rs256(key, claims)
    if exp == 1e400:  # json.dumps writes Infinity, which the verifier refuses anyway: send the JSON number
        token = sign_raw(key, b'{"iss":"%s","sub":"user_1","exp":1e400}' % ISSUER.encode())
    async with aiohttp.ClientSession() as session:
        async with session.get(gw.url + "/admin/v1/me", headers={"Authorization": f"Bearer {token}"}) as resp:
            assert resp.status == 401
            assert openai_error(await resp.read())["code"]
    assert errors_logged(caplog) == []


def test_a_jwt_that_expires_at_infinity_is_malformed() -> None:
    """JSON's 1e400 parses to infinity: such a token must not be valid forever."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    verifier = ClerkVerifier(public_key_pem=public_pem(key), issuer=ISSUER)
    for exp in (b"1e400", b"-1e400", b"1" + b"0" * 400, b"18446744073709551616"):
        with pytest.raises(JWTError, match="malformed"):
            verifier.verify(sign_raw(key, b'{"iss":"%s","sub":"user_1","exp":%s}' % (ISSUER.encode(), exp)))


def sign_raw(key: rsa.RSAPrivateKey, payload: bytes) -> str:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    from tests.jwt_signing import b64url, b64url_json

    signing_input = f"{b64url_json({'alg': 'RS256', 'typ': 'JWT'})}.{b64url(payload)}"
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64url(signature)}"


# ------------------------------------------------------- the aiohttp internals runner.py uses


def test_the_aiohttp_internals_the_runner_relies_on_are_still_there() -> None:
    assert inspect.iscoroutinefunction(AppRunner._make_server)
    for name in ("connection_made", "connection_lost", "data_received", "handle_error", "log_exception",
                 "force_close"):
        assert callable(getattr(RequestHandler, name)), name
    assert list(inspect.signature(RequestHandler.handle_error).parameters) == [
        "self", "request", "status", "exc", "message"]
    assert list(inspect.signature(RequestHandler.finish_response).parameters) == [
        "self", "request", "resp", "start_time"]
    assert inspect.iscoroutinefunction(RequestHandler.finish_response)
    for slot in ("_messages", "_waiter", "_manager", "_loop", "transport", "_keepalive_timeout"):
        assert slot in RequestHandler.__slots__ or slot in getattr(RequestHandler.__mro__[1], "__slots__", ()), slot
    assert "keepalive_timeout" in inspect.signature(RequestHandler.__init__).parameters
    server_init = inspect.getsource(Server.__init__)
    assert "self._kwargs = kwargs" in server_init and "self._loop" in server_init
    for name in ("is_eof", "exception", "set_exception"):
        assert callable(getattr(StreamReader, name)), name
    assert inspect.iscoroutinefunction(Response._prepare_headers)
    assert "headers.setdefault(hdrs.SERVER" in inspect.getsource(web.StreamResponse._prepare_headers)
    # The Server header per request (GatewayRunner's request class): the factory, its class and the hook.
    assert "_cls" in inspect.signature(web.Application._make_request).parameters
    assert "self.request_factory" in server_init
    source = inspect.getsource(web.Request._prepare_hook)
    assert "match_info._apps" in source and "on_response_prepare.send(self, response)" in source
    # How a spoiled body reaches the handler (RequestPayloadError caused by ContentEncodingError) is
    # checked by test_a_body_that_does_not_match_its_encoding_is_400.
