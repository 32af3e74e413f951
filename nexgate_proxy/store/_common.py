"""What both backends share: ids, time, argument checks, row conversion, conflict messages."""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from ..records import USAGE_FIELDS
from .base import (
    CREDIT_KINDS,
    GROUP_BYS,
    LEDGER_KINDS,
    MAX_PICO,
    MIN_PICO,
    ROLES,
    ApiKeyRow,
    LastOwnerError,
    LedgerEntry,
    Membership,
    NewLedgerEntry,
    Organization,
    UnappliedPayment,
    UsageRecord,
    User,
)

# Column lists, in the order the *_from_row functions read them.
USER_COLUMNS = "id, external_id, email, name, created_at, deleted_at, suspended_at"
ORG_COLUMNS = "id, name, created_at, limits"
MEMBERSHIP_COLUMNS = "org_id, user_id, role, created_at"
API_KEY_COLUMNS = (
    "id, public_id, prefix, secret_hash, name, user_id, org_id, created_by, created_at,"
    " last_used_at, expires_at, revoked_at, allowed_models, limits"
)
USAGE_COLUMNS = ", ".join(USAGE_FIELDS)
_STORED_AS_NULL = {
    "key_prefix": "NULLIF(COALESCE(key_prefix, (SELECT k.prefix FROM api_keys k WHERE k.id = usage_records.key_id)),"
                  " '')",
    "cached_tokens": "COALESCE(cached_tokens, 0)",  # PostgreSQL stores NULL for 0
    "attempts": "COALESCE(attempts, 1)",  # and for 1
}
USAGE_SELECT = ", ".join(f"{_STORED_AS_NULL[name]} AS {name}" if name in _STORED_AS_NULL else name
                         for name in USAGE_FIELDS)
"""USAGE_COLUMNS as list_usage reads them: a key prefix stored as NULL is its key's (keys are never
deleted); on PostgreSQL, NULL cached_tokens are 0 and NULL attempts 1."""
LEDGER_COLUMNS = "id, account_id, kind, amount_pico, source, external_id, request_id, description, created_at"
LEDGER_INSERT_COLUMNS = "account_id, kind, amount_pico, source, external_id, request_id, description, created_at"

DELETED_KEY_NAME = "deleted"
"""What anonymize_user renames a deleted user's personal keys to: their names are the user's own words."""

# anonymize_user: the keys an account deletion ends, the usage rows whose IP it clears.
USER_KEYS_CONDITION = "(user_id = {user} OR (org_id IS NOT NULL AND created_by = {user}))"
"""The user's personal keys and the organization keys they created (they saw the plaintext)."""


def last_owner(org_id: str, user_id: str) -> LastOwnerError:
    return LastOwnerError(
        f"user {user_id} is the last owner of organization {org_id}: make another member owner first"
    )


def last_owner_of(user_id: str, org_ids: list[str]) -> LastOwnerError:
    return LastOwnerError(
        f"user {user_id} is the last owner of organization(s) {', '.join(org_ids)}: make another member "
        "owner of each first, then delete the account"
    )


REQUEST_SOURCE = "request"
"""The ledger source of the debits record_usage applies: one per account and batch (external_id: the
first of the batch's request ids, the usage rows name it in debit_id). Before migration 0008, one per
request (external_id: its request id)."""

# Lean usage rows: what most rows hold is stored as NULL and read back (see usage_for_storage).
COMMON_ENDPOINT = "chat.completions"
"""Stored as NULL in usage_records.endpoint."""
NO_KEY_PREFIX = ""
"""Stored in usage_records.key_prefix for None when the row's key exists (NULL there: its prefix)."""
NO_UPSTREAM_MODEL = ""
"""Stored in usage_records.upstream_model for None (NULL there means "the same as model")."""


def debit_description(requests: int) -> str:
    """A batch debit's description: how many requests it charges."""
    return f"{requests} request{'s' * (requests != 1)}"


def stored_key_prefix(key_prefix: str | None, key_has: str | None) -> str | None:
    """NULL for the prefix of the row's key (``key_has``: api_keys.prefix, None when there is no such key)."""
    if key_has is None:
        return key_prefix
    if key_prefix == key_has:
        return None
    return NO_KEY_PREFIX if key_prefix is None else key_prefix


def stored_endpoint(endpoint: str) -> str | None:
    return None if endpoint == COMMON_ENDPOINT else endpoint


def stored_upstream_model(model: str | None, upstream_model: str | None) -> str | None:
    if upstream_model == model:
        return None
    return NO_UPSTREAM_MODEL if upstream_model is None else upstream_model


def usage_from_storage(record: UsageRecord) -> UsageRecord:
    """The record as written, from a row read with USAGE_COLUMNS (endpoint and upstream_model as stored)."""
    upstream = record.upstream_model
    return record._replace(
        endpoint=COMMON_ENDPOINT if record.endpoint is None else record.endpoint,
        upstream_model=record.model if upstream is None else (None if upstream == NO_UPSTREAM_MODEL else upstream),
        usage_estimated=bool(record.usage_estimated), stream=bool(record.stream))


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


