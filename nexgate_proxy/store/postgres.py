"""PostgreSQL backend: asyncpg with a connection pool.

The URL's query may carry server settings, which asyncpg passes through to every
pooled connection: `postgresql://.../db?search_path=tenant_a` puts all tables in
schema `tenant_a` (created by `migrate()` when missing).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import date, datetime, timedelta
from typing import Any

import asyncpg

from . import _common as common
from . import _queries as q
from ._common import (
    API_KEY_COLUMNS,
    LEDGER_INSERT_COLUMNS,
    MEMBERSHIP_COLUMNS,
    ORG_COLUMNS,
    USAGE_COLUMNS,
    USAGE_FIELDS,
    USER_COLUMNS,
    Filter,
    RowDecoder,
)
from ._migrations import load_migrations, refuse_newer
from ._queries import Sql
from ._sqlstore import SqlStore
from .feed import API_KEY_CHANGE, CREDIT_CHANGE, ORG_CHANGE, ChangeFeed
from .base import (
    AnonymizedUser,
    ApiKeyRow,
    Conflict,
    Membership,
    LedgerDay,
    NewLedgerEntry,
    NotFound,
    Organization,
    SchemaError,
    StoreError,
    UnappliedPayment,
    UsageRecord,
    User,
)

# One advisory lock for "migrating this database": gateway instances starting
# together queue on it instead of racing each other's DDL. ("NexGate" in ASCII.)
MIGRATION_LOCK_ID = 0x4E6578_47617465
# Held by every writer of store_changes from its insert to its commit: ids then grow in commit
# order, so a feed reading "after the last id I saw" never skips a row that commits late.
CHANGE_FEED_LOCK_ID = MIGRATION_LOCK_ID + 1
CHANGE_CHANNEL = "nexgate_store_changes"

log = logging.getLogger("nexgate.store.postgres")

# PostgreSQL constraint names -> the keys of common.CONFLICT_MESSAGES.
_CONFLICT_KEYS = {
    "users_pkey": "users.id",
    "users_external_id_key": "users.external_id",
    "organizations_pkey": "organizations.id",
    "memberships_pkey": "memberships.org_id,user_id",
    "api_keys_pkey": "api_keys.id",
    "api_keys_public_id_key": "api_keys.public_id",
}

_decode = RowDecoder()  # asyncpg already returns aware datetimes and (with our codec) decoded JSON


@contextmanager
def _translated(missing: str | None = None) -> Iterator[None]:
    """Turn driver errors into store errors; our own StoreErrors pass through untouched."""
    try:
        yield
    except asyncpg.UniqueViolationError as exc:
        key = _CONFLICT_KEYS.get(exc.constraint_name or "", exc.constraint_name or "a unique column")
        raise Conflict(common.conflict_message(key)) from exc
    except asyncpg.ForeignKeyViolationError as exc:
        raise NotFound(missing or "a referenced row does not exist") from exc
    except asyncpg.UndefinedTableError as exc:
        raise SchemaError(f"{exc}: run `nexgate db migrate`") from exc
    except asyncpg.NumericValueOutOfRangeError as exc:
        raise StoreError(common.OUT_OF_RANGE) from exc
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise StoreError(f"postgres: {exc}") from exc


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=common.dump_json, decoder=json.loads, schema="pg_catalog")


def _updated_count(status: str) -> int:
    """asyncpg returns the command tag, e.g. "UPDATE 3"."""
    return int(status.rsplit(" ", 1)[-1])


async def _version(conn: asyncpg.Connection) -> int:
    # to_regclass follows search_path, so this looks in the store's own schema.
    if await conn.fetchval("SELECT to_regclass('schema_migrations')") is None:
        return 0
    return int(await conn.fetchval(q.SCHEMA_VERSION.postgres))


async def _ensure_schema(conn: asyncpg.Connection) -> None:
    """Create the first schema of search_path when it does not exist yet."""
    if await conn.fetchval("SELECT current_schema()") is not None:
        return
    search_path = await conn.fetchval("SHOW search_path")
    names = [n.strip().strip('"') for n in search_path.split(",")]
    names = [n for n in names if n and n != "$user"]
    if not names:
        raise SchemaError("search_path names no schema to create the tables in")
    await conn.execute(await conn.fetchval("SELECT format('CREATE SCHEMA IF NOT EXISTS %I', $1::text)", names[0]))


async def _lock_org(conn: asyncpg.Connection, org_id: str) -> None:
    """Serialize owner changes per org, so two concurrent removals cannot both pass the last-owner check."""
    await conn.execute("SELECT 1 FROM organizations WHERE id = $1 FOR UPDATE", org_id)


async def _record_changes(conn: asyncpg.Connection,
                          changes: Sequence[tuple[str, str, int | None, int | None]]) -> None:
    """(kind, subject, amount_pico, ledger_id) rows, at the end of the change's own transaction.

    Nothing may wait for a row lock after this: the feed lock is held to commit. The NOTIFY is
    delivered at commit, to every listening gateway.
    """
    if not changes:
        return
    await conn.execute("SELECT pg_advisory_xact_lock($1), pg_notify($2, '')", CHANGE_FEED_LOCK_ID, CHANGE_CHANNEL)
    await conn.executemany(
        "INSERT INTO store_changes (kind, subject, amount_pico, ledger_id) VALUES ($1, $2, $3, $4)", changes)


def _credit_changes(rows: Sequence[asyncpg.Record]) -> list[tuple[str, str, int | None, int | None]]:
    """The credit changes of ledger entries just appended (id, account_id, amount_pico)."""
    return [(CREDIT_CHANGE, r["account_id"], r["amount_pico"], r["id"]) for r in rows]


async def _owner_count(conn: asyncpg.Connection, org_id: str) -> int:
    return int(await conn.fetchval(q.OWNER_COUNT.postgres, org_id))


# --- usage and money: set-based statements, one round trip per batch ---------
# Rows travel as one array per column (unnest). Inserts go in key order and
# balances in account order, so concurrent batches take their locks in the same
# order and cannot deadlock each other. Within a key, input order (ordinality)
# decides: the first of two rows with the same key wins, as in SQLite.

_USAGE_TYPES = {
    "request_id": "text", "ts": "timestamptz", "endpoint": "text", "model": "text", "provider": "text",
    "upstream_model": "text", "account_id": "text", "org_id": "text", "key_id": "text", "key_prefix": "text",
    "prompt_tokens": "integer", "completion_tokens": "integer", "cached_tokens": "integer",
    "usage_estimated": "boolean", "estimated_cost_pico": "bigint", "actual_cost_pico": "bigint",
    "latency_ms": "integer", "status": "integer", "error_code": "text", "stream": "boolean", "client_ip": "text",
    "attempts": "integer",
}  # fmt: skip

_LEDGER_INPUT = (
    "unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[]) WITH ORDINALITY"
    " AS e(account_id, kind, amount_pico, source, external_id, request_id, description, n)"
)


def _move_balances(entries: str, now: str) -> str:
    """Add the appended entries (a CTE with account_id, amount_pico) to the balances.

    SUM(bigint) is numeric: the cast, like the addition, fails rather than wrap
    (NumericValueOutOfRange -> StoreError), rolling the whole statement back.
    """
    return (
        "INSERT INTO balances (account_id, balance_pico, updated_at)"
        f" SELECT account_id, SUM(amount_pico)::bigint, {now} FROM {entries} GROUP BY account_id ORDER BY account_id"
        " ON CONFLICT (account_id) DO UPDATE"
        " SET balance_pico = balances.balance_pico + EXCLUDED.balance_pico, updated_at = EXCLUDED.updated_at"
    )


_BY_ACCOUNT = "hashtext(account_id) = hashtext({0}) AND account_id = {0}"
"""usage_records of one account, through usage_records_account_ts_idx (on hashtext(account_id), ts)."""

_DEBITED_REQUESTS = (f"SELECT request_id, actual_cost_pico FROM usage_records WHERE {_BY_ACCOUNT.format('$1')}"
                     " AND debit_id = $2 ORDER BY request_id")

_STORED_USAGE = ", ".join({
    "endpoint": f"NULLIF(i.endpoint, '{common.COMMON_ENDPOINT}')",
    # NULL for the usual 0 cached tokens and 1 attempt: 8 bytes less, a whole MAXALIGN step of the row
    "cached_tokens": "NULLIF(i.cached_tokens, 0)",
    "attempts": "NULLIF(i.attempts, 1)",
    "key_prefix": ("CASE WHEN k.prefix IS NULL THEN i.key_prefix WHEN i.key_prefix IS NOT DISTINCT FROM k.prefix"
                   f" THEN NULL ELSE COALESCE(i.key_prefix, '{common.NO_KEY_PREFIX}') END"),
    "upstream_model": ("CASE WHEN i.upstream_model IS NOT DISTINCT FROM i.model THEN NULL"
                       f" WHEN i.upstream_model IS NULL THEN '{common.NO_UPSTREAM_MODEL}' ELSE i.upstream_model END"),
}.get(name, f"i.{name}") for name in USAGE_FIELDS)
"""The input's columns in their stored form (see migration 0008 and _common.usage_from_storage)."""

