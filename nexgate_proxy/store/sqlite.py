"""SQLite backend: stdlib sqlite3 on one dedicated worker thread.

Every public method runs one function on that thread, transaction included, so
a cancelled caller can never leave a transaction half open and the single
connection is never shared between threads. WAL lets readers in other processes
(the CLI, a second gateway) work while we write; busy_timeout makes writers
queue instead of failing.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from typing import Any, TypeVar

from . import _common as common
from . import _queries as q
from ._common import (
    LEDGER_INSERT_COLUMNS,
    USAGE_COLUMNS,
    USAGE_FIELDS,
    Filter,
    RowDecoder,
)
from ._migrations import load_migrations, refuse_newer
from ._queries import Sql
from ._sqlstore import SqlStore
from .feed import API_KEY_CHANGE, CREDIT_CHANGE, ORG_CHANGE, ChangeFeed
from .base import (
    MAX_PICO,
    MIN_PICO,
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

T = TypeVar("T")

log = logging.getLogger("nexgate.store.sqlite")

BUSY_TIMEOUT_MS = 5000
MEMORY = ":memory:"


def parse_sqlite_url(url: str) -> str:
    """`sqlite:///rel.db` -> "rel.db", `sqlite:////abs.db` -> "/abs.db", `sqlite://:memory:` -> ":memory:"."""
    scheme = "sqlite://"
    if not url.startswith(scheme):
        raise ValueError("a SQLite URL starts with sqlite://")
    rest = url[len(scheme) :]
    if rest in (MEMORY, "/" + MEMORY):
        return MEMORY
    if not rest.startswith("/") or rest == "/":
        raise ValueError("expected sqlite:///relative/path.db, sqlite:////absolute/path.db or sqlite://:memory:")
    if "?" in rest or "#" in rest:
        raise ValueError("SQLite URLs take no query parameters")
    return rest[1:]


# --- value encoding: fixed-width UTC text, so text order is time order ------


def _ts(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="microseconds")


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _usage_ts(value: datetime) -> int:
    """usage_records.ts: integer microseconds since the epoch (UTC), exact both ways."""
    return (value - _EPOCH) // _MICROSECOND


def _parse_usage_ts(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


def _opt_ts(value: datetime | None) -> str | None:
    return None if value is None else _ts(value)


def _parse_ts(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def _opt_json(value: Any) -> str | None:
    return None if value is None else common.dump_json(value)


_decode = RowDecoder(timestamp=_parse_ts, json_value=json.loads, usage_ts=_parse_usage_ts)


_USAGE_DAY = "strftime('%Y-%m-%d', {} / 1000000, 'unixepoch')"
"""The UTC date 'YYYY-MM-DD' of a usage_records.ts (integer microseconds)."""

_DELETE_ROLLED_UP = (
    "DELETE FROM usage_records WHERE request_id IN (SELECT r.request_id FROM usage_records r WHERE r.ts < ?"
    " AND EXISTS (SELECT 1 FROM usage_daily d WHERE d.account_id = COALESCE(r.account_id, '')"
    f" AND d.day = {_USAGE_DAY.format('r.ts')} AND d.model = COALESCE(r.model, '') AND d.key_id = COALESCE(r.key_id, '')"
    " AND d.status = r.status AND d.org_id = COALESCE(r.org_id, '') AND d.requests > 0) LIMIT ?)"
)
"""The roll-up job's batch: old rows whose day's totals are in usage_daily (usage_records_ts_idx)."""


def _usage_params(row: UsageRecord, debit_id: int | None, key_has: str | None) -> tuple[Any, ...]:
    # The record's fields are the columns, in order, in their stored form (see migration 0008). The
    # flags go as ints: sqlite3 adapts a bool (an int subclass) on a slow path that raises and
    # catches several AttributeErrors per value.
    return (row[0], _usage_ts(row[1]), common.stored_endpoint(row[2]), row[3], row[4],
            common.stored_upstream_model(row[3], row[5]), *row[6:9], common.stored_key_prefix(row[9], key_has),
            *row[10:13], int(row[13]), *row[14:19], int(row[19]), *row[20:], debit_id)


_INSERT_USAGE = (
    f"INSERT INTO usage_records ({USAGE_COLUMNS}, debit_id) VALUES ({', '.join('?' * (len(USAGE_FIELDS) + 1))})"
)

_ADD_USAGE_DAILY = (
    "INSERT INTO usage_daily (account_id, day, model, key_id, status, org_id, requests, prompt_tokens,"
    " completion_tokens, cached_tokens, cost_high, cost_low, latency_ms_sum, latency_ms_max)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (account_id, day, model, key_id, status, org_id) DO UPDATE SET"
    " requests = requests + excluded.requests, prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
    " completion_tokens = completion_tokens + excluded.completion_tokens,"
    " cached_tokens = cached_tokens + excluded.cached_tokens, cost_high = cost_high + excluded.cost_high,"
    " cost_low = cost_low + excluded.cost_low, latency_ms_sum = latency_ms_sum + excluded.latency_ms_sum,"
    " latency_ms_max = MAX(latency_ms_max, excluded.latency_ms_max)"
)


def _daily_cells(rows: Sequence[UsageRecord]) -> list[tuple[Any, ...]]:
    """The usage_daily additions of newly stored rows: one per (account, UTC day, model, key, status, org).

    Their ts is in UTC (check_usage_row), so its date is the UTC day; ~1 µs a row."""
    cells: dict[tuple[Any, ...], list[int]] = {}
    for r in rows:
        key = (r.account_id or "", r.ts.date(), r.model or "", r.key_id or "", r.status, r.org_id or "")
        cost = r.actual_cost_pico or 0
        cell = cells.get(key)
        if cell is None:
            cells[key] = [1, r.prompt_tokens, r.completion_tokens, r.cached_tokens, cost // _COST_SPLIT,
                          cost % _COST_SPLIT, r.latency_ms, r.latency_ms]
        else:
            cell[0] += 1
            cell[1] += r.prompt_tokens
            cell[2] += r.completion_tokens
            cell[3] += r.cached_tokens
            cell[4] += cost // _COST_SPLIT
            cell[5] += cost % _COST_SPLIT
            cell[6] += r.latency_ms
            if r.latency_ms > cell[7]:
                cell[7] = r.latency_ms
    return [(account, day.isoformat(), *rest, *cell) for (account, day, *rest), cell in cells.items()]


def _add_debit_days(conn: sqlite3.Connection, debits: Mapping[str, tuple[int, int]], created: str) -> None:
    """Add the batch's debits ({account: (amount, requests)}, all booked at ``created``) to
    request_debits_daily: one row per account; entries counts the requests."""
    # divmod: any split whose parts add up will do, only the sum is read
    conn.executemany(
        "INSERT INTO request_debits_daily (account_id, day, amount_high, amount_low, entries, last_at)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (account_id, day) DO UPDATE SET"
        " amount_high = amount_high + excluded.amount_high, amount_low = amount_low + excluded.amount_low,"
        " entries = entries + excluded.entries, last_at = MAX(last_at, excluded.last_at)",
        [(account_id, created[:10], *divmod(amount, _COST_SPLIT), requests, created)
         for account_id, (amount, requests) in debits.items()])


_COST_SPLIT = 10**6
"""SQLite's SUM fails past 2**63 pUSD, which a busy gateway's all-time cost per model
can reach: sum the millions and the remainders apart (costs are never negative), add in Python."""

_GROUP_EXPRESSIONS = {
    "day": _USAGE_DAY.format("ts"),
    "model": "COALESCE(model, '')",
    "key": "COALESCE(key_id, '')",
}


# --- worker-thread helpers -----------------------------------------------


@contextmanager
def _write_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE takes the write lock up front: no deadlocked read-to-write upgrade."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _split_statements(script: str) -> Iterator[str]:
    """Split a migration into statements; sqlite3.complete_statement knows about triggers and quotes."""
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            yield buffer.strip()
            buffer = ""
    leftover = [ln for ln in buffer.splitlines() if ln.strip() and not ln.strip().startswith("--")]
    if leftover:
        raise SchemaError(f"migration ends with an incomplete statement: {leftover[0]!r}")


def _translate(exc: sqlite3.Error, missing: str | None) -> StoreError:
    message = str(exc)
    if isinstance(exc, sqlite3.IntegrityError):
        if message.startswith("UNIQUE constraint failed: "):
            # "memberships.org_id, memberships.user_id" -> "memberships.org_id,user_id"
            columns = [c.strip() for c in message.split(": ", 1)[1].split(",")]
            table = columns[0].split(".", 1)[0]
            key = table + "." + ",".join(c.split(".", 1)[-1] for c in columns)
            return Conflict(common.conflict_message(key))
        if message.startswith("FOREIGN KEY constraint failed"):
            return NotFound(missing or "a referenced row does not exist")
    if isinstance(exc, sqlite3.OperationalError) and "no such table" in message:
        return SchemaError(f"{message}: run `nexgate db migrate`")
    return StoreError(f"sqlite: {message}")


def _version(conn: sqlite3.Connection) -> int:
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
    ).fetchone()
    if exists is None:
        return 0
    return int(conn.execute(q.SCHEMA_VERSION.sqlite).fetchone()[0])


def _new_usage_rows(conn: sqlite3.Connection, rows: Sequence[UsageRecord]) -> list[UsageRecord]:
    """The rows whose request id is not stored yet (first of each id): a replay books nothing twice.

    Asked in batches inside the write transaction, so nothing can slip in between; the
    inserts then go in one executemany instead of one statement per row.
    """
    by_id: dict[str, UsageRecord] = {}
    for row in rows:
        by_id.setdefault(row.request_id, row)
    ids = list(by_id)
    for start in range(0, len(ids), _IDS_PER_QUERY):
        chunk = ids[start:start + _IDS_PER_QUERY]
        marks = ", ".join("?" * len(chunk))
        for (stored,) in conn.execute(f"SELECT request_id FROM usage_records WHERE request_id IN ({marks})", chunk):
            del by_id[stored]
    return list(by_id.values())


_IDS_PER_QUERY = 500


_INSERT_LEDGER = (
    f"INSERT INTO ledger_entries ({LEDGER_INSERT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (source, external_id) DO NOTHING"
)
_GET_BALANCE = q.GET_BALANCE.sqlite  # read once per account of every usage batch: a plain global
_NEWEST_ENTRY = q.NEWEST_ENTRY.sqlite


def _insert_ledger_entries(conn: sqlite3.Connection, entries: Sequence[NewLedgerEntry], created: str) -> int:
    """Append the entries not applied before and move their accounts' balances (inside a transaction).

    Each appended entry records a credit change (these are never a request's own debits). Returns
    how many were appended.
    """
    fresh = _insert_ledger_params(conn, [
        (e.account_id, e.kind, e.amount_pico, e.source, e.external_id, e.request_id, e.description, created)
        for e in entries])
    for account_id, _, amount, source, external_id, *_rest in fresh:
        ledger_id = conn.execute("SELECT id FROM ledger_entries WHERE source = ? AND external_id = ?",
                                 (source, external_id)).fetchone()[0]
        _record_change(conn, CREDIT_CHANGE, account_id, created, amount, ledger_id)
    return len(fresh)


def _record_change(conn: sqlite3.Connection, kind: str, subject: str, created: str,
                   amount_pico: int | None = None, ledger_id: int | None = None) -> None:
    """Inside the change's own transaction: running gateways learn of it from the feed."""
    conn.execute("INSERT INTO store_changes (kind, subject, amount_pico, ledger_id, created_at)"
                 " VALUES (?, ?, ?, ?, ?)", (kind, subject, amount_pico, ledger_id, created))


def _insert_usage_and_debits(conn: sqlite3.Connection, new: Sequence[UsageRecord], created: str) -> None:
    """Store the new rows and book one debit per account for the cost of its rows (inside the transaction).

    A debit's external_id is the first of its rows' request ids (new rows: never booked before), its
    description counts them, and every row it charges names it in debit_id. A conflict (that id
    booked by hand) fails the batch rather than store rows nobody paid for.
    """
    booked = _debits_booked_before(conn, [r.request_id for r in new if r.actual_cost_pico])
    charged: dict[str, list[UsageRecord]] = {}
    for row in new:
        if row.account_id is not None and row.actual_cost_pico and row.request_id not in booked:
            charged.setdefault(row.account_id, []).append(row)
    debit_ids: dict[str, int] = {}
    totals: dict[str, tuple[int, int]] = {}
    for account_id in sorted(charged):
        rows = charged[account_id]
        amount = -sum(r.actual_cost_pico for r in rows)  # type: ignore[misc]
        first = min(r.request_id for r in rows)
        if not MIN_PICO <= amount:
            raise StoreError(common.OUT_OF_RANGE)
        debit_ids[account_id] = conn.execute(_INSERT_DEBIT, (
            account_id, amount, first, first, common.debit_description(len(rows)), created)).lastrowid
        totals[account_id] = (amount, len(rows))
    prefixes = _key_prefixes(conn, {r.key_id for r in new if r.key_id is not None})
    conn.executemany(_INSERT_USAGE, [
        _usage_params(r, booked.get(r.request_id) or (debit_ids.get(r.account_id)  # type: ignore[arg-type]
                                                      if r.actual_cost_pico else None), prefixes.get(r.key_id))
        for r in new])
    _add_to_balances(conn, {account: amount for account, (amount, _) in totals.items()}, created)
    _add_debit_days(conn, totals, created)


def _key_prefixes(conn: sqlite3.Connection, key_ids: set[str]) -> dict[str, str]:
    """{key id: prefix} of the batch's keys (a few): a row stores NULL for its key's prefix."""
    ids = sorted(key_ids)
    found: dict[str, str] = {}
    for start in range(0, len(ids), _IDS_PER_QUERY):
        chunk = ids[start:start + _IDS_PER_QUERY]
        found.update(conn.execute(f"SELECT id, prefix FROM api_keys WHERE id IN ({', '.join('?' * len(chunk))})",
                                  chunk).fetchall())
    return found


def _debits_booked_before(conn: sqlite3.Connection, request_ids: Sequence[str]) -> dict[str, int]:
    """{request id: ledger id} of the per-request debits (before migration 0008, or by hand) of these ids:
    a row whose cost is in the ledger already is not charged again."""
    booked: dict[str, int] = {}
    for start in range(0, len(request_ids), _IDS_PER_QUERY):
        chunk = request_ids[start:start + _IDS_PER_QUERY]
        marks = ", ".join("?" * len(chunk))
        booked.update(conn.execute(f"SELECT external_id, id FROM ledger_entries WHERE source = '{common.REQUEST_SOURCE}'"
                                   f" AND external_id IN ({marks})", chunk).fetchall())
    return booked


_INSERT_DEBIT = (f"INSERT INTO ledger_entries ({LEDGER_INSERT_COLUMNS})"
                 f" VALUES (?, 'debit', ?, '{common.REQUEST_SOURCE}', ?, ?, ?, ?)")


def _insert_ledger_params(conn: sqlite3.Connection, params: Sequence[tuple[Any, ...]]) -> Sequence[tuple[Any, ...]]:
    """Insert ledger rows, skipping those applied before, and move the balances; return the new ones.

    The usual case (every row is new) is one executemany; when
    some were applied before, that is undone and each row is inserted on its own to learn which.
    """
    if not params:
        return ()
    conn.execute("SAVEPOINT ledger_batch")
    before = conn.total_changes
    conn.executemany(_INSERT_LEDGER, params)
    if conn.total_changes - before == len(params):
        conn.execute("RELEASE ledger_batch")
        fresh = params
    else:
        conn.execute("ROLLBACK TO ledger_batch")
        conn.execute("RELEASE ledger_batch")
        fresh = [p for p in params if conn.execute(_INSERT_LEDGER, p).rowcount]
    changes: dict[str, int] = {}
    for account_id, _, amount, *_rest in fresh:
        changes[account_id] = changes.get(account_id, 0) + amount
    _add_to_balances(conn, changes, params[0][-1])
    return fresh


def _add_to_balances(conn: sqlite3.Connection, changes: Mapping[str, int], updated: str) -> None:
    """Add in Python, not SQL: SQLite turns an overflowing integer sum into an inexact REAL.

    The net change must fit a BIGINT too, as PostgreSQL needs it to.
    """
    for account_id, change in sorted(changes.items()):
        row = conn.execute(_GET_BALANCE, (account_id,)).fetchone()
        balance = (0 if row is None else row[0]) + change
        if not (MIN_PICO <= change <= MAX_PICO and MIN_PICO <= balance <= MAX_PICO):
            raise StoreError(common.OUT_OF_RANGE)
        conn.execute(
            "INSERT INTO balances (account_id, balance_pico, updated_at) VALUES (?, ?, ?)"
            " ON CONFLICT (account_id) DO UPDATE SET balance_pico = excluded.balance_pico,"
            " updated_at = excluded.updated_at",
            (account_id, balance, updated),
        )


def _ledger_sum(conn: sqlite3.Connection, account_id: str) -> int:
    try:
        row = conn.execute(q.LEDGER_SUM.sqlite, (account_id,)).fetchone()
        return int(row[0])
    except sqlite3.OperationalError as exc:
        # SQLite's SUM fails when a running total passes ±2**63 on the way, even if
        # the result fits (a big credit then a big debit): add in Python instead.
        if "integer overflow" not in str(exc):
            raise
        rows = conn.execute("SELECT amount_pico FROM ledger_entries WHERE account_id = ?", (account_id,))
        return sum(r[0] for r in rows)


def _erase_wal(conn: sqlite3.Connection) -> None:
    """After erasing personal data: copy the WAL into the file and truncate it, so the old values are in
    neither (secure_delete zeroed them in the pages). Readers still on an older snapshot (another
    process) can keep it from completing; the next erasure or SQLite's own checkpoint finishes it."""
    busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    if busy is not None and busy[0]:
        log.warning("could not checkpoint the SQLite WAL after erasing personal data (a reader holds it); "
                    "it is retried at the next erasure")


def _owner_count(conn: sqlite3.Connection, org_id: str) -> int:
    return int(conn.execute(q.OWNER_COUNT.sqlite, (org_id,)).fetchone()[0])


class SQLiteStore(SqlStore):
    dialect = "sqlite"
    _decode = _decode
    _placeholder = "?"
    _group_expressions = _GROUP_EXPRESSIONS
    _cost_columns = (f"COALESCE(SUM(actual_cost_pico / {_COST_SPLIT}), 0) AS cost_high,"
                     f" COALESCE(SUM(actual_cost_pico % {_COST_SPLIT}), 0) AS cost_low")

    _daily_group_expressions = {"day": "day", "model": "model", "key": "key_id"}
    _daily_cost_columns = "COALESCE(SUM(cost_high), 0) AS cost_high, COALESCE(SUM(cost_low), 0) AS cost_low"
    # amounts are signed: SQLite's / truncates and % keeps the sign, so high * split + low is still the amount
    _amount_columns = (f"SUM(amount_pico / {_COST_SPLIT}) AS amount_high,"
                       f" SUM(amount_pico % {_COST_SPLIT}) AS amount_low")
    _day_of = "substr({}, 1, 10)"

    @staticmethod
    def _cost(row: sqlite3.Row) -> int:
        return row["cost_high"] * _COST_SPLIT + row["cost_low"]

    @staticmethod
    def _amount(row: sqlite3.Row) -> int:
        return row["amount_high"] * _COST_SPLIT + row["amount_low"]

    @staticmethod
    def _bind_day(day: date) -> str:
        return day.isoformat()

    @staticmethod
    def _bind(value: Any) -> Any:
        return _ts(value) if isinstance(value, datetime) else value  # datetimes as stored text

    def _usage_where(self, filters: list[Filter]) -> tuple[str, list[Any]]:
        # usage_records.ts is integer microseconds (every other timestamp is text)
        where, params = self._where(filters)
        return where, [_usage_ts(value) if condition.startswith("ts ") else param
                       for (condition, value), param in zip(filters, params)]

    async def _row(self, query: Sql, *params: Any) -> sqlite3.Row | None:
        return await self._run(self._fetch_one, query.sqlite, params)

    async def _rows(self, query: Sql, *params: Any) -> list[sqlite3.Row]:
        return await self._run(self._fetch_all, query.sqlite, params)

    async def _select(self, sql: str, params: list[Any]) -> list[sqlite3.Row]:
        return await self._run(self._fetch_all, sql, tuple(params))

    def __init__(self, path: str, *, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
        self.path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nexgate-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._closed = False

    @classmethod
    async def open(cls, url: str, *, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> SQLiteStore:
        store = cls(parse_sqlite_url(url), busy_timeout_ms=busy_timeout_ms)
        try:
            await store._run(store._connect)
        except BaseException:
            await store.close()
            raise
        return store

    def _connect(self, _conn: None) -> None:
        if self.path != MEMORY:
            parent = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(parent, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, sqlite3 adds none of its own.
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=self._busy_timeout_ms / 1000)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
        conn.execute("PRAGMA foreign_keys = ON")
        # Deleted or overwritten content is zeroed, not left in free pages: an erased email is gone
        # from the file once the WAL is checkpointed (see _erase_wal).
        conn.execute("PRAGMA secure_delete = ON")
        if self.path != MEMORY:
            self._enable_wal(conn)
            conn.execute("PRAGMA synchronous = NORMAL")  # durable enough with WAL, much faster
        self._conn = conn

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        # Switching to WAL can answer "database is locked" at once, without the busy handler, while
        # another process opens the same new file (several workers starting together): retry.
        deadline = time.monotonic() + self._busy_timeout_ms / 1000
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)

    async def _run(self, fn: Callable[..., T], *args: Any, missing: str | None = None) -> T:
        if self._closed:
            raise StoreError("the store is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(self._call, fn, args, missing))

    def _call(self, fn: Callable[..., T], args: tuple[Any, ...], missing: str | None) -> T:
        """On the worker thread: run `fn(conn, *args)` and turn sqlite3 errors into store errors."""
        if self._conn is None and fn != self._connect:  # work queued behind close()
            raise StoreError("the store is closed")
        try:
            return fn(self._conn, *args)
        except sqlite3.Error as exc:
            raise _translate(exc, missing) from exc

    # --- schema and lifecycle ---------------------------------------------

    async def migrate(self) -> list[int]:
        migrations = load_migrations(self.dialect)

        def work(conn: sqlite3.Connection) -> list[int]:
            with _write_transaction(conn):
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
                )
            applied: list[int] = []
            for migration in migrations:
                # Re-read the version under the write lock: another process may have migrated meanwhile.
                with _write_transaction(conn):
                    current = _version(conn)
                    refuse_newer(current, self.dialect)
                    if current >= migration.version:
                        continue
                    for statement in _split_statements(migration.sql):
                        conn.execute(statement)
                    conn.execute(q.RECORD_MIGRATION.sqlite, (migration.version, _ts(common.utcnow())))
                applied.append(migration.version)
            return applied

        return await self._run(work)

    async def schema_version(self) -> int:
        return await self._run(_version)

    async def ping(self) -> None:
        await self._run(lambda conn: conn.execute("SELECT 1").fetchone())

    async def close(self) -> None:
        if self._closed:
            return
        if self._conn is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, self._conn.close)
            self._conn = None
        self._closed = True
        self._executor.shutdown(wait=False)

    # --- users -------------------------------------------------------------

    async def create_user(
        self, *, external_id: str | None = None, email: str | None = None, name: str | None = None
    ) -> User:
        user = User(
            id=common.new_id("usr"), external_id=external_id, email=email, name=name, created_at=common.utcnow()
        )

        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                q.INSERT_USER.sqlite, (user.id, user.external_id, user.email, user.name, _ts(user.created_at))
            )

        await self._run(work)
        return user

    async def anonymize_user(self, user_id: str, at: datetime | None = None) -> AnonymizedUser:
        when = _ts(common.aware_utc(at, "at") if at else common.utcnow())

        def work(conn: sqlite3.Connection) -> AnonymizedUser:
            with _write_transaction(conn):
                if conn.execute("SELECT 1 FROM users WHERE id = ?", (user_id,)).fetchone() is None:
                    raise NotFound(f"user {user_id} does not exist")
                sole = [r[0] for r in conn.execute(q.SOLE_OWNED_ORGS.sqlite, (user_id,))]
                if sole:
                    raise common.last_owner_of(user_id, sole)
                key_rows = conn.execute(q.USER_KEYS.sqlite, (user_id,)).fetchall()
                conn.execute(q.REVOKE_USER_KEYS.sqlite, (when, user_id))
                for row in key_rows:
                    if row["revoked_at"] is None:
                        _record_change(conn, API_KEY_CHANGE, row["id"], when)
                renamed = conn.execute(q.RENAME_USER_KEYS.sqlite, (common.DELETED_KEY_NAME, user_id)).rowcount
                left = [r[0] for r in conn.execute(
                    "SELECT org_id FROM memberships WHERE user_id = ? ORDER BY org_id", (user_id,))]
                conn.execute("DELETE FROM memberships WHERE user_id = ?", (user_id,))
                for org_id in left:
                    _record_change(conn, ORG_CHANGE, org_id, when)
                cleared = conn.execute(q.CLEAR_USER_IPS.sqlite, (user_id,)).rowcount
                changed = conn.execute(q.ERASE_USER.sqlite, (when, user_id)).rowcount
                user = _decode.user(conn.execute(q.GET_USER.sqlite, (user_id,)).fetchone())
            _erase_wal(conn)
            revoked = tuple(r["id"] for r in key_rows if r["revoked_at"] is None)
            return AnonymizedUser(
                user=user, revoked_key_ids=revoked, key_ids=tuple(r["id"] for r in key_rows),
                left_org_ids=tuple(left), cleared_ips=cleared,
                already_deleted=not (revoked or renamed or left or cleared or changed),
            )

        return await self._run(work)

    async def update_user(self, user_id: str, *, email: str | None, name: str | None) -> User:
        def work(conn: sqlite3.Connection) -> User:
            with _write_transaction(conn):
                if not conn.execute(q.UPDATE_USER.sqlite, (email, name, user_id)).rowcount:
                    raise NotFound(f"user {user_id} does not exist or is deleted")
                user = _decode.user(conn.execute(q.GET_USER.sqlite, (user_id,)).fetchone())
            _erase_wal(conn)  # the old values leave the WAL too
            return user

        return await self._run(work)

    async def set_user_suspended(self, user_id: str, suspended: bool, at: datetime | None = None) -> tuple[User, bool]:
        when = _ts(common.aware_utc(at, "at") if at else common.utcnow())

        def work(conn: sqlite3.Connection) -> tuple[User, bool]:
            with _write_transaction(conn):
                row = conn.execute(q.GET_USER.sqlite, (user_id,)).fetchone()
                if row is None:
                    raise NotFound(f"user {user_id} does not exist")
                cursor = (conn.execute(q.SUSPEND_USER.sqlite, (when, user_id)) if suspended
                          else conn.execute(q.UNSUSPEND_USER.sqlite, (user_id,)))
                changed = cursor.rowcount > 0
                if changed:
                    for key in conn.execute(q.PERSONAL_KEYS.sqlite, (user_id,)).fetchall():
                        _record_change(conn, API_KEY_CHANGE, key["id"], when)
                user = _decode.user(conn.execute(q.GET_USER.sqlite, (user_id,)).fetchone())
            return user, changed

        return await self._run(work)

    # --- organizations -----------------------------------------------------

    async def create_org(self, name: str, owner_user_id: str) -> Organization:
        org = Organization(id=common.new_id("org"), name=name, created_at=common.utcnow())
        created = _ts(org.created_at)

        def work(conn: sqlite3.Connection) -> None:
            with _write_transaction(conn):
                conn.execute(q.INSERT_ORG.sqlite, (org.id, name, created))
                conn.execute(q.INSERT_MEMBER.sqlite, (org.id, owner_user_id, "owner", created))

        await self._run(work, missing=f"user {owner_user_id} does not exist")
        return org

    async def set_org_limits(self, org_id: str, limits: Mapping[str, Any] | None) -> Organization:
        stored = _opt_json(common.limits_for_storage(limits))

        def work(conn: sqlite3.Connection) -> sqlite3.Row:
            with _write_transaction(conn):
                if conn.execute("UPDATE organizations SET limits = ? WHERE id = ?", (stored, org_id)).rowcount == 0:
                    raise NotFound(f"organization {org_id} does not exist")
                _record_change(conn, ORG_CHANGE, org_id, _ts(common.utcnow()))
                return conn.execute(q.GET_ORG.sqlite, (org_id,)).fetchone()

        return _decode.org(await self._run(work))

    # --- memberships -------------------------------------------------------

    async def add_member(self, org_id: str, user_id: str, role: str) -> Membership:
        membership = Membership(
            org_id=org_id, user_id=user_id, role=common.check_role(role), created_at=common.utcnow()
        )

        def work(conn: sqlite3.Connection) -> None:
            conn.execute(q.INSERT_MEMBER.sqlite, (org_id, user_id, role, _ts(membership.created_at)))

        await self._run(work, missing=f"organization {org_id} or user {user_id} does not exist")
        return membership

    async def set_member_role(self, org_id: str, user_id: str, role: str) -> Membership:
        common.check_role(role)

        def work(conn: sqlite3.Connection) -> Membership:
            with _write_transaction(conn):
                current = self._membership(conn, org_id, user_id)
                if current is None:
                    raise NotFound(f"user {user_id} is not a member of organization {org_id}")
                if current.role == "owner" and role != "owner" and _owner_count(conn, org_id) <= 1:
                    raise common.last_owner(org_id, user_id)
                conn.execute(q.SET_ROLE.sqlite, (role, org_id, user_id))
            return Membership(org_id=org_id, user_id=user_id, role=role, created_at=current.created_at)

        return await self._run(work)

    async def remove_member(self, org_id: str, user_id: str) -> bool:
        def work(conn: sqlite3.Connection) -> bool:
            with _write_transaction(conn):
                current = self._membership(conn, org_id, user_id)
                if current is None:
                    return False
                if current.role == "owner" and _owner_count(conn, org_id) <= 1:
                    raise common.last_owner(org_id, user_id)
                conn.execute(q.DELETE_MEMBER.sqlite, (org_id, user_id))
                _record_change(conn, ORG_CHANGE, org_id, _ts(common.utcnow()))
            return True

        return await self._run(work)

    # --- API keys ----------------------------------------------------------

    async def _insert_api_key(self, key: ApiKeyRow) -> ApiKeyRow:
        models = None if key.allowed_models is None else list(key.allowed_models)

        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                q.INSERT_API_KEY.sqlite,
                (
                    key.id, key.public_id, key.prefix, key.secret_hash, key.name, key.user_id, key.org_id,
                    key.created_by, _ts(key.created_at), _opt_ts(key.expires_at), _opt_json(models),
                    _opt_json(key.limits),
                ),
            )

        await self._run(work, missing="the key's user_id, org_id or created_by does not exist")
        return key

    async def _stamp_once(self, table: str, column: str, row_id: str, at: datetime | None, what: str,
                          change: str | None = None) -> bool:
        when = _ts(common.aware_utc(at, "at") if at else common.utcnow())

        def work(conn: sqlite3.Connection) -> bool:
            with _write_transaction(conn):
                changed = conn.execute(
                    f"UPDATE {table} SET {column} = ? WHERE id = ? AND {column} IS NULL", (when, row_id)
                ).rowcount
                if changed == 0 and conn.execute(f"SELECT 1 FROM {table} WHERE id = ?", (row_id,)).fetchone() is None:
                    raise NotFound(f"{what} does not exist")
                if changed and change is not None:
                    _record_change(conn, change, row_id, when)
            return changed == 1

        return await self._run(work)

    async def touch_api_keys(self, last_used: Mapping[str, datetime]) -> int:
        if not last_used:
            return 0
        params = []
        for key_id, when in last_used.items():
            stamp = _ts(common.aware_utc(when, "last_used_at"))
            params.append((stamp, key_id, stamp))

        def work(conn: sqlite3.Connection) -> int:
            with _write_transaction(conn):
                cursor = conn.executemany(
                    "UPDATE api_keys SET last_used_at = ?"
                    " WHERE id = ? AND (last_used_at IS NULL OR last_used_at < ?)",
                    params,
                )
            return cursor.rowcount

        return await self._run(work)

    # --- usage -------------------------------------------------------------

    async def record_usage(self, rows: Sequence[UsageRecord]) -> int:
        checked = [common.check_usage_row(r) for r in rows]
        if not checked:
            return 0
        now = _ts(common.utcnow())

        def work(conn: sqlite3.Connection) -> int:
            with _write_transaction(conn):
                new = _new_usage_rows(conn, checked)
                _insert_usage_and_debits(conn, new, now)
                conn.executemany(_ADD_USAGE_DAILY, _daily_cells(new))
            return len(new)

        return await self._run(work)

    async def ledger_snapshot(self, account_id: str, *, since: datetime) -> tuple[int, int, list[LedgerDay]]:
        first = common.aware_utc(since, "since").date().isoformat()

        def work(conn: sqlite3.Connection) -> tuple[int, int, list[LedgerDay]]:
            conn.execute("BEGIN")  # one read transaction: one snapshot of the three
            try:
                balance = conn.execute(_GET_BALANCE, (account_id,)).fetchone()
                head = conn.execute(_NEWEST_ENTRY, (account_id,)).fetchone()
                days = conn.execute(
                    "SELECT day, last_at, amount_high, amount_low, entries FROM request_debits_daily"
                    " WHERE account_id = ? AND day >= ? ORDER BY day", (account_id, first)).fetchall()
            finally:
                conn.execute("COMMIT")
            return ((0 if balance is None else balance[0]), (0 if head is None else head[0]),
                    [LedgerDay(d[0], _parse_ts(d[1]), d[2] * _COST_SPLIT + d[3], d[4]) for d in days])

        return await self._run(work)

    async def clear_client_ips(self, before: datetime) -> int:
        cutoff = _usage_ts(common.aware_utc(before, "before"))

        def work(conn: sqlite3.Connection) -> int:
            with _write_transaction(conn):
                return conn.execute(q.CLEAR_CLIENT_IPS.sqlite, (cutoff,)).rowcount

        return await self._run(work)

    async def delete_rolled_up_usage(self, before: date, limit: int) -> int:
        cutoff = _usage_ts(common.rollup_cutoff(before, limit))

        def work(conn: sqlite3.Connection) -> int:
            with _write_transaction(conn):
                return conn.execute(_DELETE_ROLLED_UP, (cutoff, limit)).rowcount

        return await self._run(work)

    # --- money -------------------------------------------------------------

    async def apply_ledger_entry(self, entry: NewLedgerEntry) -> bool:
        common.check_ledger_entry(entry)
        now = _ts(common.utcnow())

        def work(conn: sqlite3.Connection) -> bool:
            with _write_transaction(conn):
                return _insert_ledger_entries(conn, [entry], now) == 1

        return await self._run(work)

    async def apply_webhook(
        self, source: str, event_id: str, event_type: str, entries: Sequence[NewLedgerEntry]
    ) -> bool:
        checked = [common.check_ledger_entry(e) for e in entries]
        now = _ts(common.utcnow())

        def work(conn: sqlite3.Connection) -> bool:
            with _write_transaction(conn):
                new = conn.execute(q.INSERT_WEBHOOK_EVENT.sqlite, (source, event_id, event_type, now)).rowcount
                if new:
                    _insert_ledger_entries(conn, checked, now)
            return bool(new)

        return await self._run(work)

    async def ledger_sum(self, account_id: str) -> int:
        return await self._run(_ledger_sum, account_id)

    async def apply_reversal(self, entry: NewLedgerEntry, payment_id: str, before: tuple[int, int],
                             after: tuple[int, int]) -> bool:
        common.check_ledger_entry(entry)
        now = _ts(common.utcnow())

        def work(conn: sqlite3.Connection) -> bool:
            with _write_transaction(conn):
                if not _insert_ledger_entries(conn, [entry], now):
                    return False
                if not conn.execute(q.SET_PAYMENT_REVERSED.sqlite,
                                    (entry.source, payment_id, *after, now, *before)).rowcount:
                    raise Conflict(f"payment {payment_id}: a concurrent reversal moved its total")  # rolls back
                return True

        return await self._run(work)

    async def hold_payment(self, payment: UnappliedPayment) -> bool:
        def work(conn: sqlite3.Connection) -> bool:
            with _write_transaction(conn):
                return bool(conn.execute(q.INSERT_UNAPPLIED.sqlite, (
                    payment.source, payment.payment_id, payment.account_hint, payment.amount_pico,
                    payment.description, payment.reason, _ts(payment.received_at))).rowcount)

        return await self._run(work)

    async def apply_unapplied_payment(self, source: str, payment_id: str, entry: NewLedgerEntry) -> bool:
        common.check_ledger_entry(entry)
        now = _ts(common.utcnow())

        def work(conn: sqlite3.Connection) -> bool:
            with _write_transaction(conn):
                if not conn.execute(q.MARK_UNAPPLIED_APPLIED.sqlite, (entry.account_id, now, source,
                                                                       payment_id)).rowcount:
                    if conn.execute(q.GET_UNAPPLIED.sqlite, (source, payment_id)).fetchone() is None:
                        raise NotFound(f"no unapplied payment {payment_id}")
                    return False
                if not _insert_ledger_entries(conn, [entry], now):
                    raise Conflict(f"payment {payment_id} is in the ledger already")  # rolls back
                return True

        return await self._run(work)

    # --- change feed -------------------------------------------------------

    def change_feed(self) -> ChangeFeed:
        return SQLiteChangeFeed(self)

    async def prune_changes(self, older_than: timedelta) -> int:
        cutoff = _ts(common.utcnow() - older_than)

        def work(conn: sqlite3.Connection) -> int:
            with _write_transaction(conn):
                return conn.execute(
                    "DELETE FROM store_changes WHERE created_at < ?"
                    " AND id < (SELECT MAX(id) FROM store_changes)", (cutoff,)).rowcount

        return await self._run(work)

    # --- worker-thread queries ---------------------------------------------

    @staticmethod
    def _fetch_one(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> sqlite3.Row | None:
        return conn.execute(sql, params).fetchone()

    @staticmethod
    def _fetch_all(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> list[sqlite3.Row]:
        return conn.execute(sql, params).fetchall()

    @staticmethod
    def _membership(conn: sqlite3.Connection, org_id: str, user_id: str) -> Membership | None:
        row = conn.execute(q.GET_MEMBERSHIP.sqlite, (org_id, user_id)).fetchone()
        return None if row is None else _decode.membership(row)


class SQLiteChangeFeed(ChangeFeed):
    """Polls ``PRAGMA data_version`` on a connection of its own: it changes when another connection commits.

    That is one cheap call every ``poll_interval`` on the feed's own thread; the change table is only
    read when something was committed. (An in-memory database has no other connection: it reads
    the table every time.)
    """

    def __init__(self, store: SQLiteStore, poll_interval: float = 0.2) -> None:
        super().__init__(store)
        self.path = store.path
        self.poll_interval = poll_interval
        self._conn: sqlite3.Connection | None = None

    def _data_version(self) -> int | None:
        if self.path == MEMORY:
            return None
        if self._conn is None:
            self._conn = sqlite3.connect(self.path, isolation_level=None, timeout=1.0)
        return int(self._conn.execute("PRAGMA data_version").fetchone()[0])

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nexgate-sqlite-feed")
        seen: int | None = None
        failing = False
        try:
            while True:
                try:
                    version = await loop.run_in_executor(executor, self._data_version)
                    if version is None or version != seen:
                        await self.catch_up()
                        seen = version
                    if failing:
                        failing = False
                        log.info("the store change feed reads the database again")
                except (sqlite3.Error, StoreError) as exc:
                    if not failing:
                        failing = True
                        log.warning("the store change feed cannot read the database (%s); retrying", exc)
                    await loop.run_in_executor(executor, self._disconnect)
                await asyncio.sleep(self.poll_interval)
        finally:
            executor.submit(self._disconnect)
            executor.shutdown(wait=False)
