"""API key authentication on the proxy path.

A request's key is checked in this order, cheapest first:

1. the verified-key cache (SHA-256 of the full key -> identity): no I/O at all;
2. the format and checksum (``nexgate_proxy.keys.parse_key``): garbage is refused
   without a database lookup or bcrypt;
3. the store, by public id (one indexed query), then bcrypt off the event loop.
   Concurrent first uses of one key share one verification.

A verified key of an organization also carries the organization's limit
overrides from the store (``Identity.org_limits``), read once at verification
time, never per request.

Revocation reaches the cache through the invalidation bus (every instance
sharing Redis), and so does a change of an organization's limits: its keys'
cached identities are dropped and verified again on their next use. The cache
TTL bounds staleness if a message is ever lost.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from aiohttp import web

from nexgate_proxy import GatewayError, Identity, RequestContext, hookimpl
from nexgate_proxy.accounts import API_KEY_EVENT, ORG_EVENT
from nexgate_proxy.appkeys import BUS, STORE
from nexgate_proxy.background import stop_tasks
from nexgate_proxy.state.bus import EVICT_ALL

from .clerk import ClerkVerifier
from nexgate_proxy.config import Config, ConfigReader
from nexgate_proxy.keys import DEFAULT_BCRYPT_ROUNDS, cache_key, extract_key, parse_key, verify_secret_async
from nexgate_proxy.store import ApiKeyRow, Store, StoreError

log = logging.getLogger("nexgate.auth")

TOUCH_INTERVAL = 30.0
"""Seconds between batched writes of keys' last-used times."""


# ------------------------------------------------------------------ settings


@dataclass(frozen=True, slots=True)
class AuthSettings:
    required: bool = True
    """False lets requests without a key through anonymously (the offline demo)."""
    cache_ttl: float = 60.0
    negative_ttl: float = 10.0
    cache_size: int = 100_000
    bcrypt_rounds: int = DEFAULT_BCRYPT_ROUNDS
    admin_token_sha256: str | None = field(default=None, repr=False)
    """SHA-256 (hex) of the bootstrap admin token, for self-hosters without Clerk."""
    clerk: ClerkVerifier | None = None

    def is_admin_token(self, token: str) -> bool:
        if not self.admin_token_sha256:
            return False
        digest = hashlib.sha256(token.encode()).hexdigest()
        return hmac.compare_digest(digest, self.admin_token_sha256)


def parse_auth_settings(config: Config, problems: list[str]) -> AuthSettings:
    r = ConfigReader(problems)
    p = "auth"
    s = r.mapping(config.raw.get("auth"), p, ("required", "cache_ttl", "negative_ttl", "cache_size",
                                                "bcrypt_rounds", "admin_token_sha256", "clerk"))
    d = AuthSettings()
    token_hash = r.value(s, "admin_token_sha256", p, str, "") or None
    if token_hash is not None:
        token_hash = token_hash.lower()
        if len(token_hash) != 64 or any(c not in "0123456789abcdef" for c in token_hash):
            r.problem(f"{p}.admin_token_sha256", "must be the 64-hex-digit SHA-256 of the admin token "
                      "(e.g. `printf %s \"$TOKEN\" | sha256sum`)")
            token_hash = None
    return AuthSettings(
        required=r.value(s, "required", p, bool, d.required),
        cache_ttl=r.value(s, "cache_ttl", p, float, d.cache_ttl, _non_negative),
        negative_ttl=r.value(s, "negative_ttl", p, float, d.negative_ttl, _non_negative),
        cache_size=r.value(s, "cache_size", p, int, d.cache_size, lambda v: None if v > 0 else "must be > 0"),
        bcrypt_rounds=r.value(s, "bcrypt_rounds", p, int, d.bcrypt_rounds,
                              lambda v: None if 4 <= v <= 31 else "must be between 4 and 31"),
        admin_token_sha256=token_hash,
        clerk=_clerk(r, s.get("clerk"), f"{p}.clerk"),
    )


def _non_negative(v: float) -> str | None:
    return None if v >= 0 else "must not be negative"


