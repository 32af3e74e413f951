"""Fast verifiers: restarts and cache evictions re-admit keys without a bcrypt, and nothing stored
lets anyone recover or forge a key."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import secrets
import stat
from pathlib import Path
from typing import Any

import openai
import pytest

import nexgate_proxy.keys as keys
from nexgate_plugins.auth import AUTH
from nexgate_plugins.auth.verifiers import REDIS_KEY, VerifierTable, Verifiers, pepper_fingerprint
from nexgate_proxy.accounts import create_api_key, revoke_api_key
from nexgate_proxy.appkeys import FEED, STORE
from nexgate_proxy.keys import parse_key
from nexgate_proxy.state.redis import RedisClient
from nexgate_proxy.testing import FakeUpstream, Gateway, StartGateway, chat, gateway_config
from tests.dbdump import dump_database

PEPPER = "test-pepper-" + "p" * 40


def forged(public_id: str) -> str:
    """A well-formed key for a real public id, with a secret nobody issued."""
    body = f"{keys.KEY_PREFIX}{public_id}_" + "".join(secrets.choice(keys.BASE62_ALPHABET) for _ in range(32))
    return body + keys._checksum(body)


async def make_keys(gw: Gateway, n: int) -> list[str]:
    return [(await create_api_key(gw.app[STORE], name=f"k{i}", user_id=gw.user_id, bcrypt_rounds=4)).plaintext
            for i in range(n)]


async def restart(gw: Gateway, start_gateway: StartGateway, config: dict[str, Any]) -> Gateway:
    await gw.runner.cleanup()  # stops the plugins: the verifiers are written out
    return await start_gateway(config)


def key_material(plaintext: str) -> list[bytes]:
    """Everything that would let someone recover or check a key fast, as it could be stored."""
    secret = parse_key(plaintext).secret  # type: ignore[union-attr]
    out = []
    for text in (plaintext, secret):
        raw = text.encode()
        digest = hashlib.sha256(raw).digest()
        out += [raw, digest, digest.hex().encode(), base64.b64encode(digest), base64.b64encode(raw)]
    return out


async def test_a_restarted_gateway_serves_its_keys_without_a_bcrypt_and_stores_no_key_material(
        upstream: FakeUpstream, start_gateway: StartGateway, tmp_path: Path) -> None:
    db = tmp_path / "shared.db"
    config = gateway_config(upstream, storage={"url": f"sqlite:///{db}"})
    first = await start_gateway(config)
    plaintexts = await make_keys(first, 5)
    for key in plaintexts:
        assert await chat(first, key) == "Hello from upstream"
    assert first.app[AUTH].bcrypt_calls == 5

    second = await restart(first, start_gateway, config)
    auth = second.app[AUTH]
    assert auth.verifiers.loaded == 5
    for key in plaintexts:
        assert await chat(second, key) == "Hello from upstream"
    assert (auth.bcrypt_calls, auth.fast_verifications) == (0, 5)

    # What is stored: bcrypt hashes in the database, MACs in the state file, the pepper apart.
    verifier_file, pepper_file = Path(f"{db}.verifiers"), Path(f"{db}.verifiers.pepper")
    for path in (verifier_file, pepper_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    pepper = pepper_file.read_text().strip().encode()
    stored = {"database": (await dump_database(f"sqlite:///{db}", "sqlite")).encode(),
              "database files": b"".join(p.read_bytes() for p in tmp_path.glob("shared.db*") if p != pepper_file),
              "verifier file": verifier_file.read_bytes()}
    for name, content in stored.items():
        assert pepper not in content, name
        for key in plaintexts:
            for material in key_material(key):
                assert material not in content, (name, material)
    assert len(verifier_file.read_bytes()) == 32 * (1 + 5)  # a header, then 32 bytes a key


async def test_a_forged_secret_for_a_known_key_id_is_refused_without_a_bcrypt_after_a_restart(
        upstream: FakeUpstream, start_gateway: StartGateway, tmp_path: Path) -> None:
    config = gateway_config(upstream, storage={"url": f"sqlite:///{tmp_path / 'f.db'}"})
    first = await start_gateway(config)
    await chat(first, first.api_key)
    second = await restart(first, start_gateway, config)
    auth = second.app[AUTH]
    public_id = parse_key(first.api_key).public_id  # type: ignore[union-attr]
    for _ in range(5):
        with pytest.raises(openai.AuthenticationError) as err:
            await chat(second, forged(public_id))
        assert err.value.body["code"] == "invalid_api_key"  # type: ignore[index]
    assert auth.bcrypt_calls == 0 and auth.bcrypt_skipped == 5
    assert await chat(second, first.api_key) == "Hello from upstream"  # the real one still works
    assert auth.bcrypt_calls == 0


async def test_forged_secrets_on_a_locked_key_id_cost_no_bcrypt_while_its_owner_gets_in(
        upstream: FakeUpstream, start_gateway: StartGateway, tmp_path: Path) -> None:
    config = gateway_config(upstream, storage={"url": f"sqlite:///{tmp_path / 'l.db'}"},
                            server={"trusted_proxies": ["127.0.0.1/32"]},
                            limits={"brute_force": {"max_key_failures": 3}})
    first = await start_gateway(config)
    await chat(first, first.api_key)
    second = await restart(first, start_gateway, config)
    auth = second.app[AUTH]
    public_id = parse_key(first.api_key).public_id  # type: ignore[union-attr]
    codes = []
    for i in range(6):
        client = second.openai_client(forged(public_id)).with_options(
            default_headers={"X-Forwarded-For": f"192.0.2.{i + 1}"})
        with pytest.raises(openai.APIStatusError) as err:
            await client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
        codes.append(err.value.body["code"])  # type: ignore[index]
    assert codes[:3] == ["invalid_api_key"] * 3 and codes[-1] == "key_verification_limited", codes
    assert auth.bcrypt_calls == 0
    # The owner, never verified by this process, is let in by the verifier despite the lock.
    owner = second.openai_client(first.api_key).with_options(default_headers={"X-Forwarded-For": "198.51.100.9"})
    reply = await owner.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "Hello from upstream"
    assert auth.bcrypt_calls == 0 and auth.fast_verifications == 1


async def test_an_evicted_key_is_readmitted_without_a_bcrypt(upstream: FakeUpstream, start_gateway) -> None:
    gw = await start_gateway(gateway_config(upstream, auth={"bcrypt_rounds": 4, "cache_size": 2}))
    auth = gw.app[AUTH]
    plaintexts = await make_keys(gw, 6)
    for _ in range(3):
        for key in plaintexts:
            assert await chat(gw, key) == "Hello from upstream"
    assert len(auth.cache) == 2
    assert auth.bcrypt_calls == 6 and auth.fast_verifications == 12


async def test_revocation_drops_the_verifier_here_and_in_the_state_file(
        upstream: FakeUpstream, start_gateway: StartGateway, tmp_path: Path) -> None:
    config = gateway_config(upstream, storage={"url": f"sqlite:///{tmp_path / 'r.db'}"})
    gw = await start_gateway(config)
    auth = gw.app[AUTH]
    cached, uncached = await make_keys(gw, 2)
    await chat(gw, gw.api_key)
    await chat(gw, cached)
    await chat(gw, uncached)
    auth.cache.clear()  # the second key is known only by its verifier, not by the identity cache
    await chat(gw, cached)
    rows = {r.public_id: r for r in await gw.app[STORE].list_api_keys(user_id=gw.user_id)}
    ids = [parse_key(k).public_id for k in (cached, uncached)]  # type: ignore[union-attr]
    assert all(auth.verifiers.lookup(i) is not None for i in ids)
    for public_id in ids:
        await revoke_api_key(gw.app[STORE], gw.app[FEED], rows[public_id].id)
    for _ in range(50):
        if all(auth.verifiers.lookup(i) is None for i in ids):
            break
        await asyncio.sleep(0.02)
    assert [auth.verifiers.lookup(i) for i in ids] == [None, None]
    for key in (cached, uncached):
        with pytest.raises(openai.AuthenticationError) as err:
            await chat(gw, key)
        assert "revoked" in err.value.body["message"]  # type: ignore[index]

    second = await restart(gw, start_gateway, config)
    assert second.app[AUTH].verifiers.loaded == 1  # only the test user's own key, never revoked
    assert all(second.app[AUTH].verifiers.lookup(i) is None for i in ids)


async def test_another_pepper_ignores_the_old_verifiers_and_still_verifies(
        upstream: FakeUpstream, start_gateway: StartGateway, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'p.db'}"
    first = await start_gateway(gateway_config(upstream, storage={"url": url}))
    await chat(first, first.api_key)
    await first.runner.cleanup()
    config = gateway_config(upstream, storage={"url": url}, auth={"bcrypt_rounds": 4, "verifiers": {"pepper": PEPPER}})
    second = await start_gateway(config)
    assert second.app[AUTH].verifiers.loaded == 0
    assert await chat(second, first.api_key) == "Hello from upstream"
    assert second.app[AUTH].bcrypt_calls == 1


@pytest.mark.redis
async def test_with_redis_the_verifiers_live_in_the_state_and_hold_no_key_material(
        upstream: FakeUpstream, start_gateway: StartGateway, tmp_path: Path, redis_url: str) -> None:
    pepper = PEPPER + secrets.token_hex(4)  # a key of its own in the test Redis
    config = gateway_config(upstream, storage={"url": f"sqlite:///{tmp_path / 'x.db'}"}, state={"url": redis_url},
                            auth={"bcrypt_rounds": 4, "verifiers": {"pepper": pepper}})
    first = await start_gateway(config)
    plaintexts = await make_keys(first, 3)
    for key in plaintexts:
        await chat(first, key)
    second = await restart(first, start_gateway, config)
    auth = second.app[AUTH]
    assert auth.verifiers.loaded == 3
    for key in plaintexts:
        await chat(second, key)
    assert (auth.bcrypt_calls, auth.fast_verifications) == (0, 3)
    assert not list(tmp_path.glob("*.verifiers*")), "no local file with Redis state"

    redis = RedisClient(redis_url)
    await redis.start()
    try:
        hash_key = REDIS_KEY + pepper_fingerprint(pepper.encode()).hex()
        stored: Any = await redis.command("HGETALL", hash_key, timeout=2)
        await redis.command("DEL", hash_key, timeout=2)
    finally:
        await redis.close()
    content = b"|".join(stored)
    assert len(stored) == 2 * 3 and all(len(v) == 20 for v in stored[1::2])
    assert pepper.encode() not in content
    for key in plaintexts:
        assert parse_key(key).public_id.encode() in content  # type: ignore[union-attr]
        for material in key_material(key):
            assert material not in content


def test_a_verifier_is_believed_only_for_the_hash_it_was_made_for() -> None:
    verifiers = Verifiers(100, os.urandom(32))
    verifiers.add("A" * 12, "$2b$04$hash-one", "s3cret")
    known = verifiers.lookup("A" * 12)
    assert known is not None and len(known) == 20
    assert verifiers.tag_matches(known, "A" * 12, "s3cret") and not verifiers.tag_matches(known, "A" * 12, "s3creT")
    assert verifiers.hash_matches(known, "A" * 12, "$2b$04$hash-one")
    assert not verifiers.hash_matches(known, "A" * 12, "$2b$04$hash-two")
    assert verifiers.lookup("B" * 12) is None
    # Another pepper checks nothing.
    other = Verifiers(100, os.urandom(32))
    assert not other.tag_matches(known, "A" * 12, "s3cret")


def test_the_table_is_bounded_and_replaces_within_a_bucket() -> None:
    table = VerifierTable(64)
    ids = [f"{i:012d}".encode() for i in range(1000)]
    for kid in ids:
        table.put(kid, kid[:8] + bytes(12))
    assert len(table) <= 64
    present = [kid for kid in ids if table.get(kid) is not None]
    assert len(present) == len(table) and all(table.get(k) == k[:8] + bytes(12) for k in present)
    assert table.drop(present[0]) and table.get(present[0]) is None and not table.drop(present[0])
