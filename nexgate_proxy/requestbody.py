"""Read a request body: every way a client can spoil it is a GatewayError, never a 500.

One reader for the proxy, the admin API and webhooks. aiohttp decodes a
``Content-Encoding`` while the body arrives; a body that does not match its
header fails inside that decoder, a client that hangs up mid-upload leaves a
ConnectionResetError, a client that stops sending trips the runner's body
timeout (``BodyTimeout``). Each becomes the client's 4xx (499 for a client that
left, which no one receives but the usage record and the metrics count).
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.compression_utils import HAS_BROTLI, HAS_ZSTD
from aiohttp.http_exceptions import ContentEncodingError
from aiohttp.web_protocol import RequestPayloadError

from .errors import GatewayError

log = logging.getLogger("nexgate.http")

# What aiohttp decodes on its own (it passes any other value through undecoded).
DECODED_ENCODINGS = frozenset(
    {"identity", "gzip", "deflate"} | ({"br"} if HAS_BROTLI else set()) | ({"zstd"} if HAS_ZSTD else set()))


class BodyTimeout(Exception):
    """Set on a request's payload by the runner when the client stops sending its body."""


def unsupported_encoding(encoding: str | None = None) -> GatewayError:
    named = f" {encoding[:32]!r}" if encoding else ""
    return GatewayError(
        415, f"This Content-Encoding{named} is not supported; send the body uncompressed or as "
        f"{', '.join(sorted(DECODED_ENCODINGS - {'identity'}))}.", code="unsupported_body_encoding")


def check_encoding(request: web.BaseRequest) -> None:
    encoding = request.headers.get("Content-Encoding")
    if encoding is not None and encoding.strip().lower() not in DECODED_ENCODINGS:
        raise unsupported_encoding(encoding)


def too_large(limit: int, code: str = "request_too_large") -> GatewayError:
    return GatewayError(413, f"The request body is larger than this gateway accepts ({limit} bytes).", code=code)


async def read_body(request: web.BaseRequest, limit: int, *, too_large_code: str = "request_too_large") -> bytes:
    """The whole (decoded) body, at most ``limit`` bytes. Raises GatewayError for any bad body."""
    check_encoding(request)
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit, too_large_code)
    # Chunk by chunk, so a body (or what it decompresses to) past the limit is never buffered whole.
    body = bytearray()
    try:
        async for chunk in request.content.iter_any():
            body += chunk
            if len(body) > limit:
                raise too_large(limit, too_large_code)
    except GatewayError:
        raise
    except Exception as exc:
        error = body_error(exc)
        if error is None:
            raise
        if error.status == 499:
            log.info("the client disconnected while sending the request body")
        raise error from None
    return bytes(body)


def body_error(exc: BaseException) -> GatewayError | None:
    """The client's error for an exception raised while reading its body; None when it is not the client's."""
    if isinstance(exc, RequestPayloadError):
        # The decoder failed (a gzip/deflate header on a body that is not), or the framing was cut short.
        if isinstance(exc.__cause__, ContentEncodingError):
            return GatewayError(400, "The request body does not match its Content-Encoding header.",
                                code="invalid_body_encoding")
        return GatewayError(400, "The request body is malformed or incomplete.", code="invalid_body")
    if isinstance(exc, BodyTimeout):
        return GatewayError(408, "The request body did not arrive in time.", code="request_timeout")
    if isinstance(exc, ConnectionError):
        return GatewayError(499, "The client closed the connection before sending the whole body.",
                            code="client_disconnected")
    return None
