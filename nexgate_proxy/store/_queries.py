"""The statements both backends run alike, written once with `:name` markers.

`sql()` renders each one for both dialects at import: SQLite gets numbered `?N`, PostgreSQL `$N`,
N the parameter's place in order of first use, so both bind the same positional tuple and a
repeated marker binds one value. What truly differs (RETURNING, locks, unnest, the change table's
timestamps) stays in the dialect modules, which append to these strings at import, never per call.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from ._common import (
    API_KEY_COLUMNS,
    LEDGER_COLUMNS,
    MEMBERSHIP_COLUMNS,
    ORG_COLUMNS,
    USER_COLUMNS,
    USER_KEYS_CONDITION,
)

# `:name`, but not the second colon of a PostgreSQL cast (`x::text`).
_MARKER = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


class Sql(NamedTuple):
    sqlite: str
    postgres: str


def sql(text: str, *params: str) -> Sql:
    """Render `text` for both dialects; `params` names its markers in order of first use.

    That order is the positional order every call site binds, so it is checked here, at import:
    a marker `params` does not name, a name no marker uses, or another order is an error.
    """
    used: list[str] = []
    for name in _MARKER.findall(text):
        if name not in params:
            raise ValueError(f"unknown marker :{name} in {text!r}: declared {params}")
        if name not in used:
            used.append(name)
    if tuple(used) != params:
        raise ValueError(f"parameters {params} must be the markers in order of first use: {tuple(used)}")

    def numbered(prefix: str) -> str:
        return _MARKER.sub(lambda m: f"{prefix}{params.index(m.group(1)) + 1}", text)

    return Sql(sqlite=numbered("?"), postgres=numbered("$"))


# --- schema ------------------------------------------------------------------

SCHEMA_VERSION = sql("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
RECORD_MIGRATION = sql("INSERT INTO schema_migrations (version, applied_at) VALUES (:version, :at)", "version", "at")

# --- users -------------------------------------------------------------------

INSERT_USER = sql(
    "INSERT INTO users (id, external_id, email, name, created_at) VALUES (:id, :external_id, :email, :name, :at)",
    "id", "external_id", "email", "name", "at",
)
GET_USER = sql(f"SELECT {USER_COLUMNS} FROM users WHERE id = :id", "id")
GET_USER_BY_EXTERNAL_ID = sql(f"SELECT {USER_COLUMNS} FROM users WHERE external_id = :external_id", "external_id")
LIST_USERS = {
    include_deleted: sql(
        f"SELECT {USER_COLUMNS} FROM users {'' if include_deleted else 'WHERE deleted_at IS NULL '}"
        "ORDER BY created_at, id LIMIT :limit OFFSET :offset",
        "limit", "offset",
    )
    for include_deleted in (False, True)
}

# Correction and restriction (update_user, set_user_suspended).
UPDATE_USER = sql("UPDATE users SET email = :email, name = :name WHERE id = :user AND deleted_at IS NULL",
                  "email", "name", "user")
SUSPEND_USER = sql("UPDATE users SET suspended_at = :when WHERE id = :user AND suspended_at IS NULL", "when", "user")
UNSUSPEND_USER = sql("UPDATE users SET suspended_at = NULL WHERE id = :user AND suspended_at IS NOT NULL", "user")
PERSONAL_KEYS = sql("SELECT id FROM api_keys WHERE user_id = :user AND revoked_at IS NULL ORDER BY id", "user")

# anonymize_user, in the order it runs them.
_USER_KEYS = USER_KEYS_CONDITION.format(user=":user")
SOLE_OWNED_ORGS = sql(
    "SELECT m.org_id FROM memberships m WHERE m.user_id = :user AND m.role = 'owner' AND"
    " (SELECT COUNT(*) FROM memberships o WHERE o.org_id = m.org_id AND o.role = 'owner') <= 1"
    " ORDER BY m.org_id",
    "user",
)
USER_KEYS = sql(f"SELECT id, revoked_at FROM api_keys WHERE {_USER_KEYS} ORDER BY created_at, id", "user")
REVOKE_USER_KEYS = sql(f"UPDATE api_keys SET revoked_at = :when WHERE {_USER_KEYS} AND revoked_at IS NULL",
                       "when", "user")
RENAME_USER_KEYS = sql("UPDATE api_keys SET name = :name WHERE user_id = :user AND name <> :name", "name", "user")
# By account, through the account index (PostgreSQL's holds hashtext(account_id)): a key's rows are
# billed to its owner, so the user's rows are in the user's account and the accounts of their keys.
_CLEAR_USER_IPS = (
    "UPDATE usage_records SET client_ip = NULL WHERE client_ip IS NOT NULL"
    " AND {f}(account_id) IN (SELECT {f}(:user) UNION"
    f" SELECT {{f}}(COALESCE(user_id, org_id)) FROM api_keys WHERE {_USER_KEYS})"
    f" AND (account_id = :user OR key_id IN (SELECT id FROM api_keys WHERE {_USER_KEYS}))"
)
CLEAR_USER_IPS = Sql(sqlite=sql(_CLEAR_USER_IPS.format(f=""), "user").sqlite,
                     postgres=sql(_CLEAR_USER_IPS.format(f="hashtext"), "user").postgres)
ERASE_USER = sql(
    "UPDATE users SET email = NULL, name = NULL, external_id = NULL,"
    " deleted_at = COALESCE(deleted_at, :when) WHERE id = :user AND (email IS NOT NULL"
    " OR name IS NOT NULL OR external_id IS NOT NULL OR deleted_at IS NULL)",
    "when", "user",
)

# --- organizations and memberships -------------------------------------------

INSERT_ORG = sql("INSERT INTO organizations (id, name, created_at) VALUES (:id, :name, :at)", "id", "name", "at")
GET_ORG = sql(f"SELECT {ORG_COLUMNS} FROM organizations WHERE id = :id", "id")
LIST_ORGS = sql(f"SELECT {ORG_COLUMNS} FROM organizations ORDER BY created_at, id LIMIT :limit OFFSET :offset",
                "limit", "offset")
LIST_ORGS_FOR_USER = sql(
    "SELECT o.id, o.name, o.created_at, o.limits, m.role FROM memberships m"
    " JOIN organizations o ON o.id = m.org_id"
    " WHERE m.user_id = :user ORDER BY o.created_at, o.id",
    "user",
)
INSERT_MEMBER = sql(
    "INSERT INTO memberships (org_id, user_id, role, created_at) VALUES (:org, :user, :role, :at)",
    "org", "user", "role", "at",
)
GET_MEMBERSHIP = sql(f"SELECT {MEMBERSHIP_COLUMNS} FROM memberships WHERE org_id = :org AND user_id = :user",
                     "org", "user")
GET_ROLE = sql("SELECT role FROM memberships WHERE org_id = :org AND user_id = :user", "org", "user")
OWNER_COUNT = sql("SELECT COUNT(*) FROM memberships WHERE org_id = :org AND role = 'owner'", "org")
SET_ROLE = sql("UPDATE memberships SET role = :role WHERE org_id = :org AND user_id = :user", "role", "org", "user")
DELETE_MEMBER = sql("DELETE FROM memberships WHERE org_id = :org AND user_id = :user", "org", "user")
LIST_MEMBERS = sql(f"SELECT {MEMBERSHIP_COLUMNS} FROM memberships WHERE org_id = :org ORDER BY created_at, user_id",
                   "org")

# --- API keys ----------------------------------------------------------------

_KEY_FIELDS = ("id", "public_id", "prefix", "secret_hash", "name", "user_id", "org_id", "created_by",
               "created_at", "expires_at", "allowed_models", "limits")
INSERT_API_KEY = sql(
    f"INSERT INTO api_keys ({', '.join(_KEY_FIELDS)}) VALUES ({', '.join(':' + f for f in _KEY_FIELDS)})",
    *_KEY_FIELDS,
)
# The two single-key reads say whether a personal key's user is suspended (the auth path's one query).
_OWNER_SUSPENDED = ("EXISTS (SELECT 1 FROM users u WHERE u.id = api_keys.user_id AND u.suspended_at IS NOT NULL)"
                    " AS owner_suspended")
GET_API_KEY = sql(f"SELECT {API_KEY_COLUMNS}, {_OWNER_SUSPENDED} FROM api_keys WHERE id = :id", "id")
GET_API_KEY_BY_PUBLIC_ID = sql(f"SELECT {API_KEY_COLUMNS}, {_OWNER_SUSPENDED} FROM api_keys"
                               " WHERE public_id = :public_id", "public_id")

# --- usage and money ---------------------------------------------------------

CLEAR_CLIENT_IPS = sql("UPDATE usage_records SET client_ip = NULL WHERE client_ip IS NOT NULL AND ts < :before",
                       "before")
DEBITED_REQUESTS = sql(  # by account (its index), then the debit's own rows
    "SELECT request_id, actual_cost_pico FROM usage_records WHERE account_id = :account AND debit_id = :debit"
    " ORDER BY request_id",
    "account", "debit",
)
INSERT_WEBHOOK_EVENT = sql(
    "INSERT INTO webhook_events (source, event_id, event_type, received_at) VALUES (:source, :event_id, :type, :at)"
    " ON CONFLICT (source, event_id) DO NOTHING",
    "source", "event_id", "type", "at",
)
GET_BALANCE = sql("SELECT balance_pico FROM balances WHERE account_id = :account", "account")
BALANCE_SNAPSHOT = sql(
    "SELECT (SELECT balance_pico FROM balances WHERE account_id = :account) AS balance,"
    " (SELECT COALESCE(MAX(id), 0) FROM store_changes) AS position",
    "account",
)
NEWEST_ENTRY = sql("SELECT id FROM ledger_entries WHERE account_id = :account ORDER BY created_at DESC, id DESC LIMIT 1",
                   "account")
"""ledger_snapshot's head: the entry list_ledger shows first."""
LEDGER_SUM = sql("SELECT COALESCE(SUM(amount_pico), 0) FROM ledger_entries WHERE account_id = :account", "account")
GET_LEDGER_ENTRY = sql(
    f"SELECT {LEDGER_COLUMNS} FROM ledger_entries WHERE source = :source AND external_id = :external_id",
    "source", "external_id",
)