def check_group_by(group_by: str) -> str:
    if group_by not in GROUP_BYS:
        raise ValueError(f"group_by must be one of {', '.join(GROUP_BYS)}, got {group_by!r}")
    return group_by


def models_for_storage(allowed_models: list[str] | tuple[str, ...] | None) -> list[str] | None:
    if allowed_models is None:
        return None
    if isinstance(allowed_models, str):  # a bare string would become a list of letters
        raise TypeError("allowed_models must be a list of model names, not a string")
    return [str(m) for m in allowed_models]


def limits_for_storage(limits: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return None if limits is None else dict(limits)


# --- money and usage --------------------------------------------------------

INT32_MAX = 2**31 - 1
_COUNT_FIELDS = ("prompt_tokens", "completion_tokens", "cached_tokens", "latency_ms", "status", "attempts")


def check_pico(value: Any, what: str) -> int:
    """An exact pico-USD amount: an int (never a float, Decimal or bool) that fits a BIGINT."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what} must be an int of pico-USD, got {type(value).__name__}")
    if not MIN_PICO <= value <= MAX_PICO:
        raise ValueError(f"{what} {value} is outside the BIGINT range (about ±9.2 million USD)")
    return value


def check_ledger_entry(entry: NewLedgerEntry) -> NewLedgerEntry:
    if entry.kind not in LEDGER_KINDS:
        raise ValueError(f"ledger kind must be one of {', '.join(LEDGER_KINDS)}, got {entry.kind!r}")
    amount = check_pico(entry.amount_pico, "amount_pico")
    if amount == 0:
        raise ValueError("a ledger entry moves money: amount_pico must not be 0")
    if entry.kind in CREDIT_KINDS and amount < 0:
        raise ValueError(f"a {entry.kind} credits the account: amount_pico must be positive, got {amount}")
    if entry.kind == "debit" and amount > 0:
        raise ValueError(f"a debit takes from the account: amount_pico must be negative, got {amount}")
    for name in ("account_id", "source", "external_id"):
        value = getattr(entry, name)
        if not isinstance(value, str) or not value:
            raise ValueError(f"a ledger entry needs a non-empty {name}")
    return entry


def _plainly_valid(row: UsageRecord) -> bool:
    """The gateway's own rows, in one expression (this runs once per request)."""
    e, a = row.estimated_cost_pico, row.actual_cost_pico
    return (type(row.request_id) is str and row.request_id != "" and row.ts.tzinfo is UTC
            and (e is None or (type(e) is int and 0 <= e <= MAX_PICO))
            and (a is None or (type(a) is int and 0 <= a <= MAX_PICO))
            and type(row.prompt_tokens) is int and 0 <= row.prompt_tokens <= INT32_MAX
            and type(row.completion_tokens) is int and 0 <= row.completion_tokens <= INT32_MAX
            and type(row.cached_tokens) is int and 0 <= row.cached_tokens <= INT32_MAX
            and type(row.latency_ms) is int and 0 <= row.latency_ms <= INT32_MAX
            and type(row.status) is int and 0 <= row.status <= INT32_MAX
            and type(row.attempts) is int and 0 <= row.attempts <= INT32_MAX)


def check_usage_row(row: UsageRecord) -> UsageRecord:
    """Refuse what one backend would store and the other reject; return the row with ts in UTC."""
    if _plainly_valid(row):
        return row
    if not isinstance(row.request_id, str) or not row.request_id:
        raise ValueError("a usage row needs a non-empty request_id")
    for name in ("estimated_cost_pico", "actual_cost_pico"):
        value = getattr(row, name)
        if value is not None and check_pico(value, name) < 0:
            raise ValueError(f"{name} must not be negative, got {value} (request {row.request_id})")
    for name in _COUNT_FIELDS:
        value = getattr(row, name)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= INT32_MAX:
            raise ValueError(f"{name} must be an int in 0..{INT32_MAX}, got {value!r} (request {row.request_id})")
    if row.ts.tzinfo is UTC:  # the gateway's own rows: skip the copy (this runs once per request)
        return row
    return row._replace(ts=aware_utc(row.ts, "ts"))


OUT_OF_RANGE = "a balance would leave the BIGINT range (about ±9.2 million USD): nothing was applied"

Filter = tuple[str, Any]
"""("column op", value): each backend adds its own placeholder."""


def usage_filters(
    *,
    account_id: str | None,
    org_id: str | None,
    key_id: str | None,
    model: str | None,
    since: datetime | None,
    until: datetime | None,
    require_scope: bool,
) -> list[Filter]:
    if require_scope and account_id is None and org_id is None and key_id is None:
        raise ValueError("list_usage needs at least one of account_id, org_id or key_id")
    filters: list[Filter] = [
        (f"{column} =", value)
        for column, value in (("account_id", account_id), ("org_id", org_id), ("key_id", key_id), ("model", model))
        if value is not None
    ]
    return filters + time_filters("ts", since, until)


def time_filters(column: str, since: datetime | None, until: datetime | None) -> list[Filter]:
    """since inclusive, until exclusive: consecutive periods never count a row twice."""
    filters: list[Filter] = []
    if since is not None:
        filters.append((f"{column} >=", aware_utc(since, "since")))
    if until is not None:
        filters.append((f"{column} <", aware_utc(until, "until")))
    return filters


def status_filters(status: Any) -> list[Filter]:
    """list_usage's status: one code, or a range of codes (step 1)."""
    if status is None:
        return []
    if isinstance(status, range) and status.step == 1:
        return [("status >=", status.start), ("status <", status.stop)]
    if isinstance(status, int) and not isinstance(status, bool):
        return [("status =", status)]
    raise ValueError(f"status must be an int or a range of ints with step 1, got {status!r}")


def whole_days(since: datetime | None, until: datetime | None
               ) -> tuple[tuple[date | None, date | None] | None, list[tuple[datetime | None, datetime | None]]]:
    """Split [since, until) into whole UTC days [first, last) (None: open; None for no whole day)
    and the partial days at its edges, as time ranges to read from the rows themselves."""
    since = None if since is None else aware_utc(since, "since")
    until = None if until is None else aware_utc(until, "until")
    if since is not None and since.date() == date.max:
        return None, [(since, until)]
    first = None if since is None else since.date() + timedelta(days=since != _midnight(since.date()))
    last = None if until is None else until.date()
    if first is not None and last is not None and first >= last:
        return None, [(since, until)]
    edges: list[tuple[datetime | None, datetime | None]] = []
    if since is not None and first is not None and _midnight(first) != since:
        edges.append((since, _midnight(first)))
    if until is not None and last is not None and _midnight(last) != until:
        edges.append((_midnight(last), until))
    return (first, last), edges


def rollup_cutoff(before: date, limit: int) -> datetime:
    """delete_rolled_up_usage's arguments checked: the midnight (UTC) rows older than are deleted."""
    if type(before) is not date:
        raise TypeError("before must be a date")
    if type(limit) is not int or limit < 1:
        raise ValueError("limit must be a positive integer")
    return _midnight(before)


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(), UTC)


