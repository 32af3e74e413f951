"""CORS for browser apps: preflights answered, allowed origins named on every answer.

Installed only when ``server.cors.allow_origins`` is set. An allowed origin is
echoed back (``*`` only when configured so, and never with credentials); any
other origin gets no ``Access-Control-*`` header, so the browser blocks it.
"""

from __future__ import annotations

from aiohttp import web

from .config import CorsConfig
from .errors import GatewayError
from .providers.base import ESTIMATED_HEADER

ALLOW_METHODS = "GET, POST, OPTIONS"
EXPOSE_HEADERS = ", ".join((
    "x-nexgate-request-id", "x-nexgate-cost-usd", ESTIMATED_HEADER, "x-request-id", "request-id", "retry-after",
    "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens",
))
"""Headers a page's script may read: what the SDKs and dashboards look at."""


class Cors:
    def __init__(self, config: CorsConfig) -> None:
        self.config = config
        self.any_origin = "*" in config.allow_origins
        self.origins = frozenset(config.allow_origins)

    def allowed(self, origin: str) -> bool:
        return self.any_origin or origin.lower() in self.origins

    def origin_headers(self, origin: str) -> dict[str, str]:
        if self.any_origin and not self.config.allow_credentials:
            headers = {"Access-Control-Allow-Origin": "*"}
        else:
            headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        if self.config.allow_credentials:
            headers["Access-Control-Allow-Credentials"] = "true"
        return headers

    def install(self, app: web.Application) -> None:
        app.middlewares.append(self.preflight)
        app.on_response_prepare.append(self.on_prepare)

    @web.middleware
    async def preflight(self, request: web.Request, handler: web.RequestHandler) -> web.StreamResponse:
        if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
            return await handler(request)
        origin = request.headers.get("Origin", "")
        if not origin or not self.allowed(origin):
            return GatewayError(403, f"The origin {origin or '(none)'!r} may not call this gateway from a browser.",
                                code="cors_origin_not_allowed").response()
        headers = {**self.origin_headers(origin), "Access-Control-Allow-Methods": ALLOW_METHODS,
                   "Access-Control-Max-Age": str(self.config.max_age)}
        requested = request.headers.get("Access-Control-Request-Headers")
        if requested:
            # The origin is trusted and every call still needs an API key: let it send the headers its SDK uses.
            headers["Access-Control-Allow-Headers"] = requested
            headers["Vary"] = "Origin, Access-Control-Request-Headers"
        return web.Response(status=204, headers=headers)

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if origin and request.method != "OPTIONS" and self.allowed(origin):
            for name, value in self.origin_headers(origin).items():
                if name == "Vary" and response.headers.get("Vary"):
                    value = f"{response.headers['Vary']}, {value}"  # keep the upstream's own Vary
                response.headers[name] = value
            response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
