"""API key authentication on the proxy path.

A request's key is checked in this order, cheapest first:

1. the verified-key cache (SHA-256 of the full key -> identity): no I/O at all;
2. the format and checksum (``nexgate_proxy.keys.parse_key``): garbage is refused
   without a database lookup or bcrypt;
3. the store, by public id (one indexed query), then the key id's fast verifier
   (``verifiers``: an HMAC under the server's pepper, kept in the state store, so
   restarts and cache evictions cost no bcrypt), else bcrypt off the event loop.
   Concurrent first uses of one key share one verification.

A verified key of an organization also carries the organization's limit
overrides from the store (``Identity.org_limits``), read once at verification
time, never per request.

A suspended user's personal keys (restriction of processing) are verified as usual and their
cached identity carries ``suspended``: refused 403 ``account_suspended`` with no store round
trip. Suspending and lifting it record an ``api_key`` change per key, as a revocation does.

A revocation (also by account deletion) reaches the cache within a second,
whichever process made it: the store records it with the change and every
gateway's store feed hands it to the bus's local subscribers (``on_invalidation``);
so does a change of an organization's limits or members: its keys' cached
identities are dropped and verified again on their next use. A feed that may
have missed changes delivers EVICT_ALL, and every cached key is checked again.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Awaitable, Iterator

from aiohttp import web
from prometheus_client.core import CounterMetricFamily

from nexgate_proxy import GatewayError, Identity, RequestContext, hookimpl
from nexgate_proxy.appkeys import ABUSE, BUS, REDIS, STORE
from nexgate_proxy.config import Config, ConfigSection
from nexgate_proxy.keys import extract_key


from .cache import KeyAuthenticator
from .settings import AUTH_SECTION

AUTH: web.AppKey[KeyAuthenticator] = web.AppKey("nexgate_plugins.auth", KeyAuthenticator)


@hookimpl
def nexgate_config_sections() -> list[ConfigSection[Any]]:
    return [AUTH_SECTION]


@hookimpl
def nexgate_register_routes(app: web.Application, config: Config) -> None:
    app[AUTH] = KeyAuthenticator(config.section(AUTH_SECTION))


@hookimpl
async def nexgate_lifespan(app: web.Application) -> AsyncIterator[None]:
    authenticator = app[AUTH]
    app[BUS].subscribe(authenticator.on_invalidation)
    authenticator.guard = app.get(ABUSE)  # bounds the bcrypt work per key id (the ratelimit plugin's)
    await authenticator.start(app[STORE], app.get(REDIS))
    yield
    await authenticator.stop()


@hookimpl
def nexgate_authenticate(ctx: RequestContext) -> Identity | Awaitable[Identity] | None:
    """A plain function: a cached key is answered without a coroutine; a key to verify returns the
    verification, which the chain awaits."""
    authenticator = ctx.app[AUTH]
    plaintext = extract_key(ctx.headers)
    if plaintext is None:
        if not authenticator.settings.required:
            return None
        raise GatewayError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>' "
                           "or 'x-api-key: <key>'.", code="missing_api_key",
                           headers={"WWW-Authenticate": 'Bearer realm="nexgate"'})
    identity = authenticator.authenticate_now(plaintext)
    if type(identity) is not Identity:
        return _not_suspended(identity)  # type: ignore[arg-type]
    if identity.suspended:
        raise account_suspended()
    return identity


async def _not_suspended(verifying: Awaitable[Identity]) -> Identity:
    identity = await verifying
    if identity.suspended:
        raise account_suspended()
    return identity


def account_suspended() -> GatewayError:
    return GatewayError(403, "This account is suspended: its API keys are refused until the operator lifts the "
                        "suspension. Nothing was deleted.", code="account_suspended")


@hookimpl
def nexgate_metrics(app: web.Application) -> Iterator[Any]:
    authenticator = app[AUTH]
    yield CounterMetricFamily("nexgate_auth_cache_hits", "API keys found in the verified-key cache.",
                              value=authenticator.cache_lookups - authenticator.cache_misses)
    yield CounterMetricFamily("nexgate_auth_cache_misses", "API keys not in the cache (looked up in the store).",
                              value=authenticator.cache_misses)
    yield CounterMetricFamily("nexgate_auth_bcrypt_verifications", "bcrypt checks of API key secrets.",
                              value=authenticator.bcrypt_calls)


@hookimpl
def nexgate_admit(ctx: RequestContext) -> None:
    identity = ctx.identity
    if identity is not None and identity.allowed_models is not None and ctx.model not in identity.allowed_models:
        raise GatewayError(403, f"This API key may not use the model `{ctx.model}`.", code="model_not_allowed",
                           param="model")
