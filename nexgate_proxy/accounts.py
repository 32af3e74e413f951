"""Account operations shared by the admin API and the CLI.

Creating and revoking keys in one place keeps the rules in one place: the
plaintext exists only in the return value of ``create_api_key``. A revocation,
and an organization's new limit overrides (the cached identities of its keys
carry them), are recorded by the store with the change: every running gateway
learns of them from its change feed (``store.feed``) within a second. The feed
given here, if any, is this process's: it delivers the change at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Mapping, Sequence

from .keys import DEFAULT_BCRYPT_ROUNDS, generate_key, hash_secret_async
from .store import API_KEY_CHANGE, ORG_CHANGE, ApiKeyRow, ChangeFeed, Organization, Store

API_KEY_EVENT = API_KEY_CHANGE
"""Bus message kind: the value is a key id whose cached verification must be dropped."""
ORG_EVENT = ORG_CHANGE
"""Bus message kind: the value is an organization id; the cached identities of its keys must be dropped."""


@dataclass(frozen=True, slots=True)
class CreatedKey:
    row: ApiKeyRow
    plaintext: str
    """Shown to its owner once; never stored or logged."""


async def create_api_key(
    store: Store,
    *,
    name: str,
    user_id: str | None = None,
    org_id: str | None = None,
    created_by: str | None = None,
    expires_at: datetime | None = None,
    allowed_models: Sequence[str] | None = None,
    limits: Mapping[str, Any] | None = None,
    bcrypt_rounds: int = DEFAULT_BCRYPT_ROUNDS,
) -> CreatedKey:
    generated = generate_key()
    secret_hash = await hash_secret_async(generated.secret, rounds=bcrypt_rounds)
    row = await store.create_api_key(
        public_id=generated.public_id, prefix=generated.prefix, secret_hash=secret_hash, name=name,
        user_id=user_id, org_id=org_id, created_by=created_by, expires_at=expires_at,
        allowed_models=tuple(allowed_models) if allowed_models is not None else None, limits=limits,
    )
    return CreatedKey(row=row, plaintext=generated.plaintext)


async def revoke_api_key(store: Store, feed: ChangeFeed | None, key_id: str) -> bool:
    """Revoke in the store (which tells every gateway); this process drops it at once. True if this call revoked it."""
    revoked = await store.revoke_api_key(key_id)
    if feed is not None:
        await feed.deliver_now()
    return revoked


async def set_org_limits(store: Store, feed: ChangeFeed | None, org_id: str,
                         limits: Mapping[str, Any] | None) -> Organization:
    """Replace the organization's limit overrides ({} or None removes them); every gateway hears of it.

    NotFound (nothing changed) for an unknown organization.
    """
    org = await store.set_org_limits(org_id, dict(limits) if limits else None)
    if feed is not None:
        await feed.deliver_now()
    return org
