from __future__ import annotations

import asyncio
import hashlib
import re

import pytest

import nexgate_proxy.keys as keys_module
from multidict import CIMultiDict

from nexgate_proxy import keys
from nexgate_proxy.keys import (
    BASE62_ALPHABET,
    cache_key,
    extract_key,
    generate_key,
    hash_secret,
    parse_key,
    verify_secret,
    verify_secret_async,
)

FAST_ROUNDS = 4  # bcrypt's minimum; cost 12 would make the suite slow for no extra coverage


def test_generated_key_has_documented_shape() -> None:
    key = generate_key()
    assert re.fullmatch(r"ngk_[0-9A-Za-z]{12}_[0-9A-Za-z]{38}", key.plaintext)
    assert key.prefix == f"ngk_{key.public_id}"
    assert key.plaintext.startswith(key.prefix + "_" + key.secret)
    assert len(key.public_id) == 12 and len(key.secret) == 32


def test_roundtrip() -> None:
    for _ in range(200):
        key = generate_key()
        parsed = parse_key(key.plaintext)
        assert parsed is not None
        assert (parsed.public_id, parsed.secret, parsed.prefix) == (key.public_id, key.secret, key.prefix)


def test_keys_are_unique() -> None:
    generated = {generate_key().plaintext for _ in range(1000)}
    assert len(generated) == 1000


def test_prefix_and_repr_do_not_reveal_the_secret() -> None:
    key = generate_key()
    assert key.secret not in key.prefix
    assert key.secret not in repr(key)
    assert key.plaintext not in repr(key)
    parsed = parse_key(key.plaintext)
    assert parsed is not None and key.secret not in repr(parsed)


def test_checksum_rejects_every_single_character_substitution() -> None:
    key = generate_key().plaintext
    checked = 0
    for index, original in enumerate(key):
        for replacement in BASE62_ALPHABET:
            if replacement == original:
                continue
            typo = key[:index] + replacement + key[index + 1:]
            assert parse_key(typo) is None, f"typo at {index} accepted"
            checked += 1
    assert checked > 2000


def test_checksum_rejects_adjacent_swaps_deletions_and_insertions() -> None:
    key = generate_key().plaintext
    for index in range(len(key) - 1):
        if key[index] != key[index + 1]:
            assert parse_key(key[:index] + key[index + 1] + key[index] + key[index + 2:]) is None
        assert parse_key(key[:index] + key[index + 1:]) is None
        assert parse_key(key[:index] + "x" + key[index:]) is None


@pytest.mark.parametrize(
    "text",
    [
        "", "ngk_", "ngk__", "sk-proj-abcdef", "Bearer ngk_x", "ngk_" + "a" * 51,
        "ngk_abcdefghijkl_" + "a" * 38,  # right shape, wrong checksum
        "ngk_abcdefghij-l_" + "a" * 38,
        "NGK_abcdefghijkl_" + "a" * 38,
        "ngk_abcdefghijkl_" + "a" * 30,
        "ngk_abcdefghijkl_" + "é" * 38,
        "ngk_abcdefghijkl_" + "a" * 37 + "\n",
        None, 12345, b"ngk_abc",
    ],
)
def test_garbage_is_rejected(text: object) -> None:
    assert parse_key(text) is None


def test_whitespace_around_a_valid_key_is_rejected() -> None:
    key = generate_key().plaintext
    assert parse_key(" " + key) is None
    assert parse_key(key + "\n") is None


def test_oversized_input_is_rejected_before_any_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    class NoMatching:
        def fullmatch(self, text: str) -> None:
            raise AssertionError("an oversized key must be refused before the regex runs")

    monkeypatch.setattr(keys_module, "_KEY_PATTERN", NoMatching())
    assert parse_key("ngk_" + "a" * 10_000_000) is None

def test_hash_is_not_the_secret_and_verifies() -> None:
    key = generate_key()
    hashed = hash_secret(key.secret, rounds=FAST_ROUNDS)
    assert hashed != key.secret
    assert key.secret not in hashed
    assert hashed.startswith("$2b$04$")
    assert verify_secret(key.secret, hashed)
    assert not verify_secret(generate_key().secret, hashed)
    assert not verify_secret(key.secret[:-1], hashed)