def _clerk(r: ConfigReader, raw: Any, p: str) -> ClerkVerifier | None:
    if raw is None:
        return None
    s = r.mapping(raw, p, ("issuer", "public_key", "public_key_file", "jwks_file", "authorized_parties", "leeway"))
    issuer = r.value(s, "issuer", p, str, "")
    if not issuer:
        r.problem(f"{p}.issuer", "required: your Clerk Frontend API URL, e.g. https://clerk.example.com")
    pem = r.value(s, "public_key", p, str, None)
    pem_file = r.value(s, "public_key_file", p, str, None)
    jwks_file = r.value(s, "jwks_file", p, str, None)
    if pem_file:
        try:
            pem = Path(pem_file).read_text()
        except OSError as exc:
            r.problem(f"{p}.public_key_file", f"cannot read {pem_file!r}: {exc.strerror}")
    if not (pem or jwks_file):
        r.problem(p, "give public_key, public_key_file or jwks_file (Clerk's JWT public key; no network call is made)")
    if not issuer or not (pem or jwks_file):
        return None
    try:
        return ClerkVerifier(public_key_pem=pem, jwks_path=jwks_file, issuer=issuer,
                             authorized_parties=tuple(r.value(s, "authorized_parties", p, list, [])),
                             leeway=r.value(s, "leeway", p, float, 5.0))
    except Exception as exc:  # a bad key file is a config problem, named here
        r.problem(p, f"cannot load the Clerk key: {exc}")
        return None


# -------------------------------------------------------------------- cache


@dataclass(slots=True)
class _Verified:
    identity: Identity
    expires_at: float | None
    """The key's own expiry (epoch seconds), checked on every hit."""
    fresh_until: float
    """When this cache entry must be verified again (monotonic)."""
    secret_hash: str
    """The stored bcrypt hash the key was verified against: while the row still holds it, checking
    the row again (revoked? expired? new limits?) needs no new bcrypt."""


class KeyCache:
    """Verified keys by SHA-256 of the full key, and recently refused keys."""

    def __init__(self, ttl: float, negative_ttl: float, max_size: int) -> None:
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.max_size = max_size
        self._verified: dict[bytes, _Verified] = {}
        self._digest_by_key_id: dict[str, bytes] = {}
        self._refused: dict[bytes, float] = {}
        self._due: dict[bytes, _Verified] = {}
        """Retired entries, kept until their key is checked again (see verified_hash)."""
        self.generation = 0
        """Counts invalidations: a verification that overlapped one must not cache what it read before it."""

    def get(self, digest: bytes, now: float) -> _Verified | None:
        entry = self._verified.get(digest)
        if entry is not None and entry.fresh_until <= now:
            self._retire(digest)
            return None
        return entry

    def verified_hash(self, digest: bytes) -> str | None:
        """The stored hash this exact key (same SHA-256) was verified against before its entry was retired.

        An entry is retired when it falls due (every ``ttl``) or is invalidated (revocation, an org's
        new limits, a bus reconnect). Checking the key again reads its row (revoked? expired? new
        limits?) but needs no bcrypt while the row holds that hash: a hot key's requests wait for the
        check, and a bcrypt there is a quarter-second stall for all of them.
        """
        entry = self._due.pop(digest, None)
        return None if entry is None else entry.secret_hash

    def put(self, digest: bytes, entry: _Verified) -> None:
        if len(self._verified) >= self.max_size:
            # Drop the oldest insertion; a re-verification costs one bcrypt, not a failure.
            oldest = next(iter(self._verified))
            self._drop(oldest)
        self._verified[digest] = entry
        key_id = entry.identity.key_id
        if key_id:
            self._digest_by_key_id[key_id] = digest

    def refused_recently(self, digest: bytes, now: float) -> bool:
        until = self._refused.get(digest)
        if until is None:
            return False
        if until <= now:
            del self._refused[digest]
            return False
        return True

    def refuse(self, digest: bytes, now: float) -> None:
        if len(self._refused) >= self.max_size:
            self._refused.clear()
        self._refused[digest] = now + self.negative_ttl

    def evict_key(self, key_id: str) -> None:
        self.generation += 1
        digest = self._digest_by_key_id.get(key_id)
        if digest is not None:
            self._retire(digest)

    def evict_org(self, org_id: str) -> int:
        """Retire the identities of the organization's keys; returns how many. A scan: only admin actions call it."""
        self.generation += 1
        stale = [digest for digest, entry in self._verified.items() if entry.identity.org_id == org_id]
        for digest in stale:
            self._retire(digest)
        return len(stale)

    def clear(self) -> None:
        """Everything may have changed (the bus reconnected): every key is checked against its row again."""
        self.generation += 1
        for digest in list(self._verified):
            self._retire(digest)
        self._refused.clear()

    def _retire(self, digest: bytes) -> None:
        """Out of the cache, into ``_due``: the next use re-reads the key's row, without a bcrypt."""
        entry = self._verified.get(digest)
        self._drop(digest)
        if entry is not None:
            if len(self._due) >= self.max_size:
                self._due.clear()
            self._due[digest] = entry

    def _drop(self, digest: bytes) -> None:
        entry = self._verified.pop(digest, None)
        if entry is not None and entry.identity.key_id:
            self._digest_by_key_id.pop(entry.identity.key_id, None)

    def __len__(self) -> int:
        return len(self._verified)


