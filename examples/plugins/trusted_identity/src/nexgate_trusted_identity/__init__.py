"""Authenticate callers by the identity a trusted proxy forwards (SSO, mTLS), signed with HMAC.

An identity-aware proxy in front of the gateway (oauth2-proxy, Envoy with
client certificates, an API gateway) authenticates the caller and forwards
their subject in a header. This plugin believes that header only

- on connections from the proxies' addresses (``proxies``, the direct peer,
  not X-Forwarded-For), and
- when ``hmac_secret`` is set, with a fresh signature: the proxy sends
  ``x-identity-timestamp: <unix seconds>`` and ``x-identity-signature:
  hex(HMAC-SHA256(secret, "<timestamp>.<subject>"))``, at most ``max_skew``
  seconds old;

and maps the subject to a NexGate user by its ``external_id`` (the id the
identity provider gave the user, as the admin API's Clerk sign-in stores it).
It returns the same ``Identity`` the built-in key auth produces for that user's
keys (``account_id`` = the user; no key), so rate limits, credits, the usage log
and the admin API treat both alike. Requests without the header go on to the
built-in API-key auth; a header that cannot be believed is a 401.

The user lookup is cached per subject for ``cache_seconds`` (no database round
trip per request; the same ``Identity`` object for the same caller, as the rate
limiter expects). A deleted user keeps access until their entry expires.

    trusted_identity:
      proxies: [10.0.0.5/32]                 # who may assert identities (required)
      header: x-authenticated-user           # the subject's header
      hmac_secret: ${IDENTITY_HMAC_SECRET}   # empty: addresses only
      max_skew: 300                          # seconds a signature stays valid
      cache_seconds: 60
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from nexgate_proxy import GatewayError, Identity, RequestContext, hookimpl
from nexgate_proxy.appkeys import STORE
from nexgate_proxy.config import Config, ConfigReader, ConfigSection

NEXGATE_HOOKS = "1.0"
TIMESTAMP_HEADER = "x-identity-timestamp"
SIGNATURE_HEADER = "x-identity-signature"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Settings:
    proxies: tuple[Network, ...] = ()
    header: str = "x-authenticated-user"
    hmac_secret: str = ""
    max_skew: int = 300
    cache_seconds: int = 60


def parse(r: ConfigReader, section: dict[str, Any], config: Config) -> Settings | None:
    if not section:
        return None
    p = "trusted_identity"
    proxies = []
    raw = section.get("proxies")
    if not isinstance(raw, list) or not raw:
        r.problem(f"{p}.proxies", "required: the proxies' addresses or networks, e.g. [10.0.0.5/32]")
    else:
        for i, item in enumerate(raw):
            try:
                proxies.append(ipaddress.ip_network(str(item)))
            except ValueError as exc:
                r.problem(f"{p}.proxies[{i}]", str(exc))
    secret = r.value(section, "hmac_secret", p, str, "")
    if secret and len(secret) < 32:
        r.problem(f"{p}.hmac_secret", "too short to be a secret: use 32 characters or more")
    return Settings(
        proxies=tuple(proxies),
        header=r.value(section, "header", p, str, "x-authenticated-user"),
        hmac_secret=secret,
        max_skew=r.value(section, "max_skew", p, int, 300, lambda v: None if v > 0 else "must be greater than 0"),
        cache_seconds=r.value(section, "cache_seconds", p, int, 60,
                              lambda v: None if v >= 0 else "must be 0 or more"),
    )


SECTION = ConfigSection("trusted_identity", parse, tuple(Settings.__dataclass_fields__),
                        "Accept identities a trusted proxy forwards, HMAC-signed.")


def sign(secret: str, timestamp: str, subject: str) -> str:
    """What the proxy sends as x-identity-signature."""
    return hmac.new(secret.encode(), f"{timestamp}.{subject}".encode(), hashlib.sha256).hexdigest()


class TrustedIdentities:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cache: dict[str, tuple[Identity, float]] = {}

    def check_source(self, ctx: RequestContext) -> None:
        try:
            peer = ipaddress.ip_address(ctx.request.remote or "")
        except ValueError:
            peer = None
        if peer is None or not any(peer in network for network in self.settings.proxies):
            raise _refused("The identity header is only accepted from the gateway's trusted proxies.")

    def check_signature(self, ctx: RequestContext, subject: str) -> None:
        secret = self.settings.hmac_secret
        if not secret:
            return
        timestamp = ctx.headers.get(TIMESTAMP_HEADER, "")
        signature = ctx.headers.get(SIGNATURE_HEADER, "")
        if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > self.settings.max_skew:
            raise _refused("The identity signature is missing or too old.")
        if not hmac.compare_digest(sign(secret, timestamp, subject), signature):
            raise _refused("The identity signature does not match.")

    async def identity(self, ctx: RequestContext, subject: str) -> Identity:
        cached = self.cache.get(subject)
        now = time.monotonic()
        if cached is not None and cached[1] > now:
            return cached[0]
        user = await ctx.app[STORE].get_user_by_external_id(subject)
        if user is None or user.deleted_at is not None:
            raise _refused("The forwarded identity is not a user of this gateway.")
        identity = Identity(account_id=user.id, user_id=user.id)
        if len(self.cache) > 100_000:  # bounded: forget everyone rather than grow without end
            self.cache.clear()
        self.cache[subject] = (identity, now + self.settings.cache_seconds)
        return identity


def _refused(message: str) -> GatewayError:
    return GatewayError(401, message, code="invalid_identity")


TRUSTED: web.AppKey[TrustedIdentities] = web.AppKey("nexgate_trusted_identity", TrustedIdentities)


@hookimpl
def nexgate_config_sections() -> list[ConfigSection[Any]]:
    return [SECTION]


@hookimpl
def nexgate_register_routes(app: web.Application, config: Config) -> None:
    settings = config.section(SECTION)
    if settings is not None:
        app[TRUSTED] = TrustedIdentities(settings)


# Not tryfirst: the rate limiter's tryfirst check of denied and banned IPs still runs first, and this,
# registered after the built-in key auth, runs before it.
@hookimpl
async def nexgate_authenticate(ctx: RequestContext) -> Identity | None:
    trusted = ctx.app.get(TRUSTED)
    if trusted is None:
        return None
    subject = ctx.headers.get(trusted.settings.header)
    if subject is None:
        return None  # not from the proxy: the built-in key auth decides
    trusted.check_source(ctx)
    trusted.check_signature(ctx, subject)
    return await trusted.identity(ctx, subject)
