"""An aiohttp runner whose low-level HTTP errors speak the OpenAI error shape.

aiohttp answers malformed requests (oversized headers, bad request lines) in
plain text that quotes the offending bytes, and logs them. Those bytes can hold
an API key or prompt text, so NexGate answers in JSON, quotes nothing and logs
only the error's type. This leans on two aiohttp internals
(``AppRunner._make_server`` and ``RequestHandler.handle_error``);
tests/test_faults.py fails if an aiohttp upgrade changes them.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler

from .errors import GatewayError

log = logging.getLogger("nexgate.http")


def _error_for(status: int, exc: BaseException | None) -> GatewayError:
    if isinstance(exc, http_exceptions.LineTooLong):
        return GatewayError(431, "A request header or the request line is too large.", code="headers_too_large")
    if status >= 500:
        return GatewayError(500, "The gateway failed to handle the request.", code="internal_error")
    return GatewayError(status, "The HTTP request is malformed.", code="bad_http_request")


class _JsonErrorHandler(RequestHandler):
    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500:
            log.error("unhandled error on %s %s", request.method, request.path, exc_info=exc)
        else:
            log.info("rejected a malformed HTTP request from %s: %s", request.remote, type(exc).__name__)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; closing the connection")
        response = _error_for(status, exc).response()
        response.force_close()
        return response


class _JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorServer
        return server
