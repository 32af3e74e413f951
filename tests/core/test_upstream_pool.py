"""The upstream connection layer (nexgate_proxy.upstream) on real sockets: keep-alive, stale
connections, bodies of every framing, TLS, the cap, timeouts, limits, and the gateway using it."""

from __future__ import annotations

import asyncio
import gzip
import inspect
import socket
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.client_proto import ResponseHandler

from nexgate_proxy import hookimpl
from nexgate_proxy.appkeys import PROVIDERS
from nexgate_proxy.providers import Provider, UpstreamResponse
from nexgate_proxy.providers.base import HttpUpstreamResponse
from nexgate_proxy.providers.openai import OpenAIProvider
from nexgate_proxy.testing import PROVIDER_KEY, FakeUpstream, StartGateway, gateway_config
from nexgate_proxy.upstream import BodyTooLarge, UnsafeHeader, UpstreamPool
from tests.scripted_upstream import Request, ScriptedUpstream, make_ca, response

HI = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


async def ok(request: Request) -> bytes:
    return response(b'{"n": %d}' % request.index)


async def post(pool: UpstreamPool, url: str, body: bytes = b"{}", limit: int = 1 << 20,
               headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    answer = await pool.request(url, body, dict(headers or {}), 5.0)
    try:
        return answer.status, await answer.read(limit)
    finally:
        answer.close()


async def test_kept_alive_connections_carry_one_request_after_another() -> None:
    async with ScriptedUpstream(ok) as upstream:
        pool = UpstreamPool(10)
        for n in range(1, 6):
            assert await post(pool, upstream.url(), b'{"q": 1}') == (200, b'{"n": %d}' % n)
        assert upstream.connections == 1 and pool.open_connections == 1 and pool.in_use == 0
        head = upstream.requests[0].head.decode()
        assert head.startswith("POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:")
        assert upstream.requests[0].header("Content-Length") == "8" and upstream.requests[0].body == b'{"q": 1}'
        assert upstream.requests[0].header("Accept-Encoding") == "gzip, deflate"
        await pool.close()
        await upstream.wait_open(0)  # closed at shutdown


async def test_a_pooled_connection_the_upstream_closed_unanswered_is_retried_once_on_a_new_one() -> None:
    async def second_unanswered(request: Request) -> bytes | None:
        return None if request.index == 2 else await ok(request)

    async with ScriptedUpstream(second_unanswered) as upstream:
        pool = UpstreamPool(10)
        assert await post(pool, upstream.url()) == (200, b'{"n": 1}')
        assert await post(pool, upstream.url()) == (200, b'{"n": 1}')  # on connection 2, transparently
        assert upstream.connections == 2 and [r.connection for r in upstream.requests] == [1, 1, 2]
        await pool.close()


async def test_a_new_connection_closed_unanswered_or_a_reused_one_cut_mid_answer_fails_without_retry() -> None:
    async def never(request: Request) -> bytes | None:
        return None

    async with ScriptedUpstream(never) as upstream:
        pool = UpstreamPool(10)
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await post(pool, upstream.url())
        assert len(upstream.requests) == 1 and pool.in_use == 0

    async def cut_second(request: Request) -> bytes | None:
        return b"HTTP/1.1 200 OK\r\nContent-" if request.index == 2 else await ok(request)

    async def close_after(request: Request) -> bytes | None:
        answer = await cut_second(request)
        if request.index == 2:
            asyncio.get_running_loop().call_later(0.05, lambda: [w.close() for w in list(upstream.writers)])
        return answer

    async with ScriptedUpstream(close_after) as upstream:
        pool = UpstreamPool(10)
        await post(pool, upstream.url())
        with pytest.raises(aiohttp.ClientError):
            await post(pool, upstream.url())
        assert len(upstream.requests) == 2  # something of the answer came: never sent twice
        await pool.close()


async def test_chunked_gzip_deflate_and_read_until_close_bodies() -> None:
    text = b"data: " + b"x" * 5000 + b"\n\n"

    async def framed(request: Request) -> bytes:
        kind = request.header("X-Kind")
        if kind == "chunked":
            chunks = [text[:100], text[100:]]
            wire = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
            return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n" + wire
        if kind == "gzip":
            return response(gzip.compress(text), headers={"Content-Encoding": "gzip"})
        if kind == "deflate":
            return response(zlib.compress(text), headers={"Content-Encoding": "deflate"})
        return b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + text  # no length: the body ends with the connection

    async with ScriptedUpstream(framed) as upstream:
        pool = UpstreamPool(10)
        for kind in ("chunked", "gzip", "deflate", "until-close"):
            assert await post(pool, upstream.url(), headers={"X-Kind": kind}) == (200, text), kind
        answer = await pool.request(upstream.url(), b"{}", {"X-Kind": "chunked"}, 5.0)
        assert answer.headers["Content-Type"] == "text/event-stream"
        assert b"".join([chunk async for chunk in answer.iter_chunks()]) == text
        answer.close()
        assert upstream.connections == 2  # the read-until-close answer cost its connection, the others shared one
        await pool.close()


async def test_interim_answers_are_skipped_and_an_answer_that_is_not_http_is_a_client_error() -> None:
    async def odd(request: Request) -> bytes:
        if request.header("X-Kind") == "early-hints":
            return b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n" + response(b"final")
        return b"SSH-2.0-OpenSSH_9.6\r\n\r\n"

    async with ScriptedUpstream(odd) as upstream:
        pool = UpstreamPool(10)
        assert await post(pool, upstream.url(), headers={"X-Kind": "early-hints"}) == (200, b"final")
        with pytest.raises(aiohttp.ClientResponseError):
            await post(pool, upstream.url())
        assert pool.in_use == 0
        await pool.close()


async def test_an_answer_past_the_limit_is_refused_with_or_without_a_length() -> None:
    big = b"y" * 3000

    async def large(request: Request) -> bytes:
        if request.header("X-Kind") == "chunked":
            return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    + b"".join(b"%x\r\n%s\r\n" % (1000, big[:1000]) for _ in range(3)) + b"0\r\n\r\n")
        return response(big)

    async with ScriptedUpstream(large) as upstream:
        pool = UpstreamPool(10)
        for kind in ("length", "chunked"):
            with pytest.raises(BodyTooLarge):
                await post(pool, upstream.url(), headers={"X-Kind": kind}, limit=2500)
        assert pool.in_use == 0
        await pool.close()