# --- rows -> dataclasses ---------------------------------------------------
# Backends hand over rows addressable by column name (sqlite3.Row, asyncpg.Record)
# plus two decoders: SQLite stores timestamps and JSON as text, PostgreSQL does not.

Decode = Callable[[Any], Any]


def _same(value: Any) -> Any:
    return value


class RowDecoder:
    def __init__(self, timestamp: Decode = _same, json_value: Decode = _same, usage_ts: Decode = _same) -> None:
        self._ts = timestamp
        self._json = json_value
        self._usage_ts = usage_ts

    def timestamp(self, value: Any) -> datetime:
        return self._ts(value)

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
            suspended_at=self._opt_ts(row["suspended_at"]),
        )

    def org(self, row: Any) -> Organization:
        limits = row["limits"]
        return Organization(id=row["id"], name=row["name"], created_at=self._ts(row["created_at"]),
                            limits=None if limits is None else self._json(limits))

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

    def usage(self, row: Any) -> UsageRecord:
        """Read with USAGE_COLUMNS: the columns are the record's fields. SQLite keeps booleans as 0/1."""
        record = UsageRecord._make(row[name] for name in USAGE_FIELDS)
        return usage_from_storage(record._replace(ts=self._usage_ts(record.ts)))

    def ledger_entry(self, row: Any) -> LedgerEntry:
        return LedgerEntry(
            id=row["id"],
            account_id=row["account_id"],
            kind=row["kind"],
            amount_pico=row["amount_pico"],
            source=row["source"],
            external_id=row["external_id"],
            request_id=row["request_id"],
            description=row["description"],
            created_at=self._ts(row["created_at"]),
        )

    def unapplied_payment(self, row: Any) -> UnappliedPayment:
        return UnappliedPayment(
            source=row["source"],
            payment_id=row["payment_id"],
            account_hint=row["account_hint"],
            amount_pico=row["amount_pico"],
            description=row["description"],
            reason=row["reason"],
            received_at=self._ts(row["received_at"]),
            applied_to=row["applied_to"],
            applied_at=self._opt_ts(row["applied_at"]),
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
# usage_records, ledger_entries, balances and webhook_events never raise Conflict:
# every insert into them is ON CONFLICT DO NOTHING (that is their idempotency).


def conflict_message(key: str) -> str:
    return CONFLICT_MESSAGES.get(key, f"duplicate value for {key}")
