"""An organization's rate-limit overrides from the store reach its keys' identities, on every instance."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from nexgate_proxy import Identity, hookimpl
from nexgate_proxy.accounts import ORG_EVENT, create_api_key, set_org_limits
from nexgate_proxy.appkeys import BUS, FEED, STORE
from nexgate_plugins.auth import AUTH
from tests.cli_runner import Cli
from nexgate_proxy.testing import FakeUpstream, Gateway, chat, gateway_config
from tests.plugins.admin.test_cli_admin import nexgate

EVENT_WAIT = 10.0
"""A guard against hanging, not a latency requirement: the bus delivery is awaited, not timed."""


class IdentityRecorder:
    """A plugin that keeps the identity of every admitted request, as the rate limiter would see it."""

    def __init__(self) -> None:
        self.identities: list[Identity] = []

    @hookimpl
    def nexgate_admit(self, ctx: Any) -> None:
        if ctx.identity is not None:
            self.identities.append(ctx.identity)

    @property
    def last(self) -> Identity:
        return self.identities[-1]


class OrgEvents:
    """Org events seen by one instance's bus; subscribed after the auth plugin, so auth has handled each first."""

    def __init__(self, gw: Gateway) -> None:
        self.seen: asyncio.Queue[str] = asyncio.Queue()
        gw.app[BUS].subscribe(lambda kind, value: self.seen.put_nowait(value) if kind == ORG_EVENT else None)

    async def next(self) -> str:
        return await asyncio.wait_for(self.seen.get(), EVENT_WAIT)


async def org_and_key(gw: Gateway, name: str = "Acme") -> tuple[str, str]:
    """An organization owned by the gateway's test user, and a key of that organization."""
    store = gw.app[STORE]
    org = await store.create_org(name, gw.user_id)
    key = await create_api_key(store, name="org key", org_id=org.id, bcrypt_rounds=4)
    return org.id, key.plaintext


async def test_org_limits_are_read_once_at_verification(upstream: FakeUpstream, start_gateway) -> None:
    recorder = IdentityRecorder()
    gw = await start_gateway(gateway_config(upstream), plugins=[recorder])
    auth = gw.app[AUTH]
    org_id, key = await org_and_key(gw)
    await set_org_limits(gw.app[STORE], gw.app[FEED], org_id, {"rpm": 600, "concurrent": 3})
    for _ in range(3):
        assert await chat(gw, key) == "Hello from upstream"
    assert recorder.last.org_id == org_id
    assert recorder.last.org_limits == {"rpm": 600, "concurrent": 3}
    assert recorder.last.limits == {}  # the key's own overrides stay apart
    assert (auth.org_lookups, auth.bcrypt_calls) == (1, 1)  # not per request

    await chat(gw, gw.api_key)  # a personal key: no organization to read
    assert recorder.last.org_id is None and recorder.last.org_limits == {}
    assert (auth.org_lookups, auth.bcrypt_calls) == (1, 2)


async def test_an_org_change_drops_only_that_orgs_cached_identities(upstream: FakeUpstream, start_gateway) -> None:
    recorder = IdentityRecorder()
    gw = await start_gateway(gateway_config(upstream), plugins=[recorder])
    auth = gw.app[AUTH]
    org_id, key = await org_and_key(gw, "Changes")
    other_org, other_key = await org_and_key(gw, "Untouched")
    for plaintext in (key, other_key, gw.api_key):
        await chat(gw, plaintext)
    assert recorder.last.org_limits == {} and auth.bcrypt_calls == 3

    await set_org_limits(gw.app[STORE], gw.app[FEED], org_id, {"tpm": 100_000})  # delivered here at once
    await chat(gw, key)
    assert recorder.last.org_limits == {"tpm": 100_000}
    for plaintext in (other_key, gw.api_key):
        await chat(gw, plaintext)
        assert recorder.last.org_limits == {}
    # The changed org's key was checked against its row again (one lookup, no bcrypt); no other key was.
    assert (auth.bcrypt_calls, auth.store_lookups) == (3, 4)

    await set_org_limits(gw.app[STORE], gw.app[FEED], org_id, None)
    await chat(gw, key)
    assert recorder.last.org_limits == {} and (auth.bcrypt_calls, auth.store_lookups) == (3, 5)
    assert other_org != org_id


