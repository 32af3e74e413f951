"""Dashboard server time with 1 M usage rows (SQLite): every page, measured over loopback HTTP.

    .venv/bin/python benchmarks/dashboard_pages.py                 # 1 M rows, 10 % in the measured account
    .venv/bin/python benchmarks/dashboard_pages.py --share 1.0     # the worst case: every row in one account
    .venv/bin/python benchmarks/dashboard_pages.py --rows 100000    # a quicker run
    .venv/bin/python benchmarks/dashboard_pages.py --db /tmp/dash.db # build once, then reuse it

The database is built with direct SQL (the store's migrations, then one transaction of
``executemany``): usage rows over the last 90 days across 1,000 accounts, 4 models, 3 % errors,
each with its ledger debit, so the credits and statement pages read a real ledger too; then
migration 0007 runs again, its backfill building the daily totals from those rows. A gateway
then serves it in this process; each page is fetched ``--repeat`` times (after one warm-up) with
a signed-in session cookie, and the median, p95 and max wall time per page are printed (loopback
HTTP included, so slightly above the server's own time).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
from yarl import URL

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nexgate_proxy.store import open_store  # noqa: E402
from nexgate_proxy.store import sqlite as sqlite_store  # noqa: E402
from nexgate_proxy.testing import FakeUpstream, gateway_config  # noqa: E402
from nexgate_proxy.testing.gateway import running_gateways  # noqa: E402

ADMIN_TOKEN = "ngadmin-benchmark-token-0123456789abcdef0123456789abcdef"
MODELS = ("gpt-4o", "gpt-4o-mini", "claude-sonnet", "gemini-flash")


def _ts(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


async def build(path: Path, rows: int, share: float) -> tuple[str, str]:
    url = f"sqlite:///{path}"
    store = await open_store(url)
    # Version 6: the rows go in as the store wrote them then (ISO text ts, a debit per request);
    # migrations 0007 and 0008 then convert them, as upgrading an existing database does.
    every = sqlite_store.load_migrations
    sqlite_store.load_migrations = lambda dialect: tuple(m for m in every(dialect) if m.version <= 6)
    try:
        await store.migrate()
    finally:
        sqlite_store.load_migrations = every
    heavy = await store.create_user(email="heavy@example.com", name="Heavy User")
    org = await store.create_org("Big Org", heavy.id)
    await store.close()
    accounts = [heavy.id] + [f"usr_bench{i:04d}" for i in range(999)]
    rng = random.Random(7)
    now = datetime.now(UTC)
    started = time.perf_counter()
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    usage, ledger = [], []
    balances: dict[str, int] = {}
    for i in range(rows):
        account = heavy.id if rng.random() < share else accounts[1 + rng.randrange(999)]
        ts = now - timedelta(seconds=rng.random() * 90 * 86400)
        request_id = f"req_{uuid.UUID(int=rng.getrandbits(128)).hex}"
        status = 200 if rng.random() > 0.03 else rng.choice((402, 429, 500))
        prompt, completion = rng.randrange(10, 2000), rng.randrange(1, 800)
        cost = (prompt * 2_500_000 + completion * 10_000_000) if status == 200 else 0
        usage.append((request_id, _ts(ts), "chat.completions", rng.choice(MODELS), "openai", "m", account, None,
                      "key_bench", "ng-bench", prompt, completion, 0, 0, cost, cost, rng.randrange(80, 4000), status,
                      None if status == 200 else "upstream_error", 0, None, 1))
        if cost:
            ledger.append((account, "debit", -cost, "request", request_id, request_id, None, _ts(ts)))
            balances[account] = balances.get(account, 0) - cost
    usage.sort(key=lambda u: u[1])  # in time order, as the usage log writes them
    ledger.sort(key=lambda e: e[7])  # ids in time order, as a live ledger books them
    db.executemany(f"INSERT INTO usage_records VALUES ({','.join('?' * 22)})", usage)
    db.executemany("INSERT INTO ledger_entries (account_id, kind, amount_pico, source, external_id, request_id,"
                   " description, created_at) VALUES (?,?,?,?,?,?,?,?)", ledger)
    db.executemany("INSERT INTO balances VALUES (?, ?, ?)", [(a, b, _ts(now)) for a, b in balances.items()])
    db.commit()
    db.close()
    print(f"built {rows:,} usage rows and {len(ledger):,} ledger entries in {time.perf_counter() - started:.1f} s; "
          f"{sum(1 for u in usage if u[6] == heavy.id):,} in the measured account")
    started = time.perf_counter()
    store = await open_store(url)
    assert await store.migrate() == [7, 8]
    await store.close()
    print(f"migrations 0007 (daily totals backfill) and 0008 (lean usage rows) took"
          f" {time.perf_counter() - started:.1f} s")
    db = sqlite3.connect(path)
    db.execute("ANALYZE")
    db.close()
    return heavy.id, org.id


def reuse(path: Path) -> tuple[str, str]:
    db = sqlite3.connect(path)
    heavy = db.execute("SELECT id FROM users WHERE email = 'heavy@example.com'").fetchone()[0]
    org_id = db.execute("SELECT id FROM organizations WHERE name = 'Big Org'").fetchone()[0]
    db.close()
    return heavy, org_id


async def measure(args: argparse.Namespace) -> None:
    directory = Path(tempfile.mkdtemp(prefix="nexgate-dashboard-bench-"))
    db_path = Path(args.db) if args.db else directory / "bench.db"
    try:
        if db_path.exists():
            heavy, org_id = reuse(db_path)
        else:
            heavy, org_id = await build(db_path, args.rows, args.share)
        await serve(args, directory, db_path, heavy, org_id)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def serve(args: argparse.Namespace, directory: Path, db_path: Path, heavy: str, org_id: str) -> None:
    import hashlib
    async with FakeUpstream() as upstream, running_gateways(directory) as start:
        config = gateway_config(upstream, storage={"url": f"sqlite:///{db_path}"},
                                auth={"admin_token_sha256": hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()})
        gw = await start(config)
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(cookie_jar=jar) as http:
            async with http.get(gw.url + "/dashboard/login") as response:
                await response.read()
            csrf = jar.filter_cookies(URL(gw.url + "/dashboard/"))["nexgate_dashboard_login"].value
            async with http.post(gw.url + "/dashboard/login", data={"token": ADMIN_TOKEN, "csrf": csrf},
                                 allow_redirects=False) as response:
                assert response.status == 303, response.status
            month = datetime.now(UTC).strftime("%Y-%m")
            a = f"account={heavy}"
            # a cursor deep in the log: the usage page's keyset pagination at depth
            deep = (datetime.now(UTC) - timedelta(days=80)).isoformat() + "~1~req_f"
            pages = [
                ("overview 30 days", f"/overview?{a}"), ("overview 90 days", f"/overview?{a}&days=90"),
                ("usage, first page", f"/usage?{a}"), ("usage, 80 days deep", f"/usage?{a}&after={deep}"),
                ("usage, one model", f"/usage?{a}&model=gpt-4o"), ("usage, errors only", f"/usage?{a}&status=error"),
                ("usage, 402 only", f"/usage?{a}&status=402"),
                ("usage, a date range", f"/usage?{a}&since=2020-01-01&until=2100-01-01"),
                ("credits", f"/credits?{a}"), ("statements", f"/statements?{a}"),
                (f"statement {month}", f"/statements/{month}?{a}"),
                ("organization", f"/orgs/{org_id}"), ("operator", "/operator"),
                ("operator account", f"/operator/accounts/{heavy}"), ("operator search", "/operator/search?q=heavy"),
            ]
            print(f"{'page':<24}{'first':>10}{'median':>10}{'p95':>10}{'max':>10}   (ms; first = cold, then "
                  f"{args.repeat} requests)")
            for name, path in pages:
                times = []
                for _ in range(args.repeat + 1):
                    began = time.perf_counter()
                    async with http.get(gw.url + "/dashboard" + path, allow_redirects=False) as response:
                        await response.read()
                        assert response.status == 200, (path, response.status)
                    times.append((time.perf_counter() - began) * 1000)
                cold = times.pop(0)
                times.sort()
                p95 = times[min(len(times) - 1, int(len(times) * 0.95))]
                print(f"{name:<24}{cold:>10.1f}{statistics.median(times):>10.1f}{p95:>10.1f}{times[-1]:>10.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--share", type=float, default=0.1, help="fraction of the rows in the measured account")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--db", help="keep the database here and reuse it on the next run (it is ~700 MB)")
    asyncio.run(measure(parser.parse_args()))


if __name__ == "__main__":
    main()
