"""The aiohttp runner: JSON errors for low-level HTTP failures, and connection hygiene.

Errors: aiohttp answers malformed requests (oversized headers, bad request
lines), unroutable targets (CONNECT, ``OPTIONS *``) and odd ``Expect`` headers in
plain text that may quote the offending bytes, and logs them. Those bytes can
hold an API key or prompt text, so NexGate answers in the OpenAI error shape,
quotes nothing and logs only the error's type. A body the client spoiled (a bad
``Content-Encoding``, a hang-up, a stall) is the client's 4xx and an INFO line,
wherever it is read.

Hygiene, per connection (settings in ``server``): a client has
``header_timeout`` seconds to send a request's headers (from connecting, or from
the first byte of the next request), a body may pause at most ``body_timeout``
seconds (then the reader gets ``BodyTimeout``: 408), an idle kept-alive
connection lives ``keepalive_timeout`` seconds (aiohttp's own timer), and past
``max_connections`` in total or ``max_connections_per_ip`` from one peer address a
new connection gets a canned 503 and is closed before any parsing. The peer is
the socket's address: X-Forwarded-For means nothing before a request is read, so
peers in ``trusted_proxies`` (load balancers, which carry many clients) count
toward the total only.

aiohttp internals this leans on (tests/core/test_hygiene.py fails if an upgrade
changes them): ``AppRunner._make_server``; ``web.Server._loop`` / ``_kwargs``;
on ``RequestHandler``: ``connection_made``, ``connection_lost``,
``data_received``, ``handle_error``, ``finish_response``, ``log_exception``,
``force_close``, ``_messages`` (the parsed-request queue), ``_waiter`` (set while
waiting for a request), ``_manager``, ``_loop``, ``transport``;
``StreamReader.is_eof/exception/set_exception``; ``Response._prepare_headers``
(where aiohttp sets its own ``Server`` header); ``Application._make_request``'s ``_cls``,
``web.Server.request_factory`` and ``Request._prepare_hook`` (the ``Server`` header of the
app's answers, set per request instead of by an ``on_response_prepare`` coroutine).
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import time
from typing import Any, Callable

from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler

from .appkeys import CONFIG
from .config import ServerConfig
from .errors import GatewayError
from .iplog import ip_tag
from .logs import SafeAccessLogger
from .requestbody import BodyTimeout, body_error, unsupported_encoding

log = logging.getLogger("nexgate.http")


def apply_server_header(headers: Any, value: str) -> None:
    """Replace aiohttp's ``Server: Python/x aiohttp/y`` with the configured value, or drop it."""
    if value:
        headers["Server"] = value
    else:
        headers.popall("Server", None)


class ServerHeaderHook:
    """The app's ``Server`` header as an ``on_response_prepare`` hook: for runners other than ours.

    ``GatewayRunner`` takes it out of the signal and sets the header in ``_GatewayRequest``
    instead: no signal send and no hook coroutine per response (an empty signal is skipped).
    """

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    async def __call__(self, request: web.Request, response: web.StreamResponse) -> None:
        apply_server_header(response.headers, self.value)


class _GatewayRequest(web.Request):
    """A request whose answer gets the ``Server`` header (its handler's ``_GatewayHandler`` policy's)."""

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        apply_server_header(response._headers, self._protocol._policy.server_header)  # type: ignore[union-attr]
        match_info = self._match_info  # aiohttp's own hook from here: the app's remaining signals
        if match_info is None:
            return
        for app in match_info._apps:
            if on_response_prepare := app.on_response_prepare:
                await on_response_prepare.send(self, response)


def _canned(status: int, reason: str, error: GatewayError, server_header: str) -> bytes:
    """A whole response, built once: sent where parsing a request would already be too much work."""
    body = json.dumps(error.body()).encode()
    server = f"Server: {server_header}\r\n" if server_header else ""
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n{server}\r\n").encode() + body


