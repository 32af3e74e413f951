"""Privacy as a user and an operator meet it: account deletion, data export, the redaction guard."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import zipfile
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import openai
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

import nexgate_plugins.admin.privacy as privacy_api
import nexgate_plugins.admin.privacy_openapi as privacy_openapi
import nexgate_plugins.redaction as redaction
from nexgate_plugins.admin.openapi import build_openapi
from nexgate_plugins.usage_log import OUTBOX
from nexgate_proxy import Identity, RecordRejected, UsageRecord, hookimpl
from nexgate_proxy.app import build_app
from nexgate_proxy.appkeys import STORE
from nexgate_proxy.config import ConfigError, parse_config
from nexgate_proxy.money import format_usd
from nexgate_proxy.plugins import resolve_config
from nexgate_proxy.store import NewLedgerEntry, Store
from tests.cli_runner import Cli
from nexgate_proxy.testing import Behaviour, FakeUpstream, Gateway, RecordingPlugin, gateway_config
from tests.privacy_helpers import (
    PLUGINS,
    AdminClient,
    auth_config,
    chat,
    dump_database,
    flush,
    priced_models,
    sdk,
)


@pytest.fixture
async def privacy(upstream: FakeUpstream, start_gateway, store_url: str,
                  clerk_key: rsa.RSAPrivateKey) -> AsyncIterator[AdminClient]:
    config = gateway_config(upstream, storage={"url": store_url}, auth=auth_config(clerk_key),
                            models=priced_models(upstream.url))
    gw = await start_gateway(config, plugins=PLUGINS)
    async with aiohttp.ClientSession() as session:
        yield AdminClient(gw, session, clerk_key)


async def grant(store: Store, account_id: str, usd: int = 1) -> None:
    await store.apply_ledger_entry(NewLedgerEntry(account_id, "grant", usd * 10**12, "admin", f"grant-{account_id}"))


async def money(store: Store, account_id: str) -> tuple[Any, ...]:
    return (await store.get_balance(account_id), await store.ledger_sum(account_id),
            await store.list_ledger(account_id, limit=1000),
            await store.usage_totals(account_id=account_id, group_by="model"))


# ------------------------------------------------------------------ deletion


async def test_deleting_an_account_anonymizes_it_and_keeps_the_money(privacy: AdminClient, store_url: str,
                                                                     backend: str) -> None:
    a, gw = privacy, privacy.gw
    store = gw.app[STORE]
    alice_token, alice = await a.user("user_alice_7c1", email="alice@example.com", name="Alice Liddell")
    bob_token, bob = await a.user("user_bob_2f9", email="bob@example.com", name="Bob Builder")
    k1_id, k1 = await a.key(alice_token, "alice laptop")
    k2_id, k2 = await a.key(alice_token, "alice spare")
    org = await a.org(bob_token, "Acme", **{alice: "admin"})
    k3_id, k3 = await a.key(alice_token, "acme ci", org_id=org)  # an org key she created (she saw it)
    kb_id, kb = await a.key(bob_token, "bob laptop")
    for account in (alice, bob, org):
        await grant(store, account)
    alice_requests = [await chat(gw, k1), await chat(gw, k1, stream=True), await chat(gw, k2)]
    org_requests = [await chat(gw, k3)]
    bob_requests = [await chat(gw, kb)]
    await flush(gw)
    before = {account: await money(store, account) for account in (alice, bob, org)}
    assert before[alice][0] < 10**12 and before[alice][0] == before[alice][1]  # debits were booked

    deleted = await a.call("DELETE", f"/users/{alice}", alice_token)  # self-service with her Clerk session
    assert deleted.status == 200, deleted.body
    assert deleted.headers["Cache-Control"] == "no-store"
    body = deleted.body
    assert body["object"] == "user.deleted" and body["id"] == alice and body["deleted"] is True
    assert body["already_deleted"] is False and body["deleted_at"].endswith("Z")
    assert sorted(body["revoked_key_ids"]) == sorted([k1_id, k2_id, k3_id])
    assert body["left_org_ids"] == [org]
    assert body["cleared_ip_records"] == len(alice_requests) + len(org_requests)

    # Balances, ledgers and aggregates are exactly as they were, under the same (anonymous) id.
    assert {account: await money(store, account) for account in (alice, bob, org)} == before
    # Her keys are dead at once; Bob's work.
    for key in (k1, k2, k3):
        with pytest.raises(openai.AuthenticationError):
            await chat(gw, key)
    assert await chat(gw, kb)
    # Her identifiers are gone from every table; the id stays, anonymous.
    user = await store.get_user(alice)
    assert user is not None and (user.email, user.name, user.external_id) == (None, None, None)
    assert user.deleted_at is not None
    await flush(gw)
    dump = await dump_database(store_url, backend)
    for identifier in ("alice@example.com", "Alice Liddell", "user_alice_7c1", "alice laptop", "alice spare"):
        assert identifier not in dump, identifier
    assert alice in dump and "bob@example.com" in dump and "acme ci" in dump  # the org's key keeps its name
    # Her IPs are cleared (her account's rows and her org key's); others keep theirs.
    rows = {r.request_id: r for account in (alice, org, bob) for r in await store.list_usage(account_id=account)}
    assert [rows[r].client_ip for r in alice_requests + org_requests] == [None] * 4
    assert rows[bob_requests[0]].client_ip == "127.0.0.1"
    # She left the org; the org and its owner are untouched.
    assert [(m.user_id, m.role) for m in await store.list_members(org)] == [(bob, "owner")]

    # Deleting twice is harmless: 200 again, nothing changes.
    again = await a.call("DELETE", f"/users/{alice}")  # the superadmin
    assert again.status == 200
    assert again.body == {**body, "already_deleted": True, "revoked_key_ids": [], "left_org_ids": [],
                          "cleared_ip_records": 0}
    # Her old session no longer maps to the anonymous id (signing in again makes a new, empty account).
    assert (await a.call("DELETE", f"/users/{alice}", alice_token)).status == 404
    shown = await a.call("GET", f"/users/{alice}")
    assert shown.body["email"] is None and shown.body["deleted_at"] == body["deleted_at"]


async def test_the_last_owner_of_an_organization_cannot_delete_their_account(privacy: AdminClient) -> None:
    a = privacy
    store = a.gw.app[STORE]
    carol_token, carol = await a.user("user_carol", email="carol@example.com")
    dave_token, dave = await a.user("user_dave")
    key_id, _ = await a.key(carol_token, "carol")
    org = await a.org(carol_token, "Solo", **{dave: "admin"})
    refused = await a.call("DELETE", f"/users/{carol}", carol_token)
    assert refused.status == 409
    error = refused.body["error"]
    assert error["code"] == "last_owner" and org in error["message"] and "owner" in error["message"]
    # Nothing changed.
    assert (await store.get_user(carol)).email == "carol@example.com"  # type: ignore[union-attr]
    assert (await store.get_api_key(key_id)).revoked_at is None  # type: ignore[union-attr]
    assert await store.get_role(org, carol) == "owner"

    promoted = await a.call("PATCH", f"/orgs/{org}/members/{dave}", carol_token, json_body={"role": "owner"})
    assert promoted.status == 200
    deleted = await a.call("DELETE", f"/users/{carol}", carol_token)
    assert deleted.status == 200 and deleted.body["left_org_ids"] == [org]
    assert [(m.user_id, m.role) for m in await store.list_members(org)] == [(dave, "owner")]


async def test_nobody_else_can_export_or_delete_an_account(privacy: AdminClient) -> None:
    a = privacy
    store = a.gw.app[STORE]
    owner_token, owner = await a.user("user_boss")
    admin_token, admin = await a.user("user_orgadmin")
    member_token, member = await a.user("user_member", email="member@example.com")
    await a.key(member_token, "personal")
    org = await a.org(owner_token, "Acme", **{admin: "admin", member: "member"})
    for token in (owner_token, admin_token):  # the org's owner and admin: still somebody else's account
        for method, path in (("DELETE", f"/users/{member}"), ("GET", f"/users/{member}/export"),
                             ("GET", f"/users/{member}/export?format=csv")):
            reply = await a.call(method, path, token)
            assert (reply.status, reply.body["error"]["code"]) == (404, "not_found"), (method, path)
        # Org admins see the org's keys and members, never a member's personal keys.
        assert (await a.call("GET", f"/keys?user_id={member}", token)).status == 404
        assert (await a.call("GET", f"/orgs/{org}/keys", token)).body["data"] == []
    for method, path in (("DELETE", f"/users/{owner}"), ("GET", f"/users/{owner}/export")):
        assert (await a.call(method, path, member_token)).status == 404
    for token in (None, "not-a-token"):
        assert (await a.call("GET", f"/users/{member}/export", token)).status == 401
        assert (await a.call("DELETE", f"/users/{member}", token)).status == 401
    assert (await a.call("GET", "/users/usr_unknown/export")).status == 404
    assert (await a.call("DELETE", "/users/usr_unknown")).status == 404
    assert (await a.call("GET", "/users/bad%24id/export")).status == 404
    bad = await a.call("GET", f"/users/{member}/export?format=xml", member_token)
    assert (bad.status, bad.body["error"]["param"]) == (400, "format")
    assert (await a.call("GET", f"/users/{member}/export?since=1", member_token)).status == 400
    assert (await a.call("DELETE", f"/users/{member}?force=1", member_token)).status == 400
    assert (await a.call("POST", f"/users/{member}/export", member_token)).status == 405
    assert (await a.call("PUT", f"/users/{member}", member_token)).status == 405
    assert (await a.call("GET", f"/users/{member}", member_token)).status == 200  # the admin API's own route
    # Nothing happened to the member.
    user = await store.get_user(member)
    assert user is not None and user.email == "member@example.com" and user.deleted_at is None
    assert await store.get_role(org, member) == "member"


# -------------------------------------------------------------------- export


def csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return str(value)


def read_zip(data: bytes) -> dict[str, list[list[str]]]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {name: list(csv.reader(io.StringIO(archive.read(name).decode("utf-8"))))
                for name in archive.namelist()}


def without_time(document: dict[str, Any]) -> dict[str, Any]:
    return {**document, "exported_at": None}


async def test_the_export_matches_the_users_activity_exactly(privacy: AdminClient, upstream: FakeUpstream,
                                                            tmp_path: Path, store_url: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    a, gw = privacy, privacy.gw
    store = gw.app[STORE]
    erin_token, erin = await a.user("user_erin", email="erin@example.com", name="Erin Example")
    owner_token, owner = await a.user("user_owner_x")
    org = await a.org(owner_token, "Acme", **{erin: "member"})
    _, org_key = await a.key(owner_token, "acme prod", org_id=org)
    k1_id, k1 = await a.key(erin_token, "laptop")
    k2_id, k2 = await a.key(erin_token, "old")
    await grant(store, erin)
    await grant(store, org)
    ids = [await chat(gw, k1), await chat(gw, k1, stream=True), await chat(gw, k2)]
    upstream.behaviour = Behaviour(status=500)
    with pytest.raises(openai.InternalServerError) as failed:
        await chat(gw, k1)
    ids.append(failed.value.response.headers["x-nexgate-request-id"])
    upstream.behaviour = Behaviour()
    await chat(gw, org_key)  # the org's activity: not part of her personal data
    assert (await a.call("DELETE", f"/keys/{k2_id}", erin_token)).status == 200
    await flush(gw)

    reply = await a.call("GET", f"/users/{erin}/export", erin_token)
    assert reply.status == 200 and reply.headers["Content-Type"].startswith("application/json")
    assert reply.headers["Content-Disposition"] == f'attachment; filename="nexgate-export-{erin}.json"'
    assert reply.headers["Cache-Control"] == "no-store"
    document = reply.body
    assert list(document) == ["object", "version", "exported_at", "user", "balance", "api_keys", "memberships",
                              "usage", "usage_daily", "ledger"]
    assert document["usage_daily"] == []  # no day rolled up (usage.rollup_after_days is off)
    assert (document["object"], document["version"]) == ("user.export", 1)
    assert document["user"] == (await a.call("GET", f"/users/{erin}", erin_token)).body
    assert document["user"]["email"] == "erin@example.com"
    keys = document["api_keys"]
    assert [(k["id"], k["name"], k["revoked_at"] is not None) for k in keys] == [(k1_id, "laptop", False),
                                                                                  (k2_id, "old", True)]
    assert all("key" not in k and "secret_hash" not in k for k in keys)
    membership = document["memberships"]
    assert [(m["org_id"], m["org_name"], m["role"]) for m in membership] == [(org, "Acme", "member")]
    assert membership[0]["created_at"].endswith("Z")

    usage = document["usage"]
    assert [u["request_id"] for u in usage] == ids  # every request, oldest first, nothing of the org's
    assert {u["account_id"] for u in usage} == {erin} and {u["client_ip"] for u in usage} == {"127.0.0.1"}
    assert [(u["key_id"], u["stream"], u["status"], u["error_code"]) for u in usage] == [
        (k1_id, False, 200, None), (k1_id, True, 200, None), (k2_id, False, 200, None),
        (k1_id, False, 502, "upstream_error")]
    assert [(u["prompt_tokens"], u["completion_tokens"]) for u in usage] == [(11, 7), (11, 3), (11, 7), (0, 0)]
    costs = [11 * 10**6 + 7 * 2 * 10**6, 11 * 10**6 + 3 * 2 * 10**6, 11 * 10**6 + 7 * 2 * 10**6, 0]
    assert [u["actual_cost_pico"] for u in usage] == costs
    stored = sorted(await store.list_usage(account_id=erin), key=lambda r: (r.ts, r.request_id))
    assert usage == [privacy_api.usage_json(r) for r in stored]

    ledger = document["ledger"]
    assert [e["id"] for e in ledger] == sorted(e["id"] for e in ledger)  # oldest first
    # One batch books one debit for her charged requests, named after the first of their ids.
    assert (ledger[0]["kind"], ledger[0]["amount_pico"]) == ("grant", 10**12)
    assert [(e["kind"], e["amount_pico"], e["request_id"]) for e in ledger[1:]] == [
        ("debit", -sum(costs[:3]), min(ids[:3]))]
    assert await store.debited_requests(erin, ledger[1]["id"]) == sorted(zip(ids[:3], costs[:3]))
    assert [ledger_row for ledger_row in ledger] == [privacy_api.ledger_json(e) for e in
                                                     sorted(await store.list_ledger(erin), key=lambda e: e.id)]
    balance = await store.get_balance(erin)
    assert document["balance"] == {"account_id": erin, "balance_pico": balance, "balance_usd": format_usd(balance)}
    assert sum(e["amount_pico"] for e in ledger) == balance == 10**12 - sum(costs)

    # The superadmin gets the same document.
    by_admin = await a.call("GET", f"/users/{erin}/export?format=json")
    assert without_time(by_admin.body) == without_time(document)

    # CSV: a zip with one CSV per section, the same columns and values as the JSON.
    zipped = await a.call("GET", f"/users/{erin}/export?format=csv", erin_token)
    assert zipped.status == 200 and zipped.headers["Content-Type"] == "application/zip"
    assert zipped.headers["Content-Disposition"] == f'attachment; filename="nexgate-export-{erin}.zip"'
    files = read_zip(zipped.raw)
    assert list(files) == ["user.csv", "balance.csv", "api_keys.csv", "memberships.csv", "usage.csv", "usage_daily.csv",
                           "ledger.csv"]
    for section, columns in privacy_api.SECTIONS:
        header, *rows = files[f"{section}.csv"]
        assert header == list(columns)
        items = [document[section]] if isinstance(document[section], dict) else document[section]
        assert rows == [[csv_cell(item[c]) for c in columns] for item in items], section

    # The CLI writes the same, readable by the owner only.
    cli = Cli(capsys, "--storage-url", store_url)
    json_file, zip_file = tmp_path / "erin.json", tmp_path / "erin.zip"
    code, out, err = await cli("users", "export", erin, "--format", "json", "--output", str(json_file))
    assert code == 0, err
    assert f"{len(ids)} usage records" in out
    assert without_time(json.loads(json_file.read_text())) == without_time(document)
    assert os.stat(json_file).st_mode & 0o777 == 0o600
    code, _, err = await cli("users", "export", erin, "--format", "csv", "--output", str(zip_file), "--json")
    assert code == 0, err
    assert read_zip(zip_file.read_bytes()) == files
    code, out, _ = await cli("users", "export", erin)  # JSON to standard output by default
    assert code == 0 and without_time(json.loads(out)) == without_time(document)


async def test_csv_cells_that_spreadsheets_would_run_are_escaped() -> None:
    now = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    document = {
        "object": "user.export", "version": 1, "exported_at": "2030-01-02T03:04:05Z",
        "user": {"object": "user", "id": "usr_a", "external_id": None, "email": "@evil.example",
                 "name": "=HYPERLINK(\"http://x\")", "created_at": "2030-01-01T00:00:00Z", "deleted_at": None},
        "balance": {"account_id": "usr_a", "balance_pico": -5, "balance_usd": "-0.000000000005"},
        "api_keys": [], "memberships": [{"org_id": "org_a", "org_name": "+1 Corp", "role": "member",
                                         "created_at": None}],
        "usage": [], "usage_daily": [],
        "ledger": [{"id": 1, "account_id": "usr_a", "kind": "adjustment", "amount_pico": -5,
                    "source": "admin", "external_id": "x", "request_id": None,
                    "description": "-refund", "created_at": now.isoformat()}],
    }
    files = read_zip(privacy_api.export_csv_zip(document))
    assert files["user.csv"][1][2:4] == ["'@evil.example", "'=HYPERLINK(\"http://x\")"]
    assert files["balance.csv"][1] == ["usr_a", "-5", "-0.000000000005"]  # numbers are never escaped
    assert files["memberships.csv"][1][1] == "'+1 Corp"
    assert files["ledger.csv"][1][3] == "-5" and files["ledger.csv"][1][7] == "'-refund"
    assert files["usage.csv"] == [list(privacy_api.USAGE_COLUMNS)]  # a header even when empty


async def test_users_delete_and_export_from_the_cli(privacy: AdminClient, store_url: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    a = privacy
    store = a.gw.app[STORE]
    frank_token, frank = await a.user("user_frank", email="frank@example.com", name="Frank")
    key_id, key = await a.key(frank_token, "frank")
    cli = Cli(capsys, "--storage-url", store_url)
    code, _, err = await cli("users", "delete", frank)
    assert code == 1 and "--yes" in err and err.startswith("nexgate: error: ")
    assert (await store.get_user(frank)).email == "frank@example.com"  # type: ignore[union-attr]

    code, out, err = await cli("users", "delete", frank, "--yes", "--json")
    assert code == 0, err
    assert err == ""  # running gateways learn of it from the store's change feed, whatever the state store
    result = json.loads(out)
    assert (result["id"], result["revoked_key_ids"], result["already_deleted"]) == (frank, [key_id], False)
    with pytest.raises(openai.AuthenticationError):  # never cached by the gateway: refused at once
        await chat(a.gw, key)
    code, out, _ = await cli("users", "delete", frank, "--yes")
    assert code == 0 and "already deleted" in out
    code, _, err = await cli("users", "delete", "usr_nobody", "--yes")
    assert code == 1 and "no such user" in err
    code, _, err = await cli("users", "export", "usr_nobody")
    assert code == 1 and "no such user" in err
    code, _, err = await cli("users", "export", frank, "--format", "csv")
    assert code == 1 and "--output" in err


# ------------------------------------------------------------ the guard, unit


GUARD_CONFIG = {
    "providers": {"fake": {"type": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": "sk-test-123456"}},
    "models": {"gpt-test": {"route": [{"provider": "fake", "model": "upstream-model"}], "free": True}},
}


def guard_config() -> Any:
    return parse_config(GUARD_CONFIG)


def a_record(**changes: Any) -> UsageRecord:
    record = UsageRecord(
        request_id="req_" + "ab" * 12, ts=datetime.fromtimestamp(1_800_000_000.5 - 10**8, UTC),
        endpoint="chat.completions",
        model="gpt-test", provider="fake", upstream_model="upstream-model", account_id="usr_" + "a" * 26,
        org_id=None, key_id="key_" + "b" * 26, key_prefix="ngk_ABCDEFGHIJKL", prompt_tokens=11,
        completion_tokens=7, cached_tokens=0, usage_estimated=False, estimated_cost_pico=10**9,
        actual_cost_pico=5 * 10**8, latency_ms=12, status=200, error_code=None, stream=False,
        client_ip="203.0.113.7", attempts=1)
    return record._replace(**changes)


BAD_FIELDS: dict[str, list[Any]] = {
    "request_id": ["req_CANARY prompt", "x" * 30, None, b"req_abc"],
    "ts": [datetime(2026, 1, 1), datetime(1999, 1, 1, tzinfo=UTC), datetime.now(UTC) + timedelta(days=2),
           1_700_000_000.0, "2026-01-01T00:00:00Z"],
    "endpoint": ["chat.completions\nCANARY", "models", None],
    "model": ["CANARY", "gpt-test ", 5],
    "provider": ["other"],
    "upstream_model": ["upstream-model-CANARY"],
    "account_id": ["usr_abc CANARY", "usr_" + "a" * 100, "USR_abc", "", 42],
    "org_id": ["org_a/b"],
    "key_id": ["key-abc"],
    "key_prefix": ["ngk_ABCDEFGHIJKL_secretsecret", "ngk_" + "A" * 17, "sk-abc"],
    "prompt_tokens": ["11", 1.5, True, 2**64],
    "completion_tokens": [None],
    "cached_tokens": [[1]],
    "usage_estimated": [1, "yes"],
    "estimated_cost_pico": [0.001, Decimal(5), -1, 2**63, "100"],
    "actual_cost_pico": [1.0, True],
    "latency_ms": [-1, 3.5],
    "status": [1000, -1, "200"],
    "error_code": ["Upstream said: CANARY", "x" * 65, "UPPER", 7],
    "stream": [None],
    "client_ip": ["CANARY", "fe80::1%CANARY", "203.0.113.7, 10.0.0.1", "1" * 46],
    "attempts": [-1, 10_000],
}


def test_the_guard_admits_metadata_and_rejects_anything_else(caplog: pytest.LogCaptureFixture) -> None:
    guard = redaction.Guard(guard_config())
    assert list(BAD_FIELDS) == list(UsageRecord._fields)  # every field has cases
    for good in [a_record(), a_record(model=None, provider=None, upstream_model=None, account_id=None,
                                      key_id=None, key_prefix=None, estimated_cost_pico=None, actual_cost_pico=None,
                                      client_ip=None),
                 a_record(client_ip=""), a_record(client_ip="2001:db8::1"), a_record(error_code="my_plugin_code"),
                 a_record(account_id="acct_1", org_id="org_9", key_prefix="ngk_abc"), a_record(status=0)]:
        guard.check_record(good)
        # The inlined fast path and the per-field rules agree.
        assert guard._record_ok(good) and redaction._first_problem(guard, good, redaction._RECORD_RULES, True) is None
    assert redaction.RECORD_RULES_COMPLETE
    caplog.set_level(logging.ERROR, logger="nexgate.privacy")
    for name, values in BAD_FIELDS.items():
        for value in values:
            record = a_record(**{name: value})
            with pytest.raises(RecordRejected) as rejected:
                guard.check_record(record)
            assert f"'{name}'" in str(rejected.value)
    total = sum(len(v) for v in BAD_FIELDS.values())
    assert guard.dropped["record"] == total
    assert "CANARY" not in caplog.text and "secretsecret" not in caplog.text  # fields named, values never
    assert caplog.text.count("req_" + "ab" * 12) == total - len(BAD_FIELDS["request_id"])

    class Sneaky(UsageRecord):  # type: ignore[misc]
        __slots__ = ()

    with pytest.raises(RecordRejected):
        guard.check_record(Sneaky(*a_record()))
    with pytest.raises(RecordRejected):
        guard.check_record(tuple(a_record()))  # the same values, but not a UsageRecord


# ------------------------------------------------------ the guard, end to end


async def test_a_record_that_could_carry_content_reaches_no_sink(upstream: FakeUpstream, start_gateway,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    canary = "CANARY-ident-9d2e"

    class LeakyAuth:
        @hookimpl
        def nexgate_authenticate(self, ctx: Any) -> Identity:
            # A buggy third-party auth plugin that puts request text into an id.
            return Identity(account_id=f"acct_{canary}", key_prefix="ngk_abc")

    recorder = RecordingPlugin()
    gw: Gateway = await start_gateway(gateway_config(upstream), plugins=[*PLUGINS, LeakyAuth(), recorder])
    caplog.set_level(logging.DEBUG)
    raw = await sdk(gw, "anything").chat.completions.with_raw_response.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    request_id = raw.headers["x-nexgate-request-id"]
    assert recorder.settled == [request_id] and recorder.records == []  # settled, then kept from every sink
    assert gw.app[OUTBOX].pending == 0
    async with aiohttp.ClientSession() as session:
        async with session.get(gw.url + "/metrics") as resp:
            metrics = await resp.text()
    assert 'nexgate_redaction_dropped_total{sink="record"} 1.0' in metrics
    assert "nexgate_requests_total" not in metrics.replace("# HELP nexgate_requests_total", "").replace(
        "# TYPE nexgate_requests_total", "")  # the metrics sink never saw it
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(request_id in m and "'account_id'" in m for m in errors), errors
    assert canary not in caplog.text and canary not in metrics


# ------------------------------------------------------------- configuration


def test_the_guard_cannot_be_disabled_silently(caplog: pytest.LogCaptureFixture) -> None:
    # resolve_config parses the sections (privacy too, the plugin being disabled) and calls nexgate_on_disabled.
    base = GUARD_CONFIG
    disabled = parse_config({**base, "plugins": {"disable": ["redaction"]}})
    with pytest.raises(ConfigError) as refused:
        resolve_config(disabled)
    assert "privacy.allow_unguarded: true" in str(refused.value)
    by_module = parse_config({**base, "plugins": {"disable": ["nexgate_plugins.redaction"]}})
    with pytest.raises(ConfigError):
        resolve_config(by_module)
    consented = parse_config({**base, "plugins": {"disable": ["redaction"]}, "privacy": {"allow_unguarded": True}})
    caplog.set_level(logging.WARNING)
    resolve_config(consented)
    assert "PRIVACY GUARD DISABLED" in caplog.text
    redaction.nexgate_on_disabled(resolve_config(guard_config()))  # enabled: nothing to say


def test_the_gateway_refuses_to_start_unguarded_without_consent(caplog: pytest.LogCaptureFixture) -> None:
    base = GUARD_CONFIG
    with pytest.raises(ConfigError, match="allow_unguarded"):
        build_app(parse_config({**base, "plugins": {"disable": ["redaction"]}}))
    caplog.set_level(logging.WARNING)
    app = build_app(parse_config({**base, "plugins": {"disable": ["redaction"]},
                                  "privacy": {"allow_unguarded": True}}))
    assert redaction.PRIVACY not in app
    assert "PRIVACY GUARD DISABLED" in caplog.text


def test_privacy_settings_are_validated() -> None:
    base = GUARD_CONFIG
    with pytest.raises(ConfigError) as bad:
        build_app(parse_config({**base, "privacy": {"ip_retention_days": -1, "retain": 5}}),
                  extra_plugins=[redaction])
    problems = "\n".join(bad.value.problems)
    assert "privacy.ip_retention_days: must be between 0 and 3650 days" in problems
    assert "privacy.retain: unknown key" in problems
    for value, problem in [("x", "expected an integer"), (3651, "between 0 and 3650"), (True, "expected an integer")]:
        with pytest.raises(ConfigError, match=problem):
            build_app(parse_config({**base, "privacy": {"ip_retention_days": value}}), extra_plugins=[redaction])
    app = build_app(parse_config({**base, "privacy": {"ip_retention_days": "0"}}), extra_plugins=[redaction])
    assert app[redaction.PRIVACY].settings == redaction.PrivacySettings(ip_retention_days=0)
    assert build_app(guard_config(), extra_plugins=[redaction])[redaction.PRIVACY].settings.ip_retention_days == 30


# ------------------------------------------------------------------- OpenAPI


async def test_openapi_fragments_describe_the_routes_and_resolve(upstream: FakeUpstream, start_gateway) -> None:
    gw: Gateway = await start_gateway(gateway_config(upstream), plugins=PLUGINS)
    admin_document = build_openapi()
    registered = {(route.method.lower(), route.resource.canonical) for route in gw.app.router.routes()
                  if route.resource and route.resource.canonical.startswith("/admin/v1/")
                  and route.method not in ("*", "HEAD")}
    ours = {(method, path) for path, ops in privacy_openapi.OPENAPI_PATHS.items() for method in ops}
    assert ours <= registered
    documented = {(m, p) for p, ops in admin_document["paths"].items() for m in ops}
    assert registered - documented == ours - documented  # every route is documented here or there
    # Merged the way the lead merges them, every reference resolves.
    merged = build_openapi()
    for path, ops in privacy_openapi.OPENAPI_PATHS.items():
        merged["paths"].setdefault(path, {}).update(ops)
    merged["components"]["schemas"].update(privacy_openapi.OPENAPI_SCHEMAS)
    served = json.loads(json.dumps(merged))

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            return ([node["$ref"]] if "$ref" in node else []) + [r for v in node.values() for r in refs(v)]
        if isinstance(node, list):
            return [r for v in node for r in refs(v)]
        return []

    for ref in refs(served):
        target: Any = served
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]
    for path, ops in privacy_openapi.OPENAPI_PATHS.items():
        for op in ops.values():
            assert {"400", "401", "404"} <= set(op["responses"])
            assert all("{" + p["name"] + "}" in path for p in op["parameters"] if p["in"] == "path")
    schemas = served["components"]["schemas"]
    assert set(schemas["UserDeleted"]["properties"]) == set(privacy_api.deletion_json(
        await _sample_deletion(gw.app[STORE])))


async def _sample_deletion(store: Store) -> Any:
    user = await store.create_user(email="sample@example.com")
    return await store.anonymize_user(user.id, at=datetime.now(UTC) - timedelta(seconds=1))


async def test_org_admins_see_the_orgs_records_never_a_members_personal_data(privacy: AdminClient) -> None:
    """End to end across the admin API: an organization's admins see the organization's account (without
    client IPs), and nothing of a member's personal account."""
    a, gw = privacy, privacy.gw
    store = gw.app[STORE]
    owner_token, owner = await a.user("user_org_owner")
    admin_token, admin = await a.user("user_org_admin")
    member_token, member = await a.user("user_org_member", email="m@example.com")
    if (await a.call("GET", "/balance", member_token)).status == 404:
        pytest.skip("the admin API has no money endpoints in this version")
    org = await a.org(owner_token, "Acme", **{admin: "admin", member: "member"})
    _, personal = await a.key(member_token, "mine")
    _, org_key = await a.key(owner_token, "shared", org_id=org)
    await grant(store, member)
    await grant(store, org)
    await chat(gw, personal)
    await chat(gw, org_key)
    await flush(gw)
    for token in (owner_token, admin_token):
        for path in (f"/balance?account={member}", f"/transactions?account={member}", f"/usage?account={member}",
                     f"/usage/totals?account={member}&group_by=day", f"/statements/2030-01?account={member}"):
            reply = await a.call("GET", path, token)
            assert reply.status == 404, (path, reply.status)
        usage = await a.call("GET", f"/usage?account={org}", token)  # aggregates only (test_privacy_rights.py)
        assert usage.status == 403 and usage.body["error"]["code"] == "aggregates_only"
        totals = await a.call("GET", f"/usage/totals?account={org}&group_by=key", token)
        assert totals.status == 200 and [t["requests"] for t in totals.body["data"]] == [1]
    assert (await a.call("GET", f"/usage?account={org}", member_token)).status == 403  # plain members: no
    mine = await a.call("GET", "/usage", member_token)
    assert [r["account_id"] for r in mine.body["data"]] == [member]