async def test_tls_with_a_trusted_ca_and_sni_and_an_untrusted_certificate_refused(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    async with ScriptedUpstream(ok, tls=ca.server_context()) as upstream:
        trusting = UpstreamPool(10, tls=ca.client_context())
        for _ in range(2):
            assert (await post(trusting, upstream.url(host="localhost")))[0] == 200  # a name: resolved, then SNI
        assert upstream.connections == 1
        await trusting.close()
        default = UpstreamPool(10)  # the system's CAs only
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await post(default, upstream.url(host="localhost"))
        assert default.in_use == 0
        await default.close()


async def test_past_max_connections_requests_wait_their_turn() -> None:
    release = asyncio.Event()

    async def slow(request: Request) -> bytes:
        await release.wait()
        return await ok(request)

    async with ScriptedUpstream(slow) as upstream:
        pool = UpstreamPool(2)
        calls = [asyncio.create_task(post(pool, upstream.url())) for _ in range(5)]
        await upstream.wait_open(2)
        await asyncio.sleep(0.05)
        assert pool.in_use == 2 and upstream.connections == 2 and len(upstream.requests) == 2
        release.set()
        assert [status for status, _ in await asyncio.gather(*calls)] == [200] * 5
        assert upstream.most_open == 2 and pool.in_use == 0
        await pool.close()


async def test_a_connect_that_does_not_complete_in_time_is_a_connection_timeout() -> None:
    with socket.socket() as listener:  # accepts TCP (the kernel's backlog) but never speaks TLS
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        pool = UpstreamPool(10)
        with pytest.raises(aiohttp.ConnectionTimeoutError):
            await pool.request(f"https://127.0.0.1:{listener.getsockname()[1]}/v1", b"{}", {}, 0.2)
        assert pool.in_use == 0
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # nothing listens there
    with pytest.raises(aiohttp.ClientConnectorError):
        await pool.request(f"http://127.0.0.1:{port}/v1", b"{}", {}, 1.0)
    assert pool.in_use == 0


async def test_a_header_that_could_start_a_line_of_its_own_is_refused_before_anything_is_sent() -> None:
    async with ScriptedUpstream(ok) as upstream:
        pool = UpstreamPool(10)
        for headers in ({"X-Trace": "a\r\nX-Injected: 1"}, {"X-Trace": "a\nb"}, {"Bad Name": "x"},
                        {"X-A\r\nB": "x"}, {"X-Trace": "nul\x00"}):
            with pytest.raises(UnsafeHeader):
                await pool.request(upstream.url(), b"{}", headers, 5.0)
        assert upstream.connections == 0 and pool.in_use == 0
        # Framing is the pool's own, whatever a header says.
        await post(pool, upstream.url(), b"abc", headers={"content-length": "99", "Transfer-Encoding": "chunked"})
        assert upstream.requests[0].header("Content-Length") == "3"
        assert upstream.requests[0].header("Transfer-Encoding") is None
        await pool.close()


async def test_an_answer_not_read_to_its_end_costs_its_connection() -> None:
    async def long(request: Request) -> bytes:
        return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")  # the rest never comes

    async with ScriptedUpstream(long) as upstream:
        pool = UpstreamPool(10)
        answer = await pool.request(upstream.url(), b"{}", {}, 5.0)
        assert await answer.iter_chunks().__anext__() == b"first"
        answer.close()
        await upstream.wait_open(0)
        assert pool.open_connections == 0 and pool.in_use == 0


async def test_a_reader_that_falls_behind_pauses_reading_from_the_upstream_then_resumes() -> None:
    block = b"z" * (1 << 20)

    async def huge(request: Request) -> bytes:
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (8 * len(block)) + block * 8

    async with ScriptedUpstream(huge) as upstream:
        pool = UpstreamPool(10)
        answer = await pool.request(upstream.url(), b"{}", {}, 5.0)
        chunks = answer.iter_chunks()
        received = len(await chunks.__anext__())
        transport = answer._connection.transport  # type: ignore[union-attr]
        assert transport is not None
        for _ in range(200):  # the payload fills up to its high-water mark, then the socket is paused
            if not transport.is_reading():
                break
            await asyncio.sleep(0.01)
        assert not transport.is_reading()
        async for chunk in chunks:
            received += len(chunk)
        assert received == 8 * len(block)
        answer.close()
        assert await post(pool, upstream.url(), limit=1 << 24) == (200, block * 8)
        assert upstream.connections == 1  # read to its end: the connection carried the next one
        await pool.close()


# ------------------------------------------------------------ through the gateway


async def test_the_gateway_reuses_its_upstream_connections(upstream: FakeUpstream,
                                                           start_gateway: StartGateway) -> None:
    gw = await start_gateway(gateway_config(upstream))
    pool = gw.app[PROVIDERS]["fake"].pool
    assert isinstance(pool, UpstreamPool)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {gw.api_key}"}) as session:
        for stream in (False, True, False, True):
            async with session.post(gw.openai_base + "/chat/completions", json={**HI, "stream": stream}) as resp:
                assert resp.status == 200
                await resp.read()
    assert pool.open_connections == 1 and len(upstream.received) == 4
    assert upstream.runner is not None and len(upstream.runner.server.connections) == 1  # type: ignore[union-attr]


async def test_a_client_leaving_mid_stream_closes_the_upstream_connection(upstream: FakeUpstream,
                                                                          start_gateway: StartGateway) -> None:
    gw = await start_gateway(gateway_config(upstream))
    pool = gw.app[PROVIDERS]["fake"].pool
    assert pool is not None
    upstream.behaviour.chunk_delay = 0.3
    upstream.behaviour.words = ["w"] * 50
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {gw.api_key}"}) as session:
        resp = await session.post(gw.openai_base + "/chat/completions", json={**HI, "stream": True})
        assert resp.status == 200
        await resp.content.readany()
        assert pool.open_connections == 1
        resp.connection.transport.abort()  # type: ignore[union-attr]
        resp.close()
    for _ in range(200):
        if pool.open_connections == 0 and not upstream.runner.server.connections:  # type: ignore[union-attr]
            break
        await asyncio.sleep(0.02)
    assert pool.open_connections == 0 and pool.in_use == 0
    assert not upstream.runner.server.connections  # type: ignore[union-attr]


async def test_an_upstream_answer_past_max_response_bytes_is_a_502(upstream: FakeUpstream,
                                                                  start_gateway: StartGateway) -> None:
    config = gateway_config(upstream)
    config["upstream"] = {"max_response_bytes": 64}
    gw = await start_gateway(config)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {gw.api_key}"}) as session:
        async with session.post(gw.openai_base + "/chat/completions", json=HI) as resp:
            assert resp.status == 502
            assert (await resp.json())["error"]["code"] == "upstream_response_too_large"
    assert gw.app[PROVIDERS]["fake"].pool.in_use == 0  # type: ignore[union-attr]


async def test_an_unreachable_upstream_is_502_through_the_pool(start_gateway: StartGateway,
                                                              upstream: FakeUpstream) -> None:
    await upstream.stop()
    gw = await start_gateway(gateway_config(upstream))
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {gw.api_key}"}) as session:
        async with session.post(gw.openai_base + "/chat/completions", json=HI) as resp:
            assert resp.status == 502 and (await resp.json())["error"]["code"] == "upstream_unreachable"


class SessionProvider(OpenAIProvider):
    """A plugin provider written against the documented send(..., session, timeout)."""

    type_name = "session-test"

    async def send(self, ctx: Any, target: Any, endpoint: Any, body: bytes, headers: dict[str, str],
                   session: aiohttp.ClientSession, timeout: aiohttp.ClientTimeout) -> UpstreamResponse:
        headers.update(self.static_headers)
        resp = await session.post(self.url_for(endpoint, target), data=body, headers=headers, timeout=timeout)
        return HttpUpstreamResponse(resp)


class SessionProviders:
    @hookimpl
    def nexgate_register_providers(self) -> dict[str, type[Provider]]:
        return {SessionProvider.type_name: SessionProvider}


async def test_a_plugin_provider_that_uses_the_session_it_is_handed_still_works(
        upstream: FakeUpstream, start_gateway: StartGateway) -> None:
    config = gateway_config(upstream)
    config["providers"]["fake"]["type"] = "session-test"
    gw = await start_gateway(config, plugins=[SessionProviders()])
    provider = gw.app[PROVIDERS]["fake"]
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {gw.api_key}"}) as session:
        async with session.post(gw.openai_base + "/chat/completions", json=HI) as resp:
            assert resp.status == 200
            assert (await resp.json())["choices"][0]["message"]["content"]
    assert upstream.received[-1].headers["Authorization"] == f"Bearer {PROVIDER_KEY}"
    assert provider.pool is not None and provider.pool.open_connections == 0  # the session carried it


def test_the_aiohttp_internals_the_upstream_pool_relies_on_are_still_there() -> None:
    from aiohttp.client_reqrep import ConnectionKey
    from aiohttp.http_parser import HttpResponseParser
    from aiohttp.http_writer import _serialize_headers
    from aiohttp.streams import EofStream, StreamReader

    params = inspect.signature(ResponseHandler.set_response_params).parameters
    for name in ("read_until_eof", "auto_decompress", "read_bufsize", "max_line_size", "max_field_size",
                 "max_headers"):
        assert name in params, name
    assert inspect.iscoroutinefunction(ResponseHandler.read)
    for name in ("data_received", "connection_lost", "is_connected", "close", "should_close", "closed"):
        assert hasattr(ResponseHandler, name), name
    assert list(inspect.signature(ResponseHandler.__init__).parameters) == ["self", "loop"]
    assert "(message, payload)" in inspect.getsource(ResponseHandler.data_received)
    assert HttpResponseParser.__module__ == "aiohttp._http_parser"  # the C parser, not the Python fallback
    with pytest.raises(ValueError):
        _serialize_headers("POST / HTTP/1.1", {"X": "a\r\nb"})
    assert _serialize_headers("POST / HTTP/1.1", {"A": "b"}) == b"POST / HTTP/1.1\r\nA: b\r\n\r\n"
    assert ConnectionKey._fields[:7] == ("host", "port", "is_ssl", "ssl", "proxy", "proxy_auth",
                                         "proxy_headers_hash")
    for name in ("iter_any", "readany", "is_eof", "at_eof"):
        assert callable(getattr(StreamReader, name)), name
    assert issubclass(EofStream, Exception)
