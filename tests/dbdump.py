"""A full dump of a test database, as text: for tests that prove something is stored nowhere."""

from __future__ import annotations

import asyncpg


async def dump_database(url: str, backend: str) -> str:
    """Every row of every table, as text."""
    if backend == "sqlite":
        import sqlite3

        path = url.removeprefix("sqlite:///")
        with sqlite3.connect(path) as conn:
            return "\n".join(conn.iterdump())
    conn = await asyncpg.connect(url)
    try:
        tables = await conn.fetch("SELECT table_name FROM information_schema.tables "
                                  "WHERE table_schema = current_schema()")
        rows = []
        for t in tables:
            rows += [str(dict(r)) for r in await conn.fetch(f'SELECT * FROM "{t["table_name"]}"')]
        return "\n".join(rows)
    finally:
        await conn.close()
