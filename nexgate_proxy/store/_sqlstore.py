"""What both backends do alike, written once: the reads, and the checks in front of a few writes.

A dialect supplies how one statement runs (`_row`, `_rows`, `_select`), its placeholder prefix
for the WHERE clauses built per call ("?" or "$": both numbered, `?N` / `$N`), how a filter value
is bound (SQLite stores datetimes as text), its row decoder, the usage_totals fragments that
really differ (the day expression, the exact cost sum), and the writes that differ in
transactions and RETURNING (`_insert_api_key`, `_stamp_once`).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping
from datetime import date, datetime
from typing import Any

from . import _common as common
from . import _queries as q
from ._common import API_KEY_COLUMNS, LEDGER_COLUMNS, USAGE_SELECT, Filter, RowDecoder
from ._migrations import check_version
from ._queries import Sql
from .base import (ApiKeyRow, GroupBy, LedgerDay, LedgerEntry, Membership, Organization, StatusFilter, Store,
                   UnappliedPayment, UsageRecord, UsageTotal, User)
from .feed import API_KEY_CHANGE, StoreChange


# Literal, not bound: the partial index on the other entries serves only a query that says so.
_OTHER_ENTRIES = f" AND source <> '{common.REQUEST_SOURCE}'"


def _add_total(totals: dict[str, list[int]], group: str, row: Any, cost: int) -> None:
    total = totals.setdefault(group, [0, 0, 0, 0])
    total[0] += int(row["requests"])
    total[1] += int(row["prompt_tokens"])
    total[2] += int(row["completion_tokens"])
    total[3] += cost


class SqlStore(Store):
    _decode: RowDecoder
    _placeholder: str
    _group_expressions: dict[str, str]
    _cost_columns: str
    """The select-list part of usage_totals that sums the cost; `_cost(row)` reads it back."""
    _daily_group_expressions: dict[str, str]
    _daily_cost_columns: str
    """As `_cost_columns`, over usage_daily."""
    _amount_columns: str
    """The select-list part of ledger_days that sums amount_pico; `_amount(row)` reads it back."""
    _day_of: str
    """The UTC date 'YYYY-MM-DD' of a timestamp column, `{}` standing for the column."""

    # --- dialect hooks --------------------------------------------------------

    @abc.abstractmethod
    async def _row(self, query: Sql, *params: Any) -> Any | None:
        """Run a shared statement, return its first row (addressable by name and index) or None."""

    @abc.abstractmethod
    async def _rows(self, query: Sql, *params: Any) -> list[Any]:
        """Run a shared statement, return all its rows."""

    @abc.abstractmethod
    async def _select(self, sql: str, params: list[Any]) -> list[Any]:
        """Run a statement built per call with `_where` (its placeholders already this dialect's)."""

    @abc.abstractmethod
    async def _insert_api_key(self, key: ApiKeyRow) -> ApiKeyRow:
        """Store a checked new key; return it as stored."""

    @abc.abstractmethod
    async def _stamp_once(self, table: str, column: str, row_id: str, at: datetime | None, what: str,
                          change: str | None = None) -> bool:
        """Set a one-time timestamp (deleted, revoked): True if this call set it; NotFound for no such row.

        When it set it, records the ``change`` kind (if any) for the row."""

    @staticmethod
    def _bind(value: Any) -> Any:
        return value

    @staticmethod
    @abc.abstractmethod
    def _cost(row: Any) -> int: ...

    @staticmethod
    @abc.abstractmethod
    def _amount(row: Any) -> int: ...

    @staticmethod
    @abc.abstractmethod
    def _bind_day(day: date) -> Any: ...

    def _where(self, filters: list[Filter]) -> tuple[str, list[Any]]:
        """`WHERE a = $1 AND ts >= $2` and its parameters; more placeholders may follow from len(params) + 1."""
        if not filters:
            return "", []
        mark = self._placeholder
        clause = " AND ".join(f"{condition} {mark}{i}" for i, (condition, _) in enumerate(filters, 1))
        return f"WHERE {clause}", [self._bind(value) for _, value in filters]

    def _usage_where(self, filters: list[Filter]) -> tuple[str, list[Any]]:
        """`_where` over usage_records (common.usage_filters: the account first, when there is one)."""
        return self._where(filters)

    def _page(self, params: list[Any]) -> str:
        n, mark = len(params), self._placeholder
        return f"LIMIT {mark}{n + 1} OFFSET {mark}{n + 2}"

    # --- schema ---------------------------------------------------------------

    async def check_schema(self) -> int:
        return check_version(await self.schema_version(), self.dialect)

    # --- users ---------------------------------------------------------------

    async def get_user(self, user_id: str) -> User | None:
        row = await self._row(q.GET_USER, user_id)
        return None if row is None else self._decode.user(row)

    async def get_user_by_external_id(self, external_id: str) -> User | None:
        row = await self._row(q.GET_USER_BY_EXTERNAL_ID, external_id)
        return None if row is None else self._decode.user(row)

    async def list_users(self, limit: int = 100, offset: int = 0, *, include_deleted: bool = False) -> list[User]:
        common.check_page(limit, offset)
        return [self._decode.user(r) for r in await self._rows(q.LIST_USERS[include_deleted], limit, offset)]

    async def delete_user(self, user_id: str, at: datetime | None = None) -> bool:
        return await self._stamp_once("users", "deleted_at", user_id, at, f"user {user_id}")

    # --- organizations and memberships ------------------------------------------

    async def get_org(self, org_id: str) -> Organization | None:
        row = await self._row(q.GET_ORG, org_id)
        return None if row is None else self._decode.org(row)

    async def list_orgs(self, limit: int = 100, offset: int = 0) -> list[Organization]:
        common.check_page(limit, offset)
        return [self._decode.org(r) for r in await self._rows(q.LIST_ORGS, limit, offset)]

    async def list_orgs_for_user(self, user_id: str) -> list[tuple[Organization, str]]:
        return [(self._decode.org(r), r["role"]) for r in await self._rows(q.LIST_ORGS_FOR_USER, user_id)]

    async def get_role(self, org_id: str, user_id: str) -> str | None:
        row = await self._row(q.GET_ROLE, org_id, user_id)
        return None if row is None else row["role"]

    async def list_members(self, org_id: str) -> list[Membership]:
        return [self._decode.membership(r) for r in await self._rows(q.LIST_MEMBERS, org_id)]

    # --- API keys ----------------------------------------------------------------

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
        common.check_key_owner(user_id, org_id)
        models = common.models_for_storage(allowed_models)
        return await self._insert_api_key(ApiKeyRow(
            id=common.new_id("key"),
            public_id=public_id,
            prefix=prefix,
            secret_hash=secret_hash,
            name=name,
            user_id=user_id,
            org_id=org_id,
            created_by=created_by,
            created_at=common.utcnow(),
            expires_at=None if expires_at is None else common.aware_utc(expires_at, "expires_at"),
            allowed_models=None if models is None else tuple(models),
            limits=common.limits_for_storage(limits),
        ))

    async def get_api_key(self, key_id: str) -> ApiKeyRow | None:
        return self._key_with_owner(await self._row(q.GET_API_KEY, key_id))

    async def get_api_key_by_public_id(self, public_id: str) -> ApiKeyRow | None:
        return self._key_with_owner(await self._row(q.GET_API_KEY_BY_PUBLIC_ID, public_id))

    def _key_with_owner(self, row: Any) -> ApiKeyRow | None:
        if row is None:
            return None
        key = self._decode.api_key(row)
        return dataclasses.replace(key, owner_suspended=True) if row["owner_suspended"] else key

    async def revoke_api_key(self, key_id: str, at: datetime | None = None) -> bool:
        return await self._stamp_once("api_keys", "revoked_at", key_id, at, f"API key {key_id}", API_KEY_CHANGE)

    async def list_api_keys(
        self, *, user_id: str | None = None, org_id: str | None = None, include_revoked: bool = False
    ) -> list[ApiKeyRow]:
        filters: list[Filter] = [(f"{column} =", value)
                                 for column, value in (("user_id", user_id), ("org_id", org_id)) if value is not None]
        where, params = self._where(filters)
        if not include_revoked:
            where = f"{where} AND revoked_at IS NULL" if where else "WHERE revoked_at IS NULL"
        rows = await self._select(f"SELECT {API_KEY_COLUMNS} FROM api_keys {where} ORDER BY created_at, id", params)
        return [self._decode.api_key(r) for r in rows]

    # --- usage ---------------------------------------------------------------------

    async def list_usage(
        self,
        *,
        account_id: str | None = None,
        org_id: str | None = None,
        key_id: str | None = None,
        model: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        status: StatusFilter | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[UsageRecord]:
        common.check_page(limit, offset)
        where, params = self._usage_where(
            common.usage_filters(
                account_id=account_id, org_id=org_id, key_id=key_id, model=model, since=since, until=until,
                require_scope=True,
            ) + common.status_filters(status)
        )
        rows = await self._select(
            f"SELECT {USAGE_SELECT} FROM usage_records {where} ORDER BY ts DESC, request_id DESC {self._page(params)}",
            [*params, limit, offset],
        )
        return [self._decode.usage(r) for r in rows]

    async def debited_requests(self, account_id: str, ledger_id: int) -> list[tuple[str, int]]:
        rows = await self._rows(q.DEBITED_REQUESTS, account_id, ledger_id)
        return [(r["request_id"], int(r["actual_cost_pico"])) for r in rows]

    async def usage_totals(
        self,
        *,
        account_id: str | None = None,
        org_id: str | None = None,
        key_id: str | None = None,
        model: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        group_by: GroupBy,
    ) -> list[UsageTotal]:
        check = common.check_group_by(group_by)
        scope = {"account_id": account_id, "org_id": org_id, "key_id": key_id, "model": model}
        days, edges = common.whole_days(since, until)
        if "" in scope.values():  # '' stands for NULL in usage_daily: only the rows can tell them apart
            days, edges = None, [(since, until)]
        totals: dict[str, list[int]] = {}
        if days is not None:
            filters = [(f"{column} =", value) for column, value in scope.items() if value is not None]
            filters += [(op, self._bind_day(day)) for op, day in (("day >=", days[0]), ("day <", days[1]))
                        if day is not None]
            where, params = self._where(filters)
            rows = await self._select(
                f"SELECT {self._daily_group_expressions[check]} AS grp, SUM(requests) AS requests,"
                f" SUM(prompt_tokens) AS prompt_tokens, SUM(completion_tokens) AS completion_tokens,"
                f" {self._daily_cost_columns} FROM usage_daily {where} GROUP BY grp",
                params,
            )
            for r in rows:
                _add_total(totals, r["grp"], r, self._cost(r))
        for lo, hi in edges:
            for r in await self._row_totals(check, account_id, org_id, key_id, model, lo, hi):
                _add_total(totals, r["grp"], r, self._cost(r))
        return [UsageTotal(group, *values) for group, values in sorted(totals.items())]

    async def _row_totals(self, group_by: str, account_id: str | None, org_id: str | None, key_id: str | None,
                          model: str | None, since: datetime | None, until: datetime | None) -> list[Any]:
        where, params = self._usage_where(
            common.usage_filters(
                account_id=account_id, org_id=org_id, key_id=key_id, model=model, since=since, until=until,
                require_scope=False,
            )
        )
        return await self._select(
            f"SELECT {self._group_expressions[group_by]} AS grp, COUNT(*) AS requests,"
            f" COALESCE(SUM(prompt_tokens), 0) AS prompt_tokens,"
            f" COALESCE(SUM(completion_tokens), 0) AS completion_tokens, {self._cost_columns}"
            f" FROM usage_records {where} GROUP BY grp",
            params,
        )

    async def usage_by_day_and_model(
        self, *, account_id: str, since: date, until: date | None = None
    ) -> list[tuple[str, UsageTotal]]:
        filters: list[Filter] = [("account_id =", account_id), ("day >=", self._bind_day(since))]
        if until is not None:
            filters.append(("day <", self._bind_day(until)))
        where, params = self._where(filters)
        day = self._daily_group_expressions["day"]
        rows = await self._select(
            f"SELECT {day} AS day, model, SUM(requests) AS requests, SUM(prompt_tokens) AS prompt_tokens,"
            f" SUM(completion_tokens) AS completion_tokens, {self._daily_cost_columns}"
            f" FROM usage_daily {where} GROUP BY day, model ORDER BY day, model",
            params,
        )
        return [(r["day"], UsageTotal(r["model"], int(r["requests"]), int(r["prompt_tokens"]),
                                      int(r["completion_tokens"]), self._cost(r))) for r in rows]

    # --- money -----------------------------------------------------------------------

    async def get_balance(self, account_id: str) -> int:
        row = await self._row(q.GET_BALANCE, account_id)
        return 0 if row is None else row[0]

    async def balance_snapshot(self, account_id: str) -> tuple[int, int]:
        # One statement reads one snapshot: the balance and the feed position agree.
        row = await self._row(q.BALANCE_SNAPSHOT, account_id)
        return (row["balance"] or 0), int(row["position"])

    async def get_ledger_entry(self, source: str, external_id: str) -> LedgerEntry | None:
        row = await self._row(q.GET_LEDGER_ENTRY, source, external_id)
        return None if row is None else self._decode.ledger_entry(row)

    async def get_payment_reversed(self, source: str, payment_id: str) -> tuple[int, int]:
        row = await self._row(q.GET_PAYMENT_REVERSED, source, payment_id)
        return (0, 0) if row is None else (int(row["reversed_minor"]), int(row["reversed_pico"]))

    async def list_unapplied_payments(self, *, include_applied: bool = False, limit: int = 100,
                                      offset: int = 0) -> list[UnappliedPayment]:
        common.check_page(limit, offset)
        rows = await self._rows(q.LIST_UNAPPLIED[include_applied], limit, offset)
        return [self._decode.unapplied_payment(r) for r in rows]

    async def get_unapplied_payment(self, source: str, payment_id: str) -> UnappliedPayment | None:
        row = await self._row(q.GET_UNAPPLIED, source, payment_id)
        return None if row is None else self._decode.unapplied_payment(row)

    async def list_ledger(
        self,
        account_id: str,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        without_request_debits: bool = False,
        limit: int = 100,
        offset: int = 0,
    ) -> list[LedgerEntry]:
        common.check_page(limit, offset)
        where, params = self._where([("account_id =", account_id), *common.time_filters("created_at", since, until)])
        if without_request_debits:
            where += _OTHER_ENTRIES
        rows = await self._select(
            f"SELECT {LEDGER_COLUMNS} FROM ledger_entries {where} ORDER BY created_at DESC, id DESC {self._page(params)}",
            [*params, limit, offset],
        )
        return [self._decode.ledger_entry(r) for r in rows]

    async def ledger_days(
        self,
        account_id: str,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        up_to_id: int | None = None,
        without_request_debits: bool = False,
    ) -> list[LedgerDay]:
        filters = [("account_id =", account_id), *common.time_filters("created_at", since, until)]
        if up_to_id is not None:
            filters.append(("id <=", up_to_id))
        where, params = self._where(filters)
        if without_request_debits:
            where += _OTHER_ENTRIES
        day = self._day_of.format("created_at")
        rows = await self._select(
            f"SELECT {day} AS day, MAX(created_at) AS last_at, COUNT(*) AS n, {self._amount_columns}"
            f" FROM ledger_entries {where} GROUP BY day ORDER BY day",
            params,
        )
        return [LedgerDay(r["day"], self._decode.timestamp(r["last_at"]), self._amount(r), int(r["n"]))
                for r in rows]

    # --- change feed -------------------------------------------------------------------

    async def latest_change_id(self) -> int:
        return int((await self._row(q.LATEST_CHANGE_ID))[0])

    async def changes_since(self, after: int, limit: int) -> list[StoreChange]:
        return [StoreChange(*row) for row in await self._rows(q.CHANGES_SINCE, after, limit)]