async def test_anonymize_user_in_the_store(store_url: str) -> None:
    from nexgate_proxy.store import NotFound, open_store

    store = await open_store(store_url)
    try:
        await store.migrate()
        gone, other = await store.create_user(email="g@example.com", name="G"), await store.create_user(name="O")
        org = await store.create_org("Org", other.id)
        await store.add_member(org.id, gone.id, "admin")
        own = await store.create_api_key(public_id="p1", prefix="ngk_p1", secret_hash="h", name="mine",
                                         user_id=gone.id, created_by=gone.id)
        theirs = await store.create_api_key(public_id="p2", prefix="ngk_p2", secret_hash="h", name="theirs",
                                            user_id=other.id, created_by=gone.id)  # not hers, whoever made it
        shared = await store.create_api_key(public_id="p3", prefix="ngk_p3", secret_hash="h", name="ci",
                                            org_id=org.id, created_by=gone.id)
        await store.delete_user(gone.id)  # soft-deleted before: still anonymized now
        with pytest.raises(ValueError, match="timezone-aware"):
            await store.anonymize_user(gone.id, at=datetime(2030, 1, 1))
        with pytest.raises(NotFound):
            await store.anonymize_user("usr_nobody")
        result = await store.anonymize_user(gone.id)
        assert result.revoked_key_ids == (own.id, shared.id) and result.key_ids == (own.id, shared.id)
        assert result.left_org_ids == (org.id,) and not result.already_deleted
        assert (result.user.email, result.user.name, result.user.external_id) == (None, None, None)
        assert (await store.get_api_key(own.id)).name == "deleted"  # type: ignore[union-attr]
        assert (await store.get_api_key(shared.id)).name == "ci"  # type: ignore[union-attr]
        assert (await store.get_api_key(theirs.id)).revoked_at is None  # type: ignore[union-attr]
        again = await store.anonymize_user(gone.id)
        assert again.already_deleted and again.revoked_key_ids == () and again.user == result.user
    finally:
        await store.close()