_RECORD_USAGE = f"""
WITH input AS (
    SELECT * FROM unnest({", ".join(f"${i}::{_USAGE_TYPES[f]}[]" for i, f in enumerate(USAGE_FIELDS, 1))})
        WITH ORDINALITY AS t({USAGE_COLUMNS}, n)
), debits AS (
    -- the id of each account's debit, taken before the rows that name it are stored (unused if none is)
    SELECT account_id, nextval(pg_get_serial_sequence('ledger_entries', 'id')) AS debit_id
    FROM (SELECT DISTINCT account_id FROM input WHERE account_id IS NOT NULL AND actual_cost_pico > 0) a
), new_usage AS (
    -- a row whose cost is in the ledger already (a per-request debit from before migration 0008, or
    -- booked by hand) names that debit and is not charged again
    INSERT INTO usage_records ({USAGE_COLUMNS}, debit_id)
    SELECT {_STORED_USAGE}, CASE WHEN i.actual_cost_pico > 0 THEN COALESCE(
        (SELECT l.id FROM ledger_entries l WHERE l.source = '{common.REQUEST_SOURCE}' AND l.external_id = i.request_id),
        d.debit_id) END
    FROM input i LEFT JOIN debits d ON d.account_id = i.account_id LEFT JOIN api_keys k ON k.id = i.key_id
    ORDER BY i.request_id, i.n
    ON CONFLICT (request_id) DO NOTHING
    RETURNING request_id, ts, model, account_id, org_id, key_id, prompt_tokens, completion_tokens, cached_tokens,
        actual_cost_pico, latency_ms, status, debit_id
), daily AS (
    INSERT INTO usage_daily (account_id, day, model, key_id, status, org_id, requests, prompt_tokens,
                             completion_tokens, cached_tokens, cost_pico, latency_ms_sum, latency_ms_max)
    SELECT COALESCE(account_id, ''), (ts AT TIME ZONE 'UTC')::date, COALESCE(model, ''), COALESCE(key_id, ''),
           status, COALESCE(org_id, ''), COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), COALESCE(SUM(cached_tokens), 0),
           COALESCE(SUM(actual_cost_pico), 0), SUM(latency_ms), MAX(latency_ms)
    FROM new_usage GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2, 3, 4, 5, 6
    ON CONFLICT (account_id, day, model, key_id, status, org_id) DO UPDATE SET
        requests = usage_daily.requests + EXCLUDED.requests,
        prompt_tokens = usage_daily.prompt_tokens + EXCLUDED.prompt_tokens,
        completion_tokens = usage_daily.completion_tokens + EXCLUDED.completion_tokens,
        cached_tokens = usage_daily.cached_tokens + EXCLUDED.cached_tokens,
        cost_pico = usage_daily.cost_pico + EXCLUDED.cost_pico,
        latency_ms_sum = usage_daily.latency_ms_sum + EXCLUDED.latency_ms_sum,
        latency_ms_max = GREATEST(usage_daily.latency_ms_max, EXCLUDED.latency_ms_max)
), new_entries AS (
    -- one debit per account for the rows this statement stored (a replayed row stores nothing, so
    -- charges nothing); external_id: the first of its request ids (byte order, as in SQLite)
    INSERT INTO ledger_entries (id, {LEDGER_INSERT_COLUMNS})
    SELECT debit_id, account_id, 'debit', -SUM(actual_cost_pico), '{common.REQUEST_SOURCE}',
           MIN(request_id COLLATE "C"), MIN(request_id COLLATE "C"),
           COUNT(*) || ' request' || CASE WHEN COUNT(*) = 1 THEN '' ELSE 's' END, $23
    FROM new_usage WHERE debit_id IN (SELECT debit_id FROM debits) GROUP BY debit_id, account_id ORDER BY account_id
    RETURNING account_id, amount_pico
), moved AS (
    {_move_balances("new_entries", "$23")}
), debit_days AS (
    INSERT INTO request_debits_daily (account_id, day, amount_pico, entries, last_at)
    SELECT account_id, ($23 AT TIME ZONE 'UTC')::date, -SUM(actual_cost_pico), COUNT(*), $23
    FROM new_usage WHERE debit_id IN (SELECT debit_id FROM debits) GROUP BY account_id ORDER BY account_id
    ON CONFLICT (account_id, day) DO UPDATE SET
        amount_pico = request_debits_daily.amount_pico + EXCLUDED.amount_pico,
        entries = request_debits_daily.entries + EXCLUDED.entries,
        last_at = GREATEST(request_debits_daily.last_at, EXCLUDED.last_at)
)
SELECT COUNT(*) FROM new_usage
"""

