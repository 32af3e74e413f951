"""One upstream connection (aiohttp's ResponseHandler and C parser) and how it is opened.

The protocol is aiohttp's own ``ResponseHandler``: its parser queues ``(message, payload)``
pairs, its ``StreamReader`` payloads pause the socket past 128 KiB unread (a slow client
pauses reading upstream) and a lost connection fails them with aiohttp's exceptions
(``ServerDisconnectedError``, ``ClientPayloadError``, ``ClientOSError``). One parser serves
every answer on a kept-alive connection (llhttp starts over after each message), where the
session built one per request.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import TYPE_CHECKING, Any

from aiohttp import (ClientConnectorCertificateError, ClientConnectorDNSError, ClientConnectorError,
                     ClientConnectorSSLError, ConnectionTimeoutError)
from aiohttp.client_proto import ResponseHandler

if TYPE_CHECKING:
    from .routes import Origin

READ_BUFSIZE = 2**16
"""A payload buffers twice this unread before the socket is paused (the session's default)."""
MAX_LINE = MAX_FIELD = 8190
MAX_HEADERS = 128
DNS_TTL = 60.0
"""Seconds a name's addresses are reused. Lookups happen only for new connections."""


class UpstreamConnection(ResponseHandler):
    """A connection to one origin; ``answered`` tells whether any byte came since the last request."""

    def __init__(self, loop: asyncio.AbstractEventLoop, origin: Origin) -> None:
        super().__init__(loop)
        self.origin = origin
        self.answered = False
        self.idle_since = 0.0
        self.set_response_params(read_until_eof=True, auto_decompress=True, read_bufsize=READ_BUFSIZE,
                                 max_line_size=MAX_LINE, max_field_size=MAX_FIELD, max_headers=MAX_HEADERS)

    def data_received(self, data: bytes) -> None:
        self.answered = True
        ResponseHandler.data_received(self, data)


class Resolver:
    """loop.getaddrinfo with a TTL cache; concurrent lookups of one name share one call (a burst)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._cache: dict[tuple[str, int], tuple[float, list[Any]]] = {}
        self._pending: dict[tuple[str, int], asyncio.Task[list[Any]]] = {}

    async def resolve(self, origin: Origin) -> list[Any]:
        if origin.addresses is not None:
            return origin.addresses
        key = (origin.host, origin.port)
        cached = self._cache.get(key)
        if cached is not None and cached[0] > self._loop.time():
            return cached[1]
        task = self._pending.get(key)
        if task is None:
            task = self._pending[key] = self._loop.create_task(self._lookup(origin))
        # One caller giving up (its client left) must not cancel the others' lookup.
        return await asyncio.shield(task)

    async def _lookup(self, origin: Origin) -> list[Any]:
        key = (origin.host, origin.port)
        try:
            infos = await self._loop.getaddrinfo(origin.host, origin.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ClientConnectorDNSError(origin.key, exc) from exc
        finally:
            del self._pending[key]
        if not infos:
            raise ClientConnectorDNSError(origin.key, OSError("no address"))
        self._cache[key] = (self._loop.time() + DNS_TTL, infos)
        return infos


async def open_connection(loop: asyncio.AbstractEventLoop, resolver: Resolver, origin: Origin,
                          timeout: float | None) -> UpstreamConnection:
    """A new connection, raising aiohttp's connector errors. ``timeout`` bounds each address's
    TCP connect and TLS handshake (the session's ``sock_connect``), not the DNS lookup."""
    infos = await resolver.resolve(origin)
    last: Exception | None = None
    for family, _, proto, _, sockaddr in infos:
        try:
            async with asyncio.timeout(timeout):
                _, connection = await loop.create_connection(
                    lambda: UpstreamConnection(loop, origin), sockaddr[0], sockaddr[1], family=family, proto=proto,
                    ssl=origin.ssl, server_hostname=origin.server_hostname)
            return connection
        except ssl.CertificateError as exc:
            raise ClientConnectorCertificateError(origin.key, exc) from exc
        except ssl.SSLError as exc:
            raise ClientConnectorSSLError(origin.key, exc) from exc
        except TimeoutError as exc:
            last = ConnectionTimeoutError(f"Connection timeout to host {origin.host}:{origin.port}")
            last.__cause__ = exc
        except OSError as exc:
            last = ClientConnectorError(origin.key, exc)
    assert last is not None
    raise last
