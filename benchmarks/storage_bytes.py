#!/usr/bin/env python
"""Bytes stored per request: the usage row and its ledger debit, with every index, on SQLite and PostgreSQL.

    .venv/bin/python benchmarks/storage_bytes.py                                   # SQLite, 20,000 requests
    .venv/bin/python benchmarks/storage_bytes.py --postgres postgresql://postgres@127.0.0.1:5432/test
    .venv/bin/python benchmarks/storage_bytes.py --rev d75fa6c                     # a commit's schema
    .venv/bin/python benchmarks/storage_bytes.py --days 30 --rollup-after-days 7   # with the usage roll-up

Writes ``--requests`` priced requests of realistic shape (personal keys, 10% organization keys, a
client IP, a model and provider name, request ids as one gateway process makes them, the accounts
and keys in the store as the gateway's are) through ``store.record_usage`` in batches of 500, as the usage
log does, and reports the bytes of the usage table and the ledger, each with its indexes, per request.
SQLite: ``dbstat`` (pages in use); PostgreSQL: ``pg_total_relation_size`` after ``VACUUM``, in a
schema of its own that is dropped afterwards. ``--days D`` spreads the requests evenly over the last
D days (default: all within minutes); ``--rollup-after-days N`` then deletes the rows older than N
days as ``usage.rollup_after_days`` does. The daily totals (usage_daily, request_debits_daily) are
reported as ``daily``. After a roll-up PostgreSQL is measured after ``VACUUM FULL`` (live size: a
plain VACUUM keeps the freed pages in the files, for the next rows), SQLite counts pages in use.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import use_source  # noqa: E402

TABLES = {"usage": ("usage_records",), "ledger": ("ledger_entries",), "daily": ("usage_daily", "request_debits_daily")}


async def accounts(store) -> tuple[list[str], list[str], dict[str, tuple[str, str]]]:
    """50 users and 5 organizations, each with an API key, as the gateway's rows have them."""
    users = [(await store.create_user(email=f"u{i}@example.com")).id for i in range(50)]
    orgs = [(await store.create_org(f"org {i}", users[i])).id for i in range(5)]
    keys = {}
    for account in users + orgs:
        public_id = secrets.token_hex(6)
        owner = {"org_id": account} if account in orgs else {"user_id": account}
        key = await store.create_api_key(public_id=public_id, prefix="ngk_" + public_id, secret_hash="x",
                                         name="bench", **owner)
        keys[account] = (key.id, key.prefix)
    return users, orgs, keys


def rows(count: int, start: datetime, step: timedelta, users: list[str], orgs: list[str],
         keys: dict[str, tuple[str, str]]) -> list:
    from nexgate_proxy.records import UsageRecord

    process = secrets.token_hex(8)  # request ids as the gateway makes them (proxy.new_request_id)
    out = []
    for i in range(count):
        org = orgs[i % 5] if i % 10 == 0 else None
        account = org or users[i % 50]
        key_id, prefix = keys[account]
        out.append(UsageRecord(
            request_id=f"req_{process}{i + 1:08x}", ts=start + i * step,
            endpoint="chat.completions", model="gpt-4o-mini", provider="openai", upstream_model="gpt-4o-mini",
            account_id=account, org_id=org, key_id=key_id, key_prefix=prefix, prompt_tokens=412,
            completion_tokens=128, cached_tokens=0, usage_estimated=False, estimated_cost_pico=2_000_000_000,
            actual_cost_pico=138_600_000 + i, latency_ms=840, status=200, error_code=None, stream=i % 2 == 0,
            client_ip=f"203.0.113.{i % 250 + 1}", attempts=1))
    return out


async def measure(url: str, count: int, sqlite_path: str | None, days: int = 0,
                  rollup_after_days: int = 0) -> dict[str, float]:
    from nexgate_proxy.store import open_store

    store = await open_store(url)
    try:
        await store.migrate()
        who = await accounts(store)
        if days:
            now = datetime.now(timezone.utc)
            batch = rows(count, now - timedelta(days=days), timedelta(days=days) / count, *who)
        else:
            batch = rows(count, datetime(2026, 1, 1, tzinfo=timezone.utc), timedelta(milliseconds=10), *who)
        for i in range(0, count, 500):
            await store.record_usage(batch[i:i + 500])
        if rollup_after_days:
            before = datetime.now(timezone.utc).date() - timedelta(days=rollup_after_days)
            while await store.delete_rolled_up_usage(before, 5000) == 5000:
                pass
    finally:
        await store.close()
    if sqlite_path is not None:
        import sqlite3

        with sqlite3.connect(sqlite_path) as conn:
            sizes = {}
            for label, tables in TABLES.items():
                names = list(tables) + [r[0] for table in tables for r in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ?", (table,))]
                marks = ",".join("?" * len(names))
                sizes[label] = conn.execute(f"SELECT SUM(pgsize - unused) FROM dbstat WHERE name IN ({marks})",
                                            names).fetchone()[0] / count
            return sizes
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        sizes = {}
        for label, tables in TABLES.items():
            sizes[label] = 0
            for table in tables:
                # after a roll-up, FULL: the live size (a plain VACUUM keeps the freed pages for reuse)
                await conn.execute(f"VACUUM {'FULL ' if rollup_after_days else ''}{table}")
                sizes[label] += await conn.fetchval(f"SELECT pg_total_relation_size('{table}')") / count
        return sizes
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--postgres", help="a PostgreSQL URL (a schema is created in it, then dropped)")
    parser.add_argument("--days", type=int, default=0, help="spread the requests over the last DAYS days")
    parser.add_argument("--rollup-after-days", type=int, default=0, help="then roll up rows older than this")
    parser.add_argument("--rev", help="measure this git revision's schema instead of the work tree's")
    parser.add_argument("--json", type=Path,
                        help="where to write results (default results/storage_sqlite.json or storage_postgres.json)")
    args = parser.parse_args()
    source = use_source(args.rev)
    print(source)
    if args.postgres:
        import asyncpg

        schema = "bench_bytes_" + secrets.token_hex(4)

        async def run() -> dict[str, float]:
            admin = await asyncpg.connect(args.postgres)
            await admin.execute(f"CREATE SCHEMA {schema}")
            try:
                sep = "&" if "?" in args.postgres else "?"
                return await measure(f"{args.postgres}{sep}search_path={schema}", args.requests, None,
                                     args.days, args.rollup_after_days)
            finally:
                await admin.execute(f"DROP SCHEMA {schema} CASCADE")
                await admin.close()

        sizes = asyncio.run(run())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = f"{tmp}/bytes.db"
            sizes = asyncio.run(measure(f"sqlite:///{path}", args.requests, path, args.days,
                                       args.rollup_after_days))
    total = sum(sizes.values())
    print(" ".join(f"{k}={v:.0f} B" for k, v in sizes.items()) + f" total={total:.0f} B per request")
    from results_file import RESULTS, save

    store = "postgres" if args.postgres else "sqlite"
    save(args.json or RESULTS / f"storage_{store}.json",
         {"store": store, "requests": args.requests, "days": args.days, "rollup_after_days": args.rollup_after_days,
          "bytes_per_request": {k: round(v, 1) for k, v in sizes.items()}, "total_bytes_per_request": round(total, 1)},
         source)


if __name__ == "__main__":
    main()
