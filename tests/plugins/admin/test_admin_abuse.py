"""The admin API and /metrics under the same abuse controls as the proxy; self-service limits only lower."""

from __future__ import annotations

from typing import Any, AsyncIterator

import aiohttp
import openai
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from nexgate_proxy.testing import FakeUpstream, gateway_config
from tests.plugins.admin.test_admin_api import ADMIN_TOKEN, Admin, admin_auth


async def admin_with(start_gateway, upstream: FakeUpstream, clerk_key: rsa.RSAPrivateKey,
                     session: aiohttp.ClientSession, **sections: Any) -> Admin:
    gw = await start_gateway(gateway_config(upstream, auth=admin_auth(clerk_key), **sections))
    return Admin(gw, session, clerk_key)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def metrics_status(admin: Admin) -> int:
    async with admin.session.get(admin.gw.url + "/metrics") as resp:
        return resp.status


async def test_a_denied_ip_is_refused_by_the_admin_api_and_metrics(
        upstream: FakeUpstream, start_gateway, clerk_key: rsa.RSAPrivateKey, session: aiohttp.ClientSession) -> None:
    admin = await admin_with(start_gateway, upstream, clerk_key, session, limits={"deny": ["127.0.0.0/8"]})
    me = await admin.call("GET", "/me")  # the right admin token
    assert me.status == 403 and me.error["code"] == "ip_not_allowed", me.body
    assert (await admin.call("GET", "/me", admin.jwt("user_1"))).status == 403
    assert await metrics_status(admin) == 403
    assert (await admin.call("GET", "/users")).status == 403


@pytest.mark.parametrize("kind", ["admin_token", "jwt"])
async def test_wrong_admin_tokens_and_bad_session_tokens_get_the_ip_banned(
        upstream: FakeUpstream, start_gateway, clerk_key: rsa.RSAPrivateKey,
        session: aiohttp.ClientSession, kind: str) -> None:
    admin = await admin_with(start_gateway, upstream, clerk_key, session)  # default limits: 20 failures
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # signs tokens nobody trusts
    assert (await admin.call("GET", "/me")).status == 200
    assert await metrics_status(admin) == 200
    for i in range(20):
        token = f"ngadmin-wrong-{i:040d}" if kind == "admin_token" else admin.jwt(f"user_{i}", key=other_key)
        reply = await admin.call("GET", "/me", token)
        assert reply.status == 401, reply.body
    reply = await admin.call("GET", "/me")  # the right token, from the banned IP
    assert reply.status == 403 and reply.error["code"] == "ip_banned", reply.body
    assert int(reply.headers["Retry-After"]) > 800
    assert await metrics_status(admin) == 403
    client = openai.AsyncOpenAI(base_url=admin.gw.openai_base, api_key=admin.gw.api_key, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as err:
        await client.models.list()
    assert err.value.body["code"] == "ip_banned"  # type: ignore[index]


# ------------------------------------------------------------ self-service limits


async def test_users_and_org_admins_may_only_lower_the_operators_limits(
        upstream: FakeUpstream, start_gateway, clerk_key: rsa.RSAPrivateKey, session: aiohttp.ClientSession) -> None:
    admin = await admin_with(start_gateway, upstream, clerk_key, session,
                             limits={"key": {"rpm": 3, "concurrent": 4}, "brute_force": False})
    token, _ = await admin.user("user_self")
    for limits, param in (({"rpm": 0}, "limits.rpm"), ({"rpm": 4}, "limits.rpm"), ({"concurrent": 0}, "limits.concurrent"),
                          ({"rpm": 2, "concurrent": 9}, "limits.concurrent")):
        reply = await admin.call("POST", "/keys", token, json_body={"name": "mine", "limits": limits})
        assert reply.status == 403 and reply.error["param"] == param, (limits, reply.body)
        assert "superadmin" in reply.error["message"]
    reply = await admin.call("POST", "/keys", token, json_body={"name": "mine", "limits": {"rpm": "2"}})
    assert reply.status == 400 and reply.error["param"] == "limits.rpm", reply.body
    # An org admin's org key: the same rule.
    org = await admin.call("POST", "/orgs", token, json_body={"name": "Acme"})
    assert org.status == 201
    reply = await admin.call("POST", "/keys", token, json_body={"name": "org", "org_id": org.body["id"],
                                                                 "limits": {"rpm": 0, "tpm": 0}})
    assert reply.status == 403 and reply.error["param"] == "limits.rpm", reply.body
    # tpm has no operator limit: any value lowers it. A lower rpm is accepted and enforced.
    reply = await admin.call("POST", "/keys", token, json_body={"name": "mine", "limits": {"rpm": 2, "tpm": 0}})
    assert reply.status == 201, reply.body
    client = openai.AsyncOpenAI(base_url=admin.gw.openai_base, api_key=reply.body["key"], max_retries=0)
    for _ in range(2):
        await client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.RateLimitError) as err:
        await client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["code"] == "rate_limit_requests"  # type: ignore[index]
    # Only the superadmin raises or lifts.
    user_id = (await admin.call("GET", "/me", token)).body["user"]["id"]
    reply = await admin.call("POST", "/keys", ADMIN_TOKEN, json_body={"name": "vip", "user_id": user_id,
                                                                      "limits": {"rpm": 0}})
    assert reply.status == 201, reply.body
    client = openai.AsyncOpenAI(base_url=admin.gw.openai_base, api_key=reply.body["key"], max_retries=0)
    for _ in range(5):
        await client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