def test_hash_uses_a_fresh_salt() -> None:
    secret = generate_key().secret
    assert hash_secret(secret, rounds=FAST_ROUNDS) != hash_secret(secret, rounds=FAST_ROUNDS)


def test_default_cost_is_12() -> None:
    assert keys.DEFAULT_BCRYPT_ROUNDS == 12
    assert hash_secret("x" * 32).startswith("$2b$12$")


@pytest.mark.parametrize("stored", ["", "not-a-hash", "$2b$04$short", "\u00e9"])
def test_verify_with_a_corrupt_hash_is_false_not_an_error(stored: str) -> None:
    assert verify_secret("secret", stored) is False


def test_verify_refuses_secrets_bcrypt_would_truncate() -> None:
    hashed = hash_secret("a" * 72, rounds=FAST_ROUNDS)
    assert verify_secret("a" * 72, hashed)
    assert not verify_secret("a" * 72 + "b", hashed)
    with pytest.raises(ValueError):
        hash_secret("a" * 73, rounds=FAST_ROUNDS)


async def test_verify_async_runs_off_the_event_loop() -> None:
    key = generate_key()
    hashed = hash_secret(key.secret, rounds=10)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    ticking = asyncio.create_task(ticker())
    try:
        results = await asyncio.gather(
            verify_secret_async(key.secret, hashed),
            verify_secret_async("wrong", hashed),
        )
    finally:
        ticking.cancel()
    assert results == [True, False]
    assert ticks > 3  # the loop kept running while bcrypt worked


async def test_a_flood_of_verifications_is_refused_at_once_past_the_queue_bound(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    import time

    release = threading.Event()
    started = []

    def slow(secret: str, secret_hash: str) -> bool:  # a bcrypt that takes as long as the test wants
        started.append(secret)
        release.wait(5)
        return False

    monkeypatch.setattr(keys_module, "verify_secret", slow)
    bound = keys.MAX_PENDING_VERIFICATIONS
    waiting = [asyncio.ensure_future(verify_secret_async(f"s{i}", "h")) for i in range(bound)]
    await asyncio.sleep(0)
    began = time.perf_counter()
    for _ in range(50):  # past the bound: no thread, no queue, an answer at once
        with pytest.raises(keys.VerifierBusy):
            await verify_secret_async("forged", "h")
    assert time.perf_counter() - began < 0.5
    release.set()
    assert await asyncio.gather(*waiting) == [False] * bound
    assert "forged" not in started
    monkeypatch.setattr(keys_module, "verify_secret", lambda secret, secret_hash: True)
    assert await verify_secret_async("again", "h")  # the slots came back


async def test_hash_secret_async() -> None:
    hashed = await keys.hash_secret_async("s" * 32, rounds=FAST_ROUNDS)
    assert await verify_secret_async("s" * 32, hashed)


def test_cache_key_is_sha256_of_the_full_key() -> None:
    key = generate_key().plaintext
    assert cache_key(key) == hashlib.sha256(key.encode()).digest()
    assert len(cache_key(key)) == 32
    assert cache_key(key) != cache_key(generate_key().plaintext)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Authorization": "Bearer ngk_abc"}, "ngk_abc"),
        ({"authorization": "bearer ngk_abc"}, "ngk_abc"),
        ({"AUTHORIZATION": "BEARER   ngk_abc  "}, "ngk_abc"),
        ({"x-api-key": "ngk_abc"}, "ngk_abc"),
        ({"X-Api-Key": " ngk_abc "}, "ngk_abc"),
        ({"Authorization": "Bearer ngk_a", "x-api-key": "ngk_b"}, "ngk_a"),
        ({"Authorization": "Basic dXNlcjpwYXNz", "x-api-key": "ngk_b"}, "ngk_b"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, None),
        ({"Authorization": "Bearer"}, None),
        ({"Authorization": "Bearer   "}, None),
        ({"x-api-key": "  "}, None),
        ({}, None),
    ],
)
def test_extract_key(headers: dict[str, str], expected: str | None) -> None:
    assert extract_key(headers) == expected
    assert extract_key(CIMultiDict(headers)) == expected
