"""Where a provider URL goes (its origin) and the request head written for it.

A URL is parsed once (``Routes`` caches it: providers use a handful of URLs); the head is
serialized per request by aiohttp's own C serializer, which refuses control characters (CR,
LF, NUL...) in names and values, so no header value can start a line of its own upstream.
Names must also be HTTP tokens, checked once per distinct name.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import socket
import ssl
from collections import deque
from typing import TYPE_CHECKING, Mapping
from urllib.parse import quote, urlsplit

from aiohttp.client_reqrep import ConnectionKey
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.http_writer import _serialize_headers

from ..errors import GatewayError

if TYPE_CHECKING:
    from .connection import UpstreamConnection

# What the session sent (aiohttp's default): the gateway decompresses these two itself.
ACCEPT_ENCODING = "gzip, deflate"
USER_AGENT = SERVER_SOFTWARE

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Framing is the gateway's own: never taken from a header someone else set.
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection"})
_MAX_ROUTES = 4096
_MAX_NAMES = 4096


class UnsafeHeader(GatewayError):
    """A header that cannot be sent as one HTTP/1.1 header line (a line break or control character)."""

    def __init__(self, name: str) -> None:
        super().__init__(400, f"The request header {name[:64]!r} has a name or value that cannot be sent upstream "
                         "(a line break, control character or invalid name).", code="invalid_header")


class Origin:
    """One scheme://host:port: its TLS settings, its idle connections and its DNS answers."""

    __slots__ = ("host", "port", "ssl", "server_hostname", "host_header", "key", "idle", "addresses")

    def __init__(self, scheme: str, host: str, port: int, host_header: str, tls: ssl.SSLContext | None) -> None:
        self.host = host
        self.port = port
        self.ssl = tls if scheme == "https" else None
        # Certificates name the host without a trailing dot (aiohttp strips it too).
        self.server_hostname = host.rstrip(".") if self.ssl is not None else None
        self.host_header = host_header
        self.key = ConnectionKey(host, port, self.ssl is not None, self.ssl or True, None, None, None)
        """What aiohttp's connection errors describe (their host, port and ssl)."""
        self.idle: deque[UpstreamConnection] = deque()
        self.addresses = _literal(host, port)
        """getaddrinfo()-shaped answers for an IP literal: no lookup at all."""


class Route:
    """A parsed URL: its origin, the request line and the headers it adds."""

    __slots__ = ("origin", "request_line", "authorization")

    def __init__(self, origin: Origin, target: str, authorization: str | None) -> None:
        self.origin = origin
        self.request_line = f"POST {target} HTTP/1.1"
        self.authorization = authorization
        """Basic credentials from the URL's user info (as aiohttp sent them), unless a header has its own."""

    def head(self, headers: Mapping[str, str], length: int) -> bytes:
        """The request line and headers for a body of ``length`` bytes. Raises UnsafeHeader."""
        names = _NAMES
        try:
            present = {names[name] for name in headers}
        except KeyError:  # a name not seen before: checked once
            present = {names.get(name) or _checked_name(name) for name in headers}
        out = {} if "host" in present else {"Host": self.origin.host_header}
        if present & _FRAMING:
            out.update((k, v) for k, v in headers.items() if k.lower() not in _FRAMING)
        else:
            out.update(headers)
        out["Content-Length"] = str(length)
        if "content-type" not in present:
            out["Content-Type"] = "application/json"
        if "accept-encoding" not in present:
            out["Accept-Encoding"] = ACCEPT_ENCODING
        if "user-agent" not in present:
            out["User-Agent"] = USER_AGENT
        if self.authorization is not None and "authorization" not in present:
            out["Authorization"] = self.authorization
        try:
            return _serialize_headers(self.request_line, out)  # type: ignore[no-any-return]
        except ValueError:  # a control character in a value
            raise UnsafeHeader(next((k for k, v in out.items() if _has_control(v)), "?")) from None


class Routes:
    """URL -> Route, parsed once; origins shared by every URL that names them."""

    def __init__(self, tls: ssl.SSLContext) -> None:
        self._tls = tls
        self._routes: dict[str, Route] = {}
        self.origins: dict[tuple[str, str, int], Origin] = {}

    def get(self, url: str) -> Route:
        route = self._routes.get(url)
        if route is None:
            route = self._parse(url)
            if len(self._routes) >= _MAX_ROUTES:  # URLs with per-request parts: keep memory bounded
                self._routes.clear()
            self._routes[url] = route
        return route

    def _parse(self, url: str) -> Route:
        from aiohttp import InvalidUrlClientError, NonHttpUrlClientError

        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise InvalidUrlClientError(url, str(exc)) from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise NonHttpUrlClientError(url)
        host = parts.hostname
        if not host:
            raise InvalidUrlClientError(url, "no host")
        default = 443 if scheme == "https" else 80
        port = port or default
        key = (scheme, host, port)
        origin = self.origins.get(key)
        if origin is None:
            shown = f"[{host}]" if ":" in host else host
            origin = Origin(scheme, host, port, shown if port == default else f"{shown}:{port}", self._tls)
            self.origins[key] = origin
        # Percent-encode what may not appear in a request line (spaces, controls, non-ASCII), keep the rest.
        target = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
        if parts.query:
            target += "?" + quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
        authorization = None
        if parts.username is not None:
            credentials = f"{parts.username}:{parts.password or ''}".encode()
            authorization = "Basic " + base64.b64encode(credentials).decode()
        return Route(origin, target, authorization)


_NAMES: dict[str, str] = {}
"""Header names seen and found to be tokens, with their lowercase."""


def _checked_name(name: str) -> str:
    if not isinstance(name, str) or _TOKEN.fullmatch(name) is None:
        raise UnsafeHeader(str(name))
    lower = name.lower()
    if len(_NAMES) < _MAX_NAMES:
        _NAMES[name] = lower
    return lower


def _has_control(value: str) -> bool:
    return any((ord(c) < 0x20 and c != "\t") or c == "\x7f" for c in str(value))


def _literal(host: str, port: int) -> list[tuple[int, int, int, str, tuple]] | None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    sockaddr: tuple = (host, port, 0, 0) if address.version == 6 else (host, port)
    return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr)]
