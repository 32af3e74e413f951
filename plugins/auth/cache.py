"""The verified-key cache and the authenticator that fills it (see the package doc)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Awaitable


from nexgate_proxy import GatewayError, Identity
from nexgate_proxy.accounts import API_KEY_EVENT, ORG_EVENT
from nexgate_proxy.background import stop_tasks
from nexgate_proxy.state.bus import EVICT_ALL
from nexgate_proxy.state.redis import RedisClient

from nexgate_proxy.abuse import AbuseGuard
from nexgate_proxy.keys import KEY_PREFIX, VerifierBusy, cache_key, parse_key, verify_secret_async
from nexgate_proxy.store import ApiKeyRow, Store, StoreError


from .settings import AuthSettings
from .verifiers import Verifiers, open_verifiers, random_pepper

log = logging.getLogger("nexgate.auth")

MAX_VERIFICATIONS_PER_KEY_ID = 2
"""bcrypts at once for different secrets of one key id; more answer 503 at once (the same secret, sent
concurrently, shares one verification)."""
TOUCH_INTERVAL = 30.0
"""Seconds between batched writes of keys' last-used times."""


@dataclass(slots=True)
class _Verified:
    identity: Identity
    expires_at: float | None
    """The key's own expiry (epoch seconds), checked on every hit."""
    fresh_until: float
    """When this cache entry must be verified again (monotonic)."""


class KeyCache:
    """Verified keys by SHA-256 of the full key, and recently refused keys."""

    def __init__(self, ttl: float, negative_ttl: float, max_size: int) -> None:
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.max_size = max_size
        self._verified: dict[bytes, _Verified] = {}
        self._digest_by_key_id: dict[str, bytes] = {}
        self._refused: dict[bytes, float] = {}
        self.generation = 0
        """Counts invalidations: a verification that overlapped one must not cache what it read before it."""

    def get(self, digest: bytes, now: float) -> _Verified | None:
        entry = self._verified.get(digest)
        if entry is not None and entry.fresh_until <= now:
            self._drop(digest)
            return None
        return entry

    def put(self, digest: bytes, entry: _Verified) -> None:
        if len(self._verified) >= self.max_size:
            # Drop the oldest insertion; its next use reads its row and checks its fast verifier (no bcrypt).
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

    def public_id_of(self, key_id: str) -> str | None:
        """The public id of a cached key, by its row id."""
        digest = self._digest_by_key_id.get(key_id)
        entry = self._verified.get(digest) if digest is not None else None
        prefix = entry.identity.key_prefix if entry is not None else None
        return prefix[len(KEY_PREFIX):] if prefix else None

    def evict_key(self, key_id: str) -> None:
        self.generation += 1
        digest = self._digest_by_key_id.get(key_id)
        if digest is not None:
            self._drop(digest)

    def evict_org(self, org_id: str) -> int:
        """Drop the identities of the organization's keys; returns how many. A scan: only admin actions call it."""
        self.generation += 1
        stale = [digest for digest, entry in self._verified.items() if entry.identity.org_id == org_id]
        for digest in stale:
            self._drop(digest)
        return len(stale)

    def clear(self) -> None:
        """Everything may have changed (the bus reconnected): every key is checked against its row again."""
        self.generation += 1
        for digest in list(self._verified):
            self._drop(digest)
        self._refused.clear()

    def _drop(self, digest: bytes) -> None:
        """Out of the cache: the next use re-reads the key's row (revoked? new limits?); its fast verifier
        spares the bcrypt."""
        entry = self._verified.pop(digest, None)
        if entry is not None and entry.identity.key_id:
            self._digest_by_key_id.pop(entry.identity.key_id, None)

    def __len__(self) -> int:
        return len(self._verified)


# ------------------------------------------------------------ authenticator


def _invalid() -> GatewayError:
    return GatewayError(401, "Incorrect API key provided.", code="invalid_api_key",
                        headers={"WWW-Authenticate": 'Bearer realm="nexgate"'})


def _busy() -> GatewayError:
    return GatewayError(503, "Too many API keys are being verified right now; retry shortly.",
                        code="auth_busy", headers={"Retry-After": "1"})


