"""What the `nexgate` CLI changes reaches a running gateway within a second, on every deployment.

The CLI runs as a real subprocess against the gateway's own store: SQLite with in-process state
(the embedded default), PostgreSQL alone, and PostgreSQL with Redis. The gateway keeps its default
key cache TTL (60 s), so only the store's change feed can make it see the change in time.
"""

from __future__ import annotations

import asyncio
import json
import time
from decimal import Decimal
from pathlib import Path
from typing import Any, Awaitable, Callable

import openai
import pytest
import yaml

from nexgate_plugins.credits import CREDITS
from nexgate_proxy.money import usd_to_pico
from nexgate_proxy.testing import FakeUpstream, Gateway, chat, fresh_postgres_schema, require_redis
from tests.plugins.admin.test_cli_admin import nexgate
from tests.plugins.credits.test_credits import priced_config


@pytest.fixture(params=["sqlite+memory", pytest.param("postgres", marks=pytest.mark.postgres),
                        pytest.param("postgres+redis", marks=[pytest.mark.postgres, pytest.mark.redis])])
async def deployment(request: pytest.FixtureRequest, tmp_path: Path):
    """(storage, state) config sections of one deployment."""
    if request.param == "sqlite+memory":
        yield {"url": f"sqlite:///{tmp_path}/shared.db"}, {"url": "memory://"}
        return
    async with fresh_postgres_schema() as url:
        state = {"url": require_redis() if request.param == "postgres+redis" else "memory://"}
        yield {"url": url}, state


class Ops:
    """The operator at a shell next to a running gateway."""

    def __init__(self, tmp_path: Path, gw: Gateway, config_file: Path) -> None:
        self.tmp_path, self.gw, self.config_file = tmp_path, gw, config_file

    async def __call__(self, *argv: str) -> tuple[str, str]:
        code, out, err = await nexgate(self.tmp_path, *argv, "--config", str(self.config_file))
        assert code == 0, err
        return out, err

    async def json(self, *argv: str) -> Any:
        out, _ = await self(*argv, "--json")
        return json.loads(out)


@pytest.fixture
async def ops(tmp_path: Path, upstream: FakeUpstream, start_gateway, deployment) -> Ops:
    storage, state = deployment
    config_file = tmp_path / "nexgate.yaml"
    config_file.write_text(yaml.safe_dump({"storage": storage, "state": state, "auth": {"bcrypt_rounds": 4}}))
    gw = await start_gateway(priced_config(upstream, storage=storage, state=state))
    return Ops(tmp_path, gw, config_file)


async def within_a_second(attempt: Callable[[], Awaitable[bool]], what: str) -> None:
    started = time.monotonic()
    while not await attempt():
        assert time.monotonic() - started < 1.0, what
        await asyncio.sleep(0.02)


async def refused(gw: Gateway, key: str) -> bool:
    try:
        await chat(gw, key)
    except openai.AuthenticationError as exc:
        assert "revoked" in exc.message
        return True
    return False


async def cached_key(ops: Ops) -> tuple[dict, dict]:
    user = await ops.json("users", "create", "--email", f"u{time.monotonic_ns()}@example.com")
    key = await ops.json("keys", "create", "--name", "laptop", "--user", user["id"])
    assert await chat(ops.gw, key["key"]) == "Hello from upstream"  # verified: cached for 60 s
    return user, key


async def test_a_revoked_key_is_refused_within_a_second(ops: Ops) -> None:
    _, key = await cached_key(ops)
    out, err = await ops("keys", "revoke", key["id"])
    assert "Revoked" in out and err == ""  # no caveat: it is true on every deployment
    await within_a_second(lambda: refused(ops.gw, key["key"]), "the gateway still accepts a key revoked from the CLI")


async def test_a_deleted_users_key_is_refused_within_a_second(ops: Ops) -> None:
    user, key = await cached_key(ops)
    deleted = await ops.json("users", "delete", user["id"], "--yes")
    assert deleted["revoked_key_ids"] == [key["id"]]
    await within_a_second(lambda: refused(ops.gw, key["key"]), "the gateway still serves a deleted user's key")


async def test_a_grant_lifts_a_402_within_a_second(ops: Ops) -> None:
    client = openai.AsyncOpenAI(base_url=ops.gw.openai_base, api_key=ops.gw.api_key, max_retries=0)
    costs: list[str] = []

    async def served() -> bool:
        try:
            raw = await client.chat.completions.with_raw_response.create(
                model="gpt-paid", max_tokens=100, messages=[{"role": "user", "content": "hi"}])
        except openai.APIStatusError as exc:
            assert exc.status_code == 402
            return False
        costs.append(raw.headers["x-nexgate-cost-usd"])
        return True

    assert not await served()  # 0 balance, now cached by the gateway
    out, err = await ops("credits", "grant", ops.gw.user_id, "1", "--reason", "welcome")
    assert "Granted $1" in out and err == ""
    await within_a_second(served, "a funded user still gets 402")
    # Exactly once: the cached balance took the grant once (not again when the feed brings it
    # after a load that had it), less what the request cost.
    await asyncio.sleep(0.5)
    cost = usd_to_pico(Decimal(costs[0]))
    assert await ops.gw.app[CREDITS].state.available(ops.gw.user_id) == usd_to_pico(Decimal(1)) - cost


# ------------------------------------------- restriction of processing (privacy)


async def suspended(ops: Ops, key: str) -> bool:
    try:
        await chat(ops.gw, key)
    except openai.PermissionDeniedError as exc:
        assert exc.code == "account_suspended" and "suspended" in exc.message, exc.body
        return True
    return False


async def served(ops: Ops, key: str) -> bool:
    return not await suspended(ops, key)


async def test_a_suspension_and_its_lifting_reach_the_gateway_within_a_second(ops: Ops) -> None:
    user, key = await cached_key(ops)  # verified and cached for 60 s: only the feed can tell the gateway
    shown = await ops.json("users", "suspend", user["id"])
    assert shown["changed"] is True and shown["suspended_at"].endswith("Z")
    await within_a_second(lambda: suspended(ops, key["key"]), "the gateway still serves a suspended user's key")
    assert (await ops.json("users", "suspend", user["id"]))["changed"] is False  # idempotent
    lifted = await ops.json("users", "unsuspend", user["id"])
    assert lifted["changed"] is True and lifted["suspended_at"] is None
    await within_a_second(lambda: served(ops, key["key"]), "a lifted suspension still refuses the key")
    # Nothing was deleted: the same key, unrevoked.
    listed = await ops.json("keys", "list", "--user", user["id"])
    assert [k["id"] for k in listed] == [key["id"]] and listed[0]["revoked_at"] is None
