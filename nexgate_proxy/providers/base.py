"""What every provider adapter offers the core.

An adapter turns the client's request into the upstream's (URL, headers,
credentials) and hands back an :class:`UpstreamResponse`. HTTP providers share
one implementation, which sends through the gateway's upstream pool
(nexgate_proxy.upstream) once the app set ``Provider.pool`` at startup, and
through the ``session`` argument otherwise; a provider that is not HTTP (the
demo echo) returns its own response object with the same four members.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, AsyncIterator, ClassVar, Mapping, Protocol

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from ..endpoints import COUNT_TOKENS
from ..errors import GatewayError
from ..translate import translated_endpoint
from ..estimate import typical_input_tokens
from ..upstream import BodyTooLarge

if TYPE_CHECKING:
    from ..config import ProviderConfig, Target
    from ..context import RequestContext
    from ..endpoints import Endpoint
    from ..upstream import UpstreamPool


class UpstreamResponse(Protocol):
    status: int
    headers: Mapping[str, str]

    def iter_chunks(self) -> AsyncIterator[bytes]: ...

    async def read(self, limit: int) -> bytes: ...

    def close(self) -> None: ...


class HttpUpstreamResponse:
    """An ``aiohttp.ClientResponse`` (the session's path) with the members of an upstream response."""

    __slots__ = ("_resp", "status", "headers")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.headers = resp.headers

    def iter_chunks(self) -> AsyncIterator[bytes]:
        return self._resp.content.iter_any()

    async def read(self, limit: int) -> bytes:
        length = self._resp.content_length
        if length is not None and length > limit:
            raise BodyTooLarge
        if length is not None:
            return await self._resp.read()
        parts, size = [], 0
        async for chunk in self._resp.content.iter_any():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge
            parts.append(chunk)
        return b"".join(parts)

    def close(self) -> None:
        self._resp.close()


class ProviderBusy(GatewayError):
    """The provider's ``max_concurrent`` requests are in flight in this process: 503 at once, not a queue."""

    def __init__(self, provider: str, cap: int) -> None:
        super().__init__(503, f"The upstream provider '{provider}' has its configured maximum of {cap} requests "
                         "in flight; retry shortly.", code="provider_concurrency_limit", headers={"Retry-After": "1"})


class _Slot:
    """One of a provider's ``max_concurrent`` places, given back once."""

    __slots__ = ("provider",)

    def __init__(self, provider: Provider) -> None:
        self.provider: Provider | None = provider
        provider.in_flight += 1

    def release(self) -> None:
        if self.provider is not None:
            self.provider.in_flight -= 1
            self.provider = None

    __del__ = release  # an answer dropped without close() (a cancelled request) still gives its place back


class CappedUpstreamResponse:
    """An answer that holds its provider's place until it is closed (a stream: until its end)."""

    __slots__ = ("_upstream", "_slot", "status", "headers")

    def __init__(self, upstream: UpstreamResponse, slot: _Slot) -> None:
        self._upstream = upstream
        self._slot = slot
        self.status = upstream.status
        self.headers = upstream.headers

    def iter_chunks(self) -> AsyncIterator[bytes]:
        return self._upstream.iter_chunks()

    async def read(self, limit: int) -> bytes:
        return await self._upstream.read(limit)

    def close(self) -> None:
        self._upstream.close()
        self._slot.release()


_JSON = CIMultiDictProxy(CIMultiDict({"Content-Type": "application/json"}))

ESTIMATED_HEADER = "x-nexgate-estimated"
"""Set on answers the gateway computed itself instead of the provider (count_tokens estimates)."""


class LocalResponse:
    """A JSON answer made by the gateway, with the members of an upstream response."""

    __slots__ = ("status", "headers", "_body")

    def __init__(self, payload: object, status: int = 200) -> None:
        self.status = status
        self.headers = _JSON
        self._body = json.dumps(payload).encode()

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        yield self._body

    async def read(self, limit: int) -> bytes:
        if len(self._body) > limit:
            raise BodyTooLarge
        return self._body

    def close(self) -> None:
        self._body = b""


class Provider:
    """An upstream API reachable over HTTP. Subclasses set the credentials and paths."""

    type_name: ClassVar[str] = ""
    api_formats: ClassVar[frozenset[str]] = frozenset({"openai"})
    """Request dialects this provider speaks (see ``Endpoint.api_format``)."""
    endpoints: ClassVar[frozenset[str] | None] = None
    """The operations (``Endpoint.name``) it serves; None: every one of its dialects."""
    pool: UpstreamPool | None = None
    """Set by the app at startup: ``send`` goes through it rather than the session it is given."""

    def __init__(self, config: ProviderConfig) -> None:
        self.name = config.name
        self.config = config
        self.base_url = config.base_url
        self.static_headers = {**config.headers, **self.auth_headers()}
        self.max_concurrent = config.max_concurrent
        """Requests in flight to it in this process, at most (0: no cap but ``upstream.max_connections``)."""
        self.in_flight = 0
        """Requests holding one of the ``max_concurrent`` places (counted only under a cap)."""

    def auth_headers(self) -> dict[str, str]:
        return {}

    def supports(self, endpoint_name: str, api_format: str) -> bool:
        """Whether routing may send this operation here: in this provider's dialect, or through a
        translation to an operation it serves. count_tokens goes anywhere: see ``send``."""
        served: str | None = endpoint_name
        if api_format not in self.api_formats and endpoint_name != COUNT_TOKENS.name:
            served = translated_endpoint(endpoint_name, self.api_formats)
            if served is None:
                return False
        return self.endpoints is None or served in self.endpoints

    def url_for(self, endpoint: Endpoint, target: Target) -> str:
        return self.base_url + endpoint.upstream_path

    def extra_headers(self, ctx: RequestContext) -> Mapping[str, str]:
        """Per-request headers the upstream needs beyond the forwarded ones."""
        return {}

    async def send(
        self,
        ctx: RequestContext,
        target: Target,
        endpoint: Endpoint,
        body: bytes,
        headers: dict[str, str],
        session: aiohttp.ClientSession,
        timeout: aiohttp.ClientTimeout,
    ) -> UpstreamResponse:
        """Send the request; return once the upstream's status and headers arrived."""
        if endpoint.name == COUNT_TOKENS.name and "anthropic" not in self.api_formats:
            # No upstream can count for another dialect: answer in Anthropic's shape, marked as estimated.
            ctx.response_headers[ESTIMATED_HEADER] = "true"
            return LocalResponse({"input_tokens": typical_input_tokens(ctx.body or {})})
        headers.update(self.static_headers)
        headers.update(self.extra_headers(ctx))
        if not self.max_concurrent:
            pool = self.pool
            if pool is not None:  # what _post does, inline: no coroutine of its own on the common path
                return await pool.request(self.url_for(endpoint, target), body, headers, timeout.sock_connect)
            return await self._post(self.url_for(endpoint, target), body, headers, session, timeout)
        if self.in_flight >= self.max_concurrent:
            raise ProviderBusy(self.name, self.max_concurrent)
        slot = _Slot(self)
        try:
            upstream = await self._post(self.url_for(endpoint, target), body, headers, session, timeout)
        except BaseException:
            slot.release()
            raise
        return CappedUpstreamResponse(upstream, slot)

    async def _post(self, url: str, body: bytes, headers: dict[str, str], session: aiohttp.ClientSession,
                    timeout: aiohttp.ClientTimeout) -> UpstreamResponse:
        pool = self.pool
        if pool is not None:
            return await pool.request(url, body, headers, timeout.sock_connect)
        resp = await session.post(url, data=body, headers=headers, timeout=timeout, allow_redirects=False)
        return HttpUpstreamResponse(resp)