class ConnectionPolicy:
    """The limits of one server (one process) and its open connections by peer address."""

    def __init__(self, config: ServerConfig) -> None:
        self.header_timeout = config.header_timeout
        self.body_timeout = config.body_timeout
        self.max_connections = config.max_connections
        self.max_per_ip = config.max_connections_per_ip
        self.server_header = config.server_header
        self.trusted_proxies = config.trusted_proxies
        self.open = 0
        self.by_ip: dict[str, int] = {}
        self._warned_at = 0.0
        self.busy = _canned(503, "Service Unavailable", GatewayError(
            503, "Too many open connections; retry later.", code="too_many_connections"), self.server_header)
        self.too_slow = _canned(408, "Request Timeout", GatewayError(
            408, "The request headers did not arrive in time.", code="request_timeout"), self.server_header)

    def admit(self, ip: str | None) -> bool:
        """Count a new connection; False (nothing counted) when it is one too many."""
        if self.max_connections and self.open >= self.max_connections:
            self._warn("server.max_connections")
            return False
        if ip is not None and self.max_per_ip:
            if self.by_ip.get(ip, 0) >= self.max_per_ip and not self._trusted(ip):
                self._warn("server.max_connections_per_ip")
                return False
            self.by_ip[ip] = self.by_ip.get(ip, 0) + 1
        self.open += 1
        return True

    def release(self, ip: str | None) -> None:
        self.open -= 1
        if ip is not None and self.max_per_ip:
            left = self.by_ip.pop(ip, 1) - 1
            if left > 0:
                self.by_ip[ip] = left

    def _trusted(self, ip: str) -> bool:
        if not self.trusted_proxies:
            return False
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in network for network in self.trusted_proxies)

    def _warn(self, setting: str) -> None:
        # A flood of refused connections must not become a flood of log lines: one a minute.
        now = time.monotonic()
        if now - self._warned_at >= 60:
            self._warned_at = now
            log.warning("refusing new connections: %s reached (more refusals are not logged for a minute)",
                        setting)


def _error_for(status: int, exc: BaseException | None) -> GatewayError:
    if isinstance(exc, http_exceptions.LineTooLong):
        return GatewayError(431, "A request header or the request line is too large.", code="headers_too_large")
    if isinstance(exc, http_exceptions.ContentEncodingError):  # an encoding aiohttp knows but cannot decode here
        return unsupported_encoding()
    if status >= 500:
        return GatewayError(500, "The gateway failed to handle the request.", code="internal_error")
    return GatewayError(status, "The HTTP request is malformed.", code="bad_http_request")


def _json_for(request: web.BaseRequest, exc: web.HTTPException) -> web.Response:
    """aiohttp's own plain-text 4xx (unroutable target, odd Expect, ...) in the OpenAI error shape."""
    if request.method == "CONNECT" or exc.status == 405:
        error = GatewayError(405, f"{request.method} is not supported here.", code="method_not_allowed")
    elif exc.status == 404:
        error = GatewayError(404, "Unknown path. NexGate serves the OpenAI API under /v1/.", code="unknown_url")
    elif exc.status == 417:
        error = GatewayError(417, "Only `Expect: 100-continue` is supported.", code="expectation_failed")
    elif exc.status == 413:
        error = GatewayError(413, "The request body is larger than this gateway accepts.", code="request_too_large")
    else:
        error = GatewayError(exc.status, "The HTTP request cannot be served.", code="bad_http_request")
    response = error.response()
    for name in ("Allow", "Retry-After"):
        if name in exc.headers:
            response.headers[name] = exc.headers[name]
    return response


class _ErrorResponse(web.Response):
    """A low-level error's answer. No app runs for it, so it sets the Server header itself."""

    server_header = "NexGate"

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        apply_server_header(self.headers, self.server_header)


def watch_connection(request: web.BaseRequest, on_lost: Callable[[], None] | None) -> bool:
    """Call ``on_lost`` as soon as the client's connection drops (None: stop watching).

    aiohttp cancels a handler on a hang-up only with ``handler_cancellation``, for every
    route at any await; the proxy wants it only while it waits on an upstream. False when
    the connection is already gone. Under another runner (no ``_GatewayHandler``) nothing is
    watched and a hang-up shows when a write fails.
    """
    if request.transport is None:
        return on_lost is None
    protocol = request.protocol
    if isinstance(protocol, _GatewayHandler):
        protocol.on_lost = on_lost
    return True


