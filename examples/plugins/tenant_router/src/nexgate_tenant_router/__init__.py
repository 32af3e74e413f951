"""Route by a request header: each tenant gets its own route for a model, within what the key may use.

A client asks for ``gpt-4o`` and sends ``x-tenant: acme``; the table below sends
that request along the route of the alias ``gpt-4o-acme`` (its own providers,
deployments, fallbacks and price; ``x-nexgate-model`` says so) while usage
records keep the model the client asked for, ``gpt-4o``. A
tenant with no entry for the model, or a request without the header, takes the
model's own route.

The tenant's alias must be one the caller's key may use (``allowed_models``),
or the request is refused with a 403: a header cannot widen what a key can do.
Give each tenant's keys the tenant's aliases only, and a key of one tenant
cannot ride on another's route.

    tenant_router:
      header: x-tenant           # the request header naming the tenant
      required: false            # true: a request without it is a 400
      tenants:
        acme: {gpt-4o: gpt-4o-acme}     # tenant -> {requested alias: alias whose route serves it}
        globex: {gpt-4o: gpt-4o-eu, claude: claude-eu}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from nexgate_plugins.routing import weighted_order
from nexgate_proxy import GatewayError, RequestContext, hookimpl
from nexgate_proxy.appkeys import CONFIG, PROVIDERS
from nexgate_proxy.config import Config, ConfigReader, ConfigSection, Target

NEXGATE_HOOKS = "1.0"


@dataclass(frozen=True)
class Settings:
    header: str = "x-tenant"
    required: bool = False
    tenants: dict[str, dict[str, str]] = field(default_factory=dict)


def parse(r: ConfigReader, section: dict[str, Any], config: Config) -> Settings:
    p = "tenant_router"
    tenants: dict[str, dict[str, str]] = {}
    for tenant, table in r.mapping(section.get("tenants"), f"{p}.tenants").items():
        here = f"{p}.tenants.{tenant}"
        tenants[str(tenant)] = {}
        for asked, alias in r.mapping(table, here).items():
            if asked not in config.models:
                r.problem(f"{here}.{asked}", f"unknown model alias '{asked}'")
            elif alias not in config.models:
                r.problem(f"{here}.{asked}", f"routes to '{alias}', which is not a model alias under models:")
            else:
                tenants[str(tenant)][str(asked)] = str(alias)
    return Settings(header=r.value(section, "header", p, str, "x-tenant"),
                    required=r.value(section, "required", p, bool, False), tenants=tenants)


SECTION = ConfigSection("tenant_router", parse, ("header", "required", "tenants"),
                        "Route by a tenant header, within what the key may use.")
SETTINGS: web.AppKey[Settings] = web.AppKey("nexgate_tenant_router.settings", Settings)


@hookimpl
def nexgate_config_sections() -> list[ConfigSection[Any]]:
    return [SECTION]


@hookimpl
def nexgate_register_routes(app: web.Application, config: Config) -> None:
    app[SETTINGS] = config.section(SECTION)


@hookimpl(tryfirst=True)  # before the routing table (trylast), which serves everything this leaves
def nexgate_route(ctx: RequestContext) -> list[Target] | None:
    settings = ctx.app[SETTINGS]
    tenant = ctx.headers.get(settings.header)
    if tenant is None:
        if settings.required:
            raise GatewayError(400, f"Send the {settings.header} header naming your tenant.",
                               code="missing_tenant", param=settings.header)
        return None
    table = settings.tenants.get(tenant)
    if table is None:
        # The value is the client's own input: not echoed.
        raise GatewayError(400, f"Unknown tenant in the {settings.header} header.", code="unknown_tenant",
                           param=settings.header)
    alias = table.get(ctx.model or "")
    if alias is None:
        return None  # this tenant has no route of its own for the model
    identity = ctx.identity
    if identity is not None and identity.allowed_models is not None and alias not in identity.allowed_models:
        raise GatewayError(403, f"This API key may not use the model `{ctx.model}` for this tenant.",
                           code="model_not_allowed", param="model")
    return _route_of(ctx, alias)


def _route_of(ctx: RequestContext, alias: str) -> list[Target]:
    """The alias's targets in the routing table's own order (weights, then its fallbacks), as it would."""
    config = ctx.app[CONFIG]
    providers = ctx.app[PROVIDERS]
    route = config.models[alias]
    ordered: list[Target] = []
    for name in route.chain:
        for target in weighted_order(config.models[name].targets):
            if target not in ordered and providers[target.provider].supports(ctx.endpoint, ctx.api_format):
                ordered.append(target)
    if not ordered:
        raise GatewayError(400, f"The model `{ctx.model}` cannot serve {ctx.request.path} for this tenant.",
                           code="unsupported_endpoint", param="model")
    ctx.route = route  # its price and timeouts apply
    return ordered