# ------------------------------------------------------------ authenticator


def _invalid() -> GatewayError:
    return GatewayError(401, "Incorrect API key provided.", code="invalid_api_key",
                        headers={"WWW-Authenticate": 'Bearer realm="nexgate"'})


def _epoch(moment: datetime | None) -> float | None:
    return moment.timestamp() if moment is not None else None


class KeyAuthenticator:
    def __init__(self, settings: AuthSettings) -> None:
        self.settings = settings
        self.cache = KeyCache(settings.cache_ttl, settings.negative_ttl, settings.cache_size)
        self.store: Store | None = None
        self.bcrypt_calls = 0
        self.store_lookups = 0
        self.org_lookups = 0
        self._inflight: dict[bytes, asyncio.Future[_Verified]] = {}
        self._last_used: dict[str, float] = {}
        self._toucher: asyncio.Task[None] | None = None

    async def authenticate(self, plaintext: str) -> Identity:
        digest = cache_key(plaintext)
        now = time.monotonic()
        entry = self.cache.get(digest, now)
        if entry is None:
            if self.cache.refused_recently(digest, now):
                raise _invalid()
            entry = await self._verify_once(plaintext, digest)
        if entry.expires_at is not None and time.time() >= entry.expires_at:
            raise GatewayError(401, "This API key has expired.", code="invalid_api_key")
        identity = entry.identity
        self._last_used[identity.key_id or ""] = time.time()
        return identity

    async def _verify_once(self, plaintext: str, digest: bytes) -> _Verified:
        """Verify a key not in the cache; concurrent callers with the same key share one verification."""
        pending = self._inflight.get(digest)
        if pending is not None:
            # The result itself, not a cache read: it is not cached when an invalidation overlapped it.
            return await asyncio.shield(pending)
        future: asyncio.Future[_Verified] = asyncio.get_running_loop().create_future()
        self._inflight[digest] = future
        try:
            entry = await self._verify(plaintext, digest)
            future.set_result(entry)
            return entry
        except BaseException as exc:
            future.set_exception(exc if isinstance(exc, Exception) else GatewayError(401, "Cancelled."))
            future.exception()  # retrieved: waiters get it, nobody else is warned
            raise
        finally:
            del self._inflight[digest]

    async def _verify(self, plaintext: str, digest: bytes) -> _Verified:
        now = time.monotonic()
        generation = self.cache.generation
        parsed = parse_key(plaintext)
        if parsed is None:
            self.cache.refuse(digest, now)
            raise _invalid()
        assert self.store is not None, "the auth plugin starts after the store"
        try:
            self.store_lookups += 1
            row = await self.store.get_api_key_by_public_id(parsed.public_id)
        except StoreError:
            log.error("API key lookup failed: the store is unavailable")
            raise GatewayError(503, "The gateway cannot verify API keys right now; retry shortly.",
                               code="auth_unavailable") from None
        if row is None:
            self.cache.refuse(digest, now)
            raise _invalid()
        if self.cache.verified_hash(digest) != row.secret_hash:
            self.bcrypt_calls += 1
            if not await verify_secret_async(parsed.secret, row.secret_hash):
                self.cache.refuse(digest, now)
                raise _invalid()
        if row.revoked_at is not None:
            self.cache.refuse(digest, now)
            raise GatewayError(401, "This API key has been revoked.", code="invalid_api_key")
        org_limits = await self._org_limits(row.org_id) if row.org_id else {}
        entry = _Verified(identity=_identity(row, org_limits), expires_at=_epoch(row.expires_at),
                          fresh_until=now + self.settings.cache_ttl, secret_hash=row.secret_hash)
        if self.cache.generation == generation:
            self.cache.put(digest, entry)
        return entry

    async def _org_limits(self, org_id: str) -> dict[str, Any]:
        """The organization's overrides from the store, read once per verification."""
        assert self.store is not None
        try:
            self.org_lookups += 1
            org = await self.store.get_org(org_id)
        except StoreError:
            log.error("organization lookup failed: the store is unavailable")
            raise GatewayError(503, "The gateway cannot verify API keys right now; retry shortly.",
                               code="auth_unavailable") from None
        return dict(org.limits or {}) if org is not None else {}

    def on_invalidation(self, kind: str, value: str) -> None:
        if kind == EVICT_ALL:
            self.cache.clear()
        elif kind == API_KEY_EVENT:
            self.cache.evict_key(value)
        elif kind == ORG_EVENT:
            # Only this org's keys: EVICT_ALL would cost a bcrypt for every cached key.
            self.cache.evict_org(value)

    # -- last-used times, written in batches off the request path

    def start(self, store: Store) -> None:
        self.store = store
        self._toucher = asyncio.create_task(self._touch_forever(), name="nexgate-auth-touch")

    async def stop(self) -> None:
        await stop_tasks(self._toucher)
        await self.flush_last_used()

    async def _touch_forever(self) -> None:
        while True:
            await asyncio.sleep(TOUCH_INTERVAL)
            await self.flush_last_used()

    async def flush_last_used(self) -> None:
        if not self._last_used or self.store is None:
            return
        batch, self._last_used = self._last_used, {}
        batch.pop("", None)
        try:
            await self.store.touch_api_keys(
                {key_id: datetime.fromtimestamp(at, timezone.utc) for key_id, at in batch.items()})
        except StoreError:
            log.warning("could not record last-used times of %d keys; will retry", len(batch))
            for key_id, at in batch.items():
                self._last_used.setdefault(key_id, at)


