"""Money invariant 1: an answer the client received has exactly one usage row and one debit,
also when the gateway is killed right after answering or the database is away for a while."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from nexgate_proxy.accounts import create_api_key
from nexgate_proxy.appkeys import STORE
from nexgate_proxy.money import usd_to_pico
from nexgate_proxy.store import LedgerEntry, NewLedgerEntry, Store, open_store
from nexgate_plugins.usage_log import OUTBOX
from nexgate_proxy.testing import FakeUpstream, free_port, gateway_config
from tests.tcpproxy import TcpProxy

PRICE = {"input": "1", "output": "2"}


async def charged_by_debits(store: Store, account_id: str, debits: list[LedgerEntry]) -> dict[str, int]:
    """{request id: cost} over the debits' own lists of the requests they charged; none charged twice,
    each debit the sum of its requests."""
    charged: dict[str, int] = {}
    for debit in debits:
        requests = await store.debited_requests(account_id, debit.id)
        assert -debit.amount_pico == sum(cost for _, cost in requests)
        for request_id, cost in requests:
            assert request_id not in charged, f"{request_id} charged twice"
            charged[request_id] = cost
    return charged


async def wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            if proc.poll() is not None:
                pytest.fail(f"gateway exited early:\n{log.read_text()}")
            try:
                async with session.get(url + "/healthz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    pytest.fail(f"gateway did not start:\n{log.read_text()}")


def launch(config: Path, port: int, log: Path) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "nexgate_proxy.cli", "serve", "--config", str(config),
                                 "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


async def test_sigkill_right_after_answers_loses_no_charge(tmp_path: Path, upstream: FakeUpstream) -> None:
    db = tmp_path / "nexgate.db"
    config = tmp_path / "nexgate.yaml"
    config.write_text(textwrap.dedent(f"""
        storage: {{url: "sqlite:///{db}"}}
        usage: {{outbox_dir: "{tmp_path / 'outbox'}", flush_interval: 30}}
        auth: {{bcrypt_rounds: 4}}
        providers: {{fake: {{type: openai, base_url: "{upstream.url}", api_key: k}}}}
        models: {{paid: {{route: [{{provider: fake, model: m}}], price: {json.dumps(PRICE)}}}}}
    """))
    store = await open_store(f"sqlite:///{db}")
    await store.migrate()
    user = await store.create_user(email="kill@example.com")
    key = (await create_api_key(store, name="k", user_id=user.id, bcrypt_rounds=4)).plaintext
    await store.apply_ledger_entry(NewLedgerEntry(account_id=user.id, kind="grant", amount_pico=10**12,
                                                  source="test", external_id="g1"))
    await store.close()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "gateway.log"
    proc = launch(config, port, log)
    received: list[str] = []
    try:
        await wait_healthy(url, proc, log)
        headers = {"Authorization": f"Bearer {key}"}
        upstream.behaviour.words = ["slow"] * 50
        upstream.behaviour.chunk_delay = 0.05
        async with aiohttp.ClientSession(headers=headers) as session:
            async def stream_until_killed() -> None:
                async with session.post(url + "/v1/chat/completions",
                                        json={"model": "paid", "stream": True, "messages": []}) as resp:
                    await resp.read()

            in_flight = [asyncio.create_task(stream_until_killed()) for _ in range(3)]
            await asyncio.sleep(0.3)
            upstream.behaviour.chunk_delay = 0.0
            upstream.behaviour.words = ["fast"]

            async def answer(i: int) -> None:
                async with session.post(url + "/v1/chat/completions",
                                        json={"model": "paid", "stream": i % 2 == 0, "messages": []}) as resp:
                    body = await resp.read()
                    complete = resp.status == 200 and (b'"choices"' in body)
                    if complete and (i % 2 == 1 or body.endswith(b"data: [DONE]\n\n")):
                        received.append(resp.headers["x-nexgate-request-id"])

            await asyncio.gather(*[answer(i) for i in range(40)])
            os.killpg(proc.pid, signal.SIGKILL)  # no shutdown, no flush
            proc.wait(5)
            results = await asyncio.gather(*in_flight, return_exceptions=True)
            assert all(isinstance(r, Exception) for r in results), "the killed streams should not complete"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    assert len(received) == 40

    # Restart: the outbox left by the killed process is replayed at start.
    proc = launch(config, port, log)
    try:
        await wait_healthy(url, proc, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, log.read_text()

    store = await open_store(f"sqlite:///{db}")
    try:
        rows = {r.request_id: r for r in await store.list_usage(account_id=user.id, limit=1000)}
        debits = [e for e in await store.list_ledger(user.id, limit=1000) if e.kind == "debit"]
        # one debit per account and batch, listing the requests it charged: each request in one debit
        charged = await charged_by_debits(store, user.id, debits)
        for request_id in received:
            assert request_id in rows, f"{request_id} answered but not recorded"
            assert charged[request_id] == rows[request_id].actual_cost_pico > 0
        assert await store.get_balance(user.id) == await store.ledger_sum(user.id)
        assert await store.get_balance(user.id) == 10**12 - sum(r.actual_cost_pico or 0 for r in rows.values())
    finally:
        await store.close()
    assert not list((tmp_path / "outbox").glob("*.jsonl")), "the replayed outbox should be gone"


@pytest.mark.postgres
async def test_a_database_outage_loses_nothing_and_books_nothing_twice(
        upstream: FakeUpstream, start_gateway, postgres_url: str) -> None:
    parts = urlsplit(postgres_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await proxy.start()
    url = parts._replace(netloc=f"{parts.username + '@' if parts.username else ''}127.0.0.1:{proxy.port}").geturl()
    try:
        config = gateway_config(upstream, storage={"url": url})
        config["models"]["paid"] = {"route": [{"provider": "fake", "model": "m"}], "price": PRICE}
        gw = await start_gateway(config)
        store = gw.app[STORE]
        await store.apply_ledger_entry(NewLedgerEntry(account_id=gw.user_id, kind="grant",
                                                      amount_pico=usd_to_pico(Decimal(1)), source="t", external_id="g"))
        headers = {"Authorization": f"Bearer {gw.api_key}"}
        body = {"model": "paid", "max_tokens": 10, "messages": []}
        async with aiohttp.ClientSession(headers=headers) as session:
            async with session.post(gw.openai_base + "/chat/completions", json=body) as resp:
                assert resp.status == 200  # key and balance are now in memory

            await proxy.cut()
            statuses = []
            for _ in range(20):
                async with session.post(gw.openai_base + "/chat/completions", json=body) as resp:
                    statuses.append(resp.status)
            assert statuses == [200] * 20, "requests within the known balance are served during the outage"
            assert not await gw.app[OUTBOX].flush()
            assert gw.app[OUTBOX].pending == 21

            await proxy.restore()
            for _ in range(50):
                if await gw.app[OUTBOX].flush():
                    break
                await asyncio.sleep(0.1)
            assert gw.app[OUTBOX].pending == 0
            assert await gw.app[OUTBOX].flush()  # and again: nothing twice
        rows = await store.list_usage(account_id=gw.user_id, limit=100)
        assert len(rows) == 21
        debits = [e for e in await store.list_ledger(gw.user_id, limit=100) if e.kind == "debit"]
        charged = await charged_by_debits(store, gw.user_id, debits)
        assert charged == {r.request_id: r.actual_cost_pico for r in rows}
        assert await store.get_balance(gw.user_id) == usd_to_pico(Decimal(1)) - sum(r.actual_cost_pico for r in rows)
    finally:
        await proxy.cut()


async def test_a_row_the_store_refuses_is_set_aside_without_its_client_ip(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from nexgate_plugins.usage_log.outbox import Outbox, decode_row
    from nexgate_proxy.records import UsageRecord

    def row(request_id: str, tokens: int) -> UsageRecord:
        return UsageRecord(request_id, datetime.now(UTC), "chat.completions", "m", "p", "u", "usr_a", None, None,
                           None, tokens, 1, 0, False, None, None, 3, 200, None, False, "203.0.113.9", 1)

    stored: list[str] = []

    async def sink(rows: list[UsageRecord]) -> int:
        if any(r.prompt_tokens < 0 for r in rows):
            raise ValueError("prompt_tokens must be an int in 0..2147483647")  # what the store says
        stored.extend(r.request_id for r in rows)
        return len(rows)

    outbox = Outbox(tmp_path, sink)
    await outbox.start()
    for request_id, tokens in (("req_a", 1), ("req_bad", -5), ("req_c", 2)):
        outbox.append(row(request_id, tokens))
    assert await outbox.flush()
    await outbox.stop()
    assert stored == ["req_a", "req_c"] and outbox.rejected == 1
    [kept] = (tmp_path / "rejected.jsonl").read_bytes().splitlines()
    assert decode_row(kept) == row("req_bad", -5)._replace(ts=decode_row(kept).ts, client_ip=None)
    assert b"203.0.113.9" not in (tmp_path / "rejected.jsonl").read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["rejected.jsonl"]  # the segment itself is gone
