"""NexGate API keys: format, checksum, hashing and extraction from requests.

A key looks like ``ngk_<public_id>_<secret><checksum>``:

* ``public_id``: 12 base62 chars; the database lookup key, safe to show and log.
* ``secret``: 32 base62 chars (~190 bits) from ``secrets``; only its bcrypt hash is stored.
* ``checksum``: 6 base62 chars of CRC32 over everything before it. CRC32 catches
  every single-character typo and adjacent swap, so garbage is turned away
  without a database lookup or a bcrypt call (the idea behind GitHub's tokens).
  It is not a secret and proves nothing about authenticity.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
import secrets
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Mapping

import bcrypt

KEY_PREFIX = "ngk_"
BASE62_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
PUBLIC_ID_LENGTH = 12
SECRET_LENGTH = 32
# Longer secrets parse too, so the generator can grow them without breaking old keys.
MAX_SECRET_LENGTH = 64
CHECKSUM_LENGTH = 6  # 62**6 > 2**32, so any CRC32 fits
MAX_KEY_LENGTH = 200

DEFAULT_BCRYPT_ROUNDS = 12
# bcrypt ignores bytes past 72; refuse them instead of silently truncating.
_BCRYPT_MAX_BYTES = 72

_KEY_PATTERN = re.compile(
    rf"{KEY_PREFIX}([0-9A-Za-z]{{{PUBLIC_ID_LENGTH}}})_"
    rf"([0-9A-Za-z]{{{SECRET_LENGTH},{MAX_SECRET_LENGTH}}})([0-9A-Za-z]{{{CHECKSUM_LENGTH}}})"
)


@dataclass(frozen=True, slots=True)
class GeneratedKey:
    """A new key. Show ``plaintext`` to the user once; store ``public_id``, ``prefix`` and the secret's hash."""

    plaintext: str = field(repr=False)
    public_id: str
    prefix: str
    secret: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class ParsedKey:
    """A well-formed key with a valid checksum; it still has to be checked against the database."""

    public_id: str
    prefix: str
    secret: str = field(repr=False)


def _random_base62(length: int) -> str:
    return "".join(secrets.choice(BASE62_ALPHABET) for _ in range(length))


def _base62_fixed(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        value, digit = divmod(value, 62)
        chars.append(BASE62_ALPHABET[digit])
    return "".join(reversed(chars))


def _checksum(body: str) -> str:
    return _base62_fixed(zlib.crc32(body.encode("ascii")), CHECKSUM_LENGTH)


def display_prefix(public_id: str) -> str:
    """The part of a key that may be stored in clear and shown in UIs and logs."""
    return KEY_PREFIX + public_id


def generate_key() -> GeneratedKey:
    public_id = _random_base62(PUBLIC_ID_LENGTH)
    secret = _random_base62(SECRET_LENGTH)
    body = f"{KEY_PREFIX}{public_id}_{secret}"
    return GeneratedKey(
        plaintext=body + _checksum(body),
        public_id=public_id,
        prefix=display_prefix(public_id),
        secret=secret,
    )


def parse_key(text: object) -> ParsedKey | None:
    """Split a key into its parts, or None if it is malformed or its checksum is wrong.

    Cheap and bounded: never touches the database or bcrypt.
    """
    if not isinstance(text, str) or len(text) > MAX_KEY_LENGTH or not text.startswith(KEY_PREFIX):
        return None
    match = _KEY_PATTERN.fullmatch(text)
    if match is None:
        return None
    public_id, secret, checksum = match.groups()
    # The checksum is public, but comparing in constant time costs nothing.
    if not hmac.compare_digest(checksum, _checksum(text[:-CHECKSUM_LENGTH])):
        return None
    return ParsedKey(public_id=public_id, prefix=display_prefix(public_id), secret=secret)


def hash_secret(secret: str, *, rounds: int = DEFAULT_BCRYPT_ROUNDS) -> str:
    """bcrypt hash of a key's secret, as text for the database."""
    encoded = secret.encode("utf-8")
    if len(encoded) > _BCRYPT_MAX_BYTES:
        raise ValueError("secret is too long for bcrypt")
    return bcrypt.hashpw(encoded, bcrypt.gensalt(rounds=rounds)).decode("ascii")


def verify_secret(secret: str, secret_hash: str) -> bool:
    """True if the secret matches the stored bcrypt hash. Never raises on bad input."""
    try:
        encoded = secret.encode("utf-8")
        if len(encoded) > _BCRYPT_MAX_BYTES:
            return False
        return bcrypt.checkpw(encoded, secret_hash.encode("ascii"))
    except (ValueError, TypeError, AttributeError, UnicodeError):
        # A corrupt or non-bcrypt stored hash must read as "no match", not a 500.
        return False


# bcrypt costs ~100-250 ms of CPU at cost 12; a small pool of its own keeps a
# burst of logins from starving the default executor (DNS lookups, file I/O).
_BCRYPT_WORKERS = max(1, min(4, os.cpu_count() or 1))
_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _bcrypt_executor() -> ThreadPoolExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=_BCRYPT_WORKERS, thread_name_prefix="nexgate-bcrypt")
        return _executor