def _identity(row: ApiKeyRow, org_limits: dict[str, Any]) -> Identity:
    return Identity(
        account_id=row.owner_id,
        key_id=row.id,
        key_prefix=row.prefix,
        user_id=row.user_id,
        org_id=row.org_id,
        allowed_models=frozenset(row.allowed_models) if row.allowed_models is not None else None,
        limits=dict(row.limits or {}),
        org_limits=org_limits,
    )


# -------------------------------------------------------------------- hooks

AUTH: web.AppKey[KeyAuthenticator] = web.AppKey("nexgate_plugins.auth", KeyAuthenticator)


@hookimpl
def nexgate_check_config(config: Config) -> list[str]:
    problems: list[str] = []
    parse_auth_settings(config, problems)
    return problems


@hookimpl
def nexgate_register_routes(app: web.Application, config: Config) -> None:
    app[AUTH] = KeyAuthenticator(parse_auth_settings(config, []))


@hookimpl
async def nexgate_startup(app: web.Application) -> None:
    authenticator = app[AUTH]
    app[BUS].subscribe(authenticator.on_invalidation)
    authenticator.start(app[STORE])


@hookimpl
async def nexgate_shutdown(app: web.Application) -> None:
    await app[AUTH].stop()


@hookimpl
async def nexgate_authenticate(ctx: RequestContext) -> Identity | None:
    authenticator = ctx.app[AUTH]
    plaintext = extract_key(ctx.headers)
    if plaintext is None:
        if not authenticator.settings.required:
            return None
        raise GatewayError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>' "
                           "or 'x-api-key: <key>'.", code="missing_api_key",
                           headers={"WWW-Authenticate": 'Bearer realm="nexgate"'})
    return await authenticator.authenticate(plaintext)


@hookimpl
def nexgate_admit(ctx: RequestContext) -> None:
    identity = ctx.identity
    if identity is not None and identity.allowed_models is not None and ctx.model not in identity.allowed_models:
        raise GatewayError(403, f"This API key may not use the model `{ctx.model}`.", code="model_not_allowed",
                           param="model")
