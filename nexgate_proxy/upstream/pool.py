"""The process-wide pool: a cap on connections in use, idle connections per origin, one request at a time each."""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import TYPE_CHECKING, AsyncIterator

from aiohttp import ClientConnectionError, ClientOSError, ClientResponseError, RequestInfo, ServerDisconnectedError
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import EofStream

from multidict import CIMultiDict, CIMultiDictProxy

from .connection import Resolver, UpstreamConnection, open_connection
from .routes import Routes

if TYPE_CHECKING:
    from aiohttp.http_parser import RawResponseMessage
    from aiohttp.streams import StreamReader

    from .routes import Origin

KEEPALIVE = 15.0
"""Seconds an idle connection is kept (the session's keepalive_timeout)."""
_WRITE_JOINED = 64 * 1024
"""Bodies up to this size are copied after the head: one send for the request."""


class BodyTooLarge(Exception):
    """The upstream's answer exceeded the limit given to ``UpstreamAnswer.read``."""


class UpstreamPool:
    """Sends POST requests over kept-alive HTTP/1.1 connections, at most ``max_connections`` in use.

    A request beyond the cap waits (first come, first served) for one to be handed back.
    """

    def __init__(self, max_connections: int, tls: ssl.SSLContext | None = None,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._limit = max_connections
        self._in_use = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._routes = Routes(tls or default_tls())
        self._resolver = Resolver(self._loop)
        self._open: set[UpstreamConnection] = set()
        self._sweep: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def open_connections(self) -> int:
        return len(self._open)

    async def request(self, url: str, body: bytes, headers: dict[str, str],
                      connect_timeout: float | None) -> UpstreamAnswer:
        """POST ``body``; return once the status and headers arrived. Raises aiohttp.ClientError
        subclasses for transport failures, UnsafeHeader for a header that cannot be sent."""
        route = self._routes.get(url)
        origin = route.origin
        head = route.head(headers, len(body))
        data = head + body if len(body) <= _WRITE_JOINED else None
        # The common case inline (a free place, an idle connection): no coroutine per step.
        if self._in_use < self._limit and not self._waiters:
            self._in_use += 1
        else:
            await self._wait_for_slot()
        retried = False
        while True:
            connection = None
            idle = origin.idle
            while idle:
                candidate = idle.pop()  # the most recently used: the least likely to be stale
                if candidate.is_connected() and not candidate.should_close:
                    connection = candidate
                    break
                self._drop(candidate)
            if connection is None:
                try:
                    connection = await self._open_connection(origin, connect_timeout)
                except BaseException:
                    self._give_slot()
                    raise
            reused = connection.idle_since != 0.0
            connection.answered = False
            try:
                transport = connection.transport
                assert transport is not None
                if data is not None:
                    transport.write(data)
                else:
                    transport.writelines((head, body))
                message, payload = await connection.read()
                if 100 <= message.code < 200:
                    message, payload = await _past_interim(connection, message, payload)
            except (ServerDisconnectedError, ClientOSError):
                self._drop(connection)
                # A kept-alive connection the upstream closed as we reused it: it closes idle ones
                # only between requests, so an answer of nothing at all means the request was not
                # taken (RFC 9112 9.3.1). Once, on a new connection, where that race cannot happen.
                if reused and not connection.answered and not retried:
                    retried = True
                    continue
                self._give_slot()
                raise
            except BaseException as exc:
                self._drop(connection)
                self._give_slot()
                if isinstance(exc, (EofStream, HttpProcessingError)):
                    raise _client_error(exc, url) from exc
                raise
            return UpstreamAnswer(self, connection, message.code, message.headers, payload)

    # ------------------------------------------------------------ connections

    async def _open_connection(self, origin: Origin, timeout: float | None) -> UpstreamConnection:
        if self._closed:
            raise ClientConnectionError("the upstream pool is closed")
        connection = await open_connection(self._loop, self._resolver, origin, timeout)
        self._open.add(connection)
        return connection

    def release(self, connection: UpstreamConnection, reusable: bool) -> None:
        """The answer was read (``reusable``: to its end, and the connection may carry another) or dropped."""
        if reusable and not self._closed and not connection.should_close and connection.is_connected():
            connection.idle_since = self._loop.time()
            connection.origin.idle.append(connection)
            if self._sweep is None:
                self._sweep = self._loop.call_later(KEEPALIVE, self._close_expired)
        else:
            self._drop(connection)
        self._give_slot()

    def _drop(self, connection: UpstreamConnection) -> None:
        connection.close()
        self._open.discard(connection)

    def _close_expired(self) -> None:
        self._sweep = None
        expiry = self._loop.time() - KEEPALIVE
        waiting = False
        for origin in self._routes.origins.values():
            idle = origin.idle
            while idle and idle[0].idle_since <= expiry:  # oldest first
                self._drop(idle.popleft())
            waiting = waiting or bool(idle)
        if waiting:
            self._sweep = self._loop.call_later(KEEPALIVE / 2, self._close_expired)

    # ------------------------------------------------------------ the cap

    async def _wait_for_slot(self) -> None:
        waiter = self._loop.create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # _give_slot hands its place over: _in_use stays
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._give_slot()  # handed over as we were cancelled: pass it on
            else:
                self._waiters.remove(waiter)
            raise

    def _give_slot(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._in_use -= 1

    # ------------------------------------------------------------ shutdown

    async def close(self, timeout: float = 1.0) -> None:
        """Close every connection (a TLS one sends its close_notify) and wait for them to go, briefly."""
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for origin in self._routes.origins.values():
            origin.idle.clear()
        closing = []
        for connection in list(self._open):
            closed = connection.closed
            connection.close()
            if closed is not None and not closed.done():
                closing.append(closed)
        self._open.clear()
        if closing:
            await asyncio.wait(closing, timeout=timeout)


class UpstreamAnswer:
    """The upstream's status and headers, and its body to read or stream. ``close()`` hands the
    connection back when the body was read to its end, and drops it otherwise."""

    __slots__ = ("status", "headers", "_payload", "_connection", "_pool")

    def __init__(self, pool: UpstreamPool, connection: UpstreamConnection, status: int,
                 headers: CIMultiDictProxy[str], payload: StreamReader) -> None:
        self.status = status
        self.headers = headers
        self._payload = payload
        self._connection: UpstreamConnection | None = connection
        self._pool = pool

    def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (decompressed), never an empty chunk."""
        return self._payload.iter_any()

    async def read(self, limit: int) -> bytes:
        """The whole body (decompressed); BodyTooLarge past ``limit`` bytes."""
        length = self.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise BodyTooLarge
        payload = self._payload
        chunk = await payload.readany()
        if payload.at_eof() or not chunk:  # most answers: all of it arrived with the headers
            if len(chunk) > limit:
                raise BodyTooLarge
            return chunk
        parts, size = [chunk], len(chunk)
        while chunk:
            if size > limit:
                raise BodyTooLarge
            chunk = await payload.readany()
            size += len(chunk)
            parts.append(chunk)
        if size > limit:
            raise BodyTooLarge
        return b"".join(parts)

    def close(self) -> None:
        connection = self._connection
        if connection is not None:
            self._connection = None
            self._pool.release(connection, self._payload.is_eof())

    def __del__(self) -> None:
        # An answer dropped without close() (a cancelled request) must not keep its place under the cap.
        if self._connection is not None:
            try:
                self._pool.release(self._connection, False)
            except Exception:  # the loop is gone (interpreter shutdown): nothing left to give back
                pass


async def _past_interim(connection: UpstreamConnection, message: RawResponseMessage,
                        payload: StreamReader) -> tuple[RawResponseMessage, StreamReader]:
    """The final answer after interim ones (103 Early Hints; the pool never sends Expect)."""
    while 100 <= message.code < 200 and message.code != 101:
        message, payload = await connection.read()
    return message, payload


def _client_error(exc: BaseException, url: str) -> Exception:
    """What aiohttp's session raises for an answer that is not HTTP, or none at all."""
    if isinstance(exc, HttpProcessingError):
        from yarl import URL

        info = RequestInfo(URL(url), "POST", CIMultiDictProxy(CIMultiDict()), URL(url))
        return ClientResponseError(info, (), status=exc.code, message=exc.message, headers=exc.headers)
    return ServerDisconnectedError()


def default_tls() -> ssl.SSLContext:
    """Verified TLS with the system's CAs, as the session's default; HTTP/1.1 offered in ALPN."""
    context = ssl.create_default_context()
    context.set_alpn_protocols(["http/1.1"])
    return context

