"""The admin HTTP API, called over a real socket like an operator's tooling would."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, AsyncIterator

import aiohttp
import openai
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from nexgate_plugins.admin.openapi import build_openapi
from nexgate_proxy.appkeys import STORE
from nexgate_proxy.testing import FakeUpstream, Gateway, gateway_config
from tests.jwt_signing import b64url, b64url_json, public_pem, sign_rs256

ADMIN_TOKEN = "ngadmin-test-token-5f0c1d2e3b4a69788796a5b4c3d2e1f0"
ISSUER = "https://clerk.example.com"
APP = "https://app.example.com"


@pytest.fixture(scope="module")
def other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def admin_auth(clerk_key: rsa.RSAPrivateKey) -> dict[str, Any]:
    return {
        "bcrypt_rounds": 4,
        "admin_token_sha256": hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest(),
        "clerk": {"issuer": ISSUER, "public_key": public_pem(clerk_key).decode(), "authorized_parties": [APP]},
    }


@dataclass
class Reply:
    status: int
    body: Any
    headers: Any

    @property
    def error(self) -> dict[str, Any]:
        assert isinstance(self.body, dict) and set(self.body) == {"error"}, self.body
        assert set(self.body["error"]) == {"message", "type", "param", "code"}
        return self.body["error"]


class Admin:
    """A gateway with the admin API, and a client for it."""

    def __init__(self, gw: Gateway, session: aiohttp.ClientSession, key: rsa.RSAPrivateKey) -> None:
        self.gw = gw
        self.session = session
        self.key = key

    async def call(self, method: str, path: str, token: str | None = ADMIN_TOKEN, *, json_body: Any = None,
                   data: bytes | str | None = None, headers: dict[str, str] | None = None) -> Reply:
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        kwargs: dict[str, Any] = {"headers": all_headers}
        if json_body is not None:
            kwargs["json"] = json_body
        elif data is not None:
            kwargs["data"] = data
            all_headers.setdefault("Content-Type", "application/json")
        async with self.session.request(method, self.gw.url + "/admin/v1" + path, **kwargs) as resp:
            text = await resp.text()
            assert resp.status not in (500, 502), f"{method} {path} -> {resp.status}: {text}"
            assert resp.content_type == "application/json", text
            return Reply(resp.status, json.loads(text), resp.headers)

    def jwt(self, sub: str | None, *, key: rsa.RSAPrivateKey | None = None, header: dict[str, Any] | None = None,
            **overrides: Any) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {"iss": ISSUER, "sub": sub, "sid": f"sess_{sub or 0}", "azp": APP,
                                  "iat": now - 5, "nbf": now - 5, "exp": now + 60}
        claims.update(overrides)
        return sign_rs256(key or self.key, {k: v for k, v in claims.items() if v is not None}, header)

    async def user(self, sub: str) -> tuple[str, str]:
        """A Clerk user's session token and local user id (created on first sight)."""
        token = self.jwt(sub)
        me = await self.call("GET", "/me", token)
        assert me.status == 200, me.body
        return token, me.body["user"]["id"]


@pytest.fixture
async def admin(upstream: FakeUpstream, start_gateway, store_url: str,
                clerk_key: rsa.RSAPrivateKey) -> AsyncIterator[Admin]:
    gw = await start_gateway(gateway_config(upstream, storage={"url": store_url}, auth=admin_auth(clerk_key)))
    async with aiohttp.ClientSession() as session:
        yield Admin(gw, session, clerk_key)


def sdk(admin: Admin, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=admin.gw.openai_base, api_key=key, max_retries=0)


async def chat(admin: Admin, key: str) -> str:
    reply = await sdk(admin, key).chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    return reply.choices[0].message.content or ""


async def org_with(admin: Admin, owner: str, name: str = "Acme", **members: str) -> str:
    """An org owned by user token `owner`; members given as user_id=role."""
    created = await admin.call("POST", "/orgs", owner, json_body={"name": name})
    assert created.status == 201, created.body
    for user_id, role in members.items():
        added = await admin.call("POST", f"/orgs/{created.body['id']}/members", owner,
                                 json_body={"user_id": user_id, "role": role})
        assert added.status == 201, added.body
    return created.body["id"]


# ------------------------------------------------------------------ OpenAPI


