"""The `store` fixture, run once per backend.

PostgreSQL tests each get a fresh schema (via `search_path` in the URL, which
asyncpg passes to the server), dropped afterwards, so they never see each
other's rows and can run against a shared database.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import pytest

from nexgate_proxy.store import Store, open_store
from tests.services import require_postgres


def with_search_path(url: str, schema: str) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "search_path"]
    query.append(("search_path", schema))
    return urlunsplit(parts._replace(query=urlencode(query)))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
async def store_url(backend: str, tmp_path) -> AsyncIterator[str]:
    """A URL to an empty database of the backend under test."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'nexgate.db'}"
        return
    base_url = require_postgres()
    schema = f"t_{secrets.token_hex(8)}"
    admin = await asyncpg.connect(base_url)
    try:
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        yield with_search_path(base_url, schema)
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    """A migrated, empty store."""
    opened = await open_store(store_url)
    try:
        await opened.migrate()
        yield opened
    finally:
        await opened.close()
