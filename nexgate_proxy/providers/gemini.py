"""`type: gemini`: Google's Gemini API through its OpenAI-compatible endpoint.

``base_url`` is ``https://generativelanguage.googleapis.com/v1beta/openai``; the key
is sent as ``Authorization: Bearer``. Chat completions (streamed too, with
``stream_options.include_usage``) and embeddings go to ``/chat/completions`` and
``/embeddings`` under it, in OpenAI's wire format, so requests and answers pass
through unchanged: no translation, nothing lost, and Gemini-only parameters still
reach Google via ``extra_body``. Why not the native ``generateContent``: it would
need a full translation layer for one provider, while Google documents and
maintains this endpoint as the OpenAI-SDK route to the same models.

One thing is not OpenAI's shape: Google answers errors as a JSON *list*
(``[{"error": {"code": 400, "message": ..., "status": "INVALID_ARGUMENT"}}]``),
which OpenAI SDKs cannot read. Those are rewritten to OpenAI's error object.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, AsyncIterator

from .. import hookimpl
from .base import Provider, UpstreamResponse
from .openai import OpenAIProvider

if TYPE_CHECKING:
    import aiohttp

    from ..config import Target
    from ..context import RequestContext
    from ..endpoints import Endpoint

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 429: "rate_limit_error"}


class GeminiProvider(OpenAIProvider):
    type_name = "gemini"
    endpoints = frozenset({"chat.completions", "embeddings"})

    async def send(self, ctx: RequestContext, target: Target, endpoint: Endpoint, body: bytes,
                   headers: dict[str, str], session: aiohttp.ClientSession,
                   timeout: aiohttp.ClientTimeout) -> UpstreamResponse:
        upstream = await super().send(ctx, target, endpoint, body, headers, session, timeout)
        return GeminiErrors(upstream) if upstream.status >= 400 else upstream


class GeminiErrors:
    """An error answer from Google, read as OpenAI's error object."""

    __slots__ = ("_upstream", "status", "headers")

    def __init__(self, upstream: UpstreamResponse) -> None:
        self._upstream = upstream
        self.status = upstream.status
        self.headers = upstream.headers

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self._upstream.iter_chunks():
            yield chunk

    async def read(self, limit: int) -> bytes:
        return openai_error(self.status, await self._upstream.read(limit))

    def close(self) -> None:
        self._upstream.close()


def openai_error(status: int, raw: bytes) -> bytes:
    """Google's ``[{"error": {...}}]`` as ``{"error": {message, type, param, code}}``; anything else unchanged."""
    try:
        data: Any = json.loads(raw)
    except ValueError:
        return raw
    if isinstance(data, list) and len(data) == 1:
        data = data[0]
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str) or "type" in error:
        return raw  # not Google's shape (or already OpenAI's)
    status_name = error.get("status")
    return json.dumps({"error": {
        "message": error["message"],
        "type": _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
        "param": None,
        "code": status_name if isinstance(status_name, str) else None,
    }}).encode()


@hookimpl
def nexgate_register_providers() -> dict[str, type[Provider]]:
    return {GeminiProvider.type_name: GeminiProvider}
