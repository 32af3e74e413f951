"""Balances, transactions, usage and statements in the admin API: who sees which account's money."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, AsyncIterator

import aiohttp
import openai
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from nexgate_plugins.usage_log import OUTBOX
from nexgate_plugins.credits import statements
from nexgate_proxy.appkeys import STORE
from nexgate_proxy.money import format_usd, usd_to_pico
from nexgate_plugins.credits.statements import Account, build_statement, statement_json
from nexgate_proxy.store import LedgerDay, LedgerEntry, NewLedgerEntry
from nexgate_proxy.testing import FakeUpstream, gateway_config
from tests.plugins.admin.test_admin_api import ADMIN_TOKEN, Admin, admin_auth, org_with

PRICE = {"input": "1.5", "output": "2"}
MONEY_PATHS = ("/balance", "/transactions", "/usage", "/usage/totals")


@pytest.fixture
async def admin(upstream: FakeUpstream, start_gateway, store_url: str,
                clerk_key: rsa.RSAPrivateKey) -> AsyncIterator[Admin]:
    config = gateway_config(upstream, storage={"url": store_url}, auth=admin_auth(clerk_key))
    config["models"]["gpt-paid"] = {"route": [{"provider": "fake", "model": "upstream-model"}], "price": PRICE}
    gw = await start_gateway(config)
    async with aiohttp.ClientSession() as session:
        yield Admin(gw, session, clerk_key)


async def grant(admin: Admin, account: str, usd: str, ref: str, reason: str = "test grant") -> None:
    assert await admin.gw.app[STORE].apply_ledger_entry(NewLedgerEntry(
        account_id=account, kind="grant", amount_pico=usd_to_pico(Decimal(usd)), source="test", external_id=ref,
        description=reason))


async def new_key(admin: Admin, token: str, org_id: str | None = None) -> tuple[str, str]:
    body: dict[str, Any] = {"name": "k"}
    if org_id:
        body["org_id"] = org_id
    created = await admin.call("POST", "/keys", token, json_body=body)
    assert created.status == 201, created.body
    return created.body["id"], created.body["key"]


async def spend(admin: Admin, key: str, times: int = 1) -> None:
    client = openai.AsyncOpenAI(base_url=admin.gw.openai_base, api_key=key, max_retries=0)
    for _ in range(times):
        await client.chat.completions.create(model="gpt-paid", messages=[{"role": "user", "content": "hi"}])
    assert await admin.gw.app[OUTBOX].flush()


def no_floats(node: Any) -> None:
    """Money is never a float: not anywhere in a response."""
    assert not isinstance(node, float), node
    if isinstance(node, dict):
        for value in node.values():
            no_floats(value)
    elif isinstance(node, list):
        for value in node:
            no_floats(value)


def month_of(moment: datetime) -> str:
    return moment.strftime("%Y-%m")


def add_months(month: str, n: int) -> str:
    year, mon = map(int, month.split("-"))
    index = year * 12 + mon - 1 + n
    return f"{index // 12:04d}-{index % 12 + 1:02d}"


# ------------------------------------------------------------------- owners


async def test_a_user_sees_their_own_balance_transactions_and_usage(admin: Admin) -> None:
    token, user_id = await admin.user("user_ann")
    store = admin.gw.app[STORE]
    await grant(admin, user_id, "5", "g-ann", reason="welcome credits")
    key_id, key = await new_key(admin, token)
    for _ in range(2):
        await spend(admin, key)  # two flushes: two batches, a debit each
    balance = await store.get_balance(user_id)
    assert 0 < balance < usd_to_pico(Decimal(5))

    for path in ("/balance", f"/balance?account={user_id}"):
        reply = await admin.call("GET", path, token)
        assert reply.status == 200, reply.body
        assert reply.body == {"object": "balance", "account_id": user_id, "account_type": "user", "currency": "usd",
                              "balance_usd": format_usd(balance), "balance_pico": balance}
        assert reply.headers["Cache-Control"] == "no-store"
    assert Decimal(reply.body["balance_usd"]).scaleb(12) == balance

    tx = await admin.call("GET", "/transactions", token)
    assert tx.status == 200 and tx.body["has_more"] is False
    assert [t["kind"] for t in tx.body["data"]] == ["debit", "debit", "grant"]  # newest first
    assert sum(t["amount_pico"] for t in tx.body["data"]) == balance
    for t in tx.body["data"]:
        assert Decimal(t["amount_usd"]).scaleb(12) == t["amount_pico"]
    assert tx.body["data"][-1]["description"] == "welcome credits"
    page = await admin.call("GET", "/transactions?limit=2", token)
    assert len(page.body["data"]) == 2 and page.body["has_more"] is True
    last = await admin.call("GET", "/transactions?limit=2&offset=2", token)
    assert [t["kind"] for t in last.body["data"]] == ["grant"] and last.body["has_more"] is False
    future = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%d")
    assert (await admin.call("GET", f"/transactions?since={future}", token)).body["data"] == []
    assert len((await admin.call("GET", f"/transactions?until={future}", token)).body["data"]) == 3

    usage = await admin.call("GET", "/usage", token)
    assert usage.status == 200 and len(usage.body["data"]) == 2
    row = usage.body["data"][0]
    assert row["object"] == "usage_record" and row["account_id"] == user_id and row["key_id"] == key_id
    assert row["model"] == "gpt-paid" and row["actual_cost_pico"] > 0
    assert Decimal(row["actual_cost_usd"]).scaleb(12) == row["actual_cost_pico"]
    assert "client_ip" not in row
    assert sum(r["actual_cost_pico"] for r in usage.body["data"]) == usd_to_pico(Decimal(5)) - balance
    assert len((await admin.call("GET", "/usage?model=gpt-paid", token)).body["data"]) == 2
    assert (await admin.call("GET", "/usage?model=gpt-test", token)).body["data"] == []
    assert len((await admin.call("GET", f"/usage?key_id={key_id}", token)).body["data"]) == 2
    assert (await admin.call("GET", "/usage?key_id=key_other", token)).body["data"] == []
    assert (await admin.call("GET", "/usage?limit=1", token)).body["has_more"] is True
    assert (await admin.call("GET", f"/usage?since={future}", token)).body["data"] == []

    spent = usd_to_pico(Decimal(5)) - balance
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    for group_by, group in (("model", "gpt-paid"), ("key", key_id), ("day", today)):
        totals = await admin.call("GET", f"/usage/totals?group_by={group_by}", token)
        assert totals.status == 200, totals.body
        assert totals.body["data"] == [{"object": "usage_total", "group_by": group_by, "group": group, "requests": 2,
                                        "prompt_tokens": 22, "completion_tokens": 14,
                                        "cost_usd": format_usd(spent), "cost_pico": spent}]
    assert (await admin.call("GET", "/usage/totals", token)).body["data"][0]["group"] == today
    assert (await admin.call("GET", "/usage/totals?model=gpt-test", token)).body["data"] == []

    for reply in (usage, tx, totals):
        no_floats(reply.body)


async def test_bad_money_queries_are_400(admin: Admin) -> None:
    token, user_id = await admin.user("user_bad")
    for path, param in [
        ("/usage/totals?group_by=week", "group_by"), ("/transactions?since=yesterday", "since"),
        ("/transactions?since=2025-01-01T00:00:00", "since"),  # no timezone
        ("/usage?since=0001-01-01T00:00:00%2B23:59", "since"),  # before year 1 in UTC: was a 500
        ("/transactions?until=9999-12-31T23:59:59-23:59", "until"),  # after year 9999 in UTC
        ("/usage?limit=0", "limit"), ("/usage?offset=1000000001", "offset"), ("/usage?limit=1_0", "limit"),
        ("/usage?model=", "model"),
        ("/usage?limit=1001", "limit"), ("/balance?colour=blue", "colour"), ("/usage?key_id=not%20an%20id", "key_id"),
        ("/statements/2025-13", "month"), ("/statements/2025-1", "month"), ("/statements/abcd-ef", "month"),
        ("/statements/1969-12", "month"), ("/statements/2025-01?format=xml", "format"),
    ]:
        reply = await admin.call("GET", path, token)
        assert (reply.status, reply.error["param"]) == (400, param), (path, reply.body)
    # A period that ends before it starts is empty, not an error (the document cannot say `since < until`).
    empty = await admin.call("GET", "/usage?since=2025-02-01&until=2025-01-01", token)
    assert (empty.status, empty.body["data"]) == (200, [])
    # Offsets with a '+' sent unencoded (a space) still parse.
    assert (await admin.call("GET", "/transactions?since=2025-01-01T00:00:00+00:00", token)).status == 200
    assert (await admin.call("GET", "/transactions?since=2025-01-01T02:00:00%2B02:00", token)).status == 200
    for path in MONEY_PATHS:
        assert (await admin.call("GET", path, None)).status == 401
        assert (await admin.call("GET", path, "not-a-token")).status == 401
        assert (await admin.call("POST", path, token, json_body={})).status == 405


# -------------------------------------------------------------- organizations


async def test_org_admins_see_the_org_aggregate_never_members_personal_accounts(admin: Admin) -> None:
    owner_token, owner_id = await admin.user("user_owner")
    admin_token, admin_id = await admin.user("user_admin")
    member_token, member_id = await admin.user("user_member")
    outsider_token, _ = await admin.user("user_outsider")
    org = await org_with(admin, owner_token, **{admin_id: "admin", member_id: "member"})
    store = admin.gw.app[STORE]
    await grant(admin, org, "10", "g-org")
    await grant(admin, member_id, "3", "g-member")
    org_key_id, org_key = await new_key(admin, admin_token, org_id=org)
    member_key_id, member_key = await new_key(admin, member_token)
    await spend(admin, org_key, 1)
    await spend(admin, member_key, 2)
    org_balance = await store.get_balance(org)
    month = month_of(datetime.now(UTC))

    for token in (owner_token, admin_token, ADMIN_TOKEN):
        balance = await admin.call("GET", f"/balance?account={org}", token)
        assert balance.status == 200, balance.body
        assert (balance.body["account_type"], balance.body["balance_pico"]) == ("organization", org_balance)
        usage = await admin.call("GET", f"/usage?account={org}", token)
        if token == ADMIN_TOKEN:
            assert [(r["account_id"], r["key_id"]) for r in usage.body["data"]] == [(org, org_key_id)]
        else:  # the org's admins see aggregates, not request rows (privacy.org_request_rows is off)
            assert usage.status == 403 and usage.error["code"] == "aggregates_only"
        totals = await admin.call("GET", f"/usage/totals?account={org}&group_by=key", token)
        assert [t["group"] for t in totals.body["data"]] == [org_key_id]  # never the member's personal key
        tx = await admin.call("GET", f"/transactions?account={org}", token)
        assert [t["kind"] for t in tx.body["data"]] == ["debit", "grant"]
        statement = await admin.call("GET", f"/statements/{month}?account={org}", token)
        assert statement.status == 200 and statement.body["closing_balance_pico"] == org_balance

    # A member's personal account is invisible to the org's admins and owners: 404, as an unknown id.
    for token in (owner_token, admin_token):
        for path in (*MONEY_PATHS, f"/statements/{month}"):
            for account in (member_id, "usr_doesnotexist"):
                reply = await admin.call("GET", f"{path}?account={account}", token)
                assert (reply.status, reply.error["code"]) == (404, "not_found"), (path, account)
    # Plain members see their own account, and may not see the organization's money.
    own = await admin.call("GET", "/balance", member_token)
    assert own.body["balance_pico"] == await store.get_balance(member_id) > 0
    assert [r["key_id"] for r in (await admin.call("GET", "/usage", member_token)).body["data"]] == [member_key_id] * 2
    for path in (*MONEY_PATHS, f"/statements/{month}"):
        reply = await admin.call("GET", f"{path}?account={org}", member_token)
        assert reply.status == 403, (path, reply.body)
        # Outsiders do not learn that the organization exists.
        reply = await admin.call("GET", f"{path}?account={org}", outsider_token)
        assert reply.status == 404, (path, reply.body)

    # The superadmin sees any account, and must say which.
    member = await admin.call("GET", f"/balance?account={member_id}", ADMIN_TOKEN)
    assert member.status == 200 and member.body["account_type"] == "user"
    assert (await admin.call("GET", "/balance", ADMIN_TOKEN)).error["param"] == "account"
    assert (await admin.call("GET", "/balance?account=usr_nobody", ADMIN_TOKEN)).status == 404
    assert (await admin.call("GET", "/balance?account=bad%20id", ADMIN_TOKEN)).status == 404
    assert owner_id != member_id


# ----------------------------------------------------------------- statements


async def test_a_statement_adds_up_and_its_html_is_escaped(admin: Admin) -> None:
    evil = '<img src=x onerror="alert(1)">'
    token = admin.jwt("user_stmt")
    me = await admin.call("GET", "/me", token)
    user_id = me.body["user"]["id"]
    assert (await admin.call("PATCH", f"/users/{user_id}", token, json_body={"name": evil})).status == 200
    store = admin.gw.app[STORE]
    await grant(admin, user_id, "7.25", "g-1", reason="<script>alert('x')</script> & friends")
    await grant(admin, user_id, "0.000000000001", "g-2", reason="one pico-dollar")
    _, key = await new_key(admin, token)
    await spend(admin, key, 3)
    balance = await store.get_balance(user_id)
    month = month_of(datetime.now(UTC))

    reply = await admin.call("GET", f"/statements/{month}", token)
    assert reply.status == 200, reply.body
    s = reply.body
    no_floats(s)
    assert (s["object"], s["account_id"], s["account_name"], s["month"], s["final"]) == \
        ("statement", user_id, evil, month, False)
    amounts = [t["amount_pico"] for t in s["transactions"]]
    assert s["opening_balance_pico"] + sum(amounts) == s["closing_balance_pico"] == balance
    assert s["opening_balance_pico"] == 0
    assert s["credits_pico"] == sum(a for a in amounts if a > 0) == usd_to_pico(Decimal("7.250000000001"))
    assert s["debits_pico"] == sum(a for a in amounts if a < 0) < 0
    for name in ("opening_balance", "credits", "debits", "closing_balance"):
        assert s[f"{name}_usd"] == format_usd(s[f"{name}_pico"])
    for t in s["transactions"]:
        assert t["amount_usd"] == format_usd(t["amount_pico"])
    usage_lines = [t for t in s["transactions"] if t["source"] == "request"]
    assert len(usage_lines) == 1 and usage_lines[0]["count"] == 3 and usage_lines[0]["id"] is None
    assert "3 requests" in usage_lines[0]["description"]
    [by_model] = s["usage_by_model"]
    assert (by_model["group"], by_model["requests"], by_model["cost_pico"]) == ("gpt-paid", 3, -s["debits_pico"])

    previous = (await admin.call("GET", f"/statements/{add_months(month, -1)}", token)).body
    assert (previous["opening_balance_pico"], previous["closing_balance_pico"], previous["transactions"]) == (0, 0, [])
    assert previous["final"] is True
    # A month that has not begun has no statement yet: a clear 404, not a 200 "provisional".
    following = await admin.call("GET", f"/statements/{add_months(month, 1)}", token)
    assert following.status == 404 and following.error["code"] == "month_not_started"
    assert add_months(month, 1) in following.error["message"]

    url = f"{admin.gw.url}/admin/v1/statements/{month}"
    auth = {"Authorization": f"Bearer {token}"}
    for params, headers in (({"format": "html"}, {}), ({}, {"Accept": "text/html,application/xhtml+xml"})):
        async with admin.session.get(url, params=params, headers={**auth, **headers}) as resp:
            page = await resp.text()
            assert resp.status == 200 and resp.content_type == "text/html" and resp.charset == "utf-8"
            assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
            assert resp.headers["Cache-Control"] == "no-store"
        assert "<script" not in page and "<img" not in page and "onerror=\"" not in page
        assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; friends" in page
        assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in page
        assert "$7.25" in page and "gpt-paid" in page and "Closing balance" in page
    async with admin.session.get(url, params={"format": "json"}, headers={**auth, "Accept": "text/html"}) as resp:
        assert resp.content_type == "application/json" and json.loads(await resp.text())["month"] == month


def _by_day(entries: Any) -> list[LedgerDay]:
    days: dict[str, list[Any]] = {}
    for e in entries:
        day = days.setdefault(e.created_at.date().isoformat(), [e.created_at, 0, 0])
        day[0], day[1], day[2] = max(day[0], e.created_at), day[1] + e.amount_pico, day[2] + 1
    return [LedgerDay(d, at, amount, n) for d, (at, amount, n) in sorted(days.items())]


class FakeLedger:
    """A ledger in memory that books new entries while a statement is being read."""

    def __init__(self, entries: list[LedgerEntry]) -> None:
        self.entries = list(entries)
        self.booked_meanwhile: list[LedgerEntry] = []

    def _scan(self, account_id: str, since: datetime | None, until: datetime | None) -> list[LedgerEntry]:
        if since is not None and self.booked_meanwhile:  # the statement's scan, not its snapshot
            self.entries.append(self.booked_meanwhile.pop(0))
        return [e for e in self.entries if e.account_id == account_id and (since is None or e.created_at >= since)
                and (until is None or e.created_at < until)]

    async def list_ledger(self, account_id: str, *, since: datetime | None = None, until: datetime | None = None,
                          without_request_debits: bool = False, limit: int = 100, offset: int = 0) -> list[LedgerEntry]:
        rows = [e for e in self._scan(account_id, since, until)
                if not (without_request_debits and e.source == "request")]
        rows.sort(key=lambda e: (e.created_at, e.id), reverse=True)
        return rows[offset:offset + limit]

    async def ledger_days(self, account_id: str, *, since: datetime | None = None, until: datetime | None = None,
                          up_to_id: int | None = None, without_request_debits: bool = False) -> list[LedgerDay]:
        return _by_day(e for e in self._scan(account_id, since, until) if (up_to_id is None or e.id <= up_to_id)
                       and not (without_request_debits and e.source == "request"))

    async def ledger_snapshot(self, account_id: str, *, since: datetime) -> tuple[int, int, list[LedgerDay]]:
        mine = sorted((e for e in self.entries if e.account_id == account_id), key=lambda e: (e.created_at, e.id))
        return (sum(e.amount_pico for e in mine), mine[-1].id if mine else 0,
                _by_day(e for e in mine if e.source == "request" and e.created_at.date() >= since.date()))

    async def get_balance(self, account_id: str) -> int:
        return sum(e.amount_pico for e in self.entries if e.account_id == account_id)

    async def usage_totals(self, **_: Any) -> list:
        return []


async def test_statement_balances_stay_exact_while_entries_are_booked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(statements, "PAGE", 2)
    ids = iter(range(1, 1000))

    def entry(day: str, amount: int, source: str = "admin", kind: str = "grant") -> LedgerEntry:
        at = datetime.fromisoformat(day).replace(tzinfo=UTC)
        return LedgerEntry(next(ids), "usr_a", kind, amount, source, f"x{amount}{day}", None, f"d{amount}", at)

    before = [entry("2025-12-20T10:00:00", 1_000), entry("2025-12-31T23:59:59.999999", 50)]
    january = [entry("2026-01-01T00:00:00", 7), entry("2026-01-05T08:00:00", -3, "request", "debit"),
               entry("2026-01-05T09:00:00", -4, "request", "debit"),
               entry("2026-01-05T09:00:00", -5, "request", "debit"),
               entry("2026-01-06T01:00:00", -6, "dodopayments", "refund"), entry("2026-01-31T23:59:59", 21)]
    after = [entry("2026-02-01T00:00:00", 13), entry("2026-02-03T00:00:00", -17, "request", "debit")]
    store = FakeLedger(before + january + after)
    # Booked during the scan: newer entries shift the pages, and one with an old date (a slow writer).
    store.booked_meanwhile = [entry("2026-02-10T00:00:00", 100), entry("2026-02-10T00:00:01", 200),
                              entry("2026-01-10T00:00:00", 300), entry("2026-02-11T00:00:00", 400)]
    account = Account("usr_a", "user", "A")
    statement = await build_statement(store, account, "2026-01",  # type: ignore[arg-type]
                                      now=datetime(2026, 2, 15, tzinfo=UTC))
    assert statement.opening_pico == 1_050
    assert statement.closing_pico == 1_050 + 7 - 3 - 4 - 5 - 6 + 21 == 1_060
    assert statement.opening_pico + sum(x.amount_pico for x in statement.lines) == statement.closing_pico
    assert [(x.amount_pico, x.count) for x in statement.lines] == [(7, 1), (-12, 3), (-6, 1), (21, 1)]
    assert statement.final and statement.credits_pico == 28 and statement.debits_pico == -18
    body = statement_json(statement)
    assert body["transactions"][1]["description"] == "Usage charges, 2026-01-05 (3 requests)"
    # An empty ledger, and the month that is still running.
    empty = await build_statement(FakeLedger([]), account, "2026-01")  # type: ignore[arg-type]
    assert (empty.opening_pico, empty.closing_pico, empty.lines) == (0, 0, ())
    running = await build_statement(FakeLedger(before + january), account, "2026-01",  # type: ignore[arg-type]
                                    now=datetime(2026, 1, 20, tzinfo=UTC))
    assert not running.final and (running.opening_pico, running.closing_pico) == (1_050, 1_060)
    assert replace(running, generated_at=datetime(2026, 2, 1, tzinfo=UTC)).final


def test_months_parse_to_utc_periods() -> None:
    assert statements.parse_month("2025-12") == (datetime(2025, 12, 1, tzinfo=UTC), datetime(2026, 1, 1, tzinfo=UTC))
    assert statements.parse_month("2024-02")[1] == datetime(2024, 3, 1, tzinfo=UTC)
    for bad in ("2025-00", "2025-13", "25-01", "2025-1", "2025-01-01", "9999-12", " 2025-01"):
        with pytest.raises(ValueError):
            statements.parse_month(bad)
