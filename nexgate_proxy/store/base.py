"""The durable store: accounts, organizations and API keys.

`Store` is the one interface the gateway codes against; `sqlite.py` and
`postgres.py` implement it. Rows come back as frozen dataclasses with
timezone-aware UTC datetimes, whatever the backend.

Lookups (`get_*`) return None for a missing row; operations on something that
must exist (adding a member to an unknown org, revoking an unknown key) raise
`NotFound`.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

Role = Literal["owner", "admin", "member"]
ROLES: tuple[str, ...] = ("owner", "admin", "member")


# --- errors ---------------------------------------------------------------


class StoreError(Exception):
    """Any failure of the store; the other store errors derive from it."""


class NotFound(StoreError):
    """A row the operation needs does not exist."""


class Conflict(StoreError):
    """A unique value is already taken; the message names which one."""


class SchemaError(StoreError):
    """The database schema is missing, behind, or ahead of this code."""


class LastOwnerError(StoreError):
    """The operation would leave an organization without an owner."""


# --- rows -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class User:
    id: str
    external_id: str | None
    """The identity provider's user id (Clerk), when the user came from there."""
    email: str | None
    name: str | None
    created_at: datetime
    deleted_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Organization:
    id: str
    name: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Membership:
    org_id: str
    user_id: str
    role: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ApiKeyRow:
    id: str
    public_id: str
    """The non-secret half of the key the auth path looks the row up by."""
    prefix: str
    """Short display prefix, safe to show and log."""
    secret_hash: str = field(repr=False)
    """bcrypt hash of the secret half; the plaintext is never stored. Kept out of repr."""
    name: str
    user_id: str | None
    org_id: str | None
    created_by: str | None
    created_at: datetime
    last_used_at: datetime | None = None
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    allowed_models: tuple[str, ...] | None = None
    """None means every model."""
    limits: Mapping[str, Any] | None = field(default=None, hash=False)

    @property
    def owner_id(self) -> str:
        """The account that pays: the user or the organization that owns the key."""
        return self.user_id or self.org_id  # type: ignore[return-value]  # CHECK: exactly one is set

    def is_usable(self, now: datetime) -> bool:
        """Not revoked and not expired at `now`."""
        if self.revoked_at is not None:
            return False
        return self.expires_at is None or now < self.expires_at


# --- interface ------------------------------------------------------------


class Store(abc.ABC):
    """Async access to accounts and API keys. Open one with `open_store(url)`."""

    dialect: str
    """"sqlite" or "postgres": which migrations directory applies."""

    # schema and lifecycle

    @abc.abstractmethod
    async def migrate(self) -> list[int]:
        """Apply pending migrations, one transaction each; return the versions applied."""

    @abc.abstractmethod
    async def schema_version(self) -> int:
        """The highest applied migration, 0 for an empty database."""

    @abc.abstractmethod
    async def check_schema(self) -> int:
        """Return the version if it is exactly the one this code knows; else raise SchemaError."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Round-trip to the database; raise StoreError when it does not answer."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections. Safe to call twice."""

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # users

    @abc.abstractmethod
    async def create_user(
        self, *, external_id: str | None = None, email: str | None = None, name: str | None = None
    ) -> User: ...

    @abc.abstractmethod
    async def get_user(self, user_id: str) -> User | None: ...

    @abc.abstractmethod
    async def get_user_by_external_id(self, external_id: str) -> User | None: ...

    @abc.abstractmethod
    async def list_users(self, limit: int = 100, offset: int = 0, *, include_deleted: bool = False) -> list[User]: ...

    @abc.abstractmethod
    async def delete_user(self, user_id: str, at: datetime | None = None) -> bool:
        """Soft-delete (set deleted_at); False if already deleted, NotFound if unknown."""

    # organizations

    @abc.abstractmethod
    async def create_org(self, name: str, owner_user_id: str) -> Organization:
        """Create the organization and its owner membership in one transaction."""

    @abc.abstractmethod
    async def get_org(self, org_id: str) -> Organization | None: ...

    @abc.abstractmethod
    async def list_orgs(self, limit: int = 100, offset: int = 0) -> list[Organization]: ...

    @abc.abstractmethod
    async def list_orgs_for_user(self, user_id: str) -> list[tuple[Organization, str]]:
        """The user's organizations with the user's role in each."""

    # memberships

    @abc.abstractmethod
    async def add_member(self, org_id: str, user_id: str, role: str) -> Membership:
        """Conflict if already a member; NotFound if the org or user does not exist."""

    @abc.abstractmethod
    async def set_member_role(self, org_id: str, user_id: str, role: str) -> Membership:
        """NotFound if not a member; LastOwnerError when demoting the last owner."""

    @abc.abstractmethod
    async def remove_member(self, org_id: str, user_id: str) -> bool:
        """False if not a member; LastOwnerError when removing the last owner."""

    @abc.abstractmethod
    async def get_role(self, org_id: str, user_id: str) -> str | None: ...

    @abc.abstractmethod
    async def list_members(self, org_id: str) -> list[Membership]: ...

    # API keys

    @abc.abstractmethod
    async def create_api_key(
        self,
        *,
        public_id: str,
        prefix: str,
        secret_hash: str,
        name: str,
        user_id: str | None = None,
        org_id: str | None = None,
        created_by: str | None = None,
        expires_at: datetime | None = None,
        allowed_models: list[str] | tuple[str, ...] | None = None,
        limits: Mapping[str, Any] | None = None,
    ) -> ApiKeyRow:
        """Exactly one of user_id / org_id. `secret_hash` is a bcrypt hash, never the secret."""

    @abc.abstractmethod
    async def get_api_key(self, key_id: str) -> ApiKeyRow | None: ...

    @abc.abstractmethod
    async def get_api_key_by_public_id(self, public_id: str) -> ApiKeyRow | None:
        """The auth path's lookup on a cache miss: one indexed query. Returns revoked keys too."""

    @abc.abstractmethod
    async def list_api_keys(
        self, *, user_id: str | None = None, org_id: str | None = None, include_revoked: bool = False
    ) -> list[ApiKeyRow]:
        """Keys of the user and/or org given (all keys when neither), oldest first."""

    @abc.abstractmethod
    async def revoke_api_key(self, key_id: str, at: datetime | None = None) -> bool:
        """True if this call revoked it, False if it was already revoked; NotFound if unknown."""

    @abc.abstractmethod
    async def touch_api_keys(self, last_used: Mapping[str, datetime]) -> int:
        """Batch-record last use, in one transaction. Never moves last_used_at backwards.

        Returns how many rows changed; unknown ids are ignored.
        """
