"""The privacy policy's rights as a user and an operator meet them: correction, restriction, erasure
that leaves no bytes behind, aggregates for organization admins, and only the Clerk claims promised."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import anthropic
import openai
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from nexgate_proxy.appkeys import STORE
from nexgate_proxy.store.sqlite import parse_sqlite_url
from nexgate_proxy.testing import FakeUpstream, gateway_config
from tests.plugins.admin.test_cli_admin import nexgate
from tests.privacy_helpers import PLUGINS, AdminClient, auth_config, chat, flush


async def start(start_gateway, upstream: FakeUpstream, store_url: str, clerk_key: rsa.RSAPrivateKey,
                session: aiohttp.ClientSession, *, clerk: dict[str, Any] | None = None,
                privacy: dict[str, Any] | None = None) -> AdminClient:
    auth = auth_config(clerk_key)
    auth["clerk"].update(clerk or {})
    overrides: dict[str, Any] = {"privacy": privacy} if privacy else {}
    config = gateway_config(upstream, storage={"url": store_url}, auth=auth, **overrides)
    return AdminClient(await start_gateway(config, plugins=PLUGINS), session, clerk_key)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def admin(upstream: FakeUpstream, start_gateway, store_url: str, clerk_key: rsa.RSAPrivateKey,
                session: aiohttp.ClientSession) -> AdminClient:
    return await start(start_gateway, upstream, store_url, clerk_key, session)


# ------------------------------------------------------------------ erasure


def database_bytes(store_url: str) -> dict[str, bytes]:
    path = Path(parse_sqlite_url(store_url))
    return {p.name: p.read_bytes() for p in (path, Path(f"{path}-wal"), Path(f"{path}-journal")) if p.exists()}


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_no_identifier_stays_in_the_sqlite_files_right_after_deletion(admin: AdminClient, store_url: str) -> None:
    a = admin
    identifiers = {"email": "erin.erasable@example.com", "name": "Erin Erasable-Zed",
                   "external_id": "user_erin_9f8e7d6c5b4a"}
    created = await a.call("POST", "/users", json_body=identifiers)
    assert created.status == 201
    erin = created.body["id"]
    # Her old email, corrected before the deletion, must not survive either.
    corrected = await a.call("PATCH", f"/users/{erin}", json_body={"email": "erin.corrected@example.com"})
    assert corrected.status == 200 and corrected.body["email"] == "erin.corrected@example.com"
    token, clerk_user = await a.user("user_frank_1a2b3c", email="frank.keeps@example.com")
    key_id, key = await a.key(token, "frank laptop")
    await chat(a.gw, key)
    await flush(a.gw)
    before = b"".join(database_bytes(store_url).values())
    assert b"erin.corrected@example.com" in before and identifiers["external_id"].encode() in before

    deleted = await a.call("DELETE", f"/users/{erin}")
    assert deleted.status == 200 and deleted.body["deleted"] is True
    files = database_bytes(store_url)  # right after: the gateway is still running, its connection open
    for name, data in files.items():
        for value in (*identifiers.values(), "erin.corrected@example.com"):
            for encoded in (value.encode(), value.encode("utf-16-le")):
                assert encoded not in data, (name, value)
    assert b"frank.keeps@example.com" in b"".join(files.values())  # others' data stays readable
    assert len(files.get(Path(parse_sqlite_url(store_url)).name + "-wal", b"")) < len(before)


async def test_a_correction_overwrites_and_a_deleted_account_cannot_be_corrected(admin: AdminClient) -> None:
    a = admin
    token, me = await a.user("user_gina_55", email="gina@old.example.com")
    other_token, other = await a.user("user_hal_66", email="hal@example.com")
    patched = await a.call("PATCH", f"/users/{me}", token, json_body={"email": "  gina@new.example.com ",
                                                                        "name": "Gina Gale"})
    assert patched.status == 200, patched.body
    assert (patched.body["email"], patched.body["name"]) == ("gina@new.example.com", "Gina Gale")
    assert patched.headers["Cache-Control"] == "no-store"
    assert (await a.call("GET", f"/users/{me}", token)).body["email"] == "gina@new.example.com"
    cleared = await a.call("PATCH", f"/users/{me}", json_body={"name": None})  # the superadmin; null clears
    assert cleared.status == 200 and cleared.body["name"] is None and cleared.body["email"] == "gina@new.example.com"
    # Nobody else: another user's id answers 404 (not probed), as for an unknown one.
    assert (await a.call("PATCH", f"/users/{other}", token, json_body={"name": "x"})).status == 404
    assert (await a.call("GET", f"/users/{other}")).body["name"] is None
    for body, param in (({"email": "not-an-address"}, "email"), ({"name": "  "}, "name"), ({"name": "a\x00b"}, "name"),
                        ({"email": "x@" + "y" * 400}, "email"), ({"phone": "1"}, "phone"), ({}, None),
                        ({"name": 5}, "name")):
        refused = await a.call("PATCH", f"/users/{me}", token, json_body=body)
        assert refused.status == 400 and refused.body["error"]["param"] == param, (body, refused.body)
        assert refused.body["error"]["type"] == "invalid_request_error"
    assert (await a.call("DELETE", f"/users/{me}", token)).status == 200
    assert (await a.call("PATCH", f"/users/{me}", json_body={"name": "Back"})).status == 404
    assert (await a.call("GET", f"/users/{me}")).body["name"] is None
    assert other_token


async def test_users_update_from_the_cli(admin: AdminClient, store_url: str, tmp_path: Path) -> None:
    _, user_id = await admin.user("user_ivy_77", email="ivy@old.example.com")

    async def cli(*argv: str) -> tuple[int, str, str]:
        return await nexgate(tmp_path, "users", *argv, "--storage-url", store_url)

    code, out, err = await cli("update", user_id, "--email", "ivy@new.example.com", "--name", "Ivy", "--json")
    assert code == 0, err
    shown = json.loads(out)
    assert (shown["email"], shown["name"]) == ("ivy@new.example.com", "Ivy")
    code, out, _ = await cli("update", user_id, "--clear-name")
    assert code == 0 and "name cleared" in out
    user = await admin.gw.app[STORE].get_user(user_id)
    assert (user.email, user.name) == ("ivy@new.example.com", None)
    for argv, message in ((("update", user_id), "nothing to change"),
                          (("update", user_id, "--email", "nope"), "not an email address"),
                          (("update", user_id, "--name", "x", "--clear-name"), "not both"),
                          (("update", "usr_unknown", "--name", "x"), "no such user")):
        code, out, err = await cli(*argv)
        assert code == 1 and message in err, (argv, err)


# -------------------------------------------------------------- restriction


async def test_a_suspended_account_is_refused_kept_exported_and_restored(admin: AdminClient,
                                                                         upstream: FakeUpstream) -> None:
    a, gw = admin, admin.gw
    token, jill = await a.user("user_jill_88", email="jill@example.com")
    owner_token, _ = await a.user("user_ken_99", email="ken@example.com")
    _, key = await a.key(token, "jill laptop")
    org = await a.org(owner_token, "Kenco", **{jill: "admin"})
    _, org_key = await a.key(token, "kenco ci", org_id=org)
    await chat(gw, key)  # verified: cached for 60 s
    # Only the superadmin restricts processing (a user asks the operator, as the policy says).
    assert (await a.call("POST", f"/users/{jill}/suspend", token)).status == 403
    assert (await a.call("POST", f"/users/{jill}/suspend", owner_token)).status == 403
    suspended = await a.call("POST", f"/users/{jill}/suspend")
    assert suspended.status == 200 and suspended.body["changed"] is True and suspended.body["suspended_at"]
    assert (await a.call("POST", f"/users/{jill}/suspend")).body["changed"] is False

    with pytest.raises(openai.PermissionDeniedError) as refused:
        await chat(gw, key)
    error = refused.value.body
    assert refused.value.status_code == 403 and error["code"] == "account_suspended", error
    assert error["type"] and "suspended" in error["message"]
    messages = anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0)
    with pytest.raises(anthropic.PermissionDeniedError) as refused_anthropic:
        await messages.messages.create(model="claude-test", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert refused_anthropic.value.body["type"] == "error"
    assert refused_anthropic.value.body["error"]["type"] == "permission_error"
    assert await chat(gw, org_key)  # the organization's key is the organization's processing, not hers
    assert (await a.call("POST", "/keys", token, json_body={"name": "another"})).body["error"]["code"] \
        == "account_suspended"
    # Her data stays hers to read, export and delete.
    await flush(gw)
    exported = await a.call("GET", f"/users/{jill}/export", token)
    assert exported.status == 200 and exported.body["user"]["suspended_at"] == suspended.body["suspended_at"]
    assert len(exported.body["usage"]) == 1 and len(exported.body["api_keys"]) == 1
    assert (await a.call("GET", "/me", token)).body["user"]["suspended_at"] == suspended.body["suspended_at"]

    lifted = await a.call("POST", f"/users/{jill}/unsuspend")
    assert lifted.status == 200 and lifted.body["changed"] is True and lifted.body["suspended_at"] is None
    assert await chat(gw, key)  # the same key, at once
    assert (await a.call("GET", f"/users/{jill}/export", token)).body["user"]["suspended_at"] is None
    assert (await a.call("POST", "/users/usr_unknown0000/suspend")).status == 404


async def test_a_suspended_keys_refusal_costs_no_store_lookup(admin: AdminClient) -> None:
    from nexgate_plugins.auth import AUTH

    a, gw = admin, admin.gw
    token, lee = await a.user("user_lee_11")
    _, key = await a.key(token, "lee")
    assert (await a.call("POST", f"/users/{lee}/suspend")).status == 200
    authenticator = gw.app[AUTH]
    for _ in range(3):
        with pytest.raises(openai.PermissionDeniedError):
            await chat(gw, key)
    lookups, bcrypts = authenticator.store_lookups, authenticator.bcrypt_calls
    for _ in range(20):
        with pytest.raises(openai.PermissionDeniedError):
            await chat(gw, key)
    assert (authenticator.store_lookups, authenticator.bcrypt_calls) == (lookups, bcrypts)


# ------------------------------------------------------- organization admins


async def usage_setup(a: AdminClient) -> tuple[str, str, str, str, str]:
    owner_token, owner = await a.user("user_olga_1", email="olga@example.com")
    member_token, member = await a.user("user_max_2", email="max@example.com")
    org = await a.org(owner_token, "Olgaco", **{member: "member"})
    await a.call("PATCH", f"/orgs/{org}/members/{member}", owner_token, json_body={"role": "admin"})
    _, owner_key = await a.key(owner_token, "olga ci", org_id=org)
    _, member_key = await a.key(member_token, "max laptop", org_id=org)
    for key in (owner_key, owner_key, member_key):
        await chat(a.gw, key)
    await flush(a.gw)
    return owner_token, member_token, org, owner_key, member_key


async def test_org_admins_see_aggregates_never_request_rows(admin: AdminClient) -> None:
    a = admin
    owner_token, admin_token, org, _, _ = await usage_setup(a)
    for token in (owner_token, admin_token):
        rows = await a.call("GET", f"/usage?account={org}", token)
        assert rows.status == 403 and rows.body["error"]["code"] == "aggregates_only", rows.body
        assert "/usage/totals" in rows.body["error"]["message"]
        for group_by in ("key", "model", "day"):
            totals = await a.call("GET", f"/usage/totals?account={org}&group_by={group_by}", token)
            assert totals.status == 200, totals.body
            assert sum(t["requests"] for t in totals.body["data"]) == 3
        by_key = await a.call("GET", f"/usage/totals?account={org}&group_by=key", token)
        assert sorted(t["requests"] for t in by_key.body["data"]) == [1, 2]
        assert "request_id" not in json.dumps(by_key.body)
    # Their own personal usage, and the operator's view, are request rows as before.
    assert (await a.call("GET", "/usage", admin_token)).status == 200
    operator = await a.call("GET", f"/usage?account={org}")
    assert operator.status == 200 and len(operator.body["data"]) == 3


async def test_an_operator_may_allow_request_rows_for_org_admins(upstream: FakeUpstream, start_gateway, store_url: str,
                                                                 clerk_key: rsa.RSAPrivateKey,
                                                                 session: aiohttp.ClientSession) -> None:
    a = await start(start_gateway, upstream, store_url, clerk_key, session, privacy={"org_request_rows": True})
    owner_token, admin_token, org, _, _ = await usage_setup(a)
    for token in (owner_token, admin_token):
        rows = await a.call("GET", f"/usage?account={org}", token)
        assert rows.status == 200 and len(rows.body["data"]) == 3
        assert all("client_ip" not in row for row in rows.body["data"])


# ---------------------------------------------------------------------- Clerk


async def test_clerk_gives_only_the_user_id_and_email_by_default(admin: AdminClient, store_url: str,
                                                                 backend: str) -> None:
    from tests.dbdump import dump_database

    token, user_id = await admin.user("user_nina_3", email="nina@example.com", name="Nina Notstored")
    user = await admin.gw.app[STORE].get_user(user_id)
    assert (user.external_id, user.email, user.name) == ("user_nina_3", "nina@example.com", None)
    assert (await admin.call("GET", "/me", token)).body["user"]["name"] is None
    assert "Nina Notstored" not in await dump_database(store_url, backend)
    # A changed email in the session token is the correction, at the next sign-in (a new session);
    # tokens of a session already seen leave the profile alone (a correction made meanwhile stays).
    await admin.user("user_nina_3", email="nina@moved.example.com")
    assert (await admin.gw.app[STORE].get_user(user_id)).email == "nina@example.com"
    await admin.user("user_nina_3", email="nina@moved.example.com", name="Nina Notstored", sid="sess_nina_2")
    user = await admin.gw.app[STORE].get_user(user_id)
    assert (user.email, user.name) == ("nina@moved.example.com", None)
    # A token without the claim clears nothing.
    await admin.user("user_nina_3", sid="sess_nina_3")
    assert (await admin.gw.app[STORE].get_user(user_id)).email == "nina@moved.example.com"


async def test_the_name_claim_is_kept_only_when_the_operator_enables_it(
        upstream: FakeUpstream, start_gateway, store_url: str, clerk_key: rsa.RSAPrivateKey,
        session: aiohttp.ClientSession) -> None:
    a = await start(start_gateway, upstream, store_url, clerk_key, session, clerk={"store_name": True})
    _, user_id = await a.user("user_otto_4", email="otto@example.com", name="Otto Kept")
    assert (await a.gw.app[STORE].get_user(user_id)).name == "Otto Kept"
    await a.user("user_otto_4", email="otto@example.com", name="Otto Renamed", sid="sess_otto_2")
    assert (await a.gw.app[STORE].get_user(user_id)).name == "Otto Renamed"


async def test_concurrent_first_sign_ins_with_a_new_email_make_one_user(admin: AdminClient) -> None:
    await admin.user("user_pia_5", email="pia@example.com")
    results = await asyncio.gather(*(admin.user("user_pia_5", email="pia@new.example.com", sid="sess_pia_2")
                                     for _ in range(5)))
    assert len({user_id for _, user_id in results}) == 1
    assert (await admin.gw.app[STORE].get_user(results[0][1])).email == "pia@new.example.com"