MAX_PENDING_VERIFICATIONS = 4 * _BCRYPT_WORKERS
"""Verifications queued or running at once; past it ``verify_secret_async`` refuses at once (a flood of
forged keys must not pile up threads and seconds of queue in front of real sign-ins)."""
_pending = 0
_pending_lock = threading.Lock()


class VerifierBusy(Exception):
    """Too many bcrypt verifications are queued: answer "retry shortly" instead of waiting."""


def _verification_done(_: object) -> None:
    global _pending
    with _pending_lock:
        _pending -= 1


async def verify_secret_async(secret: str, secret_hash: str) -> bool:
    """`verify_secret` off the event loop, on the dedicated bcrypt pool. Raises VerifierBusy when
    ``MAX_PENDING_VERIFICATIONS`` are already queued or running."""
    global _pending
    with _pending_lock:
        if _pending >= MAX_PENDING_VERIFICATIONS:
            raise VerifierBusy
        _pending += 1
    try:
        work = _bcrypt_executor().submit(verify_secret, secret, secret_hash)
    except BaseException:
        _verification_done(None)
        raise
    work.add_done_callback(_verification_done)  # when the work really ends, even if the caller gave up
    return await asyncio.wrap_future(work)


async def hash_secret_async(secret: str, *, rounds: int = DEFAULT_BCRYPT_ROUNDS) -> str:
    """`hash_secret` off the event loop, on the dedicated bcrypt pool."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_bcrypt_executor(), lambda: hash_secret(secret, rounds=rounds))


def shutdown_bcrypt_executor() -> None:
    """Stop the bcrypt pool (at gateway shutdown); it is recreated on next use."""
    global _executor
    with _executor_lock:
        executor, _executor = _executor, None
    if executor is not None:
        executor.shutdown(wait=False, cancel_futures=True)


def cache_key(plaintext: str) -> bytes:
    """SHA-256 of the whole key: an in-memory cache index that never holds the key itself."""
    return hashlib.sha256(plaintext.encode("utf-8")).digest()


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None:
        return value
    # Plain dicts are case-sensitive; aiohttp's CIMultiDict already matched above.
    for key, candidate in headers.items():
        if key.lower() == name:
            return candidate
    return None


def extract_key(headers: Mapping[str, str]) -> str | None:
    """The client's key from ``Authorization: Bearer <key>`` (OpenAI SDKs) or ``x-api-key`` (Anthropic SDKs)."""
    authorization = _header(headers, "authorization")
    if authorization:
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer" and token:
            return token
    api_key = _header(headers, "x-api-key")
    if api_key:
        api_key = api_key.strip()
        if api_key:
            return api_key
    return None