_DELETE_ROLLED_UP = (
    "DELETE FROM usage_records WHERE request_id IN (SELECT r.request_id FROM usage_records r WHERE r.ts < $1"
    " AND EXISTS (SELECT 1 FROM usage_daily d WHERE d.account_id = COALESCE(r.account_id, '')"
    " AND d.day = (r.ts AT TIME ZONE 'UTC')::date AND d.model = COALESCE(r.model, '')"
    " AND d.key_id = COALESCE(r.key_id, '') AND d.status = r.status AND d.org_id = COALESCE(r.org_id, '')"
    " AND d.requests > 0) LIMIT $2 FOR UPDATE SKIP LOCKED)"
)
"""The roll-up job's batch: old rows whose day's totals are in usage_daily; SKIP LOCKED lets two
gateways' runs share the work instead of waiting on each other (each row is deleted once)."""

_APPLY_ENTRIES = f"""
WITH new_entries AS (
    INSERT INTO ledger_entries ({LEDGER_INSERT_COLUMNS})
    SELECT account_id, kind, amount_pico, source, external_id, request_id, description, $8
    FROM {_LEDGER_INPUT} ORDER BY source, external_id, n
    ON CONFLICT (source, external_id) DO NOTHING
    RETURNING id, account_id, amount_pico
), moved AS (
    {_move_balances("new_entries", "$8")}
)
SELECT id, account_id, amount_pico FROM new_entries ORDER BY id
"""

