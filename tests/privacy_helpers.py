"""Shared helpers of the privacy tests: an admin API client with Clerk sessions, a DB dump, requests."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
from cryptography.hazmat.primitives.asymmetric import rsa

import nexgate_plugins.admin as admin_plugin
import nexgate_plugins.redaction as redaction
from nexgate_plugins.usage_log import OUTBOX
from nexgate_proxy.testing import Gateway
from tests.dbdump import dump_database  # noqa: F401  (re-exported for the privacy tests)
from tests.jwt_signing import public_pem, sign_rs256

PLUGINS = [redaction, admin_plugin]
ADMIN_TOKEN = "ngadmin-privacy-token-0a1b2c3d4e5f60718293a4b5c6d7e8f9"
ISSUER = "https://clerk.example.com"
APP = "https://app.example.com"
PRICE = {"input": 1, "output": 2}
"""USD per million tokens: a token costs 1e6 / 2e6 pico-USD."""


def auth_config(key: rsa.RSAPrivateKey) -> dict[str, Any]:
    return {
        "bcrypt_rounds": 4,
        "admin_token_sha256": hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest(),
        "clerk": {"issuer": ISSUER, "public_key": public_pem(key).decode(), "authorized_parties": [APP]},
    }


def priced_models(upstream_url: str) -> dict[str, Any]:
    return {
        "gpt-test": {"route": [{"provider": "fake", "model": "upstream-model"}], "price": PRICE},
        "claude-test": {"route": [{"provider": "fake-anthropic", "model": "claude-upstream"}], "price": PRICE},
    }


@dataclass
class Reply:
    status: int
    body: Any
    headers: Any
    raw: bytes


class AdminClient:
    def __init__(self, gw: Gateway, session: aiohttp.ClientSession, key: rsa.RSAPrivateKey) -> None:
        self.gw = gw
        self.session = session
        self.signing_key = key

    async def call(self, method: str, path: str, token: str | None = ADMIN_TOKEN, *,
                   json_body: Any = None) -> Reply:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        async with self.session.request(method, self.gw.url + "/admin/v1" + path, headers=headers,
                                        json=json_body) as resp:
            raw = await resp.read()
            assert resp.status < 500, f"{method} {path} -> {resp.status}: {raw[:500]!r}"
            body = json.loads(raw) if resp.content_type == "application/json" else None
            return Reply(resp.status, body, resp.headers, raw)

    def jwt(self, sub: str, **claims: Any) -> str:
        now = int(time.time())
        payload = {"iss": ISSUER, "sub": sub, "sid": f"sess_{sub}", "azp": APP, "iat": now - 5, "nbf": now - 5,
                   "exp": now + 600, **claims}
        return sign_rs256(self.signing_key, payload)

    async def user(self, sub: str, **claims: Any) -> tuple[str, str]:
        """A Clerk user's session token and local user id (created on first sight)."""
        token = self.jwt(sub, **claims)
        me = await self.call("GET", "/me", token)
        assert me.status == 200, me.body
        return token, me.body["user"]["id"]

    async def key(self, token: str, name: str, **body: Any) -> tuple[str, str]:
        created = await self.call("POST", "/keys", token, json_body={"name": name, **body})
        assert created.status == 201, created.body
        return created.body["id"], created.body["key"]

    async def org(self, owner_token: str, name: str, **members: str) -> str:
        created = await self.call("POST", "/orgs", owner_token, json_body={"name": name})
        assert created.status == 201, created.body
        for user_id, role in members.items():
            added = await self.call("POST", f"/orgs/{created.body['id']}/members", owner_token,
                                    json_body={"user_id": user_id, "role": role})
            assert added.status == 201, added.body
        return created.body["id"]


def sdk(gw: Gateway, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.openai_base, api_key=key, max_retries=0)


async def chat(gw: Gateway, key: str, content: str = "hi", *, stream: bool = False) -> str:
    """One chat request; returns the request id NexGate answered with."""
    client = sdk(gw, key)
    messages = [{"role": "user", "content": content}]
    if stream:
        async with client.chat.completions.with_streaming_response.create(
                model="gpt-test", messages=messages, stream=True) as response:
            async for _ in response.iter_lines():
                pass
            return response.headers["x-nexgate-request-id"]
    raw = await client.chat.completions.with_raw_response.create(model="gpt-test", messages=messages)
    return raw.headers["x-nexgate-request-id"]


async def flush(gw: Gateway) -> None:
    assert await gw.app[OUTBOX].flush()
