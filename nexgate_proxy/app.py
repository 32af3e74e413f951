"""Build the aiohttp application: plugins, providers, routes, lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import AsyncIterator, Awaitable, Callable, Sequence

import aiohttp
from aiohttp import web

from .appkeys import ABUSE, CHAIN, CONFIG, PROVIDERS, PROXY
from .clientip import client_ip
from .config import Config, ConfigError
from .context import RequestContext
from .cors import Cors
from .endpoints import ENDPOINTS, Endpoint
from .errors import GatewayError
from .keys import extract_key, parse_key
from .plugins import HookChain, build_plugin_manager, configure
from .providers.base import Provider
from .proxy import Proxy, new_request_id
from .runner import ServerHeaderHook
from .services import readiness, services_context
from .upstream import UpstreamPool

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def resolve_providers(config: Config, chain: HookChain, problems: list[str]) -> dict[str, Provider]:
    """Instantiate every configured provider; unknown types are added to ``problems``."""
    types = chain.provider_types()
    providers: dict[str, Provider] = {}
    for name, spec in config.providers.items():
        cls = types.get(spec.type)
        if cls is None:
            problems.append(f"providers.{name}.type: unknown provider type '{spec.type}' "
                            f"(known: {', '.join(sorted(types))})")
            continue
        try:
            providers[name] = cls(spec)
        except ValueError as exc:  # the type refused its options
            problems.append(f"providers.{name}.options: {exc}")
    return providers


def build_app(config: Config, extra_plugins: Sequence[object] = ()) -> web.Application:
    """The gateway application. Raises ConfigError or PluginError before anything starts.

    The plugins' config sections are parsed here, once; every hook gets the config carrying them.
    """
    pm = build_plugin_manager(config, extra_plugins)
    chain = HookChain(pm)
    problems: list[str] = []
    config = configure(config, pm, problems)
    providers = resolve_providers(config, chain, problems)
    if problems:
        raise ConfigError(config.source, problems)
    proxy = Proxy(config, chain, providers)
    app = web.Application(
        client_max_size=config.server.max_body_bytes,
        handler_args={
            "max_field_size": config.server.max_header_bytes,
            "max_line_size": config.server.max_header_bytes,
            "keepalive_timeout": config.server.keepalive_timeout,
        },
    )
    app.on_response_prepare.append(ServerHeaderHook(config.server.server_header))
    app[CONFIG] = config
    app[CHAIN] = chain
    app[PROVIDERS] = providers
    app[PROXY] = proxy

    # Each API path is served with and without /v1: SDKs pointed at the bare host URL drop it.
    for endpoint in ENDPOINTS:
        handler = _endpoint_handler(proxy, endpoint)
        for path in (endpoint.path, endpoint.bare_path):
            app.router.add_post(path, handler)
            app.router.add_route("*", path, _method_not_allowed)
    for prefix in ("/v1", ""):
        app.router.add_get(f"{prefix}/models", _list_models)
        app.router.add_get(f"{prefix}/models/{{model}}", _get_model)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    chain.register_routes(app, config)
    app.router.add_route("*", "/{tail:.*}", _not_found)

    if config.server.cors.enabled:
        Cors(config.server.cors).install(app)

    app.cleanup_ctx.append(services_context)
    app.cleanup_ctx.append(_upstream_session)
    app.cleanup_ctx.append(_plugin_lifecycle)
    return app


def _endpoint_handler(proxy: Proxy, endpoint: Endpoint) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        return await proxy.handle(request, endpoint)

    handle.__name__ = f"proxy_{endpoint.name.replace('.', '_')}"
    return handle


async def _upstream_session(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    # The built-in HTTP providers send through the pool (nexgate_proxy.upstream); the session stays
    # for plugin providers whose own send() uses the session they are handed.
    pool = UpstreamPool(config.upstream.max_connections)
    for provider in app[PROVIDERS].values():
        provider.pool = pool
    connector = aiohttp.TCPConnector(
        limit=config.upstream.max_connections, ttl_dns_cache=300, enable_cleanup_closed=True
    )
    # Never pick up proxies or credentials from the environment: the config is the only source.
    # No cookie jar: a cookie one client's call received must never ride along on another's.
    session = aiohttp.ClientSession(connector=connector, trust_env=False, auto_decompress=True,
                                    cookie_jar=aiohttp.DummyCookieJar())
    app[PROXY].session = session
    app[PROXY].loop = asyncio.get_running_loop()
    yield
    await pool.close()
    await session.close()


def _plugin_lifecycle(app: web.Application) -> contextlib.AbstractAsyncContextManager[None]:
    # After the store, the bus and the upstream session: plugins start with them up and stop before them.
    return app[CHAIN].lifespan(app, app[CONFIG])


# ------------------------------------------------------------ small routes


async def _authenticated(request: web.Request) -> RequestContext:
    ctx = RequestContext(request_id=new_request_id(), endpoint="models", api_format="openai",
                         request=request, app=request.app,
                         client_ip=client_ip(request.remote, request.headers.get("X-Forwarded-For"),
                                             request.app[CONFIG].server.trusted_proxies))
    try:
        await request.app[CHAIN].authenticate(ctx)
    except GatewayError as exc:
        if exc.status == 401:
            await _count(ctx, failed=True)
        raise
    await _count(ctx, failed=False)
    return ctx


async def _count(ctx: RequestContext, failed: bool) -> None:
    """These routes skip admit/settle: the abuse guard counts them (``limits.ip.rpm``, failed keys) here."""
    guard = ctx.app.get(ABUSE)
    if guard is None:
        return
    parsed = parse_key(extract_key(ctx.headers)) if failed else None
    pending = guard.count(ctx.client_ip, failed=failed, key_id=parsed.public_id if parsed else None)
    if pending is not None:
        await pending


def _visible_models(request: web.Request, ctx: RequestContext) -> list[str]:
    allowed = ctx.identity.allowed_models if ctx.identity else None
    return [m for m in request.app[CONFIG].models if allowed is None or m in allowed]


def _model_object(alias: str) -> dict[str, object]:
    return {"id": alias, "object": "model", "created": 0, "owned_by": "nexgate"}


async def _list_models(request: web.Request) -> web.Response:
    try:
        ctx = await _authenticated(request)
    except GatewayError as exc:
        return exc.response()
    return web.json_response({"object": "list", "data": [_model_object(m) for m in _visible_models(request, ctx)]})


async def _get_model(request: web.Request) -> web.Response:
    try:
        ctx = await _authenticated(request)
    except GatewayError as exc:
        return exc.response()
    alias = request.match_info["model"]
    if alias not in _visible_models(request, ctx):
        return GatewayError(404, f"The model `{alias}` does not exist.", code="model_not_found",
                            param="model").response()
    return web.json_response(_model_object(alias))


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    started = time.perf_counter()
    checks = await readiness(request.app) + await request.app[CHAIN].ready(request.app)
    ok = all(good for _, good in checks)
    return web.json_response(
        {"status": "ok" if ok else "unavailable", "checks": {name: good for name, good in checks},
         "took_ms": round((time.perf_counter() - started) * 1000, 1)},
        status=200 if ok else 503,
    )


async def _method_not_allowed(request: web.Request) -> web.Response:
    return GatewayError(405, f"{request.method} is not supported on {request.path}; use POST.",
                        code="method_not_allowed", headers={"Allow": "POST"}).response()


async def _not_found(request: web.Request) -> web.Response:
    return GatewayError(404, f"Unknown path {request.path!r}. NexGate serves the OpenAI API under /v1/.",
                        code="unknown_url").response()