class _GatewayHandler(RequestHandler):
    __slots__ = ("_policy", "_peer_ip", "_header_timer", "_header_started", "_body", "_body_seen", "_body_timer",
                 "on_lost")

    def __init__(self, manager: _GatewayServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._policy = manager.policy
        self._peer_ip: str | None = None
        self._header_timer: Any = None
        self._header_started = False
        """Some bytes of a request's headers arrived (then a timeout is answered 408, else just closed)."""
        self._body: Any = None
        """The payload still arriving (a StreamReader), if any."""
        self._body_seen = 0.0
        self._body_timer: Any = None
        self.on_lost: Callable[[], None] | None = None
        """Set by the proxy while a request waits on its upstream (``watch_connection``)."""

    # ------------------------------------------------------------ connection

    def connection_made(self, transport: Any) -> None:
        peer = transport.get_extra_info("peername")
        ip = peer[0] if isinstance(peer, tuple) and peer else None
        if not self._policy.admit(ip):
            self._manager = None  # so connection_lost does nothing: aiohttp never saw this one
            transport.write(self._policy.busy)
            transport.close()
            return
        self._peer_ip = ip
        super().connection_made(transport)
        self._header_timer = self._loop.call_later(self._policy.header_timeout, self._header_expired)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._manager is None:
            return
        self._policy.release(self._peer_ip)
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = self._body = None
        super().connection_lost(exc)
        on_lost, self.on_lost = self.on_lost, None
        if on_lost is not None:
            on_lost()

    def data_received(self, data: bytes) -> None:
        if self._manager is None:  # refused, or already lost
            return
        parsed = len(self._messages)
        super().data_received(data)
        if self.transport is None:
            return
        loop = self._loop
        if len(self._messages) > parsed:  # a request's headers are complete
            self._header_started = False
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            payload = self._messages[-1][1]
            if not payload.is_eof():
                self._body = payload
                self._body_seen = loop.time()
                if self._body_timer is None:
                    self._body_timer = loop.call_at(self._body_seen + self._policy.body_timeout, self._body_check)
            return
        body = self._body
        if body is not None and not body.is_eof():
            self._body_seen = loop.time()
        elif data:
            self._header_started = True
            if self._header_timer is None and self._waiter is not None:
                # The first bytes of the next request on an idle connection: its headers are on the clock.
                self._body = None
                self._header_timer = loop.call_later(self._policy.header_timeout, self._header_expired)

    def _header_expired(self) -> None:
        self._header_timer = None
        # Only while aiohttp waits for a request (never in the middle of answering one).
        if self.transport is None or self._messages or self._waiter is None or self._waiter.done():
            return
        if self._header_started:
            # Never to a silent socket: a client would read it as the answer to its next request.
            self.transport.write(self._policy.too_slow)
        self.force_close()

    def _body_check(self) -> None:
        self._body_timer = None
        body = self._body
        if body is None or body.is_eof() or body.exception() is not None:
            return
        deadline = self._body_seen + self._policy.body_timeout
        if self._loop.time() < deadline:
            self._body_timer = self._loop.call_at(deadline, self._body_check)
            return
        # The reader (the handler, or aiohttp draining an unread body) raises; see requestbody.
        body.set_exception(BodyTimeout())

    # ---------------------------------------------------------------- errors

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        client_error = body_error(exc) if exc is not None else None
        if client_error is not None:  # a route that read its body itself and let the error escape
            error = client_error
        else:
            error = _error_for(status, exc)
            if status >= 500:
                log.error("unhandled error on %s %s", request.method, request.path, exc_info=exc)
            else:
                log.info("rejected a malformed HTTP request from %s: %s", ip_tag(request.remote), type(exc).__name__)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; closing the connection")
        response = _ErrorResponse(status=error.status, body=json.dumps(error.body()).encode(),
                                  content_type="application/json")
        response.server_header = self._policy.server_header
        response.force_close()
        return response

    def finish_response(self, request: Any, resp: web.StreamResponse,
                        start_time: float | None) -> Any:
        # Only aiohttp's own plain-text answers; a route's deliberate JSON or redirect stays as it is.
        # A plain function handing on aiohttp's coroutine: no coroutine of our own per response.
        if isinstance(resp, web.HTTPException) and resp.status >= 400 and resp.content_type == "text/plain":
            resp = _json_for(request, resp)
        return super().finish_response(request, resp, start_time)

    def log_exception(self, *args: Any, **kw: Any) -> None:
        exc = kw.get("exc_info")
        if isinstance(exc, BaseException) and body_error(exc) is not None:
            # aiohttp draining a body the client spoiled: the connection closes, nothing is wrong here.
            log.info("closed a connection after a bad request body: %s", type(exc).__name__)
            return
        super().log_exception(*args, **kw)


class _GatewayServer(web.Server):
    policy: ConnectionPolicy

    def __call__(self) -> RequestHandler:
        return _GatewayHandler(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """Serves the app with the settings of its config's ``server`` section."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        # Whoever serves the app (the CLI, the test kit): access lines without IP, query, Referer, UA.
        kwargs.setdefault("access_log_class", SafeAccessLogger)
        super().__init__(app, **kwargs)

    async def _make_server(self) -> web.Server:
        prepare = self.app.on_response_prepare  # still mutable: super() freezes the app
        hooks = [hook for hook in prepare if isinstance(hook, ServerHeaderHook)]
        for hook in hooks:
            prepare.remove(hook)
        server = await super()._make_server()
        server.__class__ = _GatewayServer
        config = self.app.get(CONFIG)
        server.policy = ConnectionPolicy(config.server if config is not None else ServerConfig())  # type: ignore[attr-defined]
        if hooks:
            server.policy.server_header = hooks[-1].value  # type: ignore[attr-defined]
            server.request_factory = functools.partial(self.app._make_request, _cls=_GatewayRequest)
        return server
