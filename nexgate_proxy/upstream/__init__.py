"""The gateway's upstream HTTP client: a lean connection layer on aiohttp's own parser and protocol.

The built-in HTTP providers send through one :class:`UpstreamPool` per worker process instead
of an ``aiohttp.ClientSession``. What a request costs here is what it must: the URL is parsed
once per distinct URL (``routes``), the head is serialized by aiohttp's C serializer and goes
out with the body in one ``transport.write``, the answer is read by aiohttp's
``ResponseHandler`` and its llhttp parser (``connection``), and the connection goes back to its
origin's idle list when the body ended and keep-alive holds (``pool``). No ClientRequest,
ClientResponse, timer, tracing or cookie objects per request.

Kept from the session: http and https (verified TLS, SNI, ALPN http/1.1), the process-wide cap
``upstream.max_connections`` on connections in use (further requests queue in order), the
route's connect timeout per address (TCP + TLS, as ``sock_connect``), getaddrinfo with a short
TTL cache, gzip/deflate decompression, Content-Length, chunked and read-until-close bodies,
flow control (a payload pauses its socket when the client reads slowly), idle connections closed
after 15 s, and aiohttp's exceptions (``ClientConnectorError``, ``ServerDisconnectedError``,
``ClientPayloadError``...), so the proxy's retries and breakers see what they saw. Not kept,
because the gateway never used them: redirects, proxies from the environment, cookies, HTTP
methods other than POST. ``aiohttp.ClientSession`` stays for plugin providers whose own
``send()`` uses the session they are given.
"""

from .pool import BodyTooLarge, UpstreamAnswer, UpstreamPool, default_tls
from .routes import UnsafeHeader

__all__ = ["BodyTooLarge", "UnsafeHeader", "UpstreamAnswer", "UpstreamPool", "default_tls"]
