"""Restriction of processing from the CLI reaches a running gateway within a second, on every deployment."""

from __future__ import annotations

import openai

from nexgate_proxy.testing import chat
from tests.store.test_changes_reach_gateways import Ops, cached_key, deployment, ops, within_a_second  # noqa: F401


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
    # Nothing was deleted: the same key, the same user, the usage kept.
    listed = await ops.json("keys", "list", "--user", user["id"])
    assert [k["id"] for k in listed] == [key["id"]] and listed[0]["revoked_at"] is None
