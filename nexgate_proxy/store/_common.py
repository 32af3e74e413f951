"""What both backends share: ids, time, argument checks, row conversion, conflict messages."""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from .base import ROLES, ApiKeyRow, Membership, Organization, User

# Column lists, in the order the *_from_row functions read them.
USER_COLUMNS = "id, external_id, email, name, created_at, deleted_at"
ORG_COLUMNS = "id, name, created_at"
MEMBERSHIP_COLUMNS = "org_id, user_id, role, created_at"
API_KEY_COLUMNS = (
    "id, public_id, prefix, secret_hash, name, user_id, org_id, created_by, created_at,"
    " last_used_at, expires_at, revoked_at, allowed_models, limits"
)


def new_id(kind: str) -> str:
    """`usr_`, `org_`, `key_`... + 26 base32 chars (128 random bits)."""
    raw = base64.b32encode(secrets.token_bytes(16)).decode("ascii").rstrip("=").lower()
    return f"{kind}_{raw}"


def utcnow() -> datetime:
    return datetime.now(UTC)


def aware_utc(value: datetime, what: str) -> datetime:
    """Refuse naive datetimes: guessing their zone silently shifts expiries."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be a timezone-aware datetime, got naive {value!r}")
    return value.astimezone(UTC)


def check_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    return role


def check_key_owner(user_id: str | None, org_id: str | None) -> None:
    if (user_id is None) == (org_id is None):
        raise ValueError("an API key belongs to exactly one of user_id or org_id")


def check_page(limit: int, offset: int) -> None:
    if limit < 0 or offset < 0:
        raise ValueError("limit and offset must not be negative")


def models_for_storage(allowed_models: list[str] | tuple[str, ...] | None) -> list[str] | None:
    if allowed_models is None:
        return None
    if isinstance(allowed_models, str):  # a bare string would become a list of letters
        raise TypeError("allowed_models must be a list of model names, not a string")
    return [str(m) for m in allowed_models]


def limits_for_storage(limits: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return None if limits is None else dict(limits)


# --- rows -> dataclasses ---------------------------------------------------
# Backends hand over rows addressable by column name (sqlite3.Row, asyncpg.Record)
# plus two decoders: SQLite stores timestamps and JSON as text, PostgreSQL does not.

Decode = Callable[[Any], Any]


def _same(value: Any) -> Any:
    return value


class RowDecoder:
    def __init__(self, timestamp: Decode = _same, json_value: Decode = _same) -> None:
        self._ts = timestamp
        self._json = json_value

    def _opt_ts(self, value: Any) -> datetime | None:
        return None if value is None else self._ts(value)

    def user(self, row: Any) -> User:
        return User(
            id=row["id"],
            external_id=row["external_id"],
            email=row["email"],
            name=row["name"],
            created_at=self._ts(row["created_at"]),
            deleted_at=self._opt_ts(row["deleted_at"]),
        )

    def org(self, row: Any) -> Organization:
        return Organization(id=row["id"], name=row["name"], created_at=self._ts(row["created_at"]))

    def membership(self, row: Any) -> Membership:
        return Membership(
            org_id=row["org_id"],
            user_id=row["user_id"],
            role=row["role"],
            created_at=self._ts(row["created_at"]),
        )

    def api_key(self, row: Any) -> ApiKeyRow:
        models = row["allowed_models"]
        limits = row["limits"]
        models = None if models is None else self._json(models)
        return ApiKeyRow(
            id=row["id"],
            public_id=row["public_id"],
            prefix=row["prefix"],
            secret_hash=row["secret_hash"],
            name=row["name"],
            user_id=row["user_id"],
            org_id=row["org_id"],
            created_by=row["created_by"],
            created_at=self._ts(row["created_at"]),
            last_used_at=self._opt_ts(row["last_used_at"]),
            expires_at=self._opt_ts(row["expires_at"]),
            revoked_at=self._opt_ts(row["revoked_at"]),
            allowed_models=None if models is None else tuple(models),
            limits=None if limits is None else self._json(limits),
        )


def dump_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


# --- conflicts ------------------------------------------------------------
# Keyed by "table.col1,col2" (what SQLite reports); PostgreSQL constraint names
# are mapped onto the same keys by the postgres backend.

CONFLICT_MESSAGES = {
    "users.id": "a user with this id already exists",
    "users.external_id": "a user with this external_id already exists",
    "organizations.id": "an organization with this id already exists",
    "memberships.org_id,user_id": "the user is already a member of this organization",
    "api_keys.id": "an API key with this id already exists",
    "api_keys.public_id": "an API key with this public_id already exists",
}


def conflict_message(key: str) -> str:
    return CONFLICT_MESSAGES.get(key, f"duplicate value for {key}")