async def test_405_allow_lists_every_method_the_document_gives_the_path(gateway: Gateway) -> None:
    """One resource per path: /users/{user_id} has the admin API's GET and the privacy endpoints' DELETE."""
    async with aiohttp.ClientSession() as session:
        for path, operations in build_openapi()["paths"].items():
            url = gateway.url + path.replace("{month}", "2025-01").replace("{", "").replace("}", "")
            async with session.request("PUT", url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
                assert resp.status == 405, path
                assert set(resp.headers["Allow"].split(", ")) == {m.upper() for m in operations}, path
                assert (await resp.json())["error"]["code"] == "method_not_allowed"


async def test_openapi_document_matches_the_routes(gateway: Gateway) -> None:
    registered = set()
    for route in gateway.app.router.routes():
        path = route.resource.canonical if route.resource else ""
        if path.startswith("/admin/v1/") and route.method not in ("*", "HEAD"):
            registered.add((route.method.lower(), path))
    document = build_openapi()
    documented = {(method, path) for path, ops in document["paths"].items() for method in ops}
    assert registered == documented
    assert len(registered) == 32  # 3 of them privacy (PATCH user, suspend, unsuspend), 4 credits and unapplied payments

    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.url + "/admin/v1/openapi.json") as resp:
            assert resp.status == 200
            served = await resp.json()
    assert served == json.loads(json.dumps(document))
    assert served["openapi"].startswith("3.1")
    assert served["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            own = [node["$ref"]] if "$ref" in node else []
            return own + [r for v in node.values() for r in refs(v)]
        if isinstance(node, list):
            return [r for v in node for r in refs(v)]
        return []

    for ref in refs(served):
        target: Any = served
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]  # every reference resolves
    for path, ops in served["paths"].items():
        for method, op in ops.items():
            if path.endswith("openapi.json"):
                assert op["security"] == []
                continue
            assert "401" in op["responses"] and "400" in op["responses"], (method, path)
            for name in (p["name"] for p in op.get("parameters", []) if p["in"] == "path"):
                assert "{" + name + "}" in path


async def test_responses_carry_exactly_the_documented_fields(admin: Admin) -> None:
    schemas = build_openapi()["components"]["schemas"]

    def fields(name: str) -> set[str]:
        return set(schemas[name]["properties"])

    token, user_id = await admin.user("user_doc")
    me = await admin.call("GET", "/me", token)
    clerk_schema = schemas["Caller"]["properties"]["clerk"]["oneOf"][1]
    assert set(me.body["clerk"]) == set(clerk_schema["properties"])
    assert set(me.body) == fields("Caller") and set(me.body["user"]) == fields("User")
    org = await admin.call("POST", "/orgs", token, json_body={"name": "Doc"})
    assert set(org.body) == fields("Organization") - {"limits"}  # the superadmin's view alone has limits
    assert set((await admin.call("GET", f"/orgs/{org.body['id']}")).body) == fields("Organization")
    patched = await admin.call("PATCH", f"/orgs/{org.body['id']}", json_body={"limits": {"rpm": 1}})
    assert set(patched.body) == fields("Organization")
    assert set(patched.body["limits"]) <= set(schemas["UpdateOrganization"]["properties"]["limits"]["properties"])
    members = await admin.call("GET", f"/orgs/{org.body['id']}/members", token)
    assert set(members.body) == fields("MemberList") and set(members.body["data"][0]) == fields("Member")
    key = await admin.call("POST", "/keys", token, json_body={"name": "doc", "org_id": org.body["id"]})
    assert set(key.body) == fields("ApiKey") | {"key"}
    keys = await admin.call("GET", f"/orgs/{org.body['id']}/keys", token)
    assert set(keys.body["data"][0]) == fields("ApiKey")
    _, other_id = await admin.user("user_doc_2")
    await admin.call("POST", f"/orgs/{org.body['id']}/members", token, json_body={"user_id": other_id})
    removed = await admin.call("DELETE", f"/orgs/{org.body['id']}/members/{other_id}", token)
    assert set(removed.body) == fields("MemberDeleted")
    error = await admin.call("GET", "/keys/key_unknown", token)
    assert set(error.body["error"]) == set(schemas["Error"]["properties"]["error"]["properties"])
    assert (await admin.call("GET", f"/users/{user_id}", token)).body == me.body["user"]


# ------------------------------------------------------------ authentication


async def test_superadmin_token_and_refused_tokens(admin: Admin) -> None:
    me = await admin.call("GET", "/me")
    assert me.status == 200
    assert me.body == {"object": "caller", "superadmin": True, "user": None, "orgs": [], "clerk": None}
    assert me.headers["Cache-Control"] == "no-store"

    wrong = ADMIN_TOKEN[:-1] + ("x" if ADMIN_TOKEN[-1] != "x" else "y")
    for token in [wrong, "", "x" * 10_000, admin.gw.api_key, "a.b.c", "é"]:
        reply = await admin.call("GET", "/me", None, headers={"Authorization": f"Bearer {token}"})
        assert reply.status == 401, token
        assert reply.error["code"] == "invalid_token"
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")
        if token:
            assert token not in json.dumps(reply.body)
    for header in [None, f"Basic {ADMIN_TOKEN}", ADMIN_TOKEN, "Bearer"]:
        reply = await admin.call("GET", "/me", None, headers={"Authorization": header} if header else {})
        assert reply.status == 401 and reply.error["code"] == "invalid_token"
    # An API key is for the proxy, never for the admin API.
    reply = await admin.call("GET", "/users", admin.gw.api_key)
    assert reply.status == 401