def _key_locked(public_id: str, ms: int) -> GatewayError:
    seconds = max(1, -(-ms // 1000))
    return GatewayError(429, f"Too many failed attempts with the key id {public_id} recently; keys with it are "
                        f"not verified for {seconds}s.", code="key_verification_limited",
                        headers={"Retry-After": str(seconds)})


def _epoch(moment: datetime | None) -> float | None:
    return moment.timestamp() if moment is not None else None


class KeyAuthenticator:
    def __init__(self, settings: AuthSettings) -> None:
        self.settings = settings
        self.cache = KeyCache(settings.cache_ttl, settings.negative_ttl, settings.cache_size)
        self.store: Store | None = None
        self.bcrypt_calls = 0
        self.cache_misses = 0
        """Keys not in the cache (a store lookup, maybe a bcrypt); every other key is a hit."""
        self.cache_lookups = 0
        self.bcrypt_skipped = 0
        """Verifications refused without a bcrypt (key id locked, queue full, a fast verifier's no)."""
        self.fast_verifications = 0
        """Keys admitted by their fast verifier instead of a bcrypt (after a restart, an eviction)."""
        self.verifiers = Verifiers(1, random_pepper())
        """Replaced at start, with the configured pepper and state store (``start``)."""
        self.guard: AbuseGuard | None = None
        """The ratelimit plugin's guard (``app[ABUSE]``), set at startup when that plugin runs."""
        self.store_lookups = 0
        self.org_lookups = 0
        self._inflight: dict[bytes, asyncio.Future[_Verified]] = {}
        self._verifying: dict[str, int] = {}
        """public key id -> bcrypts running for it (different secrets for one key id: likely forged)."""
        self._last_used: dict[str, float] = {}
        self._toucher: asyncio.Task[None] | None = None
        self._droppers: set[asyncio.Task[None]] = set()

    async def authenticate(self, plaintext: str) -> Identity:
        found = self.authenticate_now(plaintext)
        return found if type(found) is Identity else await found  # type: ignore[misc]

    def authenticate_now(self, plaintext: str) -> Identity | Awaitable[Identity]:
        """A cached key's identity at once (no coroutine: the common case, on every request);
        otherwise the verification to await."""
        self.cache_lookups += 1
        digest = cache_key(plaintext)
        now = time.monotonic()
        entry = self.cache.get(digest, now)
        if entry is None:
            return self._authenticate_uncached(plaintext, digest, now)
        return self._identity(entry)

    async def _authenticate_uncached(self, plaintext: str, digest: bytes, now: float) -> Identity:
        self.cache_misses += 1
        if self.cache.refused_recently(digest, now):
            raise _invalid()
        return self._identity(await self._verify_once(plaintext, digest))

    def _identity(self, entry: _Verified) -> Identity:
        wall = time.time()
        if entry.expires_at is not None and wall >= entry.expires_at:
            raise GatewayError(401, "This API key has expired.", code="invalid_api_key")
        identity = entry.identity
        self._last_used[identity.key_id or ""] = wall
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
        public_id, verifiers = parsed.public_id, self.verifiers
        known = verifiers.lookup(public_id)
        if known is None or not verifiers.tag_matches(known, public_id, parsed.secret):
            self._refuse_if_locked(public_id)  # no lookup either; a secret verified before is let through
        assert self.store is not None, "the auth plugin starts after the store"
        try:
            self.store_lookups += 1
            row = await self.store.get_api_key_by_public_id(public_id)
        except StoreError:
            log.error("API key lookup failed: the store is unavailable")
            raise GatewayError(503, "The gateway cannot verify API keys right now; retry shortly.",
                               code="auth_unavailable") from None
        if row is None or row.revoked_at is not None:
            # No bcrypt: nothing this secret proves changes the answer (a key id's state is not a secret).
            verifiers.drop(public_id)
            self.cache.refuse(digest, now)
            if row is None:
                raise _invalid()
            raise GatewayError(401, "This API key has been revoked.", code="invalid_api_key")
        if known is not None and verifiers.hash_matches(known, public_id, row.secret_hash):
            if not verifiers.tag_matches(known, public_id, parsed.secret):
                # Not the secret a bcrypt accepted for this row: a bcrypt would say no too.
                self.bcrypt_skipped += 1
                self.cache.refuse(digest, now)
                raise _invalid()
            self.fast_verifications += 1
        else:
            if known is not None:
                verifiers.drop(public_id)  # made for another hash of this key id: stale
            await self._bcrypt(public_id, parsed.secret, row.secret_hash, digest, now)
            known = None
        expires_at = _epoch(row.expires_at)
        if expires_at is not None and time.time() >= expires_at:
            verifiers.drop(public_id)  # refused by authenticate, from the cache too
        elif known is None and self.cache.generation == generation:  # not if a revocation may have overlapped
            verifiers.add(public_id, row.secret_hash, parsed.secret)
        org_limits = await self._org_limits(row.org_id) if row.org_id else {}
        entry = _Verified(identity=_identity(row, org_limits), expires_at=expires_at,
                          fresh_until=now + self.settings.cache_ttl)
        if self.cache.generation == generation:
            self.cache.put(digest, entry)
        return entry

    def _refuse_if_locked(self, public_id: str) -> None:
        """Forged secrets for a public key id: past its failure budget they cost no bcrypt. A 429, not a
        401: the owner of a key not verified here yet is not banned for the attack."""
        guard = self.guard
        locked_ms = guard.key_locked_ms(public_id) if guard is not None else 0
        if locked_ms:
            self.bcrypt_skipped += 1
            raise _key_locked(public_id, locked_ms)

    async def _bcrypt(self, public_id: str, secret: str, secret_hash: str, digest: bytes, now: float) -> None:
        """The one costly step, bounded: a few at once per key id, and a full queue answers 503 at once."""
        self._refuse_if_locked(public_id)  # again: the budget may have run out during the lookup
        running = self._verifying.get(public_id, 0)
        if running >= MAX_VERIFICATIONS_PER_KEY_ID:
            self.bcrypt_skipped += 1
            raise _busy()
        self._verifying[public_id] = running + 1
        try:
            verified = await verify_secret_async(secret, secret_hash)
        except VerifierBusy:
            self.bcrypt_skipped += 1
            raise _busy() from None
        finally:
            left = self._verifying.pop(public_id) - 1
            if left:
                self._verifying[public_id] = left
        self.bcrypt_calls += 1
        if not verified:
            self.cache.refuse(digest, now)
            raise _invalid()

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
            self._drop_verifier(value)
            self.cache.evict_key(value)
        elif kind == ORG_EVENT:
            # Only this org's keys: EVICT_ALL would cost a bcrypt for every cached key.
            self.cache.evict_org(value)

    def _drop_verifier(self, key_id: str) -> None:
        """A key changed (revoked): its fast verifier goes, here and in the state store (a key still usable
        pays one bcrypt). Not cached here: its public id is read from its row, off the event."""
        public_id = self.cache.public_id_of(key_id)
        if public_id is not None:
            self.verifiers.drop(public_id)
        elif self.store is not None:
            task = asyncio.create_task(self._drop_verifier_of_row(key_id))
            self._droppers.add(task)
            task.add_done_callback(self._droppers.discard)

    async def _drop_verifier_of_row(self, key_id: str) -> None:
        assert self.store is not None
        try:
            row = await self.store.get_api_key(key_id)
        except StoreError:
            return  # its next use reads the row and drops it then
        if row is not None:
            self.verifiers.drop(row.public_id)

    # -- last-used times, written in batches off the request path

    async def start(self, store: Store, redis: RedisClient | None = None) -> None:
        """``redis``: the process's Redis client when ``state.url`` is Redis (the verifiers persist there)."""
        self.store = store
        self.verifiers = open_verifiers(self.settings.verifiers, redis)
        await self.verifiers.start()
        self._toucher = asyncio.create_task(self._touch_forever(), name="nexgate-auth-touch")

    async def stop(self) -> None:
        await stop_tasks(self._toucher, *self._droppers)
        await self.flush_last_used()
        await self.verifiers.stop()

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
        suspended=row.owner_suspended,  # refused by the auth hook; cached like the rest, evicted by the feed
    )


# -------------------------------------------------------------------- hooks