async def test_a_verification_that_overlaps_a_change_is_not_cached(upstream: FakeUpstream, start_gateway) -> None:
    gw = await start_gateway(gateway_config(upstream))
    auth = gw.app[AUTH]
    org_id, key = await org_and_key(gw)
    verifying = asyncio.create_task(auth.authenticate(key))
    await asyncio.sleep(0)  # the verification runs up to its first store call
    assert auth.store_lookups == 1 and len(auth.cache) == 0
    auth.on_invalidation(ORG_EVENT, org_id)  # it may have read the organization before this change
    identity = await verifying
    assert identity.org_id == org_id  # the request itself is served
    assert len(auth.cache) == 0  # but what it read is not kept
    await auth.authenticate(key)
    assert auth.bcrypt_calls == 2 and len(auth.cache) == 1


@pytest.mark.postgres
@pytest.mark.redis
async def test_a_change_reaches_another_instance_through_the_store_feed(
        upstream: FakeUpstream, start_gateway, postgres_url: str, redis_url: str) -> None:
    shared = gateway_config(upstream, storage={"url": postgres_url}, state={"url": redis_url})
    first_seen, second_seen = IdentityRecorder(), IdentityRecorder()
    first = await start_gateway(shared, plugins=[first_seen])
    second = await start_gateway(shared, plugins=[second_seen])
    org_id, key = await org_and_key(first)
    await chat(first, key)
    await chat(second, key)  # both instances have the identity cached, without overrides
    assert second_seen.last.org_limits == {}
    bcrypt_before = second.app[AUTH].bcrypt_calls
    second_events = OrgEvents(second)

    await set_org_limits(first.app[STORE], first.app[FEED], org_id, {"rpm": 42})
    assert await second_events.next() == org_id
    await chat(second, key)
    assert second_seen.last.org_limits == {"rpm": 42}
    assert second.app[AUTH].bcrypt_calls == bcrypt_before  # a row lookup, not a bcrypt