async def test_admin_api_without_admin_token_or_clerk_refuses_everyone(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as session:
        for token in ["", "anything", gateway.api_key]:
            async with session.get(gateway.url + "/admin/v1/me", headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == 401
                assert (await r.json())["error"]["code"] == "invalid_token"


async def test_clerk_session_tokens_v1_and_v2(admin: Admin) -> None:
    v1 = admin.jwt("user_clerk_1", org_id="org_c1", org_role="org:admin", org_slug="acme",
                   email="ada@example.com", name="Ada")
    first = await admin.call("GET", "/me", v1)
    assert first.status == 200, first.body
    assert first.body["superadmin"] is False
    user = first.body["user"]
    # Clerk gives the user id and email; the name claim is not kept (auth.clerk.store_name is off).
    assert user["external_id"] == "user_clerk_1" and user["email"] == "ada@example.com" and user["name"] is None
    assert user["created_at"].endswith("Z")
    assert first.body["clerk"] == {"user_id": "user_clerk_1", "session_id": "sess_user_clerk_1",
                                   "org_id": "org_c1", "org_role": "admin", "org_slug": "acme"}
    # Same subject, v2 claims: the same local user, found not created.
    v2 = admin.jwt("user_clerk_1", v=2, o={"id": "org_c2", "rol": "member", "slg": "globex"})
    second = await admin.call("GET", "/me", v2)
    assert second.status == 200
    assert second.body["user"]["id"] == user["id"]
    assert second.body["clerk"]["org_id"] == "org_c2" and second.body["clerk"]["org_role"] == "member"
    users = await admin.call("GET", "/users")
    assert [u["external_id"] for u in users.body["data"]].count("user_clerk_1") == 1
    # Clerk org claims grant nothing: the user is in no local organization.
    assert second.body["orgs"] == []


async def test_bad_clerk_tokens_are_401_never_500(admin: Admin, other_key: rsa.RSAPrivateKey) -> None:
    now = int(time.time())
    good = admin.jwt("user_x")
    header, payload, signature = good.split(".")
    bad_tokens = {
        "bad signature": admin.jwt("user_x", key=other_key),
        "tampered": f"{header}.{b64url_json({'iss': ISSUER, 'sub': 'user_admin', 'exp': now + 60})}.{signature}",
        "wrong issuer": admin.jwt("user_x", iss="https://clerk.evil.example"),
        "expired": admin.jwt("user_x", iat=now - 600, nbf=now - 600, exp=now - 300),
        "not yet valid": admin.jwt("user_x", nbf=now + 300),
        "wrong party": admin.jwt("user_x", azp="https://evil.example"),
        "no sub": admin.jwt(None),
        "huge sub": admin.jwt("u" * 300),
        "alg none": f"{b64url_json({'alg': 'none', 'typ': 'JWT'})}.{payload}.",
        "alg none with sig": f"{b64url_json({'alg': 'none'})}.{payload}.{b64url(b'x')}",
        "hs256": f"{b64url_json({'alg': 'HS256'})}.{payload}.{signature}",
        "garbage": "eyJ.eyJ.sig",
        "not json": f"{b64url(b'{not json')}.{payload}.{signature}",
    }
    for what, token in bad_tokens.items():
        reply = await admin.call("GET", "/me", token)
        assert reply.status == 401, what
        assert reply.error["code"] == "invalid_token", what
        assert token not in json.dumps(reply.body) and signature not in json.dumps(reply.body)
    users = await admin.call("GET", "/users")
    assert users.body["data"] == [] or all(u["external_id"] != "user_admin" for u in users.body["data"])
    assert (await admin.call("GET", "/me", good)).status == 200


async def test_deleted_accounts_are_refused(admin: Admin) -> None:
    token, user_id = await admin.user("user_gone")
    await admin.gw.app[STORE].delete_user(user_id)
    reply = await admin.call("GET", "/me", token)
    assert reply.status == 403 and reply.error["code"] == "account_deleted"
    assert (await admin.call("GET", f"/users/{user_id}")).body["deleted_at"] is not None
    # Nobody can hand a deleted user a key or an org.
    assert (await admin.call("POST", "/keys", json_body={"name": "x", "user_id": user_id})).status == 404
    assert (await admin.call("POST", "/orgs", json_body={"name": "x", "owner_user_id": user_id})).status == 404


async def test_an_unavailable_store_is_503_not_500(admin: Admin) -> None:
    await admin.gw.app[STORE].close()
    reply = await admin.call("GET", "/users")
    assert reply.status == 503 and reply.error["code"] == "store_unavailable"
    assert "sqlite" not in reply.error["message"] and "postgres" not in reply.error["message"]


# -------------------------------------------------------------------- users


async def test_users(admin: Admin) -> None:
    created = await admin.call("POST", "/users", json_body={"email": "bo@example.com", "name": "Bo",
                                                            "external_id": "ext-bo"})
    assert created.status == 201
    bo = created.body
    assert bo["object"] == "user" and bo["id"].startswith("usr_") and bo["email"] == "bo@example.com"
    assert (await admin.call("POST", "/users", json_body={"external_id": "ext-bo"})).status == 409

    listed = await admin.call("GET", "/users", headers={}, token=ADMIN_TOKEN)
    ids = [u["id"] for u in listed.body["data"]]
    assert bo["id"] in ids and admin.gw.user_id in ids
    page = await admin.call("GET", "/users?limit=1")
    assert len(page.body["data"]) == 1 and page.body["has_more"] is True
    assert (await admin.call("GET", f"/users/{bo['id']}")).body == bo

    token, me_id = await admin.user("user_self")
    assert (await admin.call("GET", f"/users/{me_id}", token)).body["id"] == me_id
    # Another user's profile does not exist as far as this user can tell.
    other = await admin.call("GET", f"/users/{bo['id']}", token)
    unknown = await admin.call("GET", "/users/usr_doesnotexist", token)
    assert other.status == unknown.status == 404
    assert other.body == unknown.body
    assert (await admin.call("GET", "/users", token)).status == 403
    assert (await admin.call("POST", "/users", token, json_body={"name": "x"})).status == 403
    assert (await admin.call("GET", "/users/usr_doesnotexist")).status == 404


# -------------------------------------------------------------------- orgs


async def test_org_roles_and_membership_rules(admin: Admin) -> None:
    alice, alice_id = await admin.user("user_alice")
    bob, bob_id = await admin.user("user_bob")
    carol, carol_id = await admin.user("user_carol")
    dave, dave_id = await admin.user("user_dave")

    created = await admin.call("POST", "/orgs", alice, json_body={"name": "  Acme  "})
    assert created.status == 201
    assert created.body["name"] == "Acme" and created.body["role"] == "owner"
    org = created.body["id"]
    add = f"/orgs/{org}/members"
    assert (await admin.call("POST", add, alice, json_body={"user_id": bob_id, "role": "admin"})).status == 201
    added = await admin.call("POST", add, alice, json_body={"user_id": carol_id})
    assert added.status == 201 and added.body["role"] == "member"
    assert (await admin.call("POST", add, alice, json_body={"user_id": carol_id})).status == 409
    missing_user = await admin.call("POST", add, alice, json_body={"user_id": "usr_nobody"})
    assert missing_user.status == 404 and missing_user.error["param"] == "user_id"

    # Everyone sees their own orgs with their role; the superadmin sees all.
    assert [(o["id"], o["role"]) for o in (await admin.call("GET", "/orgs", carol)).body["data"]] == [(org, "member")]
    assert (await admin.call("GET", f"/orgs/{org}", carol)).body["role"] == "member"
    assert (await admin.call("GET", "/orgs", dave)).body["data"] == []
    assert org in [o["id"] for o in (await admin.call("GET", "/orgs")).body["data"]]
    # Non-members cannot tell the org exists.
    for path in [f"/orgs/{org}", f"/orgs/{org}/members", f"/orgs/{org}/keys"]:
        assert (await admin.call("GET", path, dave)).status == 404
    assert (await admin.call("GET", "/orgs/org_doesnotexist", dave)).status == 404

    # Members: admins and owners read them, only owners change them.
    assert (await admin.call("GET", f"/orgs/{org}/members", carol)).status == 403
    members = await admin.call("GET", f"/orgs/{org}/members", bob)
    assert members.status == 200
    assert {(m["user_id"], m["role"]) for m in members.body["data"]} == {
        (alice_id, "owner"), (bob_id, "admin"), (carol_id, "member")}
    assert (await admin.call("POST", add, carol, json_body={"user_id": dave_id})).status == 403
    assert (await admin.call("POST", add, bob, json_body={"user_id": dave_id})).status == 403
    assert (await admin.call("PATCH", f"{add}/{carol_id}", bob, json_body={"role": "admin"})).status == 403
    assert (await admin.call("DELETE", f"{add}/{carol_id}", bob)).status == 403
    assert (await admin.call("DELETE", f"{add}/{bob_id}", carol)).status == 403

    promoted = await admin.call("PATCH", f"{add}/{carol_id}", alice, json_body={"role": "admin"})
    assert promoted.status == 200 and promoted.body["role"] == "admin"
    assert (await admin.call("PATCH", f"{add}/{dave_id}", alice, json_body={"role": "admin"})).status == 404

    # The last owner can neither leave nor be demoted.
    last = await admin.call("DELETE", f"{add}/{alice_id}", alice)
    assert last.status == 409 and last.error["code"] == "last_owner"
    assert "last owner" in last.error["message"]
    assert (await admin.call("PATCH", f"{add}/{alice_id}", alice, json_body={"role": "member"})).status == 409
    assert (await admin.call("DELETE", f"{add}/{alice_id}")).status == 409  # not even the superadmin

    # A member may leave; the owner removes anyone; the personal account stays.
    left = await admin.call("DELETE", f"{add}/{carol_id}", carol)
    assert left.status == 200 and left.body["deleted"] is True
    assert (await admin.call("GET", f"/orgs/{org}", carol)).status == 404
    assert (await admin.call("GET", "/me", carol)).body["orgs"] == []
    assert (await admin.call("DELETE", f"{add}/{carol_id}", alice)).status == 404
    assert (await admin.call("DELETE", f"{add}/{bob_id}", alice)).status == 200
    assert (await admin.call("GET", f"/users/{bob_id}")).status == 200

    # A second owner lets the first one leave.
    assert (await admin.call("POST", add, alice, json_body={"user_id": dave_id, "role": "owner"})).status == 201
    assert (await admin.call("DELETE", f"{add}/{alice_id}", alice)).status == 200
    assert [(m["user_id"], m["role"]) for m in (await admin.call("GET", f"/orgs/{org}/members", dave)).body["data"]] \
        == [(dave_id, "owner")]


async def test_superadmin_creates_orgs_for_users(admin: Admin) -> None:
    _, erin_id = await admin.user("user_erin")
    missing = await admin.call("POST", "/orgs", json_body={"name": "Ops"})
    assert missing.status == 404 and missing.error["param"] == "owner_user_id"
    unknown = await admin.call("POST", "/orgs", json_body={"name": "Ops", "owner_user_id": "usr_nobody"})
    assert unknown.status == 404 and unknown.error["param"] == "owner_user_id"
    created = await admin.call("POST", "/orgs", json_body={"name": "Ops", "owner_user_id": erin_id})
    assert created.status == 201 and created.body["role"] is None
    members = await admin.call("GET", f"/orgs/{created.body['id']}/members")
    assert [(m["user_id"], m["role"]) for m in members.body["data"]] == [(erin_id, "owner")]
    # A user cannot create an org in someone else's name.
    frank, _ = await admin.user("user_frank")
    reply = await admin.call("POST", "/orgs", frank, json_body={"name": "Evil", "owner_user_id": erin_id})
    assert reply.status == 403 and reply.error["param"] == "owner_user_id"


# ------------------------------------------------------- organization limits


async def test_only_the_superadmin_sets_an_orgs_limits(admin: Admin) -> None:
    owner, _ = await admin.user("user_limits_owner")
    _, member_id = await admin.user("user_limits_member")
    outsider, _ = await admin.user("user_limits_outsider")
    org = await org_with(admin, owner, "Limited", **{member_id: "admin"})
    path = f"/orgs/{org}"
    assert (await admin.call("GET", path)).body["limits"] is None

    limits = {"rpm": 600, "tpm": 200000, "concurrent": 0}
    updated = await admin.call("PATCH", path, json_body={"limits": limits})
    assert updated.status == 200, updated.body
    assert updated.body["limits"] == limits and updated.body["id"] == org and updated.body["role"] is None
    assert (await admin.call("GET", path)).body["limits"] == limits
    assert [o["limits"] for o in (await admin.call("GET", "/orgs")).body["data"] if o["id"] == org] == [limits]

    # Owners may not raise their own ceiling, and members never see it; outsiders learn nothing.
    refused = await admin.call("PATCH", path, owner, json_body={"limits": {"rpm": 10**9}})
    assert refused.status == 403 and refused.error["code"] == "forbidden"
    assert (await admin.call("PATCH", path, outsider, json_body={"limits": {"rpm": 1}})).status == 404
    assert "limits" not in (await admin.call("GET", path, owner)).body
    assert all("limits" not in o for o in (await admin.call("GET", "/me", owner)).body["orgs"])
    assert (await admin.call("GET", path)).body["limits"] == limits  # unchanged by the refused calls

    replaced = await admin.call("PATCH", path, json_body={"limits": {"tpm": 5}})
    assert replaced.body["limits"] == {"tpm": 5}  # a replacement, not a merge
    for clearing in (None, {}):
        assert (await admin.call("PATCH", path, json_body={"limits": {"rpm": 1}})).status == 200
        cleared = await admin.call("PATCH", path, json_body={"limits": clearing})
        assert cleared.status == 200 and cleared.body["limits"] is None, clearing

    unknown = await admin.call("PATCH", "/orgs/org_doesnotexist", json_body={"limits": {"rpm": 1}})
    assert unknown.status == 404 and unknown.error["code"] == "not_found"


async def test_bad_org_limits_are_400_with_the_field_named(admin: Admin) -> None:
    owner, _ = await admin.user("user_limits_bad")
    org = await org_with(admin, owner, "Strict")
    path = f"/orgs/{org}"
    cases: list[tuple[Any, str | None, str]] = [
        ({}, "limits", "required"),
        ({"limit": {"rpm": 1}}, "limit", "Unknown field"),
        ({"limits": [1]}, "limits", "must be an object"),
        ({"limits": "rpm=1"}, "limits", "must be an object"),
        ({"limits": {"rpd": 5}}, "limits", "not an organization limit"),
        ({"limits": {"allow": "10.0.0.0/8"}}, "limits", "not an organization limit"),
        ({"limits": {"bad name": 1}}, "limits", "invalid name"),
        ({"limits": {"rpm": -1}}, "limits", "non-negative"),
        ({"limits": {"rpm": True}}, "limits", "non-negative"),
        ({"limits": {"rpm": 1.5}}, "limits", "whole number"),
        ({"limits": {"rpm": "60"}}, "limits", "whole number"),
        ({"limits": {"tpm": 2**53}}, "limits", "whole number"),
        ({"limits": {f"x{i}": 1 for i in range(33)}}, "limits", "at most"),
    ]
    for body, param, words in cases:
        reply = await admin.call("PATCH", path, json_body=body)
        assert reply.status == 400, (body, reply.body)
        assert reply.error["param"] == param and words in reply.error["message"], (body, reply.body)
    for raw in (b"{not json", b"null", b'{"limits": NaN}'):
        reply = await admin.call("PATCH", path, data=raw)
        assert reply.status == 400 and reply.error["code"] == "invalid_request", (raw, reply.body)
    assert (await admin.call("GET", path)).body["limits"] is None  # nothing bad was stored


# -------------------------------------------------------------------- keys


async def test_created_key_works_at_once_and_stops_after_delete(admin: Admin) -> None:
    token, user_id = await admin.user("user_keys")
    created = await admin.call("POST", "/keys", token, json_body={"name": "laptop"})
    assert created.status == 201
    assert created.headers["Cache-Control"] == "no-store"
    plaintext = created.body["key"]
    assert plaintext.startswith("ngk_") and plaintext.startswith(created.body["prefix"])
    assert created.body["user_id"] == user_id and created.body["org_id"] is None
    assert created.body["created_by"] == user_id and created.body["revoked_at"] is None

    assert await chat(admin, plaintext) == "Hello from upstream"

    listed = await admin.call("GET", "/keys", token)
    assert [k["id"] for k in listed.body["data"]] == [created.body["id"]]
    row = await admin.gw.app[STORE].get_api_key(created.body["id"])
    assert row is not None
    for reply in [listed, await admin.call("GET", f"/keys/{row.id}", token)]:
        text = json.dumps(reply.body)
        assert plaintext not in text and plaintext.split("_")[2][:20] not in text
        assert row.secret_hash not in text and "secret_hash" not in text and "$2b$" not in text
        assert "key" not in (reply.body["data"][0] if "data" in reply.body else reply.body)

    revoked = await admin.call("DELETE", f"/keys/{row.id}", token)
    assert revoked.status == 200 and revoked.body["revoked_at"] is not None
    with pytest.raises(openai.AuthenticationError):
        await chat(admin, plaintext)
    assert (await admin.call("GET", "/keys", token)).body["data"] == []
    assert len((await admin.call("GET", "/keys?include_revoked=true", token)).body["data"]) == 1
    # Revoking twice is harmless.
    assert (await admin.call("DELETE", f"/keys/{row.id}", token)).status == 200


async def test_key_options_are_applied(admin: Admin) -> None:
    token, _ = await admin.user("user_opts")
    expires = (datetime.now(timezone.utc) + timedelta(days=30)).replace(microsecond=0)
    created = await admin.call("POST", "/keys", token, json_body={
        "name": "ci", "expires_at": expires.astimezone(timezone(timedelta(hours=2))).isoformat(),
        "allowed_models": ["claude-test", "claude-test"], "limits": {"rpm": 60, "budget": "10.00"}})
    assert created.status == 201, created.body
    assert created.body["expires_at"] == expires.isoformat().replace("+00:00", "Z")
    assert created.body["allowed_models"] == ["claude-test"]
    assert created.body["limits"] == {"rpm": 60, "budget": "10.00"}
    with pytest.raises(openai.PermissionDeniedError):
        await chat(admin, created.body["key"])


async def test_personal_keys_are_private(admin: Admin) -> None:
    alice, alice_id = await admin.user("user_alice")
    bob, bob_id = await admin.user("user_bob")
    org = await org_with(admin, bob, **{alice_id: "member"})  # bob owns the org alice is in
    key = (await admin.call("POST", "/keys", alice, json_body={"name": "mine"})).body

    # Bob administers alice's org, yet her personal keys do not exist for him.
    for method, path in [("GET", f"/keys/{key['id']}"), ("DELETE", f"/keys/{key['id']}"),
                         ("GET", f"/keys?user_id={alice_id}")]:
        reply = await admin.call(method, path, bob)
        unknown = await admin.call(method, path.replace(key["id"], "key_unknown").replace(alice_id, "usr_unknown"),
                                   bob)
        assert reply.status == unknown.status == 404, (method, path)
        assert reply.body["error"]["message"] == unknown.body["error"]["message"]
    assert (await admin.call("GET", "/keys", bob)).body["data"] == []
    assert key["id"] not in json.dumps((await admin.call("GET", f"/orgs/{org}/keys", bob)).body)
    # A user cannot make a key in someone else's name.
    assert (await admin.call("POST", "/keys", bob, json_body={"name": "x", "user_id": alice_id})).status == 404
    # Still alive; its owner and the superadmin may act on it.
    assert (await admin.call("GET", f"/keys/{key['id']}", alice)).body["revoked_at"] is None
    assert [k["id"] for k in (await admin.call("GET", f"/keys?user_id={alice_id}")).body["data"]] == [key["id"]]
    assert (await admin.call("DELETE", f"/keys/{key['id']}")).body["revoked_at"] is not None

    # The superadmin has no personal keys but can make and list them for a user.
    # What defaults to the caller's own does not exist for it: 404 naming what to give (the request is valid).
    for method, body in (("POST", {"name": "x"}), ("GET", None)):
        reply = await admin.call(method, "/keys", json_body=body)
        assert (reply.status, reply.error["param"]) == (404, "user_id"), reply.body
    made = await admin.call("POST", "/keys", json_body={"name": "for bob", "user_id": bob_id})
    assert made.status == 201 and made.body["user_id"] == bob_id and made.body["created_by"] is None
    assert await chat(admin, made.body["key"])


async def test_org_keys_follow_org_roles(admin: Admin) -> None:
    owner, _ = await admin.user("user_owner")
    adm, adm_id = await admin.user("user_admin")
    member, member_id = await admin.user("user_member")
    outsider, _ = await admin.user("user_outsider")
    org = await org_with(admin, owner, **{adm_id: "admin", member_id: "member"})

    made = await admin.call("POST", "/keys", adm, json_body={"name": "prod", "org_id": org})
    assert made.status == 201
    assert made.body["org_id"] == org and made.body["user_id"] is None and made.body["created_by"] == adm_id
    org_key = made.body
    assert await chat(admin, org_key["key"])
    kept = (await admin.call("POST", "/keys", owner, json_body={"name": "owner's", "org_id": org})).body

    denied = await admin.call("POST", "/keys", member, json_body={"name": "x", "org_id": org})
    assert denied.status == 403
    assert (await admin.call("GET", f"/orgs/{org}/keys", member)).status == 403
    assert (await admin.call("DELETE", f"/keys/{org_key['id']}", member)).status == 403
    hidden = await admin.call("POST", "/keys", outsider, json_body={"name": "x", "org_id": org})
    assert hidden.status == 404 and hidden.error["param"] == "org_id"
    assert (await admin.call("GET", f"/keys/{org_key['id']}", outsider)).status == 404
    assert (await admin.call("DELETE", f"/keys/{org_key['id']}", outsider)).status == 404

    listed = await admin.call("GET", f"/orgs/{org}/keys", adm)
    assert [k["id"] for k in listed.body["data"]] == [org_key["id"], kept["id"]]
    assert org_key["key"] not in json.dumps(listed.body)

    # Removed from the org: no more org key management, and the org keys the admin made are revoked.
    removed = await admin.call("DELETE", f"/orgs/{org}/members/{adm_id}", owner)
    assert removed.status == 200 and removed.body["revoked_key_ids"] == [org_key["id"]]
    assert (await admin.call("GET", f"/orgs/{org}/keys", adm)).status == 404
    assert (await admin.call("POST", "/keys", adm, json_body={"name": "x", "org_id": org})).status == 404
    assert (await admin.call("GET", f"/keys/{kept['id']}", adm)).status == 404
    assert (await admin.call("DELETE", f"/keys/{kept['id']}", adm)).status == 404
    with pytest.raises(openai.AuthenticationError):
        await chat(admin, org_key["key"])
    assert await chat(admin, kept["key"])  # keys made by others keep working
    assert (await admin.call("GET", "/me", adm)).body["user"]["id"] == adm_id  # the account stays

    # The owner and the superadmin revoke any org key.
    assert (await admin.call("DELETE", f"/keys/{kept['id']}")).status == 200
    with pytest.raises(openai.AuthenticationError):
        await chat(admin, kept["key"])


# --------------------------------------------------------------- validation


async def test_client_mistakes_are_4xx_with_the_field_named(admin: Admin) -> None:
    token, user_id = await admin.user("user_val")
    org = await org_with(admin, token)
    past = (datetime.now(timezone.utc) - timedelta(minutes=1)).isoformat()
    cases: list[tuple[str, str, Any, int, str | None]] = [
        ("POST", "/keys", b"{not json", 400, None),
        ("POST", "/keys", b"", 400, None),
        ("POST", "/keys", b"\xff\xfe", 400, None),
        ("POST", "/keys", b"[1, 2]", 400, None),
        ("POST", "/keys", b'{"name": NaN}', 400, None),
        ("POST", "/keys", b"[" * 100_000 + b"]" * 100_000, 413, None),
        ("POST", "/keys", {"name": "k", "colour": "red"}, 400, "colour"),
        ("POST", "/keys", {}, 400, "name"),
        ("POST", "/keys", {"name": 7}, 400, "name"),
        ("POST", "/keys", {"name": True}, 400, "name"),
        ("POST", "/keys", {"name": "   "}, 400, "name"),
        ("POST", "/keys", {"name": "x" * 201}, 400, "name"),
        ("POST", "/keys", {"name": "a\x00b"}, 400, "name"),
        ("POST", "/keys", b'{"name": "\\ud800"}', 400, "name"),
        ("POST", "/keys", {"name": "k", "expires_at": "tomorrow"}, 400, "expires_at"),
        ("POST", "/keys", {"name": "k", "expires_at": "2999-01-01T00:00:00"}, 400, "expires_at"),
        ("POST", "/keys", {"name": "k", "expires_at": past}, 409, "expires_at"),
        ("POST", "/keys", {"name": "k", "expires_at": 1893456000}, 400, "expires_at"),
        ("POST", "/keys", {"name": "k", "expires_at": "0001-01-01T00:00:00+23:59"}, 400, "expires_at"),  # was a 500
        ("POST", "/keys", {"name": None}, 400, "name"),  # null is no string: the document says string
        ("POST", "/keys", {"name": "k", "org_id": None}, 400, "org_id"),
        ("POST", "/keys", {"name": "k", "allowed_models": "gpt-test"}, 400, "allowed_models"),
        ("POST", "/keys", {"name": "k", "allowed_models": []}, 400, "allowed_models"),
        ("POST", "/keys", {"name": "k", "allowed_models": [1]}, 400, "allowed_models"),
        ("POST", "/keys", {"name": "k", "limits": [1]}, 400, "limits"),
        ("POST", "/keys", {"name": "k", "limits": {"rpm": -1}}, 400, "limits"),
        ("POST", "/keys", {"name": "k", "limits": {"rpm": True}}, 400, "limits"),
        ("POST", "/keys", {"name": "k", "limits": {"bad name": 1}}, 400, "limits"),
        ("POST", "/keys", {"name": "k", "org_id": "org_unknown"}, 404, "org_id"),
        ("POST", "/keys", {"name": "k", "org_id": "../../etc"}, 404, "org_id"),
        ("POST", "/keys", {"name": "k", "org_id": org, "user_id": user_id}, 400, "user_id"),
        ("POST", "/orgs", {"name": ""}, 400, "name"),
        ("POST", "/orgs", {"name": ["x"]}, 400, "name"),
        ("POST", f"/orgs/{org}/members", {"user_id": user_id, "role": "king"}, 400, "role"),
        ("POST", f"/orgs/{org}/members", {"role": "member"}, 400, "user_id"),
        ("PATCH", f"/orgs/{org}/members/{user_id}", {}, 400, "role"),
        ("PATCH", f"/orgs/{org}/members/{user_id}", {"role": "superuser"}, 400, "role"),
        ("PATCH", f"/orgs/{org}/members/{user_id}", {"role": "admin", "x": 1}, 400, "x"),
        ("GET", "/keys?include_revoked=maybe", None, 400, "include_revoked"),
        ("GET", "/keys?include_revoked=1", None, 400, "include_revoked"),  # a boolean is true or false
        ("GET", "/orgs?offset=1000000001", None, 400, "offset"),
        ("GET", "/orgs?offset=%2B1", None, 400, "offset"),
        ("GET", "/keys?colour=red", None, 400, "colour"),
        ("GET", "/orgs?limit=0", None, 400, "limit"),
        ("GET", "/orgs?limit=ten", None, 400, "limit"),
        ("GET", "/orgs?offset=-1", None, 400, "offset"),
        ("GET", "/keys/key_unknown", None, 404, None),
        ("GET", "/keys/%00", None, 404, None),
        ("GET", "/keys/" + "k" * 500, None, 404, None),
        ("DELETE", "/keys/key_unknown", None, 404, None),
        ("GET", "/orgs/org%20x", None, 404, None),
        ("DELETE", f"/orgs/{org}/members/usr_unknown", None, 404, None),
        ("PUT", "/keys", {"name": "k"}, 405, None),
        ("GET", "/nothing/here", None, 404, None),
    ]
    for method, path, body, status, param in cases:
        if isinstance(body, bytes):
            reply = await admin.call(method, path, token, data=body)
        else:
            reply = await admin.call(method, path, token, json_body=body)
        assert reply.status == status, (method, path, body, reply.body)
        assert reply.error["param"] == param, (method, path, body, reply.body)
    assert (await admin.call("GET", "/keys", token)).body["data"] == []
    superadmin_cases = [
        ("/users", {"email": "not-an-email"}, "email"),
        ("/users", {"email": "a@b.c", "admin": True}, "admin"),
        ("/users", {"name": "x" * 201}, "name"),
        ("/orgs", {"name": "x", "owner_user_id": 5}, "owner_user_id"),
        ("/orgs", {"name": "x", "owner_user_id": None}, "owner_user_id"),
        ("/users", {"email": "  "}, "email"),
    ]
    for path, body, param in superadmin_cases:
        reply = await admin.call("POST", path, json_body=body)
        assert reply.status == 400 and reply.error["param"] == param, (path, body, reply.body)