# What PostgreSQL adds to the shared statements: the written row comes back in the same round trip.
_INSERT_USER = f"{q.INSERT_USER.postgres} RETURNING {USER_COLUMNS}"
_INSERT_ORG = f"{q.INSERT_ORG.postgres} RETURNING {ORG_COLUMNS}"
_INSERT_MEMBER = f"{q.INSERT_MEMBER.postgres} RETURNING {MEMBERSHIP_COLUMNS}"
_SET_ROLE = f"{q.SET_ROLE.postgres} RETURNING {MEMBERSHIP_COLUMNS}"
_INSERT_API_KEY = f"{q.INSERT_API_KEY.postgres} RETURNING {API_KEY_COLUMNS}"
_INSERT_WEBHOOK_EVENT = f"{q.INSERT_WEBHOOK_EVENT.postgres} RETURNING true"

_GROUP_EXPRESSIONS = {
    "day": "to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    "model": "COALESCE(model, '')",
    "key": "COALESCE(key_id, '')",
}


def _columns(items: Sequence[Any], fields: Sequence[str]) -> list[list[Any]]:
    """Rows of dataclasses -> one list per field, the shape unnest takes."""
    return [[getattr(item, name) for item in items] for name in fields]


_ENTRY_FIELDS = ("account_id", "kind", "amount_pico", "source", "external_id", "request_id", "description")


class _AppliedBefore(Exception):
    """Inside a transaction: the entry was applied before, roll back what was written with it."""