# --- payments: reversals and unapplied payments ------------------------------

GET_PAYMENT_REVERSED = sql(
    "SELECT reversed_minor, reversed_pico FROM payment_reversals WHERE source = :source AND payment_id = :payment",
    "source", "payment",
)
# Compare-and-set: a first reversal inserts; a later one moves the totals only from what it read.
SET_PAYMENT_REVERSED = sql(
    "INSERT INTO payment_reversals (source, payment_id, reversed_minor, reversed_pico, updated_at)"
    " VALUES (:source, :payment, :minor, :pico, :at) ON CONFLICT (source, payment_id) DO UPDATE"
    " SET reversed_minor = excluded.reversed_minor, reversed_pico = excluded.reversed_pico,"
    " updated_at = excluded.updated_at"
    " WHERE payment_reversals.reversed_minor = :old_minor AND payment_reversals.reversed_pico = :old_pico",
    "source", "payment", "minor", "pico", "at", "old_minor", "old_pico",
)
UNAPPLIED_COLUMNS = ("source", "payment_id", "account_hint", "amount_pico", "description", "reason", "received_at",
                     "applied_to", "applied_at")
INSERT_UNAPPLIED = sql(
    f"INSERT INTO unapplied_payments ({', '.join(UNAPPLIED_COLUMNS[:7])})"
    " VALUES (:source, :payment, :hint, :amount, :description, :reason, :at)"
    " ON CONFLICT (source, payment_id) DO NOTHING",
    "source", "payment", "hint", "amount", "description", "reason", "at",
)
GET_UNAPPLIED = sql(
    f"SELECT {', '.join(UNAPPLIED_COLUMNS)} FROM unapplied_payments WHERE source = :source AND payment_id = :payment",
    "source", "payment",
)
LIST_UNAPPLIED = {
    include_applied: sql(
        f"SELECT {', '.join(UNAPPLIED_COLUMNS)} FROM unapplied_payments"
        f"{'' if include_applied else ' WHERE applied_to IS NULL'}"
        " ORDER BY received_at, source, payment_id LIMIT :limit OFFSET :offset",
        "limit", "offset",
    )
    for include_applied in (False, True)
}
MARK_UNAPPLIED_APPLIED = sql(
    "UPDATE unapplied_payments SET applied_to = :account, applied_at = :at"
    " WHERE source = :source AND payment_id = :payment AND applied_to IS NULL",
    "account", "at", "source", "payment",
)

# --- change feed -------------------------------------------------------------

LATEST_CHANGE_ID = sql("SELECT COALESCE(MAX(id), 0) FROM store_changes")
CHANGES_SINCE = sql(
    "SELECT id, kind, subject, amount_pico, ledger_id FROM store_changes WHERE id > :after ORDER BY id LIMIT :limit",
    "after", "limit",
)
