"""Real PostgreSQL and Redis for tests.

Locally a missing server skips its tests; in CI (CI=true, or
NEXGATE_REQUIRE_SERVICES=1) a missing server fails them, so CI can never pass
by skipping. The servers are found at NEXGATE_TEST_POSTGRES_URL and
NEXGATE_TEST_REDIS_URL (read when a test asks, so a conftest may set them).
"""

from __future__ import annotations

import os
import secrets
import socket
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator
from urllib.parse import parse_qsl, urlencode, urlparse, urlsplit, urlunsplit

import pytest

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"


def postgres_server_url() -> str:
    return os.environ.get("NEXGATE_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)


def redis_server_url() -> str:
    return os.environ.get("NEXGATE_TEST_REDIS_URL", DEFAULT_REDIS_URL)


def services_required() -> bool:
    return os.environ.get("CI", "").lower() == "true" or os.environ.get("NEXGATE_REQUIRE_SERVICES") == "1"


def _reachable(url: str) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 0), timeout=1):
            return True
    except OSError:
        return False


def require(url: str, what: str) -> str:
    """Return the URL if the server answers; otherwise skip (locally) or fail (CI)."""
    if _reachable(url):
        return url
    message = f"{what} is not reachable at {url}"
    if services_required():
        pytest.fail(message + " (required in CI)")
    pytest.skip(message)
    raise AssertionError("unreachable")


def require_postgres() -> str:
    return require(postgres_server_url(), "PostgreSQL")


def require_redis() -> str:
    return require(redis_server_url(), "Redis")


def with_search_path(url: str, schema: str) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "search_path"]
    query.append(("search_path", schema))
    return urlunsplit(parts._replace(query=urlencode(query)))


@asynccontextmanager
async def fresh_postgres_schema() -> AsyncIterator[str]:
    """A URL to a new, empty PostgreSQL schema, dropped on exit.

    The schema travels as ``search_path`` in the URL, which asyncpg passes to
    the server, so parallel tests never see each other's tables.
    """
    import asyncpg  # only tests that use PostgreSQL pay for the import

    base_url = require_postgres()
    schema = f"t_{secrets.token_hex(8)}"
    admin = await asyncpg.connect(base_url)
    try:
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        yield with_search_path(base_url, schema)
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()


@asynccontextmanager
async def store_url_for(backend: str, directory: Path) -> AsyncIterator[str]:
    """A URL to an empty database: a SQLite file in ``directory``, or a fresh PostgreSQL schema."""
    if backend == "sqlite":
        yield f"sqlite:///{directory / 'nexgate.db'}"
    elif backend == "postgres":
        async with fresh_postgres_schema() as url:
            yield url
    else:
        raise ValueError(f"unknown store backend {backend!r} (sqlite or postgres)")