class PostgresStore(SqlStore):
    dialect = "postgres"
    _decode = _decode
    _placeholder = "$"
    _group_expressions = _GROUP_EXPRESSIONS
    _cost_columns = "COALESCE(SUM(actual_cost_pico), 0) AS cost_pico"

    _daily_group_expressions = {"day": "to_char(day, 'YYYY-MM-DD')", "model": "model", "key": "key_id"}
    _daily_cost_columns = "COALESCE(SUM(cost_pico), 0) AS cost_pico"
    _amount_columns = "SUM(amount_pico) AS amount_pico"
    _day_of = "to_char({} AT TIME ZONE 'UTC', 'YYYY-MM-DD')"

    @staticmethod
    def _cost(row: asyncpg.Record) -> int:
        return int(row["cost_pico"])  # SUM(bigint) and SUM(numeric) are exact Decimals

    @staticmethod
    def _amount(row: asyncpg.Record) -> int:
        return int(row["amount_pico"])

    @staticmethod
    def _bind_day(day: date) -> date:
        return day

    def _usage_where(self, filters: list[Filter]) -> tuple[str, list[Any]]:
        # The account index holds hashtext(account_id) (4 bytes, not the id's 31): say it, then the id.
        where, params = self._where(filters)
        if filters and filters[0][0] == "account_id =":
            where = where.replace("WHERE account_id = $1", f"WHERE {_BY_ACCOUNT.format('$1')}", 1)
        return where, params

    async def debited_requests(self, account_id: str, ledger_id: int) -> list[tuple[str, int]]:
        with _translated():
            rows = await self._pool.fetch(_DEBITED_REQUESTS, account_id, ledger_id)
        return [(r["request_id"], int(r["actual_cost_pico"])) for r in rows]

    async def _row(self, query: Sql, *params: Any) -> asyncpg.Record | None:
        with _translated():
            return await self._pool.fetchrow(query.postgres, *params)

    async def _rows(self, query: Sql, *params: Any) -> list[asyncpg.Record]:
        with _translated():
            return await self._pool.fetch(query.postgres, *params)

    async def _select(self, sql: str, params: list[Any]) -> list[asyncpg.Record]:
        with _translated():
            return await self._pool.fetch(sql, *params)

    def __init__(self, pool: asyncpg.Pool, url: str) -> None:
        self._pool = pool
        self._url = url
        """For the change feed's own LISTEN connection."""

    @classmethod
    async def open(cls, url: str, *, min_size: int = 1, max_size: int = 10, **pool_options: Any) -> PostgresStore:
        with _translated():
            pool = await asyncpg.create_pool(
                url, min_size=min_size, max_size=max_size, init=_init_connection, **pool_options
            )
        return cls(pool, url)

    # --- schema and lifecycle ---------------------------------------------

    async def migrate(self) -> list[int]:
        migrations = load_migrations(self.dialect)
        applied: list[int] = []
        with _translated():
            async with self._pool.acquire() as conn:
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_ID)
                    await _ensure_schema(conn)
                    await conn.execute(
                        "CREATE TABLE IF NOT EXISTS schema_migrations ("
                        " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
                    )
                for migration in migrations:
                    async with conn.transaction():
                        # The lock is held to commit; re-reading the version under it
                        # makes a second instance skip what the first just applied.
                        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_ID)
                        current = await _version(conn)
                        refuse_newer(current, self.dialect)
                        if current >= migration.version:
                            continue
                        await conn.execute(migration.sql)
                        await conn.execute(q.RECORD_MIGRATION.postgres, migration.version, common.utcnow())
                    applied.append(migration.version)
        return applied

    async def schema_version(self) -> int:
        with _translated():
            async with self._pool.acquire() as conn:
                return await _version(conn)

    async def ping(self) -> None:
        with _translated():
            await self._pool.fetchval("SELECT 1")

    async def close(self) -> None:
        await self._pool.close()  # idempotent in asyncpg

    # --- users -------------------------------------------------------------

    async def create_user(
        self, *, external_id: str | None = None, email: str | None = None, name: str | None = None
    ) -> User:
        with _translated():
            row = await self._pool.fetchrow(
                _INSERT_USER, common.new_id("usr"), external_id, email, name, common.utcnow()
            )
        return _decode.user(row)

    async def anonymize_user(self, user_id: str, at: datetime | None = None) -> AnonymizedUser:
        when = common.aware_utc(at, "at") if at else common.utcnow()
        with _translated():
            async with self._pool.acquire() as conn, conn.transaction():
                if await conn.fetchval("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user_id) is None:
                    raise NotFound(f"user {user_id} does not exist")
                # Lock the user's organizations (in id order, like every owner change) so a concurrent
                # role change or removal cannot leave one without an owner.
                await conn.execute(
                    "SELECT 1 FROM organizations WHERE id IN (SELECT org_id FROM memberships WHERE user_id = $1)"
                    " ORDER BY id FOR UPDATE", user_id,
                )
                sole = [r["org_id"] for r in await conn.fetch(q.SOLE_OWNED_ORGS.postgres, user_id)]
                if sole:
                    raise common.last_owner_of(user_id, sole)
                key_rows = await conn.fetch(q.USER_KEYS.postgres, user_id)
                await conn.execute(q.REVOKE_USER_KEYS.postgres, when, user_id)
                renamed = _updated_count(
                    await conn.execute(q.RENAME_USER_KEYS.postgres, common.DELETED_KEY_NAME, user_id))
                left = [r["org_id"] for r in await conn.fetch(
                    "DELETE FROM memberships WHERE user_id = $1 RETURNING org_id", user_id)]
                cleared = _updated_count(await conn.execute(q.CLEAR_USER_IPS.postgres, user_id))
                changed = _updated_count(await conn.execute(q.ERASE_USER.postgres, when, user_id))
                row = await conn.fetchrow(q.GET_USER.postgres, user_id)
                await _record_changes(conn, [
                    *((API_KEY_CHANGE, r["id"], None, None) for r in key_rows if r["revoked_at"] is None),
                    *((ORG_CHANGE, org_id, None, None) for org_id in sorted(left))])
        revoked = tuple(r["id"] for r in key_rows if r["revoked_at"] is None)
        return AnonymizedUser(
            user=_decode.user(row), revoked_key_ids=revoked, key_ids=tuple(r["id"] for r in key_rows),
            left_org_ids=tuple(sorted(left)), cleared_ips=cleared,
            already_deleted=not (revoked or renamed or left or cleared or changed),
        )

    async def update_user(self, user_id: str, *, email: str | None, name: str | None) -> User:
        with _translated():
            async with self._pool.acquire() as conn, conn.transaction():
                if not _updated_count(await conn.execute(q.UPDATE_USER.postgres, email, name, user_id)):
                    raise NotFound(f"user {user_id} does not exist or is deleted")
                row = await conn.fetchrow(q.GET_USER.postgres, user_id)
        return _decode.user(row)

    async def set_user_suspended(self, user_id: str, suspended: bool, at: datetime | None = None) -> tuple[User, bool]:
        when = common.aware_utc(at, "at") if at else common.utcnow()
        with _translated():
            async with self._pool.acquire() as conn, conn.transaction():
                if await conn.fetchval("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user_id) is None:
                    raise NotFound(f"user {user_id} does not exist")
                status = (await conn.execute(q.SUSPEND_USER.postgres, when, user_id) if suspended
                          else await conn.execute(q.UNSUSPEND_USER.postgres, user_id))
                changed = bool(_updated_count(status))
                if changed:
                    keys = await conn.fetch(q.PERSONAL_KEYS.postgres, user_id)
                    await _record_changes(conn, [(API_KEY_CHANGE, r["id"], None, None) for r in keys])
                row = await conn.fetchrow(q.GET_USER.postgres, user_id)
        return _decode.user(row), changed

    # --- organizations -----------------------------------------------------

    async def create_org(self, name: str, owner_user_id: str) -> Organization:
        org_id, now = common.new_id("org"), common.utcnow()
        with _translated(missing=f"user {owner_user_id} does not exist"):
            async with self._pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(_INSERT_ORG, org_id, name, now)
                await conn.execute(q.INSERT_MEMBER.postgres, org_id, owner_user_id, "owner", now)
        return _decode.org(row)

    async def set_org_limits(self, org_id: str, limits: Mapping[str, Any] | None) -> Organization:
        with _translated():
            async with self._pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(
                    f"UPDATE organizations SET limits = $2 WHERE id = $1 RETURNING {ORG_COLUMNS}",
                    org_id, common.limits_for_storage(limits),
                )
                if row is not None:
                    await _record_changes(conn, [(ORG_CHANGE, org_id, None, None)])
        if row is None:
            raise NotFound(f"organization {org_id} does not exist")
        return _decode.org(row)

    # --- memberships -------------------------------------------------------

    async def add_member(self, org_id: str, user_id: str, role: str) -> Membership:
        common.check_role(role)
        with _translated(missing=f"organization {org_id} or user {user_id} does not exist"):
            row = await self._pool.fetchrow(_INSERT_MEMBER, org_id, user_id, role, common.utcnow())
        return _decode.membership(row)

    async def set_member_role(self, org_id: str, user_id: str, role: str) -> Membership:
        common.check_role(role)
        with _translated():
            async with self._pool.acquire() as conn, conn.transaction():
                await _lock_org(conn, org_id)
                current = await conn.fetchval(q.GET_ROLE.postgres, org_id, user_id)
                if current is None:
                    raise NotFound(f"user {user_id} is not a member of organization {org_id}")
                if current == "owner" and role != "owner" and await _owner_count(conn, org_id) <= 1:
                    raise common.last_owner(org_id, user_id)
                row = await conn.fetchrow(_SET_ROLE, role, org_id, user_id)
        return _decode.membership(row)

    async def remove_member(self, org_id: str, user_id: str) -> bool:
        with _translated():
            async with self._pool.acquire() as conn, conn.transaction():
                await _lock_org(conn, org_id)
                current = await conn.fetchval(q.GET_ROLE.postgres, org_id, user_id)
                if current is None:
                    return False
                if current == "owner" and await _owner_count(conn, org_id) <= 1:
                    raise common.last_owner(org_id, user_id)
                await conn.execute(q.DELETE_MEMBER.postgres, org_id, user_id)
                await _record_changes(conn, [(ORG_CHANGE, org_id, None, None)])
        return True

    # --- API keys ----------------------------------------------------------

    async def _insert_api_key(self, key: ApiKeyRow) -> ApiKeyRow:
        with _translated(missing="the key's user_id, org_id or created_by does not exist"):
            row = await self._pool.fetchrow(
                _INSERT_API_KEY,
                key.id, key.public_id, key.prefix, key.secret_hash, key.name, key.user_id, key.org_id, key.created_by,
                key.created_at, key.expires_at,
                None if key.allowed_models is None else list(key.allowed_models), key.limits,
            )
        return _decode.api_key(row)

    async def _stamp_once(self, table: str, column: str, row_id: str, at: datetime | None, what: str,
                          change: str | None = None) -> bool:
        when = common.aware_utc(at, "at") if at else common.utcnow()
        with _translated():
            async with self._pool.acquire() as conn, conn.transaction():
                stamped = await conn.fetchval(
                    f"UPDATE {table} SET {column} = $2 WHERE id = $1 AND {column} IS NULL RETURNING id", row_id, when
                )
                if stamped is None and await conn.fetchval(f"SELECT 1 FROM {table} WHERE id = $1", row_id) is None:
                    raise NotFound(f"{what} does not exist")
                if stamped is not None and change is not None:
                    await _record_changes(conn, [(change, row_id, None, None)])
        return stamped is not None

    async def touch_api_keys(self, last_used: Mapping[str, datetime]) -> int:
        if not last_used:
            return 0
        ids = list(last_used)
        stamps = [common.aware_utc(last_used[k], "last_used_at") for k in ids]
        with _translated():
            status = await self._pool.execute(
                "UPDATE api_keys AS k SET last_used_at = v.used_at"
                " FROM unnest($1::text[], $2::timestamptz[]) AS v(id, used_at)"
                " WHERE k.id = v.id AND (k.last_used_at IS NULL OR k.last_used_at < v.used_at)",
                ids, stamps,
            )
        return _updated_count(status)

    # --- usage -------------------------------------------------------------

    async def record_usage(self, rows: Sequence[UsageRecord]) -> int:
        checked = [common.check_usage_row(r) for r in rows]
        if not checked:
            return 0
        with _translated():
            # One statement, so one transaction: usage rows, their debits and the balances.
            columns = [list(column) for column in zip(*checked)]  # a record is its row: transpose for unnest
            return int(await self._pool.fetchval(_RECORD_USAGE, *columns, common.utcnow()))

    async def ledger_snapshot(self, account_id: str, *, since: datetime) -> tuple[int, int, list[LedgerDay]]:
        first = common.aware_utc(since, "since").date()
        with _translated():
            async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
                balance = await conn.fetchval(q.GET_BALANCE.postgres, account_id)
                head = await conn.fetchval(q.NEWEST_ENTRY.postgres, account_id)
                days = await conn.fetch(
                    "SELECT to_char(day, 'YYYY-MM-DD') AS day, last_at, amount_pico, entries FROM request_debits_daily"
                    " WHERE account_id = $1 AND day >= $2 ORDER BY day", account_id, first)
        return (balance or 0), (head or 0), [LedgerDay(d[0], d[1], int(d[2]), int(d[3])) for d in days]

    async def clear_client_ips(self, before: datetime) -> int:
        cutoff = common.aware_utc(before, "before")
        with _translated():
            status = await self._pool.execute(q.CLEAR_CLIENT_IPS.postgres, cutoff)
        return _updated_count(status)

    async def delete_rolled_up_usage(self, before: date, limit: int) -> int:
        cutoff = common.rollup_cutoff(before, limit)
        with _translated():
            status = await self._pool.execute(_DELETE_ROLLED_UP, cutoff, limit)
        return _updated_count(status)

    # --- money -------------------------------------------------------------

    async def apply_ledger_entry(self, entry: NewLedgerEntry) -> bool:
        common.check_ledger_entry(entry)
        with _translated():
            async with self._pool.acquire() as conn, conn.transaction():
                applied = await conn.fetch(_APPLY_ENTRIES, *_columns([entry], _ENTRY_FIELDS), common.utcnow())
                await _record_changes(conn, _credit_changes(applied))
        return len(applied) == 1

    async def apply_webhook(
        self, source: str, event_id: str, event_type: str, entries: Sequence[NewLedgerEntry]
    ) -> bool:
        checked = [common.check_ledger_entry(e) for e in entries]
        now = common.utcnow()
        with _translated():
            async with self._pool.acquire() as conn, conn.transaction():
                # A concurrent duplicate waits here on the primary key, then finds it taken.
                new = await conn.fetchval(_INSERT_WEBHOOK_EVENT, source, event_id, event_type, now)
                if new and checked:
                    applied = await conn.fetch(_APPLY_ENTRIES, *_columns(checked, _ENTRY_FIELDS), now)
                    await _record_changes(conn, _credit_changes(applied))
        return bool(new)

    async def apply_reversal(self, entry: NewLedgerEntry, payment_id: str, before: tuple[int, int],
                             after: tuple[int, int]) -> bool:
        common.check_ledger_entry(entry)
        now = common.utcnow()
        try:
            with _translated():
                async with self._pool.acquire() as conn, conn.transaction():
                    # The totals row first: a concurrent reversal of the same payment waits here.
                    moved = await conn.execute(q.SET_PAYMENT_REVERSED.postgres, entry.source, payment_id, *after, now,
                                               *before)
                    if moved.endswith(" 0"):
                        raise Conflict(f"payment {payment_id}: a concurrent reversal moved its total")
                    applied = await conn.fetch(_APPLY_ENTRIES, *_columns([entry], _ENTRY_FIELDS), now)
                    if not applied:
                        raise _AppliedBefore  # rolls the totals back
                    await _record_changes(conn, _credit_changes(applied))
        except _AppliedBefore:
            return False
        return True

    async def hold_payment(self, payment: UnappliedPayment) -> bool:
        with _translated():
            done = await self._pool.execute(q.INSERT_UNAPPLIED.postgres, payment.source, payment.payment_id,
                                            payment.account_hint, payment.amount_pico, payment.description,
                                            payment.reason, payment.received_at)
        return not done.endswith(" 0")

    async def apply_unapplied_payment(self, source: str, payment_id: str, entry: NewLedgerEntry) -> bool:
        common.check_ledger_entry(entry)
        now = common.utcnow()
        with _translated():
            async with self._pool.acquire() as conn, conn.transaction():
                marked = await conn.execute(q.MARK_UNAPPLIED_APPLIED.postgres, entry.account_id, now, source,
                                            payment_id)
                if marked.endswith(" 0"):
                    if await conn.fetchrow(q.GET_UNAPPLIED.postgres, source, payment_id) is None:
                        raise NotFound(f"no unapplied payment {payment_id}")
                    return False
                applied = await conn.fetch(_APPLY_ENTRIES, *_columns([entry], _ENTRY_FIELDS), now)
                if not applied:
                    raise Conflict(f"payment {payment_id} is in the ledger already")  # rolls back
                await _record_changes(conn, _credit_changes(applied))
        return True

    async def ledger_sum(self, account_id: str) -> int:
        with _translated():
            total = await self._pool.fetchval(q.LEDGER_SUM.postgres, account_id)
        return int(total)  # SUM(bigint) is numeric: an exact Decimal

    # --- change feed -------------------------------------------------------

    def change_feed(self) -> ChangeFeed:
        return PostgresChangeFeed(self, self._url)

    async def prune_changes(self, older_than: timedelta) -> int:
        with _translated():
            status = await self._pool.execute(
                "DELETE FROM store_changes WHERE created_at < now() - $1::interval"
                " AND id < (SELECT MAX(id) FROM store_changes)", older_than)
        return _updated_count(status)


class PostgresChangeFeed(ChangeFeed):
    """LISTENs on a connection of its own; each NOTIFY (sent at a change's commit) triggers a read.

    Every ``keepalive`` seconds without one it pings that connection and reads anyway. A lost
    connection is reopened with capped, jittered backoff; the read that follows delivers what was
    committed meanwhile, from the table.
    """

    def __init__(self, store: PostgresStore, url: str, *, keepalive: float = 5.0, connect_timeout: float = 5.0,
                 initial_backoff: float = 0.1, max_backoff: float = 5.0) -> None:
        super().__init__(store)
        self._url = url
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self._conn: asyncpg.Connection | None = None
        self._listening = False
        self._in_outage = False

    @property
    def connected(self) -> bool:
        return self._listening

    async def _watch(self) -> None:
        backoff = self.initial_backoff
        while True:
            try:
                await self._listen()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._listening:
                    backoff = self.initial_backoff  # we were up: retry fast
                if not self._in_outage:
                    self._in_outage = True
                    log.warning("the store change feed lost PostgreSQL (%s: %s); reconnecting in the background",
                                type(exc).__name__, exc)
                else:
                    log.debug("store change feed reconnect failed: %s: %s", type(exc).__name__, exc)
            finally:
                self._listening = False
                conn, self._conn = self._conn, None
                if conn is not None:
                    conn.terminate()
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, self.max_backoff)

    async def _listen(self) -> None:
        """Listen and read until the connection fails, then raise."""
        woken = asyncio.Event()
        self._conn = conn = await asyncpg.connect(self._url, timeout=self.connect_timeout)
        conn.add_termination_listener(lambda *_: woken.set())
        await conn.add_listener(CHANGE_CHANNEL, lambda *_: woken.set())
        await self.catch_up()  # what was committed while nobody listened
        self._listening = True
        if self._in_outage:
            self._in_outage = False
            log.info("the store change feed listens to PostgreSQL again; read what it missed")
        while True:
            try:
                await asyncio.wait_for(woken.wait(), self.keepalive)
            except asyncio.TimeoutError:
                # A half-open connection never errors: an answered query is how we know it is alive.
                await conn.fetchval("SELECT 1", timeout=self.connect_timeout)
            woken.clear()
            if conn.is_closed():
                raise ConnectionError("the LISTEN connection closed")
            await self.catch_up()
