"""Durable store for accounts, organizations, API keys, usage records and money.

    store = await open_store("sqlite:///nexgate.db")        # or postgresql://...
    await store.migrate()        # `nexgate db migrate`; the gateway calls check_schema()
    ...
    await store.close()

What running gateways must learn of (a revoked key, a credit...) is recorded with the change
itself; ``store.change_feed()`` delivers it to each gateway (see ``feed``).
"""

from __future__ import annotations

from typing import Any

from ._migrations import latest_version
from .feed import API_KEY_CHANGE, CREDIT_CHANGE, MISSED, ORG_CHANGE, ChangeFeed, StoreChange
from .base import (
    LEDGER_KINDS,
    MAX_PICO,
    MIN_PICO,
    PICO_PER_USD,
    ROLES,
    AnonymizedUser,
    ApiKeyRow,
    Conflict,
    GroupBy,
    LastOwnerError,
    LedgerDay,
    LedgerEntry,
    LedgerKind,
    Membership,
    NewLedgerEntry,
    NotFound,
    Organization,
    Role,
    SchemaError,
    Store,
    StatusFilter,
    StoreError,
    UnappliedPayment,
    UsageRecord,
    UsageTotal,
    User,
)


async def open_store(url: str, **options: Any) -> Store:
    """Open the backend the URL's scheme names. `options` go to that backend's `open`."""
    scheme = url.split(":", 1)[0].lower()
    if scheme == "sqlite":
        from .sqlite import SQLiteStore

        return await SQLiteStore.open(url, **options)
    if scheme in ("postgresql", "postgres"):
        from .postgres import PostgresStore

        return await PostgresStore.open(url, **options)
    # Only the scheme in the message: the rest of the URL may hold a password.
    raise ValueError(f"unsupported store URL scheme {scheme!r}: use sqlite:// or postgresql://")


__all__ = [
    "API_KEY_CHANGE",
    "CREDIT_CHANGE",
    "MISSED",
    "ORG_CHANGE",
    "ChangeFeed",
    "StoreChange",
    "LEDGER_KINDS",
    "MAX_PICO",
    "MIN_PICO",
    "PICO_PER_USD",
    "ROLES",
    "AnonymizedUser",
    "ApiKeyRow",
    "Conflict",
    "GroupBy",
    "LastOwnerError",
    "LedgerDay",
    "LedgerEntry",
    "LedgerKind",
    "Membership",
    "NewLedgerEntry",
    "NotFound",
    "Organization",
    "Role",
    "SchemaError",
    "Store",
    "StatusFilter",
    "StoreError",
    "UnappliedPayment",
    "UsageRecord",
    "UsageTotal",
    "User",
    "latest_version",
    "open_store",
]
