"""A store as older versions left it: migrated up to a version, with usage rows in the pre-0008 form.

Before migration 0008 a usage row was its record's fields as they are (SQLite: ts as UTC ISO text),
and record_usage booked one "request" debit per charged row (external_id: its request id).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nexgate_proxy.store import NewLedgerEntry, Store, UsageRecord
from nexgate_proxy.store import _migrations, postgres, sqlite
from nexgate_proxy.store._common import REQUEST_SOURCE, USAGE_COLUMNS


async def migrate_up_to(store: Store, version: int, monkeypatch: Any) -> list[int]:
    """Apply the migrations up to ``version`` only."""
    with monkeypatch.context() as patch:
        for module in (sqlite, postgres):
            patch.setattr(module, "load_migrations", lambda dialect: tuple(
                m for m in _migrations.load_migrations(dialect) if m.version <= version))
            patch.setattr(module, "refuse_newer", lambda current, dialect: None)
        return await store.migrate()


async def write_old_rows(store: Store, rows: Sequence[UsageRecord]) -> None:
    """Insert the rows as the pre-0008 schema held them, and their per-request debits."""
    marks = ", ".join(f"{store._placeholder}{i}" for i in range(1, 23))  # type: ignore[attr-defined]
    for row in rows:
        values = list(row)
        if store.dialect == "sqlite":
            values[1] = sqlite._ts(row.ts)
        await store._select(f"INSERT INTO usage_records ({USAGE_COLUMNS}) VALUES ({marks})",  # type: ignore[attr-defined]
                            values)
        if row.account_id is not None and row.actual_cost_pico:
            await store.apply_ledger_entry(NewLedgerEntry(row.account_id, "debit", -row.actual_cost_pico,
                                                          REQUEST_SOURCE, row.request_id, request_id=row.request_id))