async def test_orgs_limits_command(store_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    cli = Cli(capsys, "--storage-url", store_url)
    await cli.json("db", "migrate")
    owner = await cli.json("users", "create", "--email", "owner@example.com")
    org = await cli.json("orgs", "create", "--name", "Acme", "--owner", owner["id"])
    assert org["limits"] is None

    updated = await cli.json("orgs", "limits", org["id"], "--limits", '{"rpm": 600, "tpm": 200000}')
    assert updated["id"] == org["id"] and updated["limits"] == {"rpm": 600, "tpm": 200000}
    assert [o["limits"] for o in await cli.json("orgs", "list")] == [{"rpm": 600, "tpm": 200000}]
    code, out, err = await cli("orgs", "limits", org["id"], "--limits", '{"concurrent": 5}')
    assert code == 0 and '{"concurrent": 5}' in out and err == ""  # running gateways learn of it from the store feed
    code, out, _ = await cli("orgs", "limits", org["id"], "--clear")
    assert code == 0 and "Removed" in out
    assert (await cli.json("orgs", "list"))[0]["limits"] is None

    for bad, words in [("{not json", "JSON object"), ("[1]", "JSON object"), ('{"rpd": 1}', "not an organization"),
                       ('{"rpm": -1}', "non-negative"), ('{"rpm": 1.5}', "whole number")]:
        assert words in await cli.fails("orgs", "limits", org["id"], "--limits", bad), bad
    assert "no such organization" in await cli.fails("orgs", "limits", "org_nope", "--limits", '{"rpm": 1}')
    for argv, words in [((), "one of the arguments --limits --clear is required"),
                        (("--clear", "--limits", "{}"), "not allowed with")]:
        with pytest.raises(SystemExit) as exited:
            await cli("orgs", "limits", org["id"], *argv)
        assert exited.value.code == 2 and words in capsys.readouterr().err
    assert (await cli.json("orgs", "list"))[0]["limits"] is None  # no failed call changed anything


@pytest.mark.redis
async def test_the_command_reaches_a_running_gateway(
        tmp_path: Path, upstream: FakeUpstream, start_gateway, redis_url: str) -> None:
    storage = {"url": f"sqlite:///{tmp_path}/shared.db"}
    state = {"url": redis_url}
    config_file = tmp_path / "nexgate.yaml"
    config_file.write_text(yaml.safe_dump({"storage": storage, "state": state, "auth": {"bcrypt_rounds": 4}}))
    recorder = IdentityRecorder()
    gw = await start_gateway(gateway_config(upstream, storage=storage, state=state), plugins=[recorder])
    org_id, key = await org_and_key(gw)
    await chat(gw, key)
    assert recorder.last.org_limits == {}
    events = OrgEvents(gw)

    code, out, err = await nexgate(tmp_path, "orgs", "limits", org_id, "--limits", '{"rpm": 7}',
                                   "--config", str(config_file), "--json")
    assert code == 0 and "warning" not in err and "note" not in err, err
    assert json.loads(out)["limits"] == {"rpm": 7}
    assert await events.next() == org_id
    await chat(gw, key)
    assert recorder.last.org_limits == {"rpm": 7}


# ------------------------------------------------------------------ enforced


async def rpm_refusals(gw: Gateway, key: str, attempts: int) -> tuple[int, list[str]]:
    """How many of ``attempts`` calls passed, and the codes of the refused ones."""
    client = openai.AsyncOpenAI(base_url=gw.openai_base, api_key=key, max_retries=0)
    passed, codes = 0, []
    for _ in range(attempts):
        try:
            await client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
            passed += 1
        except openai.RateLimitError as exc:
            codes.append(exc.body["code"])  # type: ignore[index]
    return passed, codes


async def test_the_store_override_is_what_the_rate_limiter_enforces(upstream: FakeUpstream, start_gateway) -> None:
    # YAML: no org limits at all. The store's override alone must apply to the org's keys.
    gw = await start_gateway(gateway_config(upstream))
    org_id, key = await org_and_key(gw)
    await set_org_limits(gw.app[STORE], gw.app[FEED], org_id, {"rpm": 3})
    assert await rpm_refusals(gw, key, 5) == (3, ["rate_limit_requests"] * 2)
    another_key = await create_api_key(gw.app[STORE], name="second", org_id=org_id, bcrypt_rounds=4)
    passed, codes = await rpm_refusals(gw, another_key.plaintext, 1)  # the org's limit, shared by its keys
    assert (passed, codes) == (0, ["rate_limit_requests"])
    assert await rpm_refusals(gw, gw.api_key, 2) == (2, [])  # a personal key is not the org's


async def test_the_override_goes_over_the_yaml_name_by_name(upstream: FakeUpstream, start_gateway) -> None:
    config = gateway_config(upstream, limits={"org": {"rpm": 2, "tpm": 1_000_000}})
    gw = await start_gateway(config)
    org_id, key = await org_and_key(gw)
    assert (await rpm_refusals(gw, key, 3))[0] == 2  # the YAML default for orgs
    # 0 lifts the YAML's rpm; tpm is not named, so the YAML's stays.
    await set_org_limits(gw.app[STORE], gw.app[FEED], org_id, {"rpm": 0})
    assert await rpm_refusals(gw, key, 4) == (4, [])
    await set_org_limits(gw.app[STORE], gw.app[FEED], org_id, {"tpm": 1})  # back to the YAML rpm, tiny tpm
    passed, codes = await rpm_refusals(gw, key, 1)
    assert (passed, codes) == (0, ["rate_limit_tokens"])
