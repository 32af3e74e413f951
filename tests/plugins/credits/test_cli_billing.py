"""`nexgate credits grant|balance` and `nexgate usage export`, in-process and as a real subprocess."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import secrets
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from nexgate_plugins.credits import cli as cli_billing
from nexgate_plugins.credits.holds.redis import RedisCreditState
from nexgate_proxy import cli
from nexgate_proxy.money import usd_to_pico
from nexgate_plugins.credits.statements import USAGE_CSV_COLUMNS
from nexgate_proxy.store import UsageRecord, open_store
from tests.cli_runner import Cli


async def migrated(url: str) -> None:
    assert await asyncio.to_thread(cli.main, ["db", "migrate", "--storage-url", url]) == 0


def usd(text: str) -> int:
    return usd_to_pico(Decimal(text))


async def test_grants_are_exact_and_idempotent_on_their_ref(store_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    await migrated(store_url)
    async with await open_store(store_url) as store:
        user = await store.create_user(email="ann@example.com", name="Ann")
        org = await store.create_org("Acme", user.id)
    cli = Cli(capsys, "--storage-url", store_url)

    first = await cli.json("credits", "grant", user.id, "10", "--reason", "launch promo", "--ref", "promo-1")
    assert first == {"object": "grant", "applied": True, "account_id": user.id, "account_type": "user",
                     "external_id": "grant:promo-1", "reason": "launch promo", "amount_usd": "10",
                     "amount_pico": usd("10"), "balance_usd": "10", "balance_pico": usd("10")}
    again = await cli.json("credits", "grant", user.id, "10", "--reason", "launch promo", "--ref", "promo-1")
    assert again["applied"] is False and again["balance_pico"] == usd("10")
    code, out, err = await cli("credits", "grant", user.id, "10", "--reason", "launch promo", "--ref", "promo-1")
    assert code == 0 and "already applied" in out and "nothing changed" in out
    assert "memory://" not in err  # nothing applied, nobody to tell
    # Without a ref every run is a new grant.
    code, out, err = await cli("credits", "grant", user.id, "$2.500000000001", "--reason", "goodwill")
    assert code == 0 and "Granted $2.500000000001" in out and err == ""  # the store feed tells the gateways
    await cli("credits", "grant", user.id, "2.5", "--reason", "goodwill")
    balance = await cli.json("credits", "balance", user.id)
    assert balance == {"object": "balance", "account_id": user.id, "account_type": "user", "currency": "usd",
                       "balance_usd": "15.000000000001", "balance_pico": usd("15.000000000001")}
    code, out, _ = await cli("credits", "balance", user.id)
    assert code == 0 and "$15.000000000001" in out and "Ann" in out
    org_grant = await cli.json("credits", "grant", org.id, "0.01", "--reason", "org trial")
    assert org_grant["account_type"] == "organization" and org_grant["balance_usd"] == "0.01"

    async with await open_store(store_url) as store:
        entries = await store.list_ledger(user.id)
        assert {(e.kind, e.source) for e in entries} == {("grant", "admin")}
        assert sorted(e.description for e in entries) == ["goodwill", "goodwill", "launch promo"]
        assert await store.get_balance(user.id) == await store.ledger_sum(user.id) == usd("15.000000000001")

    assert "no such account" in await cli.fails("credits", "grant", "usr_nobody", "1", "--reason", "x")
    assert "no such account" in await cli.fails("credits", "balance", "org_nobody")
    for amount in ("0", "-1", "abc", "0.0000000000001", "NaN", "Infinity", "99999999"):
        await cli.fails("credits", "grant", user.id, amount, "--reason", "x")
    assert "--reason" in await cli.fails("credits", "grant", user.id, "1", "--reason", "  ")
    assert "--reason" in await cli.fails("credits", "grant", user.id, "1", "--reason", "two\nlines")
    assert (await cli.json("credits", "balance", user.id))["balance_pico"] == usd("15.000000000001")


@pytest.mark.redis
async def test_a_grant_raises_the_balance_running_gateways_cached(tmp_path: Path, redis_url: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    await migrated(url)
    async with await open_store(url) as store:
        user = await store.create_user(name="Bo")
    state = RedisCreditState(redis_url)
    try:
        assert (await state.reserve(user.id, "warm-up", 0, 0, 60, lambda: asyncio.sleep(0, 0))).ok
        assert await state.available(user.id) == 0
        cli = Cli(capsys, "--storage-url", url, "--state-url", redis_url)
        code, _, err = await cli("credits", "grant", user.id, "1.5", "--reason", "support", "--ref", "t-1")
        assert code == 0 and err == ""
        await cli("credits", "grant", user.id, "1.5", "--reason", "support", "--ref", "t-1")  # already applied
        assert await state.available(user.id) == usd("1.5")  # pico-USD, raised once
        # A state store that does not answer is a warning: the ledger has the grant.
        cli = Cli(capsys, "--storage-url", url, "--state-url", "redis://127.0.0.1:1/0")
        code, out, err = await cli("credits", "grant", user.id, "1", "--reason", "support")
        assert code == 0 and "did not answer" in err and "Granted $1" in out
    finally:
        from nexgate_proxy.state.redis import encode_command, open_resp, parse_redis_url

        cleanup = await open_resp(parse_redis_url(redis_url))
        await cleanup.call(encode_command("DEL", *state._keys(user.id)))
        cleanup.abort()
        await state.close()


def usage_row(account: str, request_id: str, ts: datetime, model: str = "gpt-x", cost: int = 1_000,
              key_id: str = "key_a") -> UsageRecord:
    return UsageRecord(request_id=request_id, ts=ts, endpoint="chat.completions", model=model, provider="fake",
                    upstream_model="up", account_id=account, org_id=None, key_id=key_id, key_prefix="ngk_ab",
                    prompt_tokens=10, completion_tokens=5, cached_tokens=0, usage_estimated=False,
                    estimated_cost_pico=2_000, actual_cost_pico=cost, latency_ms=12, status=200, error_code=None,
                    stream=False, client_ip="203.0.113.9", attempts=1)


async def test_usage_export_as_csv_and_json(store_url: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    await migrated(store_url)
    start = datetime(2025, 3, 1, tzinfo=UTC)
    async with await open_store(store_url) as store:
        user = await store.create_user(name="Cy")
        other = await store.create_user(name="Di")
        rows = [usage_row(user.id, f"req_{i:04d}", start + timedelta(hours=i), cost=1_000 + i) for i in range(25)]
        rows.append(usage_row(other.id, "req_other", start))
        assert await store.record_usage(rows) == 26
    monkeypatch.setattr(cli_billing, "EXPORT_PAGE", 10)  # several pages
    cli = Cli(capsys, "--storage-url", store_url)

    (tmp_path / "out").mkdir()
    target = tmp_path / "out" / "usage.csv"
    summary = await cli.json("usage", "export", user.id, "--format", "csv", "--output", str(target))
    assert summary == {"object": "usage_export", "account_id": user.id, "format": "csv", "records": 25,
                       "output": str(target)}
    table = list(csv.DictReader(io.StringIO(target.read_text())))
    assert tuple(table[0]) == USAGE_CSV_COLUMNS and "client_ip" not in table[0]
    assert [r["request_id"] for r in table] == [f"req_{i:04d}" for i in reversed(range(25))]  # newest first
    assert table[-1]["actual_cost_pico"] == "1000" and table[-1]["actual_cost_usd"] == "0.000000001"
    assert table[-1]["ts"] == "2025-03-01T00:00:00Z" and table[-1]["usage_estimated"] == "False"
    assert "203.0.113.9" not in target.read_text()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["usage.csv"]  # no temporary file left behind

    code, out, err = await cli("usage", "export", user.id, "--format", "json", "--since", "2025-03-01T10:00:00Z",
                               "--until", "2025-03-01T12:00:00+00:00")
    assert code == 0 and err == ""
    assert [r["request_id"] for r in json.loads(out)] == ["req_0011", "req_0010"]
    code, out, _ = await cli("usage", "export", user.id, "--format", "json", "--since", "2030-01-01")
    assert code == 0 and json.loads(out) == []
    code, out, _ = await cli("usage", "export", user.id)  # csv to standard output by default
    assert code == 0 and len(out.strip().splitlines()) == 26
    exported = json.loads((await cli("usage", "export", user.id, "--format", "json"))[1])
    assert sum(r["actual_cost_pico"] for r in exported) == sum(1_000 + i for i in range(25))

    assert "no such account" in await cli.fails("usage", "export", "usr_nobody")
    assert "--since" in await cli.fails("usage", "export", user.id, "--since", "last week")
    assert "--until must be after" in await cli.fails("usage", "export", user.id, "--since", "2025-03-02",
                                                      "--until", "2025-03-01")
    assert "does not exist" in await cli.fails("usage", "export", user.id, "--output",
                                               str(tmp_path / "missing" / "x.csv"))


def test_the_commands_run_as_a_real_process(tmp_path: Path) -> None:
    import subprocess

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    assert cli.main(["db", "migrate", "--storage-url", url]) == 0

    async def user() -> str:
        async with await open_store(url) as store:
            return (await store.create_user(name="Ed")).id

    user_id = asyncio.run(user())
    env = {**os.environ, "NEXGATE_CONFIG": ""}
    done = subprocess.run([sys.executable, "-m", "nexgate_proxy.cli", "credits", "grant", user_id, "3",
                           "--reason", "cli", "--ref", secrets.token_hex(4), "--storage-url", url, "--json"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["balance_usd"] == "3"
    done = subprocess.run([sys.executable, "-m", "nexgate_proxy.cli", "credits", "balance", "usr_x",
                           "--storage-url", url], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 1 and done.stderr.startswith("nexgate: error: no such account")
