"""IP retention: client IPs in usage records are cleared after privacy.ip_retention_days; totals stay."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import aiohttp
import pytest
import yaml

import nexgate_plugins.redaction as redaction
from nexgate_proxy import cli
from nexgate_proxy.appkeys import STORE
from nexgate_proxy.store import NewLedgerEntry, Store, StoreError, UsageRecord, open_store
from nexgate_proxy.store.postgres import PostgresStore
from nexgate_proxy.store.sqlite import SQLiteStore
from nexgate_proxy.testing import FakeUpstream, Gateway, gateway_config
from tests.privacy_helpers import PLUGINS, chat, flush

ACCOUNT = "usr_retention"


def row(number: int, age: timedelta, ip: str | None = "198.51.100.7", now: datetime | None = None) -> UsageRecord:
    return UsageRecord(
        request_id=f"req_{number:024x}", ts=(now or datetime.now(UTC)) - age, endpoint="chat.completions",
        model="gpt-test", provider="fake", upstream_model="upstream-model", account_id=ACCOUNT, org_id=None,
        key_id="key_r", key_prefix="ngk_retention", prompt_tokens=10, completion_tokens=5, cached_tokens=0,
        usage_estimated=False, estimated_cost_pico=100, actual_cost_pico=70 + number, latency_ms=9, status=200,
        error_code=None, stream=False, client_ip=ip, attempts=1)


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    opened = await open_store(store_url)
    await opened.migrate()
    yield opened
    await opened.close()


async def snapshot(store: Store) -> tuple[Any, ...]:
    return (await store.usage_totals(account_id=ACCOUNT, group_by="day"),
            await store.usage_totals(group_by="model"), await store.get_balance(ACCOUNT),
            await store.list_ledger(ACCOUNT, limit=1000))


async def ips(store: Store) -> dict[str, str | None]:
    return {r.request_id: r.client_ip for r in await store.list_usage(account_id=ACCOUNT, limit=1000)}


async def eventually(check: Callable[[], Any], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_records_older_than_the_window_lose_their_ip_and_totals_stay(store: Store) -> None:
    now = datetime.now(UTC)
    rows = [row(1, timedelta(days=40), now=now), row(2, timedelta(days=30, seconds=1), now=now),
            row(3, timedelta(days=29, hours=23), now=now), row(4, timedelta(hours=1), now=now),
            row(5, timedelta(days=50), ip=None, now=now), row(6, timedelta(days=31), ip="2001:db8::7", now=now)]
    await store.record_usage(rows)
    await store.apply_ledger_entry(NewLedgerEntry(ACCOUNT, "grant", 10**9, "admin", "retention-grant"))
    before = await snapshot(store)
    full = {r.request_id: r for r in await store.list_usage(account_id=ACCOUNT)}

    assert await redaction.run_retention(store, 30, now=now) == 3
    assert await ips(store) == {rows[0].request_id: None, rows[1].request_id: None,
                                rows[2].request_id: "198.51.100.7", rows[3].request_id: "198.51.100.7",
                                rows[4].request_id: None, rows[5].request_id: None}
    # Only the IP changed: every other column, the aggregates, the ledger and the balance are intact.
    for r in await store.list_usage(account_id=ACCOUNT):
        assert r == full[r.request_id]._replace(client_ip=r.client_ip)
    assert await snapshot(store) == before
    assert await redaction.run_retention(store, 30, now=now) == 0  # idempotent
    # 0 days: nothing is kept past the next run.
    assert await redaction.run_retention(store, 0, now=now) == 2
    assert set((await ips(store)).values()) == {None}
    assert await snapshot(store) == before
    for bad in (-1, 3651, True, 1.5):
        with pytest.raises(ValueError):
            await redaction.run_retention(store, bad)  # type: ignore[arg-type]


async def test_several_instances_may_run_it_at_once(store_url: str, store: Store) -> None:
    await store.record_usage([row(n, timedelta(days=60 + n)) for n in range(40)] + [row(100, timedelta(days=1))])
    other = await open_store(store_url)
    try:
        results = await asyncio.gather(*(redaction.run_retention(s, 30) for s in (store, other, store, other)))
    finally:
        await other.close()
    assert sum(results) == 40  # every old IP cleared exactly once, whoever ran first
    assert list((await ips(store)).values()).count(None) == 40


async def test_the_gateway_clears_old_ips_at_start_and_every_interval(
        upstream: FakeUpstream, start_gateway, store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redaction, "RETENTION_INTERVAL", 0.1)
    seed = await open_store(store_url)
    await seed.migrate()
    await seed.record_usage([row(1, timedelta(days=8)), row(2, timedelta(days=6))])
    await seed.close()
    gw: Gateway = await start_gateway(gateway_config(upstream, storage={"url": store_url},
                                                     privacy={"ip_retention_days": 7}), plugins=PLUGINS)
    store = gw.app[STORE]
    old, recent = row(1, timedelta()).request_id, row(2, timedelta()).request_id

    async def old_cleared() -> bool:
        return (await ips(store))[old] is None

    await eventually(old_cleared)  # the first run is at start
    assert (await ips(store))[recent] == "198.51.100.7"
    # Rows that arrive later (a replayed spool) are cleared by a later run.
    await store.record_usage([row(3, timedelta(days=9))])

    state = gw.app[redaction.PRIVACY]

    async def late_cleared() -> bool:
        # The row is seen cleared as soon as the update commits, a moment before the job counts it.
        return (await ips(store))[row(3, timedelta()).request_id] is None and state.ips_cleared >= 2

    await eventually(late_cleared)
    assert state.ips_cleared == 2 and state.retention_runs >= 2 and state.retention_failures == 0
    # A request made now keeps its IP for the window.
    request_id = await chat(gw, gw.api_key)
    await flush(gw)
    [mine] = [r for r in await store.list_usage(account_id=gw.user_id) if r.request_id == request_id]
    assert mine.client_ip == "127.0.0.1"
    async with aiohttp.ClientSession() as session:
        async with session.get(gw.url + "/metrics") as resp:
            metrics = await resp.text()
    assert "nexgate_retention_ips_cleared_total 2.0" in metrics
    assert "nexgate_retention_last_success_timestamp_seconds" in metrics
    task = state.task
    assert task is not None and not task.done()
    await gw.runner.cleanup()  # the gateway stops: the plugin's teardown stops the job
    assert task.done() and state.task is None


async def test_a_failed_run_is_retried_and_says_why_without_secrets(
        upstream: FakeUpstream, start_gateway, backend: str, store_url: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(redaction, "RETENTION_RETRY", 0.05)
    calls: list[datetime] = []
    real = (SQLiteStore if backend == "sqlite" else PostgresStore).clear_client_ips

    async def flaky(self: Store, before: datetime) -> int:
        calls.append(before)
        if len(calls) == 1:
            raise StoreError("postgres: connection to postgresql://nexgate:hunter2pw@db failed")
        return await real(self, before)  # type: ignore[arg-type]

    monkeypatch.setattr(SQLiteStore if backend == "sqlite" else PostgresStore, "clear_client_ips", flaky)
    caplog.set_level(logging.INFO)
    gw: Gateway = await start_gateway(gateway_config(upstream, storage={"url": store_url}), plugins=PLUGINS)
    state = gw.app[redaction.PRIVACY]

    async def retried() -> bool:
        return state.retention_runs >= 1

    await eventually(retried)
    assert state.retention_failures == 1 and len(calls) >= 2
    assert calls[0].tzinfo is not None and abs((datetime.now(UTC) - calls[0]) - timedelta(days=30)) < timedelta(
        minutes=1)
    assert "IP retention run failed (StoreError)" in caplog.text and "hunter2pw" not in caplog.text


async def test_retention_from_the_cli(store: Store, store_url: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    await store.record_usage([row(1, timedelta(days=3)), row(2, timedelta(days=10)), row(3, timedelta(days=40))])
    config = tmp_path / "nexgate.yaml"
    config.write_text(yaml.safe_dump({"storage": {"url": store_url}, "privacy": {"ip_retention_days": 5}}))

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = cli.main(list(argv))
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err
        return code, out, err

    code, out, err = await asyncio.to_thread(run, "retention", "run", "--storage-url", store_url, "--days", "30")
    assert code == 0, err
    assert out.strip() == "Cleared the client IP of 1 usage records older than 30 days."
    code, out, err = await asyncio.to_thread(run, "retention", "run", "--config", str(config), "--json")
    assert code == 0, err
    assert json.loads(out) == {"ip_retention_days": 5, "cleared": 1}
    code, out, _ = await asyncio.to_thread(run, "retention", "run", "--config", str(config), "--json")
    assert json.loads(out)["cleared"] == 0
    assert list((await ips(store)).values()).count(None) == 2
    code, out, _ = await asyncio.to_thread(run, "retention", "run", "--storage-url", store_url, "--json")
    assert json.loads(out)["ip_retention_days"] == 30  # no config: the default
    config.write_text(yaml.safe_dump({"storage": {"url": store_url}, "privacy": {"ip_retention_days": -3}}))
    code, _, err = await asyncio.to_thread(run, "retention", "run", "--config", str(config))
    assert code == 1 and "privacy.ip_retention_days" in err
